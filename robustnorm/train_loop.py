"""The training loop behind :func:`robustnorm.train.train`: one run's model, optimiser, data, steps and state.

Contracts:
- :class:`Trainer` builds everything a run needs from a :class:`robustnorm.train.TrainConfig` on this process
  (its rank's share of every global batch under torchrun) and runs one epoch at a time;
- every random draw (initialisation, shuffling, augmentation, attack starts) is seeded with the config's seed
  and the epoch or step (:data:`SHUFFLE` ... :data:`STATISTICS` name the streams), so a run resumed from a
  checkpoint repeats exactly what an uninterrupted one would have done;
- a checkpoint holds the model, the optimiser, the completed epochs, the weight average and the settings
  that must match to resume it (:data:`RESUME_MUST_MATCH`); it is written atomically.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attacks import pgd
from .augment import crop_flip, crop_flip_params, cutout, cutout_centres
from .data import CIFAR10_MEAN, CIFAR10_STD, cifar10_train_val, iterate_batches, make_generator, normalize, to_float
from .io import ModelCard, load_model
from .layers import enable_sync, policy_layers
from .models import create_model
from .policy import FROZEN
from .progress import progress_bar
from .scoring import accuracy
from .train_config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"
# Streams of random numbers drawn from the seed; each is seeded with (seed, stream, epoch or step).
SHUFFLE, AUGMENT, ATTACK, CUTOUT, STATISTICS = 1, 2, 3, 4, 5
RESUME_MUST_MATCH = ("arch", "norm", "p", "seed", "batch_size", "limit_train", "augment", "cutout", "init_from")
"""A resumed run must train the same model on the same data order as the run it continues."""


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


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # whether this run initialised the process group (and so destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device_name: str) -> Processes:
    """The device (``auto``: CUDA when available), and the process group when torchrun started several
    processes (NCCL on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if device_name == "auto" else device_name)
    if device.type == "cuda":
        if device.index is None:  # under torchrun, each process its own GPU
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    rank = dist.get_rank() if world_size > 1 else 0
    return Processes(rank, world_size, device, owns_group)


