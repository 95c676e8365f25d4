"""Drift: how far the statistics a batch shows the normalization layers lie from the training population.

Definitions (also in ``docs/drift.md``). For a normalization layer with ``C`` channels, population mean
``m_p`` and population spread ``s_p`` (the running variance ``v_p`` for BatchNorm layers, the running range
``r_p`` for RobustNorm layers), and a group of real images with batch mean ``m_b`` and spread ``s_b``
(biased variance, or range), each measure is averaged over the channels:

- ``mean_shift``: ``|m_b - m_p| / sd_p``, the mean shift in population standard deviations, with
  ``sd_p = sqrt(v_p + eps)`` (RobustNorm layers: in units of the population range ``r_p + eps``);
- ``log_var_ratio``: ``log((v_b + eps) / (v_p + eps))`` (RobustNorm layers: ``log((r_b + eps) / (r_p + eps))``);
- ``kl``: the Gaussian KL divergence ``KL(N(m_b, sd_b^2) || N(m_p, sd_p^2))``
  ``= 0.5 * ((sd_b^2 + (m_b - m_p)^2) / sd_p^2 - 1 - log(sd_b^2 / sd_p^2))`` (RobustNorm layers take the
  range as the scale, ``sd = r + eps``).
All three are exactly zero when the batch statistics equal the population's.

Batch score: ``raw = mean over layers of kl``. Clean batches of ``n`` images drift by chance (and a range grows
with the number of values it spans), so the score is calibrated per batch size on clean held-out data:
``score = (log(raw) - mu_n) / sigma_n``, where ``mu_n`` and ``sigma_n`` are the mean and standard deviation of
``log(raw)`` over clean batches of size ``n`` (linear interpolation in ``log2 n`` between calibrated sizes).
A clean batch of any size scores about 0 with unit spread; 3 is a three-sigma event.

Image score: each image's own per-channel statistics over (H, W) at the inputs of the first ``K`` norm layers,
its mean and the log of its spread (``log(s + eps)``, the layer's measure: variance or range), concatenated into
``f``; ``raw = mean_d ((f_d - mu_d) / sigma_d)^2`` with ``mu``, ``sigma`` from clean held-out images;
``score = raw / q``, ``q`` the 99th percentile of ``raw`` on clean held-out images, so about 1% of clean images
score above 1. The spreads are what see contrast and blur changes, which leave an image's channel means almost
where they were; on the bundled models the score still misses noise and adversarial perturbations, which the
batch score catches (cards calibrated before spreads were added, ``image_features: "mean"``, score means only).
The image score is calibrated with ``frozen`` statistics and the batch score under the card's policy, and both
are only meaningful under the card's policy: under ``batch`` or ``blend`` statistics the early features of layers
after the first are re-normalised by the batch itself, which moves both scores (under ``batch``, the bundled
models' clean batches of 32 score -5.6 and -7.4 instead of about 0, and up to 15% of clean images score above 1;
``python benchmarks/drift_policy_probe.py``). So the service
scores drift only for batches run under the card's policy; under any other (``--policy`` or ``?policy=``) it
reports the per-layer measures but no scores, and warns at start-up. To score another policy, calibrate for it:
``robustnorm calibrate MODEL --policy adaptive:16 --out DIR``, then serve ``DIR``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .gate import cached_tensors
from .grouping import GroupRun, batch_groups
from .layers import policy_layers
from .policy import Policy, parse_policy
from .stream import image_spread_from_rows

MEASURES = ("mean_shift", "log_var_ratio", "kl")
DEFAULT_CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IMAGE_SCORE_LAYERS = 3
IMAGE_SCORE_QUANTILE = 0.99
IMAGE_FEATURES = "mean+log_spread"  # what new calibrations score; "mean" is the older, means-only score
_EPS = 1e-5


def _channel_terms(batch_mean: Tensor, batch_spread: Tensor, population_mean: Tensor, population_spread: Tensor,
                   robust: bool) -> Tensor:
    """The three drift measures per channel, (3, G, C) in the order of ``MEASURES``, before averaging."""
    if robust:
        scale_b, scale_p = batch_spread + _EPS, population_spread + _EPS
        variance_b, variance_p = scale_b.square(), scale_p.square()
    else:
        variance_b, variance_p = batch_spread + _EPS, population_spread + _EPS
        scale_p = variance_p.sqrt()
    delta = batch_mean - population_mean
    log_ratio = torch.log(variance_b / variance_p)
    kl = 0.5 * ((variance_b + delta.square()) / variance_p - 1.0 - log_ratio)
    return torch.stack([delta.abs() / scale_p, 0.5 * log_ratio if robust else log_ratio, kl])


def layer_drift(batch_mean: Tensor, batch_spread: Tensor, population_mean: Tensor,
                population_spread: Tensor, robust: bool) -> dict[str, Tensor]:
    """The three drift measures for rows of batch statistics (G, C) against the population (C,).

    Returns one tensor of shape (G,) per measure, each averaged over channels.
    """
    terms = _channel_terms(batch_mean, batch_spread, population_mean, population_spread, robust).mean(dim=2)
    return dict(zip(MEASURES, terms.unbind(0)))


@dataclass
class DriftCalibration:
    """Clean-data calibration of the batch and image drift scores (stored in the model card)."""

    batch_sizes: list[int]
    log_kl_mean: list[float]
    log_kl_std: list[float]
    image_layers: list[str]
    image_feature_mean: list[float]
    image_feature_std: list[float]
    image_threshold: float
    samples: dict[str, int] = field(default_factory=dict)
    image_features: str = "mean"  # the default reads cards calibrated before per-image spreads were scored
    policy: str | None = None  # the policy the batch score was calibrated under (None: older cards, the card's)
    gate: dict | None = None  # the auto policy's drift gate (robustnorm.stream.GateCalibration), when calibrated

    def to_dict(self) -> dict:
        data = asdict(self)
        for optional in ("policy", "gate"):
            if data[optional] is None:
                del data[optional]  # older cards read and hash as they were written
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DriftCalibration:
        return cls(**data)

    def image_tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``image_feature_mean`` and ``image_feature_std`` as tensors, made once per dtype and device (every
        batch's image scores need them)."""
        mean, std = cached_tensors(self, "_image_tensors", dtype, device, self.image_feature_mean,
                                   self.image_feature_std)
        return mean, std

    def batch_center(self, n: int) -> tuple[float, float]:
        """``(mu_n, sigma_n)`` of clean ``log(raw)``, interpolated linearly in ``log2 n``."""
        sizes = [math.log2(size) for size in self.batch_sizes]
        position = min(max(math.log2(max(n, 1)), sizes[0]), sizes[-1])
        for i in range(len(sizes) - 1):
            if position <= sizes[i + 1]:
                t = (position - sizes[i]) / (sizes[i + 1] - sizes[i])
                mean = (1 - t) * self.log_kl_mean[i] + t * self.log_kl_mean[i + 1]
                std = (1 - t) * self.log_kl_std[i] + t * self.log_kl_std[i + 1]
                return mean, std
        return self.log_kl_mean[-1], self.log_kl_std[-1]


