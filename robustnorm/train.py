"""Training a CIFAR-10 model with BatchNorm or RobustNorm layers: ``train(TrainConfig(...))`` and ``robustnorm train``.

The model trains on 45,000 images of the training archive; the other 5,000 (a fixed, stratified split,
:func:`robustnorm.data.cifar10_train_val`) are the validation set, evaluated with ``frozen`` statistics after
every epoch. From Python, ``model, card = train(TrainConfig(arch="resnet20", norm="robustnorm", out=Path("runs/rn")))``;
from the command line, one process or several under torchrun (each flag sets the config field of its name)::

    robustnorm train --arch resnet20 --norm robustnorm --p 0.2 --out runs/resnet20-rn
    torchrun --standalone --nproc-per-node 4 -m robustnorm.train --arch resnet20 --out runs/resnet20-bn

Under torchrun (DistributedDataParallel; NCCL on CUDA, gloo on CPU) ``--batch-size`` is the global batch:
every rank takes its share of each global batch, and the norm layers all-reduce their batch statistics
(:func:`robustnorm.enable_sync`), so N processes compute what one process with the whole batch would.

Written to ``--out`` (by rank 0 only): ``log.jsonl`` (one JSON line per epoch), ``checkpoint.pt`` (after
every epoch; continue with ``--resume``), and at the end the model (``robustnorm.save_model``: weights and
a card with policy ``frozen``; calibration is a separate command).

``--swa-epochs K`` ends the run with stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads
to Wider Optima"): the schedule anneals to ``--swa-lr`` by epoch EPOCHS - K and holds it for the last K epochs,
the weights at the end of each of those epochs are averaged, and since an average of weights has no running
statistics of its own, one more pass over the augmented training images (no gradient steps) recomputes them
as a plain mean over its batches. The saved model is the average.

Every random choice (initialisation, shuffling, augmentation, attack starts) comes from ``--seed`` and the
epoch or step, so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .io import ModelCard, save_model
from .models import list_architectures
from .progress import shows_progress
from .train_config import COMPILE_MODES, NORMS, PRECISIONS, SCHEDULES, TrainConfig
from .train_loop import CHECKPOINT_FILE, Processes, Trainer, start_processes

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


def train(config: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None
          ) -> tuple[nn.Module, ModelCard]:
    """Train as ``config`` says; returns the model and its card, which the main process has saved to
    ``config.out``. ``on_epoch(record)`` runs in the main process after each epoch with the epoch's log record.

    Raises ``FileExistsError`` when ``config.out`` holds a checkpoint and ``config.resume`` is not set.
    """
    processes = start_processes(config.device)
    try:
        return _train(config, processes, on_epoch)
    finally:
        if processes.owns_group:
            # Free the run's DDP wrapper and the tensors of finished collectives while the group still
            # exists: left to interpreter shutdown, gloo's threads abort the process now and then.
            gc.collect()
            dist.destroy_process_group()


def _truncate_log(path: Path, epochs: int) -> None:
    """Keep the log lines of the first ``epochs`` epochs: those the checkpoint we start from has seen."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
        path.write_text("".join(line + "\n" for line in kept))


def _train(config: TrainConfig, processes: Processes, on_epoch: Callable[[dict[str, Any]], None] | None
           ) -> tuple[nn.Module, ModelCard]:
    out = config.out
    if (out / CHECKPOINT_FILE).exists() and not config.resume:
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose "
                              "another --out")
    trainer = Trainer(config, processes)
    start_epoch = trainer.load_checkpoint() if config.resume else 0
    progress = processes.is_main and shows_progress(config.progress)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / LOG_FILE, start_epoch)
        logger.info("training %s/%s on %d images (%d steps per epoch), %d process(es) on %s, from epoch %d",
                    config.arch, config.norm, len(trainer.train_set), trainer.steps_per_epoch,
                    processes.world_size, processes.device, start_epoch + 1)

    record: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        stats = trainer.train_epoch(epoch, progress)
        if trainer.swa is not None and epoch >= trainer.swa.first_epoch:
            trainer.swa.add(trainer.model)
            stats["averaged"] = trainer.swa.count
        if processes.is_main:
            val_acc = trainer.validate()
            record = {"epoch": epoch + 1, **stats, "val_acc": val_acc, "seconds": time.perf_counter() - started}
            with (out / LOG_FILE).open("a") as log:
                log.write(json.dumps(record) + "\n")
            trainer.save_checkpoint(epoch + 1)
            if on_epoch is not None:
                on_epoch(record)
        if processes.world_size > 1:
            dist.barrier()  # the other ranks wait while rank 0 validates and writes

    card = trainer.card
    if trainer.swa is not None:
        trainer.swa.copy_to(trainer.model)
        trainer.recompute_statistics()
        if processes.is_main:
            card.training["swa"] = {"epochs": config.swa_epochs, "lr": trainer.swa_lr, "averaged": trainer.swa.count,
                                    "val_acc_last_epoch": record.get("val_acc")}
    if processes.is_main:
        final = {
            "val_acc_frozen": trainer.validate() if trainer.swa is not None or not record else record["val_acc"],
            "train_acc": record.get("train_acc"),
            "train_loss": record.get("train_loss"),
        }
        device = torch.cuda.get_device_name(processes.device) if trainer.cuda else "cpu"
        card.training.update(processes=processes.world_size, train_images=len(trainer.train_set),
                             val_images=len(trainer.val_set), final=final, torch=torch.__version__, device=device)
        card = save_model(trainer.model, card, out)
        logger.info("saved %s (version %s) to %s: validation accuracy %.4f (frozen statistics)%s",
                    card.name, card.version, out, final["val_acc_frozen"],
                    f", the average of the last {trainer.swa.count} epochs' weights" if trainer.swa else "")
    if processes.world_size > 1:
        dist.barrier()  # every rank tears its process group down together, after rank 0 has saved
    return trainer.model, card