def resume_identity(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must match, as plain values (checkpoints load with
    ``weights_only=True``)."""
    return {key: str(value) if isinstance(value := getattr(config, key), Path) else value
            for key in RESUME_MUST_MATCH}


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


class WeightAverage:
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


class Trainer:
    """One training run on this process: the model, its optimiser and data, and how one step goes."""

    def __init__(self, config: TrainConfig, processes: Processes) -> None:
        self.config, self.processes = config, processes
        device = processes.device
        self.cuda = device.type == "cuda"
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.cuda)

        train_set, val_set = cifar10_train_val(config.data)
        # The split is in seeded random order, so a prefix is a random sample that mixes the classes.
        if config.limit_train:
            train_set = train_set.subset(torch.arange(min(config.limit_train, len(train_set))))
        if config.limit_val:
            val_set = val_set.subset(torch.arange(min(config.limit_val, len(val_set))))
        if config.batch_size % processes.world_size:
            raise ValueError(f"--batch-size {config.batch_size} must divide among {processes.world_size} processes")
        self.steps_per_epoch = len(train_set) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training images")
        # uint8 CIFAR-10 is 138 MB: keep it on the device and gather batches there.
        self.train_set, self.val_set = train_set.to(device), val_set.to(device)
        self.local_batch = config.batch_size // processes.world_size
        self.card: ModelCard = config.new_card(train_set.classes)

        torch.manual_seed(config.seed)  # identical initial weights on every rank and in every resumed run
        norm_kwargs = {"p": config.p} if config.norm == "robustnorm" else {}
        self.model = create_model(config.arch, norm=config.norm, num_classes=len(train_set.classes), **norm_kwargs)
        if config.init_from is not None:
            self._initialise_from(config.init_from)
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
        if config.compile:  # the training steps only; validation, attacks and saving use the eager self.model
            self.network = torch.compile(self.network, mode=config.compile)
        self.optimizer = torch.optim.SGD(_parameter_groups(self.model, config.weight_decay), lr=config.lr,
                                         momentum=config.momentum, nesterov=True)
        milestones = config.milestones or (config.epochs // 2, (3 * config.epochs) // 4)
        swa = config.swa_epochs > 0
        self.swa = WeightAverage(self.model, first_epoch=config.epochs - config.swa_epochs) if swa else None
        self.swa_lr = config.lr / 5 if config.swa_lr is None else config.swa_lr
        self.schedule = LearningRateSchedule(
            base_lr=config.lr,
            total_steps=config.epochs * self.steps_per_epoch,
            warmup_steps=round(config.warmup_epochs * self.steps_per_epoch),
            kind=config.schedule,
            milestones=tuple(epoch * self.steps_per_epoch for epoch in milestones),
            gamma=config.gamma,
            floor=self.swa_lr if swa else 0.0,
            hold_from=(config.epochs - config.swa_epochs) * self.steps_per_epoch if swa else None,
        )

    def _initialise_from(self, directory: Path) -> None:
        start, card = load_model(directory)
        config = self.config
        wanted = (config.arch, config.norm, config.p if config.norm == "robustnorm" else None)
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

    def validate(self) -> float:
        """Validation accuracy with ``frozen`` statistics (the card's policy)."""
        self.model.eval()
        try:
            x01 = to_float(self.val_set.images)
            return accuracy(self.model, self.card, x01, self.val_set.labels, FROZEN, group_size=1)
        finally:
            self.model.train()

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": epoch, "config": resume_identity(self.config)}
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        path = self.config.out / CHECKPOINT_FILE
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)

    def load_checkpoint(self) -> int:
        """Restore from ``OUT/checkpoint.pt``; returns the number of epochs it had completed."""
        path = self.config.out / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start afresh")
        state = torch.load(path, map_location=self.processes.device, weights_only=True)
        differences = {key: (value, state["config"].get(key))
                       for key, value in resume_identity(self.config).items() if value != state["config"].get(key)}
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
        config, processes = self.config, self.processes
        layers = [layer for _, layer in policy_layers(self.model)]
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average
        self.model.train()
        batches = iterate_batches(self.train_set, config.batch_size,
                                  generator=make_generator(config.seed, STATISTICS, 0), drop_last=True,
                                  rank=processes.rank, world_size=processes.world_size)
        try:
            for index, (images, _) in enumerate(batches):
                images = self.augment(images, (STATISTICS, 1, index), (STATISTICS, 2, index))
                with self.autocast():
                    self.model(self.prepare(to_float(images)))
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum

    # -- steps ------------------------------------------------------------------------------------------
    def augment(self, images: torch.Tensor, crop_stream: tuple[int, ...],
                cutout_stream: tuple[int, ...]) -> torch.Tensor:
        """This rank's share of a global batch, augmented as the config says (crop and flip, Cutout). The random
        draws (seeded with the seed and the streams' keys) belong to the whole global batch and are sliced, so
        any number of ranks sees the same images."""
        config, processes = self.config, self.processes
        share = slice(processes.rank * self.local_batch, (processes.rank + 1) * self.local_batch)
        if config.augment:
            offsets, flips = crop_flip_params(config.batch_size, make_generator(config.seed, *crop_stream),
                                              device=processes.device)
            images = crop_flip(images, offsets[share], flips[share])
        if config.cutout:
            centres = cutout_centres(config.batch_size, *images.shape[2:],
                                     make_generator(config.seed, *cutout_stream), device=processes.device)
            images = cutout(images, centres[share], config.cutout)
        return images

    def adversarial(self, x01: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """PGD examples against the training forward (batch statistics, synchronised across ranks)."""
        config = self.config

        def forward(z: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model(self.prepare(z))

        generator = make_generator(config.seed, ATTACK, step, self.processes.rank, device=self.processes.device)
        with _buffers_kept(self.model):  # attack forwards must not move the running statistics
            return pgd(forward, x01, labels, config.adv_eps, steps=config.adv_steps, step_size=config.adv_step_size,
                       generator=generator)

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        """One epoch of steps; its learning rate at the end, mean loss and accuracy, and images per second."""
        config, processes = self.config, self.processes
        self.network.train()
        totals = torch.zeros(3, device=processes.device)  # loss sum, correct, images
        batches = iterate_batches(self.train_set, config.batch_size,
                                  generator=make_generator(config.seed, SHUFFLE, epoch), drop_last=True,
                                  rank=processes.rank, world_size=processes.world_size)
        started = time.perf_counter()
        shown = started
        lr = math.nan
        with progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                          enabled=progress) as bar:
            for index, (images, labels) in enumerate(batches):
                step = epoch * self.steps_per_epoch + index
                lr = self.schedule(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x01 = to_float(self.augment(images, (AUGMENT, step), (CUTOUT, step)))
                if config.adv_eps > 0:
                    x01 = self.adversarial(x01, labels, step)
                with self.autocast():
                    logits = self.network(self.prepare(x01))
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                with torch.no_grad():  # on the device, without waiting for it: no host copy, no .item()
                    correct = (logits.argmax(dim=1) == labels).sum()
                    totals[:2] += torch.stack([loss.detach() * labels.numel(), correct.float()])
                    totals[2] += labels.numel()
                bar.update()
                if progress and time.perf_counter() - shown > 0.5:  # the running loss waits for the device
                    shown = time.perf_counter()
                    bar.set_postfix_str(f"loss {totals[0].item() / max(1.0, totals[2].item()):.3f}", refresh=False)
        if processes.world_size > 1:
            dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        loss_sum, correct, images = totals.tolist()
        return {"lr": lr, "train_loss": loss_sum / images, "train_acc": correct / images,
                "images_per_s": images / seconds}
