#!/usr/bin/env bash
# Issue 3's models on a CPU with native bf16, one thread per run (two runs side by side on two cores).
#
#   bash benchmarks/cpu/train_cpu.sh bn|rn10|rn02            # first cycle: 60 epochs, lr 0.1 cosine, seed 0
#   bash benchmarks/cpu/train_cpu.sh bn|rn10|rn02 cycle2     # second cycle from the first: lr 0.05, seed 1
#
# Writes runs/cpu/SHORT (or SHORT2) and SHORT.train.txt; continues from the checkpoint when one exists, so
# a run cut off by the end of a session is started again with the same command.
set -euo pipefail
short="${1:?usage: train_cpu.sh bn|rn10|rn02 [cycle2]}"
case "$short" in
bn) args=(--norm bn --name cifar10-resnet20-bn) ;;
rn10) args=(--norm robustnorm --p 1.0 --name cifar10-resnet20-robustnorm-p1.0) ;;
rn02) args=(--norm robustnorm --p 0.2 --name cifar10-resnet20-robustnorm-p0.2) ;;
*) echo "unknown run $short: use bn, rn10 or rn02" >&2; exit 2 ;;
esac
out="runs/cpu/$short"
if [ "${2:-}" = cycle2 ]; then
    [ -f "$out/model.safetensors" ] || { echo "$out has no finished first cycle" >&2; exit 2; }
    args+=(--init-from "$out" --lr 0.05 --warmup-epochs 0 --seed 1)
    out="runs/cpu/${short}2"
else
    args+=(--seed 0)
fi
[ -f "$out/checkpoint.pt" ] && args+=(--resume)
mkdir -p runs/cpu
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5 "${PYTHON:-.venv/bin/python}" -m robustnorm.cli train "${args[@]}" \
    --epochs 60 --batch-size 128 --precision bf16 --device cpu --no-progress --out "$out" >> "$out.train.txt" 2>&1
