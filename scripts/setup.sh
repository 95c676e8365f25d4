#!/usr/bin/env bash
# Create .venv (if missing) and install robustnorm with the given extras, e.g. `scripts/setup.sh service,test`.
# torch is installed first, pinned to TORCH_SPEC (default torch==2.13.0; set TORCH_SPEC="" to keep whatever
# torch the environment has, or e.g. TORCH_SPEC="torch>=2.4"). Each step prints a line, and pip its progress.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-service}"
python="${PYTHON:-python3}"
step() { echo "==> $*" >&2; }
if [ ! -x .venv/bin/python ]; then
    step "creating the virtual environment .venv ($("$python" --version 2>&1))"
    "$python" -m venv .venv
fi
torch_spec="${TORCH_SPEC-torch==2.13.0}"
if [ -n "$torch_spec" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    step "installing $torch_spec (the largest download; a few minutes on a first install)"
    .venv/bin/pip install "$torch_spec"
fi
step "installing robustnorm from this folder with the extras [$extras]"
# pip's lines for packages already installed say nothing new on later runs; its other lines show progress
.venv/bin/pip install -e ".[${extras}]" | { grep -v "^Requirement already satisfied" || true; }
step ".venv is ready"
