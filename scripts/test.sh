#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite (lint, unit, integration). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "service,onnx,test"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
