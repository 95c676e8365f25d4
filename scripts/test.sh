#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite (lint, unit, integration, deploy). CI runs exactly this.
# As root on Debian it also installs the real components the deploy tests run: Prometheus (promtool),
# docker-compose (config validation only) and HAProxy; elsewhere those tests skip unless CI is set.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in promtool docker-compose haproxy; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus docker-compose haproxy >/dev/null
fi
bash scripts/setup.sh "service,onnx,test"
# PyTorch threads that spin while waiting stall for seconds when tests share a few cores with other jobs.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
