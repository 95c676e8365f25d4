"""What a training run does: :class:`TrainConfig`, one immutable, checked value per setting of ``robustnorm train``.

Contract: a config that builds is one :func:`robustnorm.train.train` can run (settings that contradict each
other fail here, with the flag to change); the command line maps its flags onto it field by field (each flag
``--some-name`` is the field ``some_name``). Its fields are recorded in the trained model's card
(:meth:`TrainConfig.new_card`).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .data import CIFAR10_MEAN, CIFAR10_STD
from .io import ModelCard
from .models import list_architectures

NORMS = ("bn", "robustnorm")
SCHEDULES = ("cosine", "step")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
INPUT_SIZE = (3, 32, 32)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run (``robustnorm train --help`` describes each setting)."""

    # the model
    arch: str = "resnet20"
    norm: str = "bn"
    p: float = 0.2  # RobustNorm's power, with norm "robustnorm"
    name: str | None = None  # in the card (default cifar10-ARCH-NORM)
    init_from: Path | None = None  # a saved model to start from (a second cosine cycle)
    # the data
    data: Path | None = None  # CIFAR-10's folder (default: robustnorm.data.find_cifar10)
    limit_train: int | None = None
    limit_val: int | None = None
    augment: bool = True  # random crop (4-pixel zero padding) and horizontal flip
    cutout: int = 0  # Cutout square size; 0: off
    # the optimisation
    epochs: int = 160
    batch_size: int = 128  # global, over all processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    milestones: tuple[int, ...] | None = None  # step schedule (default: half and three quarters of the epochs)
    gamma: float = 0.1
    swa_epochs: int = 0  # weights averaged over the last K epochs; 0: off
    swa_lr: float | None = None  # held while averaging (default: a fifth of lr)
    # adversarial training (PGD, Madry et al. 2018)
    adv_eps: float = 0.0  # in [0, 1] pixels; 0: clean training
    adv_steps: int = 7
    adv_step_size: float | None = None  # default adv_eps / 4
    # the run
    out: Path
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: str | None = None  # a torch.compile mode
    progress: bool | None = None  # a progress bar; None: when stderr is a terminal and CI is unset

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in list_architectures():
            problems.append(f"--arch {self.arch!r} is not one of {', '.join(list_architectures())}")
        for value, valid, flag in ((self.norm, NORMS, "--norm"), (self.schedule, SCHEDULES, "--schedule"),
                                   (self.precision, PRECISIONS, "--precision")):
            if value not in valid:
                problems.append(f"{flag} {value!r} is not one of {', '.join(valid)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            problems.append(f"--compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.cutout < 0 or self.swa_epochs < 0 or self.epochs < 0:
            problems.append("--cutout, --swa-epochs and --epochs are 0 or more")
        if not 0 <= self.adv_eps <= 1:
            problems.append(f"--adv-eps is in [0, 1] pixels, got {self.adv_eps}")
        if self.swa_lr is not None and not self.swa_epochs:
            problems.append("--swa-lr is the rate held while weights are averaged: it needs --swa-epochs")
        if self.swa_epochs > self.epochs:
            problems.append(f"--swa-epochs {self.swa_epochs} is more than --epochs {self.epochs}")
        if problems:
            raise ValueError("; ".join(problems))

    def arguments(self) -> dict[str, Any]:
        """The settings as JSON values (paths as strings), as the card records them."""
        return {field.name: str(value) if isinstance(value := getattr(self, field.name), Path) else value
                for field in fields(self)}

    def new_card(self, classes: tuple[str, ...]) -> ModelCard:
        """The trained model's card, before training: the run's figures complete ``training`` at the end."""
        adversarial = None
        if self.adv_eps > 0:
            step_size = self.adv_step_size or self.adv_eps / 4
            adversarial = {"eps": self.adv_eps, "steps": self.adv_steps, "step_size": step_size}
        return ModelCard(
            name=self.name or f"cifar10-{self.arch}-{self.norm}",
            architecture=self.arch,
            norm=self.norm,
            p=self.p if self.norm == "robustnorm" else None,
            labels=list(classes),
            input_size=list(INPUT_SIZE),
            mean=list(CIFAR10_MEAN),
            std=list(CIFAR10_STD),
            policy="frozen",
            training={
                "command": shlex.join(sys.argv),
                "arguments": self.arguments(),
                "seed": self.seed,
                "epochs": self.epochs,
                "dataset": "CIFAR-10 (JPEG q75)",
                "adversarial": adversarial,
            },
        )
