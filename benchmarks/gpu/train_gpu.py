"""Train the candidate CIFAR-10 models side by side on one GPU, as many epochs as a wall-clock budget allows.

    python benchmarks/gpu/train_gpu.py --total-s 570 --out /tmp/gpu

The time budget is fixed, so the number of epochs is measured, not guessed: every variant first
trains a short probe (3 epochs of --probe-images images) at the same time as the others, as they will share
the GPU in the real runs; the slowest probe epoch, scaled to 45,000 images, sets

    epochs = min(--max-epochs, floor(--safety * seconds left / slowest epoch))

(seconds left: --total-s less the set-up, the probes and a margin for saving).
and all variants then train that many epochs concurrently with plain ``robustnorm train`` commands, written to
``plan.json`` so that each run can be repeated exactly (the epoch count is an ordinary argument). A run still
going at the deadline is stopped; its checkpoint stays and ``--resume`` finishes it. Everything a run wrote
except checkpoints of finished runs goes into ``runs.tar.gz``, with the probe logs and GPU utilisation samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_IMAGES, VAL_IMAGES, PROBE_VAL_IMAGES = 45_000, 5_000, 1_000
SAVE_MARGIN_S = 15  # after the runs: archiving, and the caller copying the results
# short name, model name in the card, robustnorm train options; in order of importance
VARIANTS = {
    "bn": ("cifar10-resnet20-bn", ["--norm", "bn"]),
    "rn10": ("cifar10-resnet20-robustnorm-p1.0", ["--norm", "robustnorm", "--p", "1.0"]),
    "rn02": ("cifar10-resnet20-robustnorm-p0.2", ["--norm", "robustnorm", "--p", "0.2"]),
    "bn-cutout": ("cifar10-resnet20-bn", ["--norm", "bn", "--cutout", "16"]),
    "rn10-cutout": ("cifar10-resnet20-robustnorm-p1.0", ["--norm", "robustnorm", "--p", "1.0", "--cutout", "16"]),
    "rn02-cutout": ("cifar10-resnet20-robustnorm-p0.2", ["--norm", "robustnorm", "--p", "0.2", "--cutout", "16"]),
}


def _command(short: str, out: Path, extra: list[str]) -> list[str]:
    name, options = VARIANTS[short]
    return ["robustnorm", "train", *options, "--name", name, "--seed", "0", "--no-progress", *extra,
            "--out", str(out / short)]


def _launch(commands: dict[str, list[str]], logs: Path) -> dict[str, subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    processes = {}
    for short, command in commands.items():
        argv = [sys.executable, "-m", "robustnorm.cli", *command[1:]]  # `robustnorm` without an installed script
        with (logs / f"{short}.train.txt").open("w") as log:
            processes[short] = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return processes


def _wait(processes: dict[str, subprocess.Popen], deadline: float) -> dict[str, int | None]:
    """Exit codes; None for a process stopped at the deadline."""
    codes: dict[str, int | None] = {}
    for short, process in processes.items():
        try:
            codes[short] = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
            codes[short] = None
    return codes


def _full_epoch_seconds(run: Path, probe_images: int, train_images: int) -> list[float]:
    """Each probe epoch's time scaled to a full one: training at the measured rate on 45,000 images, and the
    rest of the epoch (validation) scaled to 5,000 validation images."""
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    estimates = []
    for line in log.read_text().splitlines():
        epoch = json.loads(line)
        training = probe_images / epoch["images_per_s"]
        rest = max(0.0, epoch["seconds"] - training)
        estimates.append(train_images / epoch["images_per_s"] + rest * VAL_IMAGES / PROBE_VAL_IMAGES)
    return estimates


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--total-s", type=float, required=True,
                        help="wall-clock seconds for all of it, set-up and probes included")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--min-epochs", type=int, default=20, help="give up below this many epochs")
    parser.add_argument("--probe-images", type=int, default=11_520)
    parser.add_argument("--safety", type=float, default=0.9)
    parser.add_argument("--limit-train", type=int, help="train on fewer images (a dry run on the CPU)")
    parser.add_argument("--data", type=Path, help="folder with train.tar.gz (default: robustnorm's search)")
    return parser.parse_args()


def _plan_and_train(args: argparse.Namespace, plan: dict) -> int:
    """Probe, plan and train, recording into ``plan`` as it goes."""
    started = time.monotonic()
    out: Path = args.out
    data = ["--data", str(args.data)] if args.data else []
    try:
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used",
                                    "--format=csv", "-l", "5"], stdout=(out / "gpu_utilisation.csv").open("w"),
                                   stderr=subprocess.DEVNULL)
    except FileNotFoundError:  # no NVIDIA driver: a dry run on the CPU
        sampler = None
    # Decode the archive once (robustnorm's cache) so that the probes start together.
    subprocess.run([sys.executable, "-c", "import sys; from robustnorm.data import load_cifar10; "
                    "load_cifar10('train', *sys.argv[1:])", *([str(args.data)] if args.data else [])],
                   cwd=REPO_ROOT, check=True)
    plan["setup_s"] = round(time.monotonic() - started, 1)

    probe_extra = [*data, "--epochs", "3", "--limit-train", str(args.probe_images),
                   "--limit-val", str(PROBE_VAL_IMAGES)]
    probes = {short: _command(short, out / "probe", probe_extra) for short in args.variants}
    probe_started = time.monotonic()
    codes = _wait(_launch(probes, out / "probe"), deadline=probe_started + 300)
    plan["probe_s"] = round(time.monotonic() - probe_started, 1)
    train_images = args.limit_train or TRAIN_IMAGES
    seconds = {short: _full_epoch_seconds(out / "probe" / short, args.probe_images, train_images)
               for short in args.variants}
    plan["probe"] = {short: {"exit": codes[short], "full_epoch_s": [round(t, 2) for t in seconds[short]]}
                     for short in args.variants}
    working = [short for short in args.variants if codes[short] == 0 and len(seconds[short]) == 3]
    if not working:
        raise SystemExit("no probe finished: see probe/*.train.txt")
    slowest = max(max(seconds[short][1:]) for short in working)  # the first epoch includes warm-up
    budget = args.total_s - (time.monotonic() - started) - SAVE_MARGIN_S
    epochs = min(args.max_epochs, math.floor(args.safety * budget / slowest))
    plan.update(slowest_epoch_s=round(slowest, 2), budget_s=round(budget, 1), epochs=epochs, trained=working)
    if epochs < args.min_epochs:
        raise SystemExit(f"only {epochs} epochs fit the budget")

    limit = ["--limit-train", str(args.limit_train)] if args.limit_train else []
    runs = {short: _command(short, out / "runs", [*data, *limit, "--epochs", str(epochs)]) for short in working}
    plan["commands"] = {short: " ".join(command) for short, command in runs.items()}
    train_started = time.monotonic()
    codes = _wait(_launch(runs, out / "runs"), deadline=train_started + budget)
    plan["train_s"] = round(time.monotonic() - train_started, 1)
    plan["exit"] = codes
    plan["final"] = {}
    for short in working:
        log = out / "runs" / short / "log.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        plan["final"][short] = json.loads(lines[-1]) if lines else None
    if sampler is not None:
        sampler.terminate()
    return 0


def _archive(out: Path) -> None:
    with tarfile.open(out / "runs.tar.gz", "w:gz") as archive:
        for path in sorted((out / "runs").rglob("*")) + sorted((out / "probe").rglob("*")):
            weights = path.suffix in (".pt", ".partial", ".safetensors")
            finished = (path.parent / "model.safetensors").is_file()
            # probes: logs only; runs: everything but the checkpoint of a run that finished
            if path.is_file() and not (weights and ("probe" in path.relative_to(out).parts or
                                                    (path.suffix != ".safetensors" and finished))):
                archive.add(path, arcname=str(path.relative_to(out)))


def main() -> int:
    args = _parse()
    args.out.mkdir(parents=True, exist_ok=True)
    plan: dict = {"total_s": args.total_s, "safety": args.safety, "variants": args.variants}
    try:
        return _plan_and_train(args, plan)
    finally:
        (args.out / "plan.json").write_text(json.dumps(plan, indent=1))
        _archive(args.out)
        print(json.dumps(plan, indent=1))


if __name__ == "__main__":
    sys.exit(main())
