"""The ``robustnorm train`` subcommand: train a CIFAR-10 model with BatchNorm or RobustNorm layers.

The model trains on 45,000 images of the training archive; the other 5,000 (a fixed, stratified split,
:func:`robustnorm.data.cifar10_train_val`) are the validation set, evaluated with ``frozen`` statistics after
every epoch. One process, or several under torchrun::

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
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ModelCard, create_model, enable_sync, list_architectures, load_model, policy_layers, save_model
from .attacks import pgd
from .data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar10_train_val,
    crop_flip,
    crop_flip_params,
    cutout,
    cutout_centres,
    iterate_batches,
    make_generator,
    normalize,
    to_float,
)
from .scoring import accuracy

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
INPUT_SIZE = (3, 32, 32)
# Streams of random numbers drawn from --seed; each is seeded with (seed, stream, epoch or step).
_SHUFFLE, _AUGMENT, _ATTACK, _CUTOUT, _STATISTICS = 1, 2, 3, 4, 5
# A resumed run must train the same model on the same data order as the run it continues.
# Settings added after checkpoints were written without them, with the value those runs had.
_ADDED_SINCE = {"cutout": 0}
_RESUME_MUST_MATCH = ("arch", "norm", "p", "seed", "batch_size", "limit_train", "augment", "cutout", "init_from")


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
    model.add_argument("--norm", default="bn", choices=("bn", "robustnorm"),
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
                      "(default: $ROBUSTNORM_CIFAR10, else ../shared/data/cifar10 beside the checkout)")
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
    optim.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
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
    runtime.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                         help="bf16 autocast for convolutions and matmuls (statistics stay float32); auto: bf16 "
                         "on CUDA, fp32 on the CPU, where bf16 pays only with native support (AVX-512 BF16, AMX)")
    runtime.add_argument("--compile", nargs="?", const="default", default=None,
                         choices=("default", "reduce-overhead", "max-autotune"), metavar="MODE",
                         help="torch.compile the training forward and backward, in MODE (default: default; "
                         "reduce-overhead adds CUDA graphs): for GPUs, where a ResNet-20 step "
                         "is bound by kernel launches (RobustNorm's per-channel arithmetic fuses); on one CPU core "
                         "it made a bf16 BatchNorm step faster and a RobustNorm step 2x slower "
                         "(benchmarks/bench_train_step.py --compile)")
    runtime.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr (default: when stderr is a terminal)")


# ------------------------------------------------------------------------------------- small components


@dataclass(frozen=True)
class LearningRateSchedule:
    """Per-step learning rate: linear warm-up to ``base_lr``, then cosine decay to ``floor`` (0 unless
    weights are averaged) or step decay; from step ``hold_from`` on (weight averaging), ``floor`` itself."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    milestones: tuple[int, ...] = ()  # steps at which a step schedule multiplies the rate by gamma
    gamma: float = 0.1
    floor: float = 0.0
    hold_from: int | None = None

    def __call__(self, step: int) -> float:
        if self.hold_from is not None and step >= self.hold_from:
            return self.floor
        end = self.total_steps if self.hold_from is None else self.hold_from
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            progress = (step - self.warmup_steps) / max(1, end - self.warmup_steps)
            return self.floor + 0.5 * (self.base_lr - self.floor) * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.base_lr * self.gamma ** sum(step >= milestone for milestone in self.milestones)


