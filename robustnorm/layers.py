"""Normalization layers whose inference-time statistics follow a policy: RobustNorm and adaptive BatchNorm.

Both layers subclass ``nn.BatchNorm2d`` so that state dicts keep BatchNorm's keys (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``) and existing checkpoints load unchanged.

- :class:`AdaptiveBatchNorm2d` is exactly ``nn.BatchNorm2d`` in training mode.
- :class:`RobustNorm2d` (arXiv 2006.11007) normalises per channel over (N, H, W) with the mean and the
  range ``max - min``: ``y = weight * (x - mean) / (range ** p + eps) + bias``. The running range is tracked in
  the ``running_var`` buffer with the same momentum update as the running mean.

In eval mode both follow their statistics policy (:mod:`robustnorm.policy`). A forward may run inside
:func:`robustnorm.batch_groups`, which tells every layer the sizes of consecutive groups of images; each group
is normalised with its own statistics and images past the last group are padding that never influences any
statistic. Every policy is differentiable with respect to the input, batch statistics included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._kernels import RangeNormalize, RangeNormalizeRows, all_reduce_extremum, all_reduce_sum
from .policy import GroupPlan, Policy, parse_policy

if TYPE_CHECKING:
    from .grouping import GroupRun


@dataclass
class GroupStatistics:
    """Batch statistics of the real images, per group, as one layer saw them (float32, on the device).

    ``spread`` is the biased variance for BatchNorm layers and the range ``max - min`` for RobustNorm layers.
    ``image_mean`` and ``image_spread`` are each real image's own per-channel mean and spread over (H, W) (the
    layer's measure: variance or range), used by the per-image drift score.
    """

    mean: Tensor  # (G, C)
    spread: Tensor  # (G, C)
    counts: Tensor  # (G,) number of images per group
    image_mean: Tensor  # (n_real, C)
    image_spread: Tensor | None  # (n_real, C); None: derived from image_rows where read (drift.image_features)
    image_rows: Tensor | None = None  # (n_real, R, C): what a stream keeps of each image (robustnorm.stream)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Statistics are computed in float32 (float64 for float64 inputs), also under bf16 autocast."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_CONSTANTS: dict[tuple, Tensor] = {}
_MAX_CONSTANTS = 512


def _cached(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """A small constant tensor of a forward (group sizes, segments, policy weights), made once per key, device
    and inference mode instead of again in every layer; never modified in place. Not cached while compiling."""
    if torch.compiler.is_compiling():
        return make()
    key = (*key, torch.is_inference_mode_enabled())
    found = _CONSTANTS.get(key)
    if found is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        found = _CONSTANTS[key] = make()
    return found


def _constant(values: tuple, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    return _cached(("constant", values, str(device), dtype), lambda: torch.tensor(values, device=device, dtype=dtype))


def _segments(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Group index of every real image, e.g. sizes (2, 3) -> [0, 0, 1, 1, 1]."""
    return _cached(("segments", tuple(sizes), str(device)), lambda: torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)))


def _group_reduce(values: Tensor, sizes: tuple[int, ...] | None, how: str) -> Tensor:
    """Reduce per-image rows (n_real, C) to per-group rows (G, C) with ``how`` in mean, amax, amin; ``sizes``
    None: all rows are one group (traceable)."""
    if sizes is None or len(sizes) == 1:
        return getattr(values, how)(dim=0, keepdim=True)
    groups, channels = len(sizes), values.shape[1]
    if len(set(sizes)) == 1:  # equal groups: a reshape, the common case in evaluation
        grouped = values.view(groups, sizes[0], channels)
        return getattr(grouped, how)(dim=1)
    index = _segments(sizes, values.device).unsqueeze(1).expand_as(values)
    out = values.new_zeros(groups, channels)
    if how == "mean":
        counts = _constant(tuple(sizes), values.device, values.dtype).unsqueeze(1)
        return out.scatter_add(0, index, values) / counts
    return out.scatter_reduce(0, index, values, reduce=how, include_self=False)