@dataclass
class DriftReport:
    """Drift of one grouped forward: per layer and measure one value per group, and the two scores."""

    layers: dict[str, dict[str, list[float]]]
    raw_batch: list[float]
    batch_score: list[float | None]
    image_score: list[float] | None


_AVERAGING: dict[tuple, Tensor] = {}  # (channels per layer, dtype, device) -> its averaging matrix


def _averaging(widths: tuple[int, ...], like: Tensor) -> Tensor:
    """(C, L): column l averages the channels of layer l among ``widths`` laid side by side."""
    key = (widths, like.dtype, like.device)
    matrix = _AVERAGING.get(key)
    if matrix is None:
        sizes = torch.tensor(widths)
        layer_of = torch.repeat_interleave(torch.arange(len(widths)), sizes)
        matrix = torch.zeros(int(sizes.sum()), len(widths), dtype=like.dtype)
        matrix[torch.arange(layer_of.numel()), layer_of] = 1.0 / sizes[layer_of].to(like.dtype)
        matrix = _AVERAGING[key] = matrix.to(like.device)
    return matrix


def _layer_measures(run: GroupRun) -> tuple[list[str], Tensor]:
    """Every layer's three measures, (L, 3, G) in the order of the names returned and of ``MEASURES``.

    The layers of one kind (BatchNorm, RobustNorm) are measured together, their channels side by side, and each
    layer's value is the mean over its own channels (a product with an averaging matrix): a handful of tensor
    operations per forward, where one layer at a time took a few dozen.
    """
    names = list(run.stats)
    if not names:
        return names, torch.empty(0)
    first = run.stats[names[0]].mean
    values = first.new_empty((len(names), len(MEASURES), first.shape[0]))
    for robust in (False, True):
        index = [i for i, name in enumerate(names) if run.robust_layers[name] == robust]
        if not index:
            continue
        kind = [names[i] for i in index]
        terms = _channel_terms(torch.cat([run.stats[name].mean for name in kind], dim=1),
                               torch.cat([run.stats[name].spread for name in kind], dim=1),
                               torch.cat([run.population[name][0] for name in kind]).to(first),
                               torch.cat([run.population[name][1] for name in kind]).to(first), robust)
        averaged = terms @ _averaging(tuple(run.stats[name].mean.shape[1] for name in kind), terms)  # (3, G, L)
        values[torch.tensor(index, device=values.device)] = averaged.permute(2, 0, 1)
    return names, values


