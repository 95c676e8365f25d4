#!/usr/bin/env bash
# The 200-epoch CPU runs (train_cpu.sh SHORT long) take 5.5-6.5 hours on a core, longer than a session, and a
# session's machine, with the git-ignored runs/, does not outlive it (session 10 lost runs at epochs 78 and 86).
# This keeps a run's resumable state in the repository between sessions:
#
#   bash benchmarks/cpu/carry.sh save bn|rn02      # before a session ends: the checkpoint (weights, momentum,
#                                                   # averaged weights once averaging starts, epoch), the epoch
#                                                   # log and the console log -> benchmarks/cpu/carried/SHORT-long/;
#                                                   # then commit that folder
#   bash benchmarks/cpu/carry.sh restore bn|rn02   # at the start of the next: back into runs/cpu/SHORT-long/,
#                                                   # then `bash benchmarks/cpu/train_cpu.sh SHORT long` resumes
#
# About 2.2 MB per run and save. A finished run is bundled (scripts/bundle_model.py) or recorded, and its
# carried folder deleted.
set -euo pipefail
cd "$(dirname "$0")/../.."
action="${1:?usage: carry.sh save|restore bn|rn02}"
short="${2:?usage: carry.sh save|restore bn|rn02}"
run="runs/cpu/$short-long"
carried="benchmarks/cpu/carried/$short-long"
case "$action" in
save)
    [ -f "$run/checkpoint.pt" ] || { echo "$run has no checkpoint to save" >&2; exit 2; }
    mkdir -p "$carried"
    cp "$run/checkpoint.pt" "$run/log.jsonl" "$carried/"
    cp "$run.train.txt" "$carried/train.txt"
    echo "saved $run at epoch $(wc -l < "$run/log.jsonl") into $carried"
    ;;
restore)
    [ -f "$carried/checkpoint.pt" ] || { echo "$carried holds no carried run" >&2; exit 2; }
    if [ -f "$run/checkpoint.pt" ] && [ "$(wc -l < "$run/log.jsonl")" -gt "$(wc -l < "$carried/log.jsonl")" ]; then
        echo "$run is ahead of $carried: left as it is" >&2
        exit 0
    fi
    mkdir -p "$run"
    cp "$carried/checkpoint.pt" "$carried/log.jsonl" "$run/"
    cp "$carried/train.txt" "$run.train.txt"
    echo "restored $run at epoch $(wc -l < "$run/log.jsonl")"
    ;;
*) echo "unknown action $action: use save or restore" >&2; exit 2 ;;
esac