class ProgressBar:
    """A one-line text progress bar, redrawn at most ten times a second (no dependency)."""

    def __init__(self, total: int, label: str, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self._drawn_at = 0.0

    def update(self, done: int, describe: Callable[[], str] | None = None) -> None:
        """Show ``done`` of ``total``; ``describe()`` (called only on a redraw) adds e.g. the running loss."""
        now = time.monotonic()
        if not self.enabled or (now - self._drawn_at < 0.1 and done < self.total):
            return
        self._drawn_at = now
        filled = round(30 * done / max(1, self.total))
        suffix = describe() if describe is not None else ""
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {suffix}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


@dataclass(frozen=True)
class _Processes:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # whether this run initialised the process group (and so destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_processes(device_arg: str) -> _Processes:
    """The device, and the process group when torchrun started several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg)
    if device.type == "cuda":
        if device.index is None:  # under torchrun, each process its own GPU
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    rank = dist.get_rank() if world_size > 1 else 0
    return _Processes(rank, world_size, device, owns_group)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on convolution and linear weights only, not on norm parameters and biases (1-D)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Undo buffer changes (running statistics, batch counts) made by training-mode forwards inside."""
    saved = [buffer.clone() for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, before in zip(model.buffers(), saved, strict=True):
                buffer.copy_(before)


def _truncate_log(path: Path, epochs: int) -> None:
    """Keep the log lines of the first ``epochs`` epochs: those the checkpoint we start from has seen."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
        path.write_text("".join(line + "\n" for line in kept))


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


class _WeightAverage:
    """The running mean of a model's parameters at the ends of epochs ``first_epoch`` onwards (0-based)."""

    def __init__(self, model: nn.Module, first_epoch: int) -> None:
        self.first_epoch = first_epoch
        self.count = 0
        self.average = {name: torch.zeros_like(value, dtype=torch.float32)
                        for name, value in model.named_parameters()}

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        self.count += 1
        for name, value in model.named_parameters():
            self.average[name].add_(value.float() - self.average[name], alpha=1 / self.count)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        if self.count == 0:
            raise ValueError("no weights were averaged: --swa-epochs needs at least one epoch to run")
        for name, value in model.named_parameters():
            value.copy_(self.average[name])

    def state_dict(self) -> dict[str, Any]:
        return {"first_epoch": self.first_epoch, "count": self.count, "average": self.average}

    def load_state_dict(self, state: dict[str, Any] | None, epochs_done: int, path: Path) -> None:
        expected = max(0, epochs_done - self.first_epoch)
        found = 0 if state is None else int(state["count"])
        if found != expected or (state is not None and int(state["first_epoch"]) != self.first_epoch):
            raise ValueError(f"--resume: {path} holds an average of {found} epochs, but averaging from epoch "
                             f"{self.first_epoch + 1} after {epochs_done} epochs needs {expected}: resume with "
                             "the --epochs and --swa-epochs it was started with")
        if state is not None:
            self.count = found
            for name in self.average:
                self.average[name].copy_(state["average"][name])


# ------------------------------------------------------------------------------------------------ train


class _Trainer:
    """One training run: the model, its optimiser and data on this process, and how one step goes."""

    def __init__(self, args: argparse.Namespace, processes: _Processes) -> None:
        self.args, self.processes = args, processes
        device = processes.device
        self.cuda = device.type == "cuda"
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and self.cuda)

        train_set, val_set = cifar10_train_val(args.data)
        # The split is in seeded random order, so a prefix is a random sample that mixes the classes.
        if args.limit_train:
            train_set = train_set.subset(torch.arange(min(args.limit_train, len(train_set))))
        if args.limit_val:
            val_set = val_set.subset(torch.arange(min(args.limit_val, len(val_set))))
        if args.batch_size % processes.world_size:
            raise ValueError(f"--batch-size {args.batch_size} must divide among {processes.world_size} processes")
        self.steps_per_epoch = len(train_set) // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
        # uint8 CIFAR-10 is 138 MB: keep it on the device and gather batches there.
        self.train_set, self.val_set = train_set.to(device), val_set.to(device)
        self.local_batch = args.batch_size // processes.world_size
        self.card = _card(args, train_set.classes)

        torch.manual_seed(args.seed)  # identical initial weights on every rank and in every resumed run
        norm_kwargs = {"p": args.p} if args.norm == "robustnorm" else {}
        self.model = create_model(args.arch, norm=args.norm, num_classes=len(train_set.classes), **norm_kwargs)
        if args.init_from is not None:
            self._initialise_from(args.init_from)
        # Channels-last suits cuDNN and oneDNN's bf16 kernels (a bf16 CPU step measured 1.3x faster than NCHW)
        # and takes RobustNorm's fast training path; fp32 CPU runs stay NCHW, whose sums match the float64
        # checks of distributed training to 1e-5.
        self.channels_last = self.cuda or self.bf16
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its convolution algorithms
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(device=device, memory_format=layout)
        self.network: nn.Module = self.model
        if processes.world_size > 1:
            enable_sync(self.model)
            device_ids = [device.index] if self.cuda else None
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if args.compile:  # the training steps only; validation, attacks and saving use the eager self.model
            self.network = torch.compile(self.network, mode=args.compile)
        self.optimizer = torch.optim.SGD(_parameter_groups(self.model, args.weight_decay), lr=args.lr,
                                         momentum=args.momentum, nesterov=True)
        milestones = args.milestones or (args.epochs // 2, (3 * args.epochs) // 4)
        if args.swa_lr is not None and not args.swa_epochs:
            raise ValueError("--swa-lr is the rate held while weights are averaged: it needs --swa-epochs")
        if args.swa_epochs > args.epochs:
            raise ValueError(f"--swa-epochs {args.swa_epochs} is more than --epochs {args.epochs}")
        self.swa = _WeightAverage(self.model, first_epoch=args.epochs - args.swa_epochs) if args.swa_epochs else None
        self.swa_lr = args.lr / 5 if args.swa_lr is None else args.swa_lr
        self.schedule = LearningRateSchedule(
            base_lr=args.lr,
            total_steps=args.epochs * self.steps_per_epoch,
            warmup_steps=round(args.warmup_epochs * self.steps_per_epoch),
            kind=args.schedule,
            milestones=tuple(epoch * self.steps_per_epoch for epoch in milestones),
            gamma=args.gamma,
            floor=self.swa_lr if self.swa else 0.0,
            hold_from=(args.epochs - args.swa_epochs) * self.steps_per_epoch if self.swa else None,
        )

    def _initialise_from(self, directory: Path) -> None:
        start, card = load_model(directory)
        wanted = (self.args.arch, self.args.norm, self.args.p if self.args.norm == "robustnorm" else None)
        if (card.architecture, card.norm, card.p) != wanted:
            raise ValueError(f"--init-from {directory}: a {card.architecture}/{card.norm} (p={card.p}) model, not "
                             f"{wanted[0]}/{wanted[1]} (p={wanted[2]})")
        self.model.load_state_dict(start.state_dict())
        self.card.training["init_from"] = {"path": str(directory), "name": card.name, "version": card.version,
                                           "epochs": card.training.get("epochs")}

    def autocast(self) -> Any:
        return torch.autocast(self.processes.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels to the network's input: normalised, in the model's memory format."""
        x = normalize(x01, CIFAR10_MEAN, CIFAR10_STD)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def config(self) -> dict[str, Any]:
        # plain values only: checkpoints load with weights_only=True
        return {key: str(value) if isinstance(value := getattr(self.args, key), Path) else value
                for key in _RESUME_MUST_MATCH}

    def validate(self) -> float:
        """Validation accuracy with ``frozen`` statistics (the card's policy)."""
        self.model.eval()
        try:
            x01 = to_float(self.val_set.images)
            return accuracy(self.model, self.card, x01, self.val_set.labels, policy="frozen", group_size=1)
        finally:
            self.model.train()

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": epoch, "config": self.config()}
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        _save_atomically(state, self.args.out / CHECKPOINT_FILE)

    def load_checkpoint(self) -> int:
        """Restore from ``OUT/checkpoint.pt``; returns the number of epochs it had completed."""
        path = self.args.out / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start afresh")
        state = torch.load(path, map_location=self.processes.device, weights_only=True)
        saved = {**_ADDED_SINCE, **state["config"]}
        differences = {key: (value, saved.get(key)) for key, value in self.config().items()
                       if value != saved.get(key)}
        if differences:
            raise ValueError(f"--resume: {path} was trained with other settings (now, then): {differences}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        epoch = int(state["epoch"])
        if self.swa is not None:
            self.swa.load_state_dict(state.get("swa"), epoch, path)
        elif "swa" in state:
            raise ValueError(f"--resume: {path} was averaging weights; resume it with the same --swa-epochs")
        return epoch

    # -- weight averaging ---------------------------------------------------------------------------
    @torch.no_grad()
    def recompute_statistics(self) -> None:
        """Running statistics for the current weights: one pass over the training images, augmented as in
        training (zero padding widens the value ranges RobustNorm tracks), each layer's statistics the plain
        mean over the pass's batches (synchronised across ranks like a training step's)."""
        args, processes = self.args, self.processes
        layers = [layer for _, layer in policy_layers(self.model)]
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average
        self.model.train()
        batches = iterate_batches(self.train_set, args.batch_size,
                                  generator=make_generator(args.seed, _STATISTICS, 0), drop_last=True,
                                  rank=processes.rank, world_size=processes.world_size)
        try:
            for index, (images, _) in enumerate(batches):
                images = self.augment(images, (_STATISTICS, 1, index), (_STATISTICS, 2, index))
                with self.autocast():
                    self.model(self.prepare(to_float(images)))
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum

    # -- steps ------------------------------------------------------------------------------------------
    def augment(self, images: torch.Tensor, crop_stream: tuple[int, ...],
                cutout_stream: tuple[int, ...]) -> torch.Tensor:
        """This rank's share of a global batch, augmented as ``--augment`` and ``--cutout`` say. The random draws
        (seeded with ``--seed`` and the streams' keys) belong to the whole global batch and are sliced, so any
        number of ranks sees the same images."""
        args, processes = self.args, self.processes
        share = slice(processes.rank * self.local_batch, (processes.rank + 1) * self.local_batch)
        if args.augment:
            offsets, flips = crop_flip_params(args.batch_size, make_generator(args.seed, *crop_stream),
                                              device=processes.device)
            images = crop_flip(images, offsets[share], flips[share])
        if args.cutout:
            centres = cutout_centres(args.batch_size, *images.shape[2:], make_generator(args.seed, *cutout_stream),
                                     device=processes.device)
            images = cutout(images, centres[share], args.cutout)
        return images

    def adversarial(self, x01: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """PGD examples against the training forward (batch statistics, synchronised across ranks)."""
        args = self.args

        def forward(z: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model(self.prepare(z))

        generator = make_generator(args.seed, _ATTACK, step, self.processes.rank, device=self.processes.device)
        with _buffers_kept(self.model):  # attack forwards must not move the running statistics
            return pgd(forward, x01, labels, args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size,
                       generator=generator)

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        args, processes = self.args, self.processes
        self.network.train()
        totals = torch.zeros(3, device=processes.device)  # loss sum, correct, images
        bar = ProgressBar(self.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", progress)
        describe = lambda: f"loss {totals[0].item() / max(1.0, totals[2].item()):.3f}"
        batches = iterate_batches(self.train_set, args.batch_size, generator=make_generator(args.seed, _SHUFFLE, epoch),
                                  drop_last=True, rank=processes.rank, world_size=processes.world_size)
        started = time.perf_counter()
        lr = math.nan
        for index, (images, labels) in enumerate(batches):
            step = epoch * self.steps_per_epoch + index
            lr = self.schedule(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x01 = to_float(self.augment(images, (_AUGMENT, step), (_CUTOUT, step)))
            if args.adv_eps > 0:
                x01 = self.adversarial(x01, labels, step)
            with self.autocast():
                logits = self.network(self.prepare(x01))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():  # on the device, without waiting for it: no host copy, no .item()
                correct = (logits.argmax(dim=1) == labels).sum()
                totals[:2] += torch.stack([loss.detach() * labels.numel(), correct.float()])
                totals[2] += labels.numel()
            bar.update(index + 1, describe)
        bar.close()
        if processes.world_size > 1:
            dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        loss_sum, correct, images = totals.tolist()
        return {"lr": lr, "train_loss": loss_sum / images, "train_acc": correct / images,
                "images_per_s": images / seconds}


def _card(args: argparse.Namespace, classes: tuple[str, ...]) -> ModelCard:
    """The saved model's card; ``training`` is completed with the run's figures at the end."""
    arguments = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                 if isinstance(value, (str, int, float, bool, tuple, Path, type(None)))}
    adversarial = None
    if args.adv_eps > 0:
        step_size = args.adv_step_size or args.adv_eps / 4
        adversarial = {"eps": args.adv_eps, "steps": args.adv_steps, "step_size": step_size}
    return ModelCard(
        name=args.name or f"cifar10-{args.arch}-{args.norm}",
        architecture=args.arch,
        norm=args.norm,
        p=args.p if args.norm == "robustnorm" else None,
        labels=list(classes),
        input_size=list(INPUT_SIZE),
        mean=list(CIFAR10_MEAN),
        std=list(CIFAR10_STD),
        policy="frozen",
        training={
            "command": shlex.join(sys.argv),
            "arguments": arguments,
            "seed": args.seed,
            "epochs": args.epochs,
            "dataset": "CIFAR-10 (JPEG q75)",
            "adversarial": adversarial,
        },
    )


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say (see :func:`add_arguments`); returns the process exit status."""
    processes = _start_processes(args.device)
    try:
        return _run(args, processes)
    finally:
        if processes.owns_group:
            # Free the run's DDP wrapper and the tensors of finished collectives while the group still
            # exists: left to interpreter shutdown, gloo's threads abort the process now and then.
            gc.collect()
            dist.destroy_process_group()


def _run(args: argparse.Namespace, processes: _Processes) -> int:
    out: Path = args.out
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.exists() and not args.resume:
        logger.error("%s already holds a checkpoint: pass --resume to continue it, or choose another --out", out)
        return 2
    trainer = _Trainer(args, processes)
    start_epoch = trainer.load_checkpoint() if args.resume else 0
    progress = processes.is_main and (sys.stderr.isatty() if args.progress is None else args.progress)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / LOG_FILE, start_epoch)
        logger.info("training %s/%s on %d images (%d steps per epoch), %d process(es) on %s, from epoch %d",
                    args.arch, args.norm, len(trainer.train_set), trainer.steps_per_epoch,
                    processes.world_size, processes.device, start_epoch + 1)

    record: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        stats = trainer.train_epoch(epoch, progress)
        if trainer.swa is not None and epoch >= trainer.swa.first_epoch:
            trainer.swa.add(trainer.model)
            stats["averaged"] = trainer.swa.count
        if processes.is_main:
            val_acc = trainer.validate()
            record = {"epoch": epoch + 1, **stats, "val_acc": val_acc, "seconds": time.perf_counter() - started}
            line = json.dumps(record)
            with (out / LOG_FILE).open("a") as log:
                log.write(line + "\n")
            trainer.save_checkpoint(epoch + 1)
            print(line, flush=True)
        if processes.world_size > 1:
            dist.barrier()  # the other ranks wait while rank 0 validates and writes

    if trainer.swa is not None:
        trainer.swa.copy_to(trainer.model)
        trainer.recompute_statistics()
        if processes.is_main:
            trainer.card.training["swa"] = {"epochs": args.swa_epochs, "lr": trainer.swa_lr,
                                            "averaged": trainer.swa.count, "val_acc_last_epoch": record.get("val_acc")}
    if processes.is_main:
        final = {
            "val_acc_frozen": trainer.validate() if trainer.swa is not None or not record else record["val_acc"],
            "train_acc": record.get("train_acc"),
            "train_loss": record.get("train_loss"),
        }
        device = torch.cuda.get_device_name(processes.device) if trainer.cuda else "cpu"
        trainer.card.training.update(processes=processes.world_size, train_images=len(trainer.train_set),
                                     val_images=len(trainer.val_set), final=final, torch=torch.__version__,
                                     device=device)
        card = save_model(trainer.model, trainer.card, out)
        logger.info("saved %s (version %s) to %s: validation accuracy %.4f (frozen statistics)%s",
                    card.name, card.version, out, final["val_acc_frozen"],
                    f", the average of the last {trainer.swa.count} epochs' weights" if trainer.swa else "")
    if processes.world_size > 1:
        dist.barrier()  # every rank tears its process group down together, after rank 0 has saved
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
