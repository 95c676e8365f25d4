#!/usr/bin/env bash
# The CIFAR-10 ResNet-20 models on a CPU with native bf16, one thread per run (two runs side by side on two cores).
#
#   bash benchmarks/cpu/train_cpu.sh bn|rn10|rn02            # first cycle: 60 epochs, lr 0.1 cosine, seed 0
#   bash benchmarks/cpu/train_cpu.sh bn|rn10|rn02 cycle2     # second cycle from the first: lr 0.05, seed 1
#   bash benchmarks/cpu/train_cpu.sh bn|rn10|rn02 cycle3     # third cycle from the second: lr 0.05, seed 2
#   bash benchmarks/cpu/train_cpu.sh bn|rn10 swa             # 20 epochs at lr 0.02 from the last cycle (bn2 or
#                                                            # rn103), their weights averaged: seed 3
#   bash benchmarks/cpu/train_cpu.sh bn|rn10|rn02 long       # one 200-epoch cosine schedule from scratch, lr 0.1,
#                                                            # the last 20 epochs' weights averaged: seed 4
#                                                            # (runs/cpu/SHORT-long; 5.5-6.5 hours on one core)
#
# Writes runs/cpu/SHORT (SHORT2, SHORT3, SHORT-swa, SHORT-long) and SHORT.train.txt; continues from the checkpoint when one exists, so
# a run that was stopped is continued with the same command (benchmarks/cpu/checkpoint.sh moves one between
# machines).
set -euo pipefail
short="${1:?usage: train_cpu.sh bn|rn10|rn02 [cycle2|cycle3|swa|long]}"
case "$short" in
bn) args=(--norm bn --name cifar10-resnet20-bn) ;;
rn10) args=(--norm robustnorm --p 1.0 --name cifar10-resnet20-robustnorm-p1.0) ;;
rn02) args=(--norm robustnorm --p 0.2 --name cifar10-resnet20-robustnorm-p0.2) ;;
*) echo "unknown run $short: use bn, rn10 or rn02" >&2; exit 2 ;;
esac
out="runs/cpu/$short"
case "${2:-}" in
"") args+=(--seed 0) ;;
cycle2 | cycle3)
    cycle="${2#cycle}"
    from="$out"
    [ "$cycle" = 3 ] && from="runs/cpu/${short}2"
    [ -f "$from/model.safetensors" ] || { echo "$from has no finished cycle $((cycle - 1))" >&2; exit 2; }
    args+=(--init-from "$from" --lr 0.05 --warmup-epochs 0 --seed $((cycle - 1)))
    out="runs/cpu/${short}${cycle}"
    ;;
swa)
    from="runs/cpu/${short}3"
    [ "$short" = bn ] && from="runs/cpu/bn2"  # BatchNorm had two cycles
    [ -f "$from/model.safetensors" ] || { echo "$from has no finished cycle" >&2; exit 2; }
    args+=(--init-from "$from" --lr 0.02 --swa-epochs 20 --swa-lr 0.02 --warmup-epochs 0 --seed 3)
    out="runs/cpu/${short}-swa"
    epochs=20
    ;;
long)
    args+=(--swa-epochs 20 --swa-lr 0.01 --seed 4)
    out="runs/cpu/${short}-long"
    epochs=200
    ;;
*) echo "unknown stage ${2}: use cycle2, cycle3, swa or long" >&2; exit 2 ;;
esac
[ -f "$out/checkpoint.pt" ] && args+=(--resume)
mkdir -p runs/cpu
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5 "${PYTHON:-.venv/bin/python}" -m robustnorm.cli train "${args[@]}" \
    --epochs "${epochs:-60}" --batch-size 128 --precision bf16 --device cpu --no-progress --out "$out" >> "$out.train.txt" 2>&1
