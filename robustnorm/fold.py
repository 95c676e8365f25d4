"""Frozen statistics folded into the convolutions, with what the norm layers saw still recorded.

Under frozen statistics a norm layer is the per-channel map ``y = x * scale + shift``, which an inference
compiler folds into the weights and bias of the convolution before it: the fastest a frozen model can run.
Folding drops what the service still needs of every batch: each image's statistics at the first layers (its
drift score), and under ``auto`` while the gate holds the population, every layer's rows for the streams.

:func:`fold_frozen` keeps both. Each folded convolution can record the statistics of the norm layer's input
``x``, recovered from its own output ``z = conv(x) * scale + shift`` per image and channel: the mean as
``(mean(z) - shift) / scale``, the variance as ``var(z) / scale**2``, the maximum and minimum from those of
``z`` (swapped where ``scale`` is negative). That costs the reductions over ``z`` the unfolded layer would
run over ``x``, and no separate pass for the affine map. Where the recovery would lose precision (a channel
whose ``scale`` is 0, or whose ``bias / scale`` dwarfs its statistics), the layer is left unfolded and records
its input as it is.

A :class:`FoldedModel` is a snapshot: fold again after the model's parameters or buffers change. It serves forwards
in which every group runs frozen statistics (``frozen``; ``adaptive`` where it falls back to it; ``auto`` while
each group's gate holds the population: :meth:`FoldedModel.runs_frozen`), inside :meth:`FoldedModel.groups`, which
hands back a :class:`robustnorm.GroupRun` as :func:`robustnorm.batch_groups` does.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .grouping import GroupRun, _validate_sizes
from .layers import GroupStatistics, _as, _compute_dtype, _constant, _group_reduce, _PolicyNorm, _segments, set_policy
from .policy import FROZEN, GroupPlan, Policy, parse_policy
from .stream import StreamSelection

# The recovery of a layer's input from the folded output adds about float32's epsilon times |bias / scale|
# to each value; a layer is folded only while that stays this many times below its population statistics.
MAX_SHIFT_RATIO = 1e3


def scale_shift(layer: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A norm layer's frozen ``y = x * scale + shift`` per channel, in float64: the library's layers from their
    own ``scale_shift`` (BatchNorm or RobustNorm statistics), a plain ``nn.BatchNorm2d`` from its buffers."""
    if isinstance(layer, _PolicyNorm):
        return layer.scale_shift(*layer.population(torch.float64))
    assert layer.running_mean is not None and layer.running_var is not None
    scale = 1.0 / torch.sqrt(layer.running_var.double() + layer.eps)
    shift = -layer.running_mean.double() * scale
    if layer.affine:
        scale = scale * layer.weight.double()
        shift = shift * layer.weight.double() + layer.bias.double()
    return scale, shift


def norms_after_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str]]:
    """(conv name, conv, norm name) for every norm layer, paired with the convolution registered just before
    it (how the ResNets and the VGG of ``robustnorm.models`` are written: conv, then its norm). Raises
    ``ValueError`` for a norm layer that does not follow a convolution of its width."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = (name, module)
        elif isinstance(module, nn.BatchNorm2d):
            if last_conv is None or last_conv[1].out_channels != module.num_features:
                raise ValueError(f"norm layer {name!r} does not follow a convolution with {module.num_features} "
                                 "output channels; this model cannot be folded")
            pairs.append((last_conv[0], last_conv[1], name))
            last_conv = None
    return pairs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _fused(conv: nn.Conv2d, scale: Tensor, shift: Tensor, cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    """``conv`` followed by ``x * scale + shift``, as one convolution (computed in float64)."""
    fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(shift if conv.bias is None else conv.bias.double() * scale + shift)
    return fused


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` in eval mode whose norm layers are folded into the convolutions before them
    (``nn.Identity`` in their place): nothing recorded, the reference a frozen model's speed is measured by."""
    folded = copy.deepcopy(model).eval()
    for conv_name, conv, norm_name in norms_after_convs(folded):
        scale, shift = scale_shift(folded.get_submodule(norm_name))
        _replace(folded, conv_name, _fused(conv, scale, shift))
        _replace(folded, norm_name, nn.Identity())
    return folded


class _RecordingConv(nn.Conv2d):
    """A convolution that, inside :meth:`FoldedModel.groups`, records the statistics of one norm layer's
    input from its output ``z``: ``x = (z - shift) / scale`` per channel (``scale`` 1 and ``shift`` 0 where the
    norm layer was left unfolded after it)."""

    norm_name: str
    robust: bool
    all_positive: bool  # every channel's scale > 0
    recorder: FoldedModel | None
    inverse: Tensor  # 1 / scale per channel
    shift: Tensor
    population_mean: Tensor
    population_spread: Tensor

    def forward(self, x: Tensor) -> Tensor:
        z = super().forward(x)
        recorder = self.recorder
        if recorder is not None and recorder._recording is not None and self.norm_name in recorder._recording:
            recorder._record(self, z)
        return z


