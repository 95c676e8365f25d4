"""Grouped statistics: one forward pass, several independent batches (ARCHITECTURE.md, "Grouped statistics").

``batch_groups`` is set around a forward call, so any model runs unchanged::

    with robustnorm.batch_groups(model, sizes=[3, 5], record=True) as run:
        logits = model(x)          # x holds >= 8 images; images 8.. are padding
    run.ran, run.fallback, run.stats

Each group of consecutive images is normalised with its own statistics (and its own ``n`` for ``blend``
and ``adaptive``); images past the last group are padding that never changes any real image's output. The
same mechanism serves padding to fixed shapes, tenant isolation inside one GPU batch and evaluating many
small batches in one forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from .layers import GroupStatistics, _PolicyNorm, policy_layers
from .policy import Policy


@dataclass
class GroupRun:
    """What one grouped forward did: the statistics each group ran with and, if recorded, what it saw."""

    sizes: tuple[int, ...] | None
    record: bool
    layer_names: dict[int, str]
    ran: list[str] = field(default_factory=list)
    fallback: list[bool] = field(default_factory=list)
    stats: dict[str, GroupStatistics] = field(default_factory=dict)
    robust_layers: dict[str, bool] = field(default_factory=dict)
    population: dict[str, tuple] = field(default_factory=dict)

    def add_plans(self, layer: _PolicyNorm, sizes: tuple[int, ...], plans: Sequence[Policy]) -> None:
        """Record which statistics ran per group; the first norm layer of the forward speaks for the model."""
        if self.ran:
            return
        self.ran = [plan.kind for plan in plans]
        self.fallback = [layer.policy.kind == "adaptive" and plan.kind != "batch" for plan in plans]

    def add_statistics(self, layer: _PolicyNorm, stats: GroupStatistics) -> None:
        name = self.layer_names[id(layer)]
        self.stats[name] = stats
        self.robust_layers[name] = layer.robust
        self.population[name] = tuple(t.detach() for t in layer._population(stats.mean.dtype))


def _validate_sizes(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    if sizes is None:
        return None
    checked = tuple(int(size) for size in sizes)
    if not checked or any(size < 1 for size in checked):
        raise ValueError(f"group sizes must be a non-empty list of positive integers, got {list(sizes)}")
    return checked


@contextmanager
def batch_groups(model: nn.Module, sizes: Sequence[int] | None = None, *, record: bool = False
                 ) -> Iterator[GroupRun]:
    """Tell every norm layer of ``model`` the group sizes of the next forward(s), and optionally record.

    ``sizes=None`` means the whole batch is one group. With ``record=True`` each layer hands back the batch
    statistics of its real images (``run.stats``), computed on the device whatever the policy.
    Not re-entrant for the same model across threads: run one grouped forward per model at a time.
    """
    layers = policy_layers(model)
    run = GroupRun(sizes=_validate_sizes(sizes), record=record,
                   layer_names={id(layer): name for name, layer in layers})
    previous = [layer.group_run for _, layer in layers]
    for _, layer in layers:
        layer.group_run = run
    try:
        yield run
    finally:
        for (_, layer), before in zip(layers, previous):
            layer.group_run = before
        if not run.ran and run.sizes is not None:  # a model without norm layers has only fixed statistics
            run.ran = ["frozen"] * len(run.sizes)
            run.fallback = [False] * len(run.sizes)