# ------------------------------------------------------------------------------------------- command line


def _pixel_fraction(text: str) -> float:
    """A perturbation size in [0, 1] pixels, written as a number or a fraction such as ``8/255``."""
    numerator, _, denominator = text.partition("/")
    try:
        value = float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a perturbation in [0, 1] pixels, got {text!r} = {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _epoch_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted(int(item) for item in text.split(",") if item.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 80,120, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``train`` options on ``parser``."""
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet20", choices=list_architectures(), help="default %(default)s")
    model.add_argument("--norm", default="bn", choices=NORMS,
                       help="normalization layers (default %(default)s)")
    model.add_argument("--p", type=float, default=0.2,
                       help="RobustNorm's power p, with --norm robustnorm (default %(default)s)")
    model.add_argument("--name", help="model name in the card (default cifar10-ARCH-NORM)")
    model.add_argument("--init-from", type=Path, metavar="DIR",
                       help="start from the weights and running statistics of a saved model (a directory "
                       "written by robustnorm train) instead of a random initialisation, e.g. for a second "
                       "cosine cycle (warm restart); its architecture, norm and p must match")

    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="folder with CIFAR-10's train.tar.gz "
                      "as described in docs/data.md (default: $ROBUSTNORM_CIFAR10)")
    data.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images only")
    data.add_argument("--limit-val", type=int, metavar="N", help="validate on the first N validation images only")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="random crop (4-pixel zero padding) and horizontal flip (default on)")
    data.add_argument("--cutout", type=_non_negative_int, default=0, metavar="SIZE",
                      help="also zero a random SIZE x SIZE square of each training image (Cutout; 16 is usual "
                      "for CIFAR-10; default 0: off)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=160, help="default %(default)s")
    optim.add_argument("--batch-size", type=int, default=128,
                       help="global batch size, over all processes (default %(default)s)")
    optim.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default %(default)s)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, Nesterov (default %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=5e-4,
                       help="L2 penalty on weights, none on norm parameters and biases (default %(default)s)")
    optim.add_argument("--label-smoothing", type=float, default=0.0, help="default %(default)s")
    optim.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="linear warm-up from 0 to --lr (default %(default)s)")
    optim.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                       help="after the warm-up (default %(default)s)")
    optim.add_argument("--milestones", type=_epoch_list, help="step schedule: epochs at which the learning "
                       "rate is multiplied by --gamma (default: half and three quarters of --epochs)")
    optim.add_argument("--gamma", type=float, default=0.1, help="default %(default)s")
    optim.add_argument("--swa-epochs", type=_non_negative_int, default=0, metavar="K",
                       help="stochastic weight averaging: hold --swa-lr for the last K epochs, average the weights "
                       "at their ends and recompute the running statistics for the average (default 0: off)")
    optim.add_argument("--swa-lr", type=float, metavar="LR",
                       help="the learning rate held while weights are averaged; the cosine schedule anneals to it "
                       "(default: a fifth of --lr)")

    adversarial = parser.add_argument_group("adversarial training (PGD, Madry et al. 2018)")
    adversarial.add_argument("--adv-eps", type=_pixel_fraction, default=0.0,
                             help="L-inf radius in [0, 1] pixels, e.g. 8/255 (default 0: clean training)")
    adversarial.add_argument("--adv-steps", type=int, default=7, help="PGD steps (default %(default)s)")
    adversarial.add_argument("--adv-step-size", type=_pixel_fraction, help="default eps / 4")

    runtime = parser.add_argument_group("run")
    runtime.add_argument("--out", type=Path, required=True, help="output directory")
    runtime.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_FILE}")
    runtime.add_argument("--seed", type=int, default=0, help="default %(default)s")
    runtime.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    runtime.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="bf16 autocast for convolutions and matmuls (statistics stay float32); auto: bf16 "
                         "on CUDA, fp32 on the CPU, where bf16 pays only with native support (AVX-512 BF16, AMX)")
    runtime.add_argument("--compile", nargs="?", const="default", default=None,
                         choices=COMPILE_MODES, metavar="MODE",
                         help="torch.compile the training forward and backward, in MODE (default: default; "
                         "reduce-overhead adds CUDA graphs): for GPUs, where a ResNet-20 step "
                         "is bound by kernel launches (RobustNorm's per-channel arithmetic fuses); on one CPU core "
                         "it made a bf16 BatchNorm step faster and a RobustNorm step 2x slower "
                         "(benchmarks/bench_train_step.py --compile)")
    runtime.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr (default: when stderr is a terminal and CI is unset)")
    runtime.add_argument("--quiet", dest="progress", action="store_false", default=None,
                         help="no progress bar (as --no-progress)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the parsed flags of :func:`add_arguments` describe (each flag sets the field of its name)."""
    return TrainConfig(**{field.name: getattr(args, field.name) for field in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    """``robustnorm train``: train as the flags say, printing each epoch's log line; returns the exit status."""
    try:
        train(config_from_args(args), on_epoch=lambda record: print(json.dumps(record), flush=True))
    except FileExistsError as error:
        logger.error("%s", error)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m robustnorm.train`` (for torchrun): the same options as ``robustnorm train``."""
    parser = argparse.ArgumentParser(prog="robustnorm train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
