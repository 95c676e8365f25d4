#!/usr/bin/env bash
# Create .venv (if missing) and install robustnorm with the given extras, e.g. `scripts/setup.sh service,test`.
# torch is installed first, pinned to TORCH_SPEC (default torch==2.13.0: a CPU build on the project's build
# machines; on other machines pip takes PyPI's build of that release). Set TORCH_SPEC="" to keep what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-service}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
torch_spec="${TORCH_SPEC-torch==2.13.0}"
if [ -n "$torch_spec" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet "$torch_spec"
fi
.venv/bin/pip install --quiet -e ".[${extras}]"
