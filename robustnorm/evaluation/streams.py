"""Several streams of traffic through a model at once, as the service would answer them, batch after batch.

Contract: :func:`stream_predictions` takes streams ``name -> images`` (normalised) and returns each image's
predicted class, as if each stream's images arrived in consecutive batches of ``batch_size`` and each batch were
answered before the next: under a stream policy (``stream`` or ``auto``) each stream has its own stream of one
fresh :class:`robustnorm.StreamStore` (the service's defaults: one batch enters at most a quarter of the window),
updated after every batch; under any other policy each batch is one statistics group. The streams advance
together, one batch each per forward, as groups of that forward (grouped statistics keep them apart), which
costs about one forward per step instead of one per stream and step. All streams run as long as the shortest,
in whole batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..gate import GateCalibration
from ..grouping import batch_groups
from ..policy import Policy, parse_policy
from ..stream import StreamStore


@torch.no_grad()
def stream_predictions(model: nn.Module, streams: Mapping[str, Tensor], policy: str | Policy, *,
                       batch_size: int = 1, gate: GateCalibration | None = None) -> dict[str, Tensor]:
    """Predicted class of every image of each stream (module docstring); ``gate`` is the ``auto`` policy's
    drift gate (without one, ``auto`` never leaves the population statistics)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parsed = parse_policy(policy)
    names = list(streams)
    length = min(images.shape[0] for images in streams.values()) if names else 0
    length -= length % batch_size
    store = (StreamStore(parsed.window or 1, max_streams=max(1, len(names)), gate=gate)
             if parsed.uses_streams else None)
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, length, batch_size):
        step = torch.cat([streams[name][start:start + batch_size] for name in names])
        selection = store.select(names) if store is not None else None
        with batch_groups(model, [batch_size] * len(names), policy=parsed, streams=selection):
            predicted = model(step).argmax(dim=1)
        for k, name in enumerate(names):
            parts[name].append(predicted[k * batch_size:(k + 1) * batch_size])
    return {name: torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long) for name, chunks in parts.items()}
