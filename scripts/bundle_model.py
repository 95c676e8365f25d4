"""Bundle a trained, calibrated model into the package: ``robustnorm/bundled/NAME/``.

    python scripts/bundle_model.py runs/cpu/bn cifar10-resnet20-bn --calibrate-command "robustnorm calibrate ..."

Copies the weights and card (renamed NAME; the run's name is kept as ``training.trained_as``), the training
log, measures clean accuracy on the whole CIFAR-10 test set (``frozen`` image by image, and the card's policy
in batches of 128) into ``evaluation.test``, and writes COMMAND.md with the exact commands and the figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch

from robustnorm.data import balanced_subset, load_cifar10, to_float
from robustnorm.io import BUNDLED_DIR, load_model, save_model
from robustnorm.runtime import retain_freed_memory
from robustnorm.scoring import accuracy
from robustnorm.train import LOG_FILE

FLOORS = {"cifar10-resnet20-bn": 0.88, "cifar10-resnet20-robustnorm": 0.87}  # as tests/robustnorm/test_bundled.py


def _command(card_command: str) -> str:
    """The training command as a user would type it (the card holds the interpreter's argv)."""
    words = shlex.split(card_command)
    if words and Path(words[0]).name in ("robustnorm", "cli.py", "__main__.py"):
        words[0] = "robustnorm"
    return shlex.join(words)


def _earlier_cycles(training: dict) -> list[tuple[Path, dict]]:
    """The runs this one started from (``--init-from``), first cycle first, each as (directory, training
    record); each must still hold the weights the next cycle started from (same version)."""
    cycles: list[tuple[Path, dict]] = []
    init = training.get("init_from")
    while init:
        run = Path(init["path"])
        card = json.loads((run / "card.json").read_text())
        if card["version"] != init["version"]:
            raise SystemExit(f"{run} now holds version {card['version']}, not the {init['version']} that the next "
                             "cycle started from; bundle from the original runs")
        cycles.insert(0, (run, card["training"]))
        init = card["training"].get("init_from")
    return cycles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="training output directory (model.safetensors, card.json, log.jsonl)")
    parser.add_argument("name", help="bundled name, e.g. cifar10-resnet20-bn")
    parser.add_argument("--calibrate-command", help="the robustnorm calibrate command that was run (to bundle)")
    parser.add_argument("--check-only", action="store_true",
                        help="measure and print the test figures and the floor check, bundle nothing")
    parser.add_argument("--machine", default="a 2-core CPU (AMD EPYC, AVX-512 BF16)", help="where it was trained")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    retain_freed_memory()

    model, card = load_model(args.run)
    test = load_cifar10("test", args.data)
    x01, labels = to_float(test.images), test.labels
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))  # batches must mix classes
    floor_subset = balanced_subset(labels, 100, seed=0)  # tests/robustnorm/test_bundled.py's 1,000 images
    figures = {"images": len(test), "frozen_n1": accuracy(model, card, x01, labels, "frozen", 1),
               f"{card.policy}_n128": accuracy(model, card, x01[order], labels[order], card.policy, 128),
               "batch_n128": accuracy(model, card, x01[order], labels[order], "batch", 128),
               "floor_subset_frozen": accuracy(model, card, x01[floor_subset], labels[floor_subset], "frozen", 100)}
    floor = FLOORS.get(args.name)
    if args.check_only:
        print(json.dumps({"run": str(args.run), "name": args.name, "floor": floor, **figures,
                          "meets_floor": floor is not None and figures["floor_subset_frozen"] >= floor}))
        return 0
    if args.calibrate_command is None:
        parser.error("--calibrate-command is required to bundle")
    if floor is not None and figures["floor_subset_frozen"] < floor:
        parser.error(f"{args.run} reaches {figures['floor_subset_frozen']:.4f} on the floor subset, below {floor}")
    card.evaluation["test"] = {key: round(value, 4) if isinstance(value, float) else value
                               for key, value in figures.items()}
    card.training["trained_as"] = card.name
    card.name = args.name
    out = BUNDLED_DIR / args.name
    if out.exists():
        shutil.rmtree(out)
    earlier = _earlier_cycles(card.training)
    card = save_model(model, card, out)
    shutil.copy(args.run / LOG_FILE, out / "train_log.jsonl")
    logs = []
    for cycle, (run, _) in enumerate(earlier, start=1):
        shutil.copy(run / LOG_FILE, out / f"train_log_cycle{cycle}.jsonl")
        logs.append(f"`train_log_cycle{cycle}.jsonl`")
    commands = [_command(training["command"]) for _, training in earlier] + [_command(card.training["command"])]
    resumed = any("--resume" in command.split() for command in commands)
    final = card.training.get("final", {})
    trained_with = card.training.get("torch", torch.__version__)  # cards from before the field: this machine's
    (out / "COMMAND.md").write_text(
        f"# {args.name}\n\nTrained on {args.machine}, PyTorch {trained_with}, as `{card.training['trained_as']}`, "
        f"with:\n\n```bash\n" + "\n".join(commands) + f"\n{args.calibrate_command}\n"
        f"python {shlex.join(sys.argv)}\n```\n\n"
        + (f"Training ran in {len(commands)} cycles, each from the weights of the one before (`--init-from`); "
           f"their logs are {', '.join(logs)} and `train_log.jsonl` (the last). " if earlier else "")
        + ("`--resume` marks a run continued from its last epoch's checkpoint after it was stopped; without it "
           "the same command trains the run in one go. " if resumed else "")
        + f"`train_log.jsonl` is the training log (one line per epoch). Validation accuracy (frozen, "
        f"{card.training.get('val_images')} images held out from training): "
        f"{final.get('val_acc_frozen', float('nan')):.4f}. Calibrated policy "
        f"`{card.policy}` (`evaluation.calibration` in `card.json`). CIFAR-10 test set (10,000 JPEG q75 images): "
        f"{json.dumps(card.evaluation['test'])}.\n")
    print(f"bundled {args.name} into {out}: test {card.evaluation['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
