#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite (lint, unit, integration, deploy). CI runs exactly this.
# Arguments are passed on to pytest: `bash scripts/test.sh -m "not slow"` skips the slowest tests, and
# `bash scripts/test.sh tests/service` runs one folder.
# As root on Debian or Ubuntu it first installs, with apt-get, the real components the deploy tests run:
# Prometheus (promtool), docker-compose (config validation only) and HAProxy. It says so before it does;
# ROBUSTNORM_NO_APT=1 skips that step, and elsewhere those tests skip unless CI is set.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> $*" >&2; }
missing=()
for tool in promtool docker-compose haproxy; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ] && [ "${ROBUSTNORM_NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    step "running as root: installing the system packages prometheus, docker-compose and haproxy with apt-get" \
         "(missing: ${missing[*]}), which the deploy tests run for real; set ROBUSTNORM_NO_APT=1 to skip this"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus docker-compose haproxy \
        | { grep -E "^(Get|Setting up)" || true; }
fi
bash scripts/setup.sh "service,onnx,test"
# PyTorch threads that spin while waiting stall for seconds when tests share a few cores with other jobs.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
step "ruff check ."
.venv/bin/ruff check .
step "pytest $* (the whole suite takes about 10 minutes on 2 cores; -m \"not slow\" skips the slowest tests)"
.venv/bin/python -m pytest -q "$@"
