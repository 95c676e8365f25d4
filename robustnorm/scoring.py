"""Scoring a model as deployed: its forward, predictions and accuracy on [0, 1] pixels in batches of n.

Contract: every function here takes images in [0, 1] (before the card's mean/std normalisation) and a
statistics policy (a string or a :class:`robustnorm.Policy`, parsed once per call). The images form consecutive
batches of ``group_size``; each batch is normalised with its own statistics under that policy, all batches in
one forward of at most :data:`MAX_IMAGES_PER_FORWARD` images (grouped statistics, :func:`robustnorm.batch_groups`).
The policy is an argument of the forward: the model's default policy (:func:`robustnorm.set_policy`) is neither
read nor changed. A partial last batch is dropped by :func:`predictions` and :func:`accuracy`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .attacks import Forward
from .data import normalize
from .grouping import batch_groups
from .io import ModelCard
from .policy import Policy, parse_policy

MAX_IMAGES_PER_FORWARD = 2048


def deployed_forward(model: nn.Module, card: ModelCard, policy: str | Policy, group_size: int) -> Forward:
    """``forward(x01) -> logits``: the model as deployed with ``policy`` on consecutive batches of ``group_size``
    images (differentiable through the batch statistics); trailing images that do not fill a batch are padding."""
    parsed = parse_policy(policy)

    def forward(x01: Tensor) -> Tensor:
        groups = [group_size] * (x01.shape[0] // group_size)
        with batch_groups(model, groups, policy=parsed):
            return model(normalize(x01, card.mean, card.std))

    return forward


def chunks(total: int, group_size: int) -> Iterator[slice]:
    """Slices of whole batches of ``group_size`` out of ``total`` images, at most MAX_IMAGES_PER_FORWARD images
    (at least one batch) each; a partial last batch is left out."""
    step = max(1, MAX_IMAGES_PER_FORWARD // group_size) * group_size
    usable = total - total % group_size
    for start in range(0, usable, step):
        yield slice(start, min(start + step, usable))


@torch.no_grad()
def predictions(model: nn.Module, card: ModelCard, x01: Tensor, policy: str | Policy, group_size: int) -> Tensor:
    """Predicted classes of the images, in consecutive batches of ``group_size``."""
    forward = deployed_forward(model, card, policy, group_size)
    return torch.cat([forward(x01[part]).argmax(dim=1) for part in chunks(x01.shape[0], group_size)])


def accuracy(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, policy: str | Policy,
             group_size: int) -> float:
    """The fraction of images predicted as ``labels``, in consecutive batches of ``group_size``."""
    predicted = predictions(model, card, x01, policy, group_size)
    return float((predicted == labels[: predicted.numel()]).float().mean())
