#!/usr/bin/env bash
# The 200-epoch CPU runs (train_cpu.sh SHORT long) take 5.5-6.5 hours on a core, and runs/ is git-ignored, so a
# run lives only on the machine it started on. This keeps a run's resumable state in the repository instead,
# so that it can be continued on another machine or after this one is gone:
#
#   bash benchmarks/cpu/checkpoint.sh save bn|rn02      # the checkpoint (weights, momentum, averaged weights
#                                                        # once averaging starts, epoch), the epoch log and the
#                                                        # console log -> benchmarks/cpu/checkpoints/SHORT-long/;
#                                                        # then commit that folder
#   bash benchmarks/cpu/checkpoint.sh restore bn|rn02   # back into runs/cpu/SHORT-long/, then
#                                                        # `bash benchmarks/cpu/train_cpu.sh SHORT long` resumes
#
# About 2.2 MB per run and save. A finished run is bundled (scripts/bundle_model.py) or recorded, and its
# saved folder deleted.
set -euo pipefail
cd "$(dirname "$0")/../.."
action="${1:?usage: checkpoint.sh save|restore bn|rn02}"
short="${2:?usage: checkpoint.sh save|restore bn|rn02}"
run="runs/cpu/$short-long"
saved="benchmarks/cpu/checkpoints/$short-long"
case "$action" in
save)
    [ -f "$run/checkpoint.pt" ] || { echo "$run has no checkpoint to save" >&2; exit 2; }
    mkdir -p "$saved"
    cp "$run/checkpoint.pt" "$run/log.jsonl" "$saved/"
    cp "$run.train.txt" "$saved/train.txt"
    echo "saved $run at epoch $(wc -l < "$run/log.jsonl") into $saved"
    ;;
restore)
    [ -f "$saved/checkpoint.pt" ] || { echo "$saved holds no saved run" >&2; exit 2; }
    if [ -f "$run/checkpoint.pt" ] && [ "$(wc -l < "$run/log.jsonl")" -gt "$(wc -l < "$saved/log.jsonl")" ]; then
        echo "$run is ahead of $saved: left as it is" >&2
        exit 0
    fi
    mkdir -p "$run"
    cp "$saved/checkpoint.pt" "$saved/log.jsonl" "$run/"
    cp "$saved/train.txt" "$run.train.txt"
    echo "restored $run at epoch $(wc -l < "$run/log.jsonl")"
    ;;
*) echo "unknown action $action: use save or restore" >&2; exit 2 ;;
esac