class FoldedModel(nn.Module):
    """A copy of a model with frozen statistics folded into its convolutions, recording chosen norm layers.

    ``folded(x)`` is the model's frozen forward (equal up to float rounding). Inside :meth:`groups` a forward
    also records, per group of images, what the norm layers named there saw, as ``batch_groups(...,
    record=True)`` would, and feeds the groups' streams.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        net = copy.deepcopy(model).eval()
        self.layer_names: list[str] = []
        self.unfolded: list[str] = []  # recovery would lose precision: normalised by the layer itself
        robust = set()
        for conv_name, conv, norm_name in norms_after_convs(net):
            norm = net.get_submodule(norm_name)
            if not isinstance(norm, _PolicyNorm):
                raise ValueError(f"norm layer {norm_name!r} is a plain {type(norm).__name__}: convert it first "
                                 "(robustnorm.convert_norms)")
            scale, shift = scale_shift(norm)
            mean, spread = norm.population(torch.float64)
            typical = mean.abs() + (spread if norm.robust else spread.sqrt())
            foldable = bool(torch.isfinite(scale).all() and torch.isfinite(shift).all() and (scale != 0).all()
                            and ((shift / scale).abs() <= MAX_SHIFT_RATIO * typical.clamp_min(1e-12)).all())
            if not foldable:
                scale, shift = torch.ones_like(scale), torch.zeros_like(shift)
                set_policy(norm, FROZEN)
                self.unfolded.append(norm_name)
            recording = _fused(conv, scale, shift, _RecordingConv)
            if foldable:
                _replace(net, norm_name, nn.Identity())
            _replace(net, conv_name, recording)
            # buffers, so that moves of the model (.to, .cuda) move them with the weights
            dtype = conv.weight.dtype
            recording.register_buffer("inverse", scale.reciprocal().to(dtype), persistent=False)
            recording.register_buffer("shift", shift.to(dtype), persistent=False)
            recording.register_buffer("population_mean", mean.to(dtype), persistent=False)
            recording.register_buffer("population_spread", spread.to(dtype), persistent=False)
            # plain attributes: the recorder must not become a submodule of its own convolution
            object.__setattr__(recording, "norm_name", norm_name)
            object.__setattr__(recording, "robust", norm.robust)
            object.__setattr__(recording, "all_positive", bool((scale > 0).all()))
            object.__setattr__(recording, "recorder", self)
            self.layer_names.append(norm_name)
            robust.add(norm.robust)
        if len(robust) > 1:
            raise ValueError("a model mixing BatchNorm and RobustNorm layers cannot be folded")
        self.robust = robust.pop() if robust else False
        self.net = net
        self._recording: frozenset[str] | None = None
        self._rows = False
        self._run: GroupRun | None = None
        self._real = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def runs_frozen(self, sizes: Sequence[int], policy: str | Policy,
                    streams: StreamSelection | None = None) -> bool:
        """Whether every group of ``sizes`` runs frozen statistics under ``policy`` (with ``streams``' state):
        ``frozen``, ``adaptive`` where it falls back to ``frozen``, ``auto`` while each group's gate holds."""
        parsed = parse_policy(policy)
        return parsed.kind == "frozen" or all(plan.population_only for plan in self._plans(sizes, parsed, streams))

    def _plans(self, sizes: Sequence[int], policy: Policy, streams: StreamSelection | None) -> list[GroupPlan]:
        return policy.plan(list(sizes), self.robust, streams.streams if streams is not None else None)

    @contextmanager
    def groups(self, sizes: Sequence[int], *, policy: str | Policy = FROZEN, record: Collection[str] | None = (),
               streams: StreamSelection | None = None) -> Iterator[GroupRun]:
        """Record the next forward of ``self`` as ``batch_groups(model, sizes, policy=..., record=True,
        streams=...)`` would, for a forward in which every group runs frozen statistics.

        ``record`` names the norm layers whose statistics to record (``None``: all, as streams need). Under a
        stream policy, every layer is recorded with its rows and each group's images are added to its stream
        when the block ends without error (with the gate's scores under ``auto``).
        """
        checked = _validate_sizes(sizes)
        assert checked is not None
        parsed = parse_policy(policy)
        plans = self._plans(checked, parsed, streams)
        if not all(plan.population_only for plan in plans):
            raise ValueError(f"policy {parsed} does not run frozen statistics for every group here; "
                             "use robustnorm.batch_groups on the unfolded model")
        streaming = streams is not None and parsed.uses_streams
        recording = self._recorded(None if record is None else tuple(record), streaming)
        run = GroupRun(sizes=checked, record=True, layer_names={}, policy=parsed, streams=streams)
        run.ran = [plan.statistics for plan in plans]
        run.fallback = [plan.fallback for plan in plans]
        run.stream_images = [plan.stream_images for plan in plans]
        if self._run is not None:
            raise RuntimeError("FoldedModel.groups is not re-entrant: run one recorded forward at a time")
        # plain attributes, set on every forward: nn.Module.__setattr__'s bookkeeping is not needed
        self.__dict__.update(_run=run, _recording=recording, _rows=streaming, _real=sum(checked))
        seen: dict[str, Tensor] = {}
        hook = (self.register_forward_hook(lambda _, inputs, output: seen.update(pixels=inputs[0], logits=output))
                if streaming else None)
        try:
            yield run
            if streaming and run.stats:
                assert streams is not None
                pixels, logits = seen.get("pixels"), seen.get("logits")
                streams.update(run, pixels[: self._real] if pixels is not None else None,
                               logits[: self._real].argmax(dim=1) if logits is not None else None)
        finally:
            if hook is not None:
                hook.remove()
            self.__dict__.update(_run=None, _recording=None)

    def _recorded(self, record: tuple[str, ...] | None, streaming: bool) -> frozenset[str]:
        """The norm layers to record (``record`` None, or streams to feed: all), checked and made once per
        choice."""
        cache: dict[tuple, frozenset[str]] = self.__dict__.setdefault("_recorded_cache", {})
        names = cache.get((record, streaming))
        if names is None:
            unknown = set(record or ()) - set(self.layer_names)
            if unknown:
                raise ValueError(f"no norm layers named {sorted(unknown)} in this model")
            everything = record is None or streaming
            names = cache[record, streaming] = frozenset(self.layer_names if everything else record)
        return names

    def _record(self, conv: _RecordingConv, z: Tensor) -> None:
        """The norm layer's statistics over the real images, recovered from its folded output ``z``."""
        run = self._run
        assert run is not None and run.sizes is not None
        name, sizes = conv.norm_name, run.sizes
        real = z if self._real == z.shape[0] else z[: self._real]
        dtype = _compute_dtype(real)
        real = real if real.dtype == dtype else real.to(dtype)
        run.stats[name] = _FoldedStatistics(conv.robust, tuple(sizes), _constant(tuple(sizes), z.device),
                                            _recover(conv, real, dtype), self._rows)
        run.robust_layers[name] = conv.robust
        buffers = conv._buffers  # not through nn.Module.__getattr__, on every recorded layer and forward
        run.population[name] = (_as(buffers["population_mean"], dtype), _as(buffers["population_spread"], dtype))


class _FoldedStatistics(GroupStatistics):
    """What a folded layer recorded. The forward recovers each image's statistics and nothing more; each image's
    mean and spread (read by the image score, for a few layers) and each group's mean and spread (read by the
    drift report, after the answer, and not for every batch) are made from them when first read.

    ``image``: for RobustNorm each image's recovered mean, maximum and minimum (n, 3, C), which are also its
    stream rows; for BatchNorm each image's mean and variance, each (n, C)."""

    def __init__(self, robust: bool, sizes: tuple[int, ...], counts: Tensor, image: tuple[Tensor, ...],
                 rows: bool) -> None:
        self.__dict__.update(_robust=robust, _sizes=sizes, _image=image, _rows=rows, _made={}, counts=counts)

    def _made_once(self, what: str) -> Tensor | None:
        made: dict[str, Tensor | None] = self.__dict__["_made"]
        if what not in made:
            robust, image = self._robust, self._image
            if what == "image_rows":
                made[what] = _rows(robust, image) if self._rows else None
            elif what in ("image_mean", "image_spread"):
                made["image_mean"], made["image_spread"] = _image_mean_spread(robust, image)
            else:
                made["mean"], made["spread"] = _group_statistics(robust, self.image_mean, self.image_spread,
                                                                 image[0], self._sizes)
        return made[what]

    mean = property(lambda self: self._made_once("mean"))  # type: ignore[assignment]
    spread = property(lambda self: self._made_once("spread"))  # type: ignore[assignment]
    image_mean = property(lambda self: self._made_once("image_mean"))  # type: ignore[assignment]
    image_spread = property(lambda self: self._made_once("image_spread"))  # type: ignore[assignment]
    image_rows = property(lambda self: self._made_once("image_rows"))  # type: ignore[assignment]


def _group_statistics(robust: bool, image_mean: Tensor, image_spread: Tensor, rows: Tensor,
                      sizes: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """Each group's (G, C) mean and spread from its images' statistics (``sizes`` None: one group, traceable);
    ``rows``: RobustNorm's recovered rows (mean, maximum, minimum), unused for BatchNorm."""
    mean = _group_reduce(image_mean, sizes, "mean")
    if robust:
        return mean, _group_reduce(rows[:, 1], sizes, "amax") - _group_reduce(rows[:, 2], sizes, "amin")
    own = mean if sizes is None or len(sizes) == 1 else mean[_segments(sizes, image_mean.device)]
    # each group's variance: its images' variances plus their means' spread about the group's mean
    return mean, _group_reduce(image_spread + (image_mean - own).square(), sizes, "mean")


def _recover(conv: _RecordingConv, real: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Each image's statistics of the norm layer's input, recovered from the folded output ``real`` (in
    ``dtype``), in traceable tensor operations only: for RobustNorm its mean, maximum and minimum (n, 3, C),
    for BatchNorm its mean and variance, each (n, C)."""
    buffers = conv._buffers
    inverse, shift = _as(buffers["inverse"], dtype), _as(buffers["shift"], dtype)
    if conv.robust:
        high, low = real.amax(dim=(2, 3)), real.amin(dim=(2, 3))  # faster than aminmax on the CPU
        if not conv.all_positive:  # a negative scale turns the folded output's maximum into the input's minimum
            negative = inverse < 0
            low, high = torch.where(negative, high, low), torch.where(negative, low, high)
        return ((torch.stack([real.mean(dim=(2, 3)), high, low], dim=1) - shift) * inverse,)
    folded_mean = real.mean(dim=(2, 3))
    # two passes, as the unfolded layer computes it (var_mean is many times slower on the CPU)
    variance = (real - folded_mean[:, :, None, None]).square().mean(dim=(2, 3))
    return (folded_mean - shift) * inverse, variance * inverse.square()


def _image_mean_spread(robust: bool, image: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Each image's mean and spread (n, C) from what :func:`_recover` made."""
    if robust:
        (recovered,) = image
        return recovered[:, 0], recovered[:, 1] - recovered[:, 2]
    return image[0], image[1]


def _rows(robust: bool, image: tuple[Tensor, ...]) -> Tensor:
    """Each image's stream rows (n, R, C) from what :func:`_recover` made: RobustNorm's mean, maximum and
    minimum, BatchNorm's mean and second moment."""
    if robust:
        return image[0]
    image_mean, image_variance = image
    return torch.stack([image_mean, image_variance + image_mean.square()], dim=1)


def _image_statistics(conv: _RecordingConv, real: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's mean and spread (n, C) of the norm layer's input, and its stream row (n, R, C), recovered
    from the folded output ``real`` (in ``dtype``): traceable tensor operations only."""
    image = _recover(conv, real, dtype)
    return (*_image_mean_spread(conv.robust, image), _rows(conv.robust, image))


class FoldedGraph(nn.Module):
    """A folded model for ONNX export: ``images`` in; the logits and, per norm layer of ``layers``, what an
    exported graph of :mod:`robustnorm.export` outputs (the batch's mean and spread as one group, and each
    image's rows) out, recovered from the folded outputs."""

    def __init__(self, folded: FoldedModel, layers: Sequence[str]) -> None:
        super().__init__()
        self.folded = copy.deepcopy(folded).cpu().float().eval()
        wanted = set(layers)
        unknown = wanted - set(self.folded.layer_names)
        if unknown:
            raise ValueError(f"no norm layers named {sorted(unknown)} in this model")
        self.layers = [name for name in self.folded.layer_names if name in wanted]
        self._outputs: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for module in self.folded.modules():
            if isinstance(module, _RecordingConv) and module.norm_name in wanted:
                module.register_forward_hook(self._statistics)

    def _statistics(self, conv: nn.Module, _: tuple[Tensor, ...], z: Tensor) -> None:
        assert isinstance(conv, _RecordingConv)
        image_mean, image_spread, rows = _image_statistics(conv, z, torch.float32)
        mean, spread = _group_statistics(conv.robust, image_mean, image_spread, rows, None)
        self._outputs[conv.norm_name] = (mean[0], spread[0], rows)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        self._outputs = {}
        logits = self.folded(images)
        return (logits, *(value for name in self.layers for value in self._outputs[name]))


def fold_frozen(model: nn.Module) -> FoldedModel:
    """``model`` (its norm layers the library's, each after a convolution) with its frozen statistics folded
    into the convolutions, able to record what its norm layers see; see the module's docstring."""
    return FoldedModel(model).eval()
