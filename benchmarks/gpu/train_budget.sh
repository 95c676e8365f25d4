#!/usr/bin/env bash
# Within a fixed time budget on a GPU: train the candidate models side by side (train_gpu.py) and collect what
# they wrote in OUT. Run on the GPU machine from the repository root, CIFAR-10's archives in data/cifar10:
#
#   OUT=/some/folder bash benchmarks/gpu/train_budget.sh 540    # seconds for the training driver, all told
#
# Back in OUT: driver.log, plan.json (probe times, chosen epochs, exact commands, final log lines),
# gpu_utilisation.csv, and runs.tar.gz (each run's weights, card, log; checkpoints of unfinished runs).
set -uo pipefail
total="${1:-540}"
work=/tmp/gpu
export PYTHONUNBUFFERED=1 PYTHONPATH=. ROBUSTNORM_CACHE=/tmp/robustnorm-cache
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# MPS lets the concurrent runs' small kernels share the GPU without context switches; off if it does not work.
if nvidia-cuda-mps-control -d 2>/dev/null &&
    timeout 60 python3 -c "import torch; assert torch.ones(8, device='cuda').sum().item() == 8"; then
    echo "MPS on"
else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    echo "MPS off"
fi
timeout $((total + 15)) python3 benchmarks/gpu/train_gpu.py --total-s "$total" --out "$work" --data data/cifar10 \
    2>&1 | tee "$OUT/driver.log"
cp "$work/plan.json" "$work/gpu_utilisation.csv" "$OUT/" 2>/dev/null
if [ -f "$work/runs.tar.gz" ]; then
    cp "$work/runs.tar.gz" "$OUT/"
else
    tar czf "$OUT/partial.tar.gz" -C "$work" .
fi
ls -la "$OUT"
