#!/usr/bin/env bash
# One command: set up .venv and serve the bundled default model on 127.0.0.1:8000 (extra flags are passed on
# to robustnorm-serve; `bash scripts/serve.sh --help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "service,onnx"  # ONNX Runtime: the faster engine on the CPU (--engine auto)
echo "==> starting robustnorm-serve${*:+ $*} (ready when it logs 'Uvicorn running'; stop with Ctrl-C)" >&2
exec .venv/bin/robustnorm-serve "$@"