def image_features(run: GroupRun, layers: Iterable[str], kind: str = IMAGE_FEATURES) -> Tensor:
    """Each image's features for the image score, (n_real, D): per layer its channel means and, for
    ``"mean+log_spread"``, the logs of its channel spreads."""
    if kind not in ("mean", "mean+log_spread"):
        raise ValueError(f"unknown image features {kind!r}: use 'mean' or 'mean+log_spread'")
    parts = []
    for name in layers:
        stats = run.stats[name]
        parts.append(stats.image_mean)
        if kind == "mean+log_spread":
            spread = stats.image_spread
            if spread is None:  # an engine that hands over rows only (ONNX Runtime): only the layers read
                assert stats.image_rows is not None
                spread = image_spread_from_rows(stats.image_rows, run.robust_layers[name])
            parts.append(torch.log(spread + _EPS))
    return torch.cat(parts, dim=1)


def _image_raw(run: GroupRun, calibration: DriftCalibration) -> Tensor:
    features = image_features(run, calibration.image_layers, calibration.image_features)
    mean, std = calibration.image_tensors(features.dtype, features.device)
    return ((features - mean) / std).square().mean(dim=1)


def image_scores(run: GroupRun, calibration: DriftCalibration) -> list[float]:
    """Each real image's calibrated drift score (about 1 at the clean threshold), from a recorded forward: a
    few layers' per-image features, cheap beside :func:`drift_report`'s per-layer measures."""
    if not run.record:
        raise ValueError("image_scores needs a forward run with batch_groups(..., record=True)")
    if not run.stats:
        return []
    return (_image_raw(run, calibration) / calibration.image_threshold).tolist()


