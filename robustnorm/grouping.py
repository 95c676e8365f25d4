"""Grouped statistics: one forward pass, several independent batches (``docs/architecture.md``).

``batch_groups`` is set around a forward call, so any model runs unchanged::

    with robustnorm.batch_groups(model, sizes=[3, 5], policy="blend:16", record=True) as run:
        logits = model(x)          # x holds >= 8 images; images 8.. are padding
    run.ran, run.fallback, run.stats

Each group of consecutive images is normalised with its own statistics (and its own ``n`` for ``blend``
and ``adaptive``); images past the last group are padding that never changes any real image's output. The
same mechanism serves padding to fixed shapes, tenant isolation inside one GPU batch and evaluating many
small batches in one forward. The forward's policy is an argument (``policy=None``: each layer's default,
see :func:`robustnorm.set_policy`); stream policies also take each group's stream
(``streams=store.select(keys)``), which the run updates with the batch's images when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from .layers import GroupStatistics, _PolicyNorm, policy_layers
from .policy import GroupPlan, Policy, parse_policy
from .stream import Stream, StreamSelection


@dataclass
class GroupRun:
    """What one grouped forward did: the statistics each group ran with and, if recorded, what it saw."""

    sizes: tuple[int, ...] | None
    record: bool
    layer_names: dict[int, str]
    policy: Policy | None = None
    streams: StreamSelection | None = None
    ran: list[str] = field(default_factory=list)
    fallback: list[bool] = field(default_factory=list)
    stream_images: list[int] = field(default_factory=list)
    stats: dict[str, GroupStatistics] = field(default_factory=dict)
    robust_layers: dict[str, bool] = field(default_factory=dict)
    population: dict[str, tuple] = field(default_factory=dict)
    _plans: dict[tuple[bool, int], list[GroupPlan]] = field(default_factory=dict, repr=False)

    @property
    def streaming(self) -> bool:
        """Whether the forward reads and updates streams (a stream policy, and streams given)."""
        return self.streams is not None and self.policy is not None and self.policy.uses_streams

    def plans(self, layer: _PolicyNorm, sizes: tuple[int, ...]) -> list[GroupPlan]:
        """The plan per group for ``layer``: made once per forward (per layer kind) and recorded once, the first
        norm layer of the forward speaking for the model."""
        policy = self.policy if self.policy is not None else layer.policy
        key = (layer.robust, id(policy))
        if key not in self._plans:
            streams = self.streams.streams if self.streams is not None else None
            self._plans[key] = policy.plan(sizes, layer.robust, streams)
        plans = self._plans[key]
        if not self.ran:
            self.ran = [plan.statistics for plan in plans]
            self.fallback = [plan.fallback for plan in plans]
            self.stream_images = [plan.stream_images for plan in plans]
        return plans

    def add_statistics(self, layer: _PolicyNorm, stats: GroupStatistics, population: tuple[Tensor, Tensor]) -> None:
        """Record ``layer``'s statistics and its population statistics (detached, in the statistics' dtype)."""
        name = self.layer_names[id(layer)]
        self.stats[name] = stats
        self.robust_layers[name] = layer.robust
        self.population[name] = population

    def stream_statistics(self, layer: _PolicyNorm) -> list[tuple[Tensor, Tensor] | None] | None:
        """Each group's stream (mean, spread) at ``layer``, or ``None`` without streams."""
        if not self.streaming:
            return None
        assert self.streams is not None
        name = self.layer_names[id(layer)]
        return [stream.statistics(name) if stream is not None else None for stream in self.streams.streams]


def _validate_sizes(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    if sizes is None:
        return None
    checked = tuple(int(size) for size in sizes)
    if not checked or any(size < 1 for size in checked):
        raise ValueError(f"group sizes must be a non-empty list of positive integers, got {list(sizes)}")
    return checked


@contextmanager
def batch_groups(model: nn.Module, sizes: Sequence[int] | None = None, *, policy: str | Policy | None = None,
                 record: bool = False, streams: StreamSelection | Sequence[Stream | None] | None = None
                 ) -> Iterator[GroupRun]:
    """Tell every norm layer of ``model`` the group sizes and policy of the next forward, optionally record.

    ``sizes=None`` means the whole batch is one group. ``policy=None`` leaves each layer's default policy.
    With ``record=True`` each layer hands back the batch statistics of its real images (``run.stats``),
    computed on the device whatever the policy. ``streams`` (one per group, from
    :meth:`robustnorm.StreamStore.select`) feed stream policies; when the block ends without error, each
    group's images are added to its stream. Not re-entrant for the same model across threads: run one grouped
    forward per model at a time.
    """
    layers = policy_layers(model)
    checked = _validate_sizes(sizes)
    if isinstance(streams, Sequence):
        streams = StreamSelection(None, list(streams))
    if streams is not None and checked is not None and len(streams.streams) != len(checked):
        raise ValueError(f"{len(streams.streams)} streams given for {len(checked)} groups")
    run = GroupRun(sizes=checked, record=record, layer_names={id(layer): name for name, layer in layers},
                   policy=parse_policy(policy) if policy is not None else None, streams=streams)
    previous = [layer.group_run for _, layer in layers]
    for _, layer in layers:
        # a plain attribute: object.__setattr__ skips nn.Module's bookkeeping, on every forward
        object.__setattr__(layer, "group_run", run)
    seen: dict[str, Tensor] = {}
    # The streams read the images (each distinct image once), the auto policy's gate the model's predictions too:
    # catch both at the model's edge.
    hook = model.register_forward_hook(lambda _, inputs, output: seen.update(pixels=inputs[0], logits=output)) \
        if run.streaming else None
    try:
        yield run
        if run.streaming and run.stats:
            assert streams is not None
            real = sum(run.sizes) if run.sizes is not None else None
            pixels, logits = seen.get("pixels"), seen.get("logits")
            streams.update(run, pixels[:real] if pixels is not None else None,
                           logits[:real].argmax(dim=1) if logits is not None else None)
    finally:
        if hook is not None:
            hook.remove()
        for (_, layer), before in zip(layers, previous):
            object.__setattr__(layer, "group_run", before)
        if not run.ran and run.sizes is not None:  # a model without norm layers has only fixed statistics
            run.ran = ["frozen"] * len(run.sizes)
            run.fallback = [False] * len(run.sizes)
            run.stream_images = [0] * len(run.sizes)