class _PolicyNorm(nn.BatchNorm2d):
    """Shared eval-mode machinery: statistics per group, chosen by the layer's policy."""

    robust: ClassVar[bool] = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, policy: str | Policy = "frozen") -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.policy = parse_policy(policy)
        self.group_run: GroupRun | None = None  # set only inside robustnorm.batch_groups(...)
        self.sync_group: object | None = None  # process group for synchronised training statistics
        self.sync_enabled = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, policy={self.policy}"

    # -- statistics -------------------------------------------------------------------------------------
    def _denominator(self, spread: Tensor) -> Tensor:
        raise NotImplementedError

    def group_statistics(self, x: Tensor, sizes: tuple[int, ...], rows: bool = True) -> GroupStatistics:
        """Mean and spread of each group of real images (two passes for an accurate variance); ``rows=False``
        leaves out what a stream keeps of each image (``image_rows`` is None)."""
        real = x if sum(sizes) == x.shape[0] else x[: sum(sizes)]
        dtype = _compute_dtype(x)
        real = real if real.dtype == dtype else real.to(dtype)
        image_mean = real.mean(dim=(2, 3))
        mean = _group_reduce(image_mean, sizes, "mean")
        spread, image_spread, image_rows = self._spreads(real, image_mean, mean, sizes, rows)
        counts = _constant(tuple(sizes), x.device)
        return GroupStatistics(mean=mean, spread=spread, counts=counts, image_mean=image_mean,
                               image_spread=image_spread, image_rows=image_rows)

    def batch_statistics(self, x: Tensor) -> GroupStatistics:
        """The statistics of the whole batch ``x`` as one group, in traceable tensor operations only (no
        Python sizes): what an exported graph computes (:mod:`robustnorm.export`)."""
        real = x.to(_compute_dtype(x))
        image_mean = real.mean(dim=(2, 3))
        mean = image_mean.mean(dim=0, keepdim=True)
        spread, image_spread, image_rows = self._spreads(real, image_mean, mean, None, True)
        return GroupStatistics(mean=mean, spread=spread, counts=torch._shape_as_tensor(x)[:1],
                               image_mean=image_mean, image_spread=image_spread, image_rows=image_rows)

    def _spreads(self, real: Tensor, image_mean: Tensor, group_mean: Tensor, sizes: tuple[int, ...] | None,
                 rows: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Spread of each group and of each image alone, and (``rows``) each image's stream row; ``image_mean``
        is each image's channel mean, ``group_mean`` (G, C) the groups' (``sizes`` None: one group)."""
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            return self._forward_train(x)
        return self._forward_eval(x)

    def _forward_train(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward_eval(self, x: Tensor) -> Tensor:
        run = self.group_run
        sizes = run.sizes if run is not None and run.sizes is not None else (x.shape[0],)
        if sum(sizes) > x.shape[0]:
            raise ValueError(f"group sizes {sizes} add up to more than the {x.shape[0]} images in the batch")
        # The one place that decides which statistics this forward uses: the policy's plan per group (the
        # forward's own policy inside batch_groups(..., policy=...), else the layer's default).
        plans = run.plans(self, sizes) if run is not None else self.policy.plan(sizes, self.robust)
        streaming = run is not None and run.streaming
        record = run is not None and run.record
        needs_batch = any(plan.uses_batch for plan in plans)
        stats = (self.group_statistics(x, sizes, rows=record or streaming) if record or needs_batch or streaming
                 else None)
        population = None
        if run is not None and (record or streaming):
            assert stats is not None
            population = self.population(stats.mean.dtype)
            run.add_statistics(self, stats, population)
        if not needs_batch and not any(plan.stream_weight for plan in plans):
            return self._normalize_frozen(x)
        assert stats is not None
        stream_stats = run.stream_statistics(self) if run is not None else None
        return self._normalize_groups(x, sizes, plans, stats, stream_stats, population)

    def population(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Population mean and spread (running variance, or running range for RobustNorm)."""
        assert self.running_mean is not None and self.running_var is not None
        return self._frozen_cached(("population", dtype), lambda: (
            self.running_mean.detach().to(dtype), self.running_var.detach().to(dtype)))

    def _frozen_cached(self, key: tuple, make: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """What depends only on the layer's parameters and buffers, made once while none of them changes.

        Only without autograd (a graph must not be shared between forwards), and apart per inference mode
        (inference tensors stay inside it). An entry is used while every parameter and buffer still has the
        storage, version, dtype and device it was made from: in-place updates (``load_state_dict``, a training
        step) bump the version, and moves or ``.data`` assignments (``.to``, ``.double()``) change the storage. The
        entry keeps the storages it was made from alive, so that no new tensor can take their addresses.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return make()
        # the dicts nn.Module keeps them in: reading them as attributes goes through nn.Module.__getattr__
        parameters, buffers = self._parameters, self._buffers
        sources = [t for t in (parameters["weight"], parameters["bias"], buffers["running_mean"],
                               buffers["running_var"]) if t is not None]
        signature = [(t.data_ptr(), t._version, t.dtype, t.device) for t in sources]
        cache = self.__dict__.setdefault("_frozen_cache", {})
        key = (*key, torch.is_inference_mode_enabled())
        entry = cache.get(key)
        if entry is None or entry[0] != signature:
            entry = cache[key] = (signature, make(), [t.detach() for t in sources])
        return entry[1]

    def _normalize_frozen(self, x: Tensor) -> Tensor:
        scale, shift = self._frozen_cached(("affine", _compute_dtype(x)), lambda: self.scale_shift(
            *self.population(_compute_dtype(x))))
        return _affine(x, scale, shift)

    def _normalize_groups(self, x: Tensor, sizes: tuple[int, ...], plans: list[GroupPlan],
                          stats: GroupStatistics, stream_stats: list[tuple[Tensor, Tensor] | None] | None,
                          population: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Normalise each group with its plan's mix of statistics (``population``: the layer's, when the caller
        has it already)."""
        dtype = stats.mean.dtype
        population = population if population is not None else self.population(dtype)
        if len(plans) == 1 and sizes[0] == x.shape[0]:  # one group, no padding: one scale and shift per channel
            return self._normalize_one(x, plans[0], stats, stream_stats[0] if stream_stats else None, population)
        population_mean, population_spread = (t.unsqueeze(0) for t in population)
        batch_weight, stream_weight = (_constant(tuple(weights), x.device, dtype).unsqueeze(1) for weights
                                       in zip(*[(plan.batch_weight, plan.stream_weight) for plan in plans]))
        mean = (1 - batch_weight - stream_weight) * population_mean + batch_weight * stats.mean
        spread = (1 - batch_weight - stream_weight) * population_spread + batch_weight * stats.spread
        if stream_stats is not None and any(plan.stream_weight for plan in plans):
            # groups whose stream holds nothing have weight 0: the population stands in
            rows = [held if held is not None else (population_mean[0], population_spread[0]) for held in stream_stats]
            mean = mean + stream_weight * torch.stack([m for m, _ in rows]).to(dtype)
            spread = spread + stream_weight * torch.stack([s for _, s in rows]).to(dtype)
        # Row G holds the population statistics, used for padding images past the last group.
        scale, shift = self.scale_shift(torch.cat([mean, population_mean]), torch.cat([spread, population_spread]))
        segments = torch.full((x.shape[0],), len(sizes), device=x.device, dtype=torch.long)
        segments[: sum(sizes)] = _segments(sizes, x.device)
        scale, shift = scale[segments].to(x.dtype), shift[segments].to(x.dtype)
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])  # one pass over x

    def _normalize_one(self, x: Tensor, plan: GroupPlan, stats: GroupStatistics,
                       stream: tuple[Tensor, Tensor] | None, population: tuple[Tensor, Tensor]) -> Tensor:
        """:meth:`_normalize_groups` for a batch that is one group: the plan's weights as numbers, terms of
        weight 0 left out, and each channel's scale and shift broadcast over the batch."""
        dtype = stats.mean.dtype
        terms = [(plan.population_weight, *population)] if plan.population_weight else []
        if plan.batch_weight:
            terms.append((plan.batch_weight, stats.mean[0], stats.spread[0]))
        if plan.stream_weight:  # a stream that holds nothing: the population stands in
            held = stream if stream is not None else population
            terms.append((plan.stream_weight, _as(held[0], dtype), _as(held[1], dtype)))
        if len(terms) == 1 and terms[0][0] == 1.0:
            mean, spread = terms[0][1], terms[0][2]
        else:  # every weighted sum at once: (2, 2k) weights times the k means and k spreads
            weights = tuple(weight for weight, _, _ in terms)
            mixing = _cached(("mixing", weights, str(x.device), dtype), lambda: torch.tensor(
                [[*weights, *[0.0] * len(weights)], [*[0.0] * len(weights), *weights]], device=x.device,
                dtype=dtype))
            mean, spread = mixing @ torch.stack([term[1] for term in terms] + [term[2] for term in terms])
        return self._normalize_with(x, mean, spread)

    def _normalize_with(self, x: Tensor, mean: Tensor, spread: Tensor) -> Tensor:
        """``x`` normalised with per-channel ``mean`` and ``spread``: :meth:`scale_shift` and one affine pass."""
        scale, shift = self.scale_shift(mean, spread)
        return _affine(x, scale, shift)

    def scale_shift(self, mean: Tensor, spread: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``scale`` and ``shift`` with ``y = x * scale + shift``."""
        denominator = self._denominator(spread)
        scale = (_as(self.weight, denominator.dtype) / denominator if self.weight is not None
                 else denominator.reciprocal())
        shift = (torch.addcmul(_as(self.bias, mean.dtype), mean, scale, value=-1.0) if self.bias is not None
                 else -mean * scale)
        return scale, shift

    def _momentum_factor(self) -> float:
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def _one_kernel(x: Tensor, layer: _PolicyNorm, mean: Tensor, spread: Tensor) -> bool:
    """Whether ``F.batch_norm`` can normalise ``x`` with ``mean`` and ``spread`` as its running statistics: no
    gradient through them (batch_norm takes none there), and ``x``, the statistics and the affine parameters in
    one dtype (float32, or float64), as on the CPU."""
    weight, bias = layer._parameters["weight"], layer._parameters["bias"]
    return (not (mean.requires_grad or spread.requires_grad) and x.dtype == mean.dtype
            and (weight is None or weight.dtype == mean.dtype) and (bias is None or bias.dtype == mean.dtype))


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, without a dispatch when it already is (this runs in every layer of a forward)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` per channel, in one pass: ``F.batch_norm`` with mean 0 and variance 1.

    One output tensor, where the multiply and add allocate an intermediate as large as ``x``; differentiable
    like the expression. Inputs in other dtypes than float32 (bf16 under autocast) take the expression.
    """
    if x.dtype != torch.float32 or scale.dtype != torch.float32:
        return _apply_affine(x, scale, shift)
    channels = x.shape[1]
    zeros = _cached(("zeros", channels, str(x.device)), lambda: torch.zeros(channels, device=x.device))
    ones = _cached(("ones", channels, str(x.device)), lambda: torch.ones(channels, device=x.device))
    return F.batch_norm(x, zeros, ones, scale, shift, False, 0.0, 0.0)


def _apply_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with per-channel ``scale`` and ``shift`` of shape (C,), in ``x``'s dtype."""
    return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def _sync_enabled(layer: _PolicyNorm) -> bool:
    return (layer.sync_enabled and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(layer.sync_group) > 1)


class AdaptiveBatchNorm2d(_PolicyNorm):
    """``nn.BatchNorm2d`` in training mode; in eval mode the statistics follow ``policy``.

    ``batch`` statistics are the batch mean and the biased batch variance, exactly what
    ``F.batch_norm(..., training=True)`` normalises with, and never touch the running buffers.
    """

    robust = False

    def _denominator(self, spread: Tensor) -> Tensor:
        return torch.sqrt(spread + self.eps)

    def _normalize_with(self, x: Tensor, mean: Tensor, spread: Tensor) -> Tensor:
        if not _one_kernel(x, self, mean, spread):
            return super()._normalize_with(x, mean, spread)
        # (x - mean) / sqrt(variance + eps) * weight + bias: BatchNorm's own eval kernel, one pass
        parameters = self._parameters
        return F.batch_norm(x, mean, spread, parameters["weight"], parameters["bias"], False, 0.0, self.eps)

    def _spreads(self, real: Tensor, image_mean: Tensor, group_mean: Tensor, sizes: tuple[int, ...] | None,
                 rows: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        if sizes is not None and len(sizes) > 1:
            group_mean = group_mean[_segments(sizes, real.device)]  # each image's group mean
        deviation = (real - group_mean[:, :, None, None]).square().mean(dim=(2, 3))  # two passes: accurate
        # an image's own variance is its mean squared deviation from the group mean less its mean's own
        image_variance = (deviation - (image_mean - group_mean).square()).clamp_min(0)
        image_rows = (torch.stack([image_mean, image_variance + image_mean.square()], dim=1)  # mean, 2nd moment
                      if rows else None)
        return _group_reduce(deviation, sizes, "mean"), image_variance, image_rows

    def _normalize_frozen(self, x: Tensor) -> Tensor:
        # nn.BatchNorm2d's own eval path, so a converted model's frozen outputs equal the original's.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _forward_train(self, x: Tensor) -> Tensor:
        if not _sync_enabled(self):
            return super(_PolicyNorm, self).forward(x)
        # Synchronised statistics: sums over every rank's images, differentiable through all_reduce.
        count_local = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        values = x.to(_compute_dtype(x))
        count_local = count_local.to(values.dtype)
        sums = torch.cat([values.sum(dim=(0, 2, 3)), values.square().sum(dim=(0, 2, 3)), count_local])
        sums = all_reduce_sum(sums, self.sync_group)
        channels = x.shape[1]
        count = sums[-1]
        mean = sums[:channels] / count
        variance = sums[channels:2 * channels] / count - mean.square()
        with torch.no_grad():
            factor = self._momentum_factor()
            unbiased = variance * count / (count - 1)
            self.running_mean.mul_(1 - factor).add_(factor * mean)
            self.running_var.mul_(1 - factor).add_(factor * unbiased)
        scale, shift = self.scale_shift(mean, variance)
        return _apply_affine(x, scale, shift)


class RobustNorm2d(_PolicyNorm):
    """RobustNorm (arXiv 2006.11007): ``y = weight * (x - mean) / (range ** p + eps) + bias``.

    Statistics are per channel over (N, H, W); ``range = max - min``. In training mode the layer uses the
    batch mean and range and updates ``running_mean`` and the running range (kept in ``running_var``) with
    ``running = (1 - momentum) * running + momentum * batch``, as the paper's reference code does.
    The ``frozen`` policy is the paper's RNT (tracked mean and range), ``batch`` is RN.
    """

    robust = True

    def __init__(self, num_features: int, p: float = 0.2, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, policy: str | Policy = "frozen") -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, policy=policy)
        if not p > 0:
            raise ValueError(f"RobustNorm's power p must be > 0, got {p}")
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"

    def _denominator(self, spread: Tensor) -> Tensor:
        return spread.pow(self.p) + self.eps

    def _normalize_with(self, x: Tensor, mean: Tensor, spread: Tensor) -> Tensor:
        if not _one_kernel(x, self, mean, spread):
            return super()._normalize_with(x, mean, spread)
        # weight * (x - mean) / denominator + bias is BatchNorm's eval kernel with variance denominator ** 2 and
        # eps 0 (the denominator is at least eps > 0): one pass, no per-channel scale and shift to make first
        parameters = self._parameters
        return F.batch_norm(x, mean, self._denominator(spread).square(), parameters["weight"], parameters["bias"],
                            False, 0.0, 0.0)

    def _spreads(self, real: Tensor, image_mean: Tensor, group_mean: Tensor, sizes: tuple[int, ...] | None,
                 rows: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        image_max, image_min = real.amax(dim=(2, 3)), real.amin(dim=(2, 3))
        spread = _group_reduce(image_max, sizes, "amax") - _group_reduce(image_min, sizes, "amin")
        image_rows = torch.stack([image_mean, image_max, image_min], dim=1) if rows else None
        return spread, image_max - image_min, image_rows

    def _forward_train(self, x: Tensor) -> Tensor:
        synchronised = _sync_enabled(self)
        if not synchronised and x.is_contiguous(memory_format=torch.channels_last):
            # CPUs vectorise wide matrices; accelerators want few kernel launches (see the two classes)
            normalize = RangeNormalize if x.device.type == "cpu" else RangeNormalizeRows
            out, mean, value_range = normalize.apply(x, self.weight, self.bias, self.p, self.eps)
            self._update_running(mean, value_range)
            return out
        # The generic autograd graph: other memory layouts, and synchronised statistics (DDP).
        values = x.to(_compute_dtype(x))
        if synchronised:
            count_local = torch.tensor([values.numel() / values.shape[1]], device=x.device, dtype=values.dtype)
            sums = all_reduce_sum(torch.cat([values.sum(dim=(0, 2, 3)), count_local]), self.sync_group)
            mean = sums[:-1] / sums[-1]
            maximum = all_reduce_extremum(values.amax(dim=(0, 2, 3)), self.sync_group, largest=True)
            minimum = all_reduce_extremum(values.amin(dim=(0, 2, 3)), self.sync_group, largest=False)
        else:
            mean = values.mean(dim=(0, 2, 3))
            maximum, minimum = values.amax(dim=(0, 2, 3)), values.amin(dim=(0, 2, 3))
        value_range = maximum - minimum
        self._update_running(mean, value_range)
        scale, shift = self.scale_shift(mean, value_range)
        return _apply_affine(x, scale, shift)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, value_range: Tensor) -> None:
        factor = self._momentum_factor()
        self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
        self.running_var.mul_(1 - factor).add_(factor * value_range.detach())


NORM_LAYERS = (AdaptiveBatchNorm2d, RobustNorm2d)


def policy_layers(model: nn.Module) -> list[tuple[str, _PolicyNorm]]:
    """The (qualified name, layer) pairs of every policy-following norm layer, in forward order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _PolicyNorm)]


def set_policy(model: nn.Module, policy: str | Policy) -> nn.Module:
    """Set the statistics policy of every :class:`RobustNorm2d` and :class:`AdaptiveBatchNorm2d` in ``model``."""
    parsed = parse_policy(policy)
    for _, layer in policy_layers(model):
        layer.policy = parsed
    return model


def enable_sync(model: nn.Module, process_group: object | None = None) -> nn.Module:
    """Make the norm layers all-reduce their training batch statistics over ``process_group`` (DDP).

    Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``, which would silently replace RobustNorm layers by
    plain synchronised BatchNorm, this keeps each layer's own statistics (mean and range for RobustNorm).
    """
    for _, layer in policy_layers(model):
        layer.sync_enabled = True
        layer.sync_group = process_group
    return model


def convert_norms(model: nn.Module, policy: str | Policy = "frozen") -> nn.Module:
    """Replace, in place, every ``nn.BatchNorm2d`` of ``model`` by :class:`AdaptiveBatchNorm2d`.

    Parameters and buffers are carried over (same keys, same tensors), so under ``frozen`` the converted
    model's eval outputs equal the original's. Returns ``model`` (a bare ``nn.BatchNorm2d`` is returned
    converted).
    """
    parsed = parse_policy(policy)
    if isinstance(model, nn.BatchNorm2d) and not isinstance(model, _PolicyNorm):
        return _converted(model, parsed)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, _PolicyNorm):
            setattr(model, name, _converted(child, parsed))
        else:
            convert_norms(child, parsed)
    set_policy(model, parsed)
    return model


def _converted(layer: nn.BatchNorm2d, policy: Policy) -> AdaptiveBatchNorm2d:
    if not layer.track_running_stats or layer.running_mean is None:
        raise ValueError("convert_norms needs BatchNorm layers that track running statistics")
    new = AdaptiveBatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                              affine=layer.affine, policy=policy)
    new.weight, new.bias = layer.weight, layer.bias
    new.running_mean, new.running_var = layer.running_mean, layer.running_var
    new.num_batches_tracked = layer.num_batches_tracked
    new.train(layer.training)
    return new