def drift_report(run: GroupRun, calibration: DriftCalibration | None = None, *, images: bool = True
                 ) -> DriftReport:
    """Turn a recorded grouped forward (``batch_groups(..., record=True)``) into drift measures and scores.

    The measures are computed on the device and copied to the host once. ``images=False`` leaves out the
    image scores (``image_score`` is None), for a caller that took them already with :func:`image_scores`.
    """
    if not run.record:
        raise ValueError("drift_report needs a forward run with batch_groups(..., record=True)")
    names, measures = _layer_measures(run)
    if not names:
        return DriftReport(layers={}, raw_batch=[], batch_score=[], image_score=None)
    raw = measures[:, MEASURES.index("kl")].mean(dim=0)
    image_raw = _image_raw(run, calibration) if calibration is not None and images else None
    # One transfer to the host for everything.
    packed = torch.cat([measures.reshape(len(names) * len(MEASURES), -1), raw[None]])
    host = packed.tolist()
    layers = {name: {measure: host[i * len(MEASURES) + j] for j, measure in enumerate(MEASURES)}
              for i, name in enumerate(names)}
    raw_batch = host[-1]
    counts = next(iter(run.stats.values())).counts.tolist()
    batch_score: list[float | None] = [None] * len(raw_batch)
    image_score = None
    if calibration is not None:
        for i, (value, n) in enumerate(zip(raw_batch, counts)):
            mean, std = calibration.batch_center(int(n))
            batch_score[i] = (math.log(max(value, 1e-30)) - mean) / std
        if image_raw is not None:
            image_score = (image_raw / calibration.image_threshold).tolist()
    return DriftReport(layers=layers, raw_batch=raw_batch, batch_score=batch_score, image_score=image_score)


@torch.no_grad()
def calibrate_drift(model: nn.Module, images: Tensor, batch_sizes: Iterable[int] = DEFAULT_CALIBRATION_SIZES,
                    batches_per_size: int = 64, chunk: int = 1024, image_layers: int = IMAGE_SCORE_LAYERS,
                    seed: int = 0, policy: str | Policy | None = None) -> DriftCalibration:
    """Calibrate the batch score per batch size and the image score on clean, normalised held-out images.

    ``images`` is a (N, C, H, W) float tensor already normalised by the model card's mean/std, on the
    model's device. For each size ``n``, ``batches_per_size`` clean batches are drawn at random (distinct
    images within a batch) so that large sizes get as many samples as small ones. ``policy`` (default: the
    model's own) is used for the batch score (the statistics it is deployed with) and ``frozen`` for the image
    score.
    """
    model.eval()
    layers = policy_layers(model)
    if not layers:
        raise ValueError("the model has no RobustNorm2d or AdaptiveBatchNorm2d layers to calibrate")
    generator = torch.Generator().manual_seed(seed)
    sizes = sorted({int(n) for n in batch_sizes if 0 < int(n) <= images.shape[0]})
    log_mean, log_std = [], []
    for n in sizes:
        index = torch.stack([torch.randperm(images.shape[0], generator=generator)[:n]
                             for _ in range(batches_per_size)]).flatten().to(images.device)
        per_forward = max(1, chunk // n)
        raw: list[float] = []
        for start in range(0, batches_per_size, per_forward):
            count = min(per_forward, batches_per_size - start)
            part = images[index[start * n:(start + count) * n]]
            with batch_groups(model, [n] * count, policy=policy, record=True) as run:
                model(part)
            raw += drift_report(run).raw_batch
        logs = torch.tensor([math.log(max(value, 1e-30)) for value in raw], dtype=torch.float64)
        log_mean.append(float(logs.mean()))
        log_std.append(float(logs.std()) if logs.numel() > 1 else 1.0)
    original = parse_policy(policy) if policy is not None else layers[0][1].policy
    names = [name for name, _ in layers[:image_layers]]
    features = []
    for start in range(0, images.shape[0], chunk):
        with batch_groups(model, policy="frozen", record=True) as run:
            model(images[start:start + chunk])
        features.append(image_features(run, names))
    feats = torch.cat(features)
    feature_mean, feature_std = feats.mean(dim=0), feats.std(dim=0).clamp_min(1e-6)
    raw = ((feats - feature_mean) / feature_std).square().mean(dim=1)
    threshold = float(torch.quantile(raw, IMAGE_SCORE_QUANTILE))
    return DriftCalibration(
        batch_sizes=sizes, log_kl_mean=log_mean, log_kl_std=[max(s, 1e-6) for s in log_std],
        image_layers=names, image_feature_mean=feature_mean.tolist(), image_feature_std=feature_std.tolist(),
        image_threshold=threshold, samples={"images": int(images.shape[0])}, image_features=IMAGE_FEATURES,
        policy=str(original),
    )
