#!/usr/bin/env bash
# One command: set up .venv and serve the bundled default model on 127.0.0.1:8000 (extra flags are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "service"
exec .venv/bin/robustnorm-serve "$@"
