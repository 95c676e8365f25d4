#!/usr/bin/env bash
# Performance on one GPU, at most 8 minutes in all: each policy's engine throughput against folded-frozen
# BatchNorm and train-mode nn.BatchNorm2d, for the bundled ResNet-20 (32x32) and a random-weight ResNet-50
# (224x224), at batch 8 and 128 (torch.compile for folded-frozen and batch at 128); then the service end to end
# with single-image requests (benchmarks/loadgen.py through benchmarks/serve_compare.py --servers robustnorm).
#
#   bash benchmarks/gpu/perf.sh OUT               # on the GPU machine, from the repository root
#   bash benchmarks/gpu/perf.sh OUT --dry-run     # the same end to end on the CPU with tiny sizes (a few minutes)
#
# Dependencies: the GPU machine has PyTorch, numpy and pillow only. The service's packages (fastapi, uvicorn,
# pydantic-settings, prometheus-client, python-multipart, safetensors, httpx, ...) come as wheels in
# .gpu-wheels/ at the repository root (made here with benchmarks/gpu/fetch_wheels.sh, listed in
# benchmarks/gpu/perf-requirements.txt, and carried along); they are installed with pip --no-index --no-deps into
# a folder of their own that goes on PYTHONPATH, so the machine's PyTorch, numpy and pillow stay as they are.
# Without the folder the packages must already be importable.
#
# Time budgets (seconds, each step is cut off at its own and at what is left of TOTAL_BUDGET):
#   DEPS_BUDGET=45  R20_BUDGET=120  R50_BUDGET=190  SERVICE_BUDGET=105  TOTAL_BUDGET=470  (x3 with --dry-run)
# Everything is written under OUT: engines_resnet20.{json,png}, engines_resnet50.{json,png},
# service_e2e.{json,png} with the server's log, perf.log (this script's own log) and environment.txt.
set -euo pipefail
out="${1:?usage: perf.sh OUT [--dry-run]}"
dry_run=0
[ "${2:-}" = "--dry-run" ] && dry_run=1
py="${PYTHON:-python}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
exec > >(tee -a "$out/perf.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE

scale=$((dry_run ? 3 : 1))  # the CPU of a dry run is slower than the GPU: three times the budgets
total_budget="${TOTAL_BUDGET:-$((470 * scale))}"
started=$SECONDS
budget() {  # the smaller of a step's budget and what is left of the total
    local left=$((total_budget - (SECONDS - started)))
    ((left < 1)) && left=1
    echo $(($1 < left ? $1 : left))
}
step() {  # step NAME BUDGET COMMAND...: run under its budget; a step that fails or times out does not stop the rest
    local name="$1" seconds
    seconds="$(budget $(($2 * scale)))"
    shift 2
    echo "== $name (budget ${seconds} s, $((SECONDS - started)) s used)"
    if timeout --signal=TERM --kill-after=10 "$seconds" "$@"; then
        echo "== $name done in $((SECONDS - step_started)) s"
    else
        echo "== $name FAILED or cut off at its budget (status $?)"
    fi
}

# -- dependencies -------------------------------------------------------------------------------------------
step_started=$SECONDS
if [ -d .gpu-wheels ]; then
    deps="${TMPDIR:-/tmp}/robustnorm-gpu-deps"
    # exactly the wheels of the folder, no resolution: numpy and pillow stay the machine's own
    step deps "${DEPS_BUDGET:-45}" "$py" -m pip install --quiet --no-index --no-deps --upgrade --target "$deps" \
        .gpu-wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$deps"
fi
"$py" -c "import fastapi, uvicorn, httptools, pydantic_settings, prometheus_client, python_multipart, safetensors, httpx" || {
    echo "the service's packages are missing: make .gpu-wheels/ with benchmarks/gpu/fetch_wheels.sh" >&2
    exit 2
}
{
    date +%F
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
    git rev-parse HEAD 2>/dev/null || true
} > "$out/environment.txt"
cat "$out/environment.txt"

if ((dry_run)); then
    device=cpu sizes=2,4 compile=4 r50_compile="" seconds=0.2 threads=2
    service=(--concurrency 1,4 --duration 2 --warmup 1 --threads 1)
else
    device=cuda sizes=8,128 compile=128 r50_compile=128 seconds=1.0 threads=0
    service=(--concurrency 1,32,128 --duration 12 --warmup 3 --threads 4)
fi
engines=("$py" benchmarks/bench_engines.py --policies --device "$device" --sizes "$sizes"
         --min-runs 4 --min-seconds "$seconds" --max-runs 400 --threads "$threads")

# -- engines ------------------------------------------------------------------------------------------------
step_started=$SECONDS
step resnet20 "${R20_BUDGET:-120}" "${engines[@]}" --compile-sizes "$compile" --output "$out/engines_resnet20.json"
step_started=$SECONDS
step resnet50 "${R50_BUDGET:-190}" "${engines[@]}" --architecture resnet50 --compile-sizes "$r50_compile" \
    --output "$out/engines_resnet50.json"

# -- the service end to end ---------------------------------------------------------------------------------
step_started=$SECONDS
step service "${SERVICE_BUDGET:-105}" "$py" benchmarks/serve_compare.py --servers robustnorm --device "$device" \
    --repeats 1 "${service[@]}" --out "$out/service_e2e.json"

echo "== all done in $((SECONDS - started)) s; results in $out"
ls -l "$out"
