#!/usr/bin/env bash
# The candidate models from scratch on one GPU: train, calibrate, evaluate, in stages that each can be cut off
# and resumed. Run from the repository root with the CIFAR-10 archives copied into data/cifar10 (git-ignored)
# and results written under OUT (default runs/gpu).
#
#   bash benchmarks/gpu/pipeline.sh train       # BN, RobustNorm p=0.2 and p=1.0 trained side by side (resumable)
#   bash benchmarks/gpu/pipeline.sh calibrate   # MIN_BATCH, N0, drift calibration on the validation split
#   bash benchmarks/gpu/pipeline.sh evaluate    # the robustness grid, drift evidence, ART cross-check, plots
#
# Knobs: EPOCHS (default 60), BATCH (128), GRID (core), ROBUST_IMAGES (2000), LIMIT_TRAIN (unset = 45,000),
# VAL_IMAGES (5,000), TEST_IMAGES (10,000).
# A stage that stops at the time limit resumes when called again: train from its checkpoints, evaluate from the
# cells already in robustness.json (written after every cell); calibrate redoes its work. Dry run on a CPU: EPOCHS=1 LIMIT_TRAIN=512 VAL_IMAGES=256 GRID=smoke
# ROBUST_IMAGES=40 TEST_IMAGES=200 ART_N=8 ...
set -euo pipefail
stage="${1:?usage: pipeline.sh train|calibrate|evaluate}"
out="${OUT:-runs/gpu}"
export ROBUSTNORM_CIFAR10="${ROBUSTNORM_CIFAR10:-data/cifar10}"
export PYTHONPATH="${PYTHONPATH:-.}"
py="${PYTHON:-python}"
epochs="${EPOCHS:-60}"
models=("bn:cifar10-resnet20-bn:--norm bn" "rn02:cifar10-resnet20-robustnorm-p0.2:--norm robustnorm --p 0.2"
        "rn10:cifar10-resnet20-robustnorm-p1.0:--norm robustnorm --p 1.0")
mkdir -p "$out"
case "$stage" in
train)
    for spec in "${models[@]}"; do
        IFS=: read -r short name args <<<"$spec"
        resume=()
        [ -f "$out/$short/checkpoint.pt" ] && resume=(--resume)
        # shellcheck disable=SC2086
        "$py" -m robustnorm.cli train $args --name "$name" --epochs "$epochs" --batch-size "${BATCH:-128}" \
            --seed 0 --no-progress ${LIMIT_TRAIN:+--limit-train "$LIMIT_TRAIN"} "${resume[@]}" --out "$out/$short" \
            > "$out/$short.train.txt" 2>&1 &
    done
    wait
    tail -n 2 "$out"/*/log.jsonl
    ;;
calibrate)
    for spec in "${models[@]}"; do
        IFS=: read -r short _ _ <<<"$spec"
        "$py" -m robustnorm.cli calibrate "$out/$short" ${VAL_IMAGES:+--val-images "$VAL_IMAGES"} \
            > "$out/$short.calibrate.txt" 2>&1 &
    done
    wait
    grep -h "policy" "$out"/*.calibrate.txt
    ;;
evaluate)
    dirs=()
    for spec in "${models[@]}"; do
        IFS=: read -r short _ _ <<<"$spec"
        dirs+=("$out/$short")
    done
    "$py" -m robustnorm.cli evaluate --models "${dirs[@]}" --grid "${GRID:-core}" --resume \
        --robust-images "${ROBUST_IMAGES:-2000}" ${TEST_IMAGES:+--test-images "$TEST_IMAGES"} --out "$out/robustness/robustness.json"
    if "$py" -c "import art" 2>/dev/null; then
        "$py" benchmarks/crosscheck_art.py --models "${dirs[0]}" "${dirs[1]}" "${dirs[2]}" \
            --images "${ROBUST_IMAGES:-2000}" --n "${ART_N:-128}" --out "$out/robustness/crosscheck_art.json"
    fi
    if "$py" -c "import matplotlib" 2>/dev/null; then
        "$py" benchmarks/plot_robustness.py "$out/robustness/robustness.json"
    fi
    "$py" benchmarks/headline.py "$out/robustness/robustness.json"
    ;;
*)
    echo "unknown stage $stage: use train, calibrate or evaluate" >&2
    exit 2
    ;;
esac
