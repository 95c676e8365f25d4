#!/usr/bin/env bash
# Within a fixed time budget on a GPU: the GPU checks of the training path, then the robustness cells only a GPU
# finishes. Run on the GPU machine from the repository root, CIFAR-10's archives copied into data/cifar10
# (git-ignored; `mkdir -p data/cifar10 && cp /path/to/cifar10/*.tar.gz data/cifar10/`):
#
#   OUT=/some/folder bash benchmarks/gpu/grid_cells.sh 560    # seconds for the whole script, all told
#
# 1. `bench_train_step.py --device cuda`: one ResNet-20 step per norm, precision and layout, RobustNorm with
#    both hand-written training normalisations, and bf16 steps under torch.compile (-> train_step_cuda.json).
# 2. One short RobustNorm training epoch under CUDA's sync debugger: every place that makes the host wait
#    for the GPU is printed once (-> sync_check.txt; the training loop is meant to have none per step).
# 3. `robustnorm evaluate --resume` on a copy of the committed robustness.json: the bundled models' missing
#    grid cells, cheapest first, written after each cell, until the time left runs out (-> robustness.json,
#    evaluate.log). All of them take about 30 minutes of a Hopper GPU: copy the result back (below), then run
#    the script again.
# Merge back with `cp OUT/robustness.json benchmarks/results/robustness/`, then regenerate headline.md and the
# plots (benchmarks/headline.py, benchmarks/plot_robustness.py).
set -uo pipefail
total="${1:-560}"
out="${OUT:?set OUT to the folder for the results}"
export PYTHONUNBUFFERED=1 PYTHONPATH=. ROBUSTNORM_CACHE=/tmp/robustnorm-cache ROBUSTNORM_CIFAR10=data/cifar10
started=$SECONDS
nvidia-smi -L
timeout 200 python3 benchmarks/bench_train_step.py --device cuda --compile --repeats 20 --out "$out/train_step_cuda.json"
timeout 120 python3 - >"$out/sync_check.txt" 2>&1 <<'EOF'
import sys

import torch

from robustnorm.cli import main

torch.cuda.set_sync_debug_mode("warn")
sys.exit(main(["train", "--norm", "robustnorm", "--limit-train", "5120", "--limit-val", "512", "--epochs", "1",
               "--no-progress", "--out", "/tmp/sync-check"]))
EOF
echo "sync warnings: $(grep -c 'synchroniz' "$out/sync_check.txt")"
cp benchmarks/results/robustness/robustness.json "$out/robustness.json"
left=$((total - (SECONDS - started) - 20))
echo "evaluate: ${left} s left"
timeout "$left" python3 -m robustnorm.cli evaluate --models cifar10-resnet20-bn cifar10-resnet20-robustnorm \
    --resume --sections grid --out "$out/robustness.json" >"$out/evaluate.log" 2>&1
echo "evaluate exit $? after $((SECONDS - started)) s"
tail -n 5 "$out/evaluate.log"
