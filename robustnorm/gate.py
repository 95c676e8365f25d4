"""The drift gate of the ``auto`` policy: has a stream's traffic shifted away from the training distribution?

The gate reads the images themselves, so its score means the same under every statistics policy (a feature
of a deeper layer's input would move when the layers before it adapt). For each image, per colour channel of
the normalised pixels: the mean, the log standard deviation, the log mean squared and mean absolute
difference between neighbouring pixels (noise raises them, blur and contrast lower them, pixelation makes
them sparse), the log ratio of those differences across 8-pixel block edges to all of them (JPEG blocks) and,
in the feature set ``pixels+fine`` (:data:`GATE_FEATURES`, what ``calibrate_gate`` fits), the log ratio of the
mean squared difference between neighbouring pixels to that between pixels two apart: how much of the image's
detail sits at the finest scale. Blur lowers it and noise raises it, but it also moves where the others hardly
do: under glass blur (an image blurred, its pixels shuffled locally, blurred again: less detail overall but
jitter at the finest scale) and frost (a textured overlay). Cards calibrated before it was added keep the
feature set ``pixels`` (the first five), which their thresholds were fitted on.

Label skew must not look like shift: a camera that sees only ships sees blue, smooth images. So each image is
compared with the clean images of the class the model predicts for it: its raw score is the mean over
features of ``((f - mu_c) / sigma_c)^2``, with ``mu_c`` and ``sigma_c`` from clean held-out images predicted as
``c``, so that clean images of any one class score about 1 on average. A stream's gate score is the mean raw
score over the images of its window; it switches to adapted statistics above ``on`` and back below ``off``
(hysteresis), deciding nothing before the window holds ``min_images``. ``robustnorm calibrate`` sets the
thresholds from clean and label-skewed held-out windows (``docs/drift.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

FEATURE_SETS = {
    "pixels": ("mean", "log_std", "log_diff_sq", "log_diff_abs", "log_block_edges"),
    "pixels+fine": ("mean", "log_std", "log_diff_sq", "log_diff_abs", "log_block_edges", "log_fine_ratio"),
}
GATE_FEATURES = "pixels+fine"  # what calibrate_gate fits
_BLOCK = 8


def _squared_differences(x: Tensor, step: int) -> Tensor:
    """Mean squared difference between pixels ``step`` apart, across plus down, per image and channel."""
    return ((x[:, :, :, step:] - x[:, :, :, :-step]).square().mean(dim=(2, 3))
            + (x[:, :, step:] - x[:, :, :-step]).square().mean(dim=(2, 3)))


def image_features(pixels: Tensor, kind: str = GATE_FEATURES) -> Tensor:
    """The gate's features of each image (n, C * features), from normalised pixels (n, C, H, W), channel-major
    within each feature (the order of ``FEATURE_SETS[kind]``)."""
    if kind not in FEATURE_SETS:
        raise ValueError(f"unknown gate feature set {kind!r}; known: {', '.join(FEATURE_SETS)}")
    x = pixels.float()
    mean = x.mean(dim=(2, 3))
    across, down = (x[:, :, :, 1:] - x[:, :, :, :-1]), (x[:, :, 1:] - x[:, :, :-1])
    squared = across.square().mean(dim=(2, 3)) + down.square().mean(dim=(2, 3))  # _squared_differences(x, 1)
    across, down = across.abs(), down.abs()
    absolute = across.mean(dim=(2, 3)) + down.mean(dim=(2, 3)) + 1e-4
    edges = across[:, :, :, _BLOCK - 1::_BLOCK].mean(dim=(2, 3)) + down[:, :, _BLOCK - 1::_BLOCK].mean(dim=(2, 3))
    squared = squared + 1e-6
    # the standard deviation in two passes (unbiased, as Tensor.std): std over a flattened dim took half the time
    deviation = (x - mean[:, :, None, None]).square().sum(dim=(2, 3)).div_(x.shape[2] * x.shape[3] - 1).sqrt_()
    positive = [deviation.clamp_min(1e-4), squared, absolute, (edges + 1e-4) / absolute]
    if kind == "pixels+fine":
        positive.append(squared / (_squared_differences(x, 2) + 1e-6))
    # every log at once; (n, features, C) flattened is channel-major within each feature
    return torch.cat([mean, torch.stack(positive, dim=1).log().flatten(1)], dim=1)


@dataclass
class GateCalibration:
    """Clean per-class feature statistics and the thresholds of the gate (stored in the model card)."""

    class_mean: list[list[float]]  # (classes, features)
    class_std: list[list[float]]
    on: float  # switch to stream statistics when the window's mean raw score exceeds this
    off: float  # and back to the population below this one
    min_images: int = 64  # the gate decides nothing on fewer images
    samples: dict[str, float] | None = None  # what the calibration saw (counts, clean and skewed maxima)
    features: str = "pixels"  # the feature set (FEATURE_SETS); cards without the field were fitted on "pixels"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GateCalibration:
        return cls(**data)

    def image_raw(self, pixels: Tensor, predicted: Tensor) -> Tensor:
        """Each image's raw score against the clean images of its predicted class, (n,)."""
        features = image_features(pixels, self.features)
        class_mean, class_std = self._class_tensors(features.dtype, features.device)
        return ((features - class_mean[predicted]) / class_std[predicted]).square().mean(dim=1)

    def _class_tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``class_mean`` and ``class_std`` as tensors, made once per dtype and device (every batch needs them)."""
        return cached_tensors(self, "_tensors", dtype, device, self.class_mean, self.class_std)


def cached_tensors(owner: object, slot: str, dtype: torch.dtype, device: torch.device, *values: list
                   ) -> tuple[Tensor, ...]:
    """``values`` (lists of a calibration) as tensors, made once per dtype and device and kept in ``owner``'s
    ``slot`` (outside its dataclass fields, so that ``asdict`` and equality ignore them)."""
    cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, ...]] = owner.__dict__.setdefault(slot, {})
    key = (dtype, device)
    if key not in cache:
        cache[key] = tuple(torch.tensor(value, dtype=dtype, device=device) for value in values)
    return cache[key]


def class_statistics(features: Tensor, predicted: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Per predicted class, the features' mean and standard deviation (a class never predicted takes the
    overall ones)."""
    overall_mean, overall_std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-4)
    means, stds = [], []
    for c in range(classes):
        chosen = features[predicted == c]
        enough = chosen.shape[0] >= 2
        means.append(chosen.mean(dim=0) if enough else overall_mean)
        stds.append(chosen.std(dim=0).clamp_min(1e-4) if enough else overall_std)
    return torch.stack(means), torch.stack(stds)


def window_scores(raw: Tensor, window: int, starts: Sequence[int]) -> list[float]:
    """Mean raw score of ``raw[start:start + window]`` for each start (the gate score of those windows)."""
    return [float(raw[start:start + window].mean()) for start in starts]


@torch.no_grad()
def calibrate_gate(model: torch.nn.Module, images: Tensor, labels: Tensor, *, window: int, classes: int,
                   windows: int = 64, margin: float = 1.1, min_images: int = 64, seed: int = 0,
                   chunk: int = 1000, features: str = GATE_FEATURES) -> GateCalibration:
    """Fit the gate on clean held-out images (normalised, with their true ``labels``).

    Half the images give each predicted class's feature statistics (the model's own predictions under
    ``frozen``, as the gate sees them in service); the other half scores ``windows`` random clean windows of
    ``window`` images and label-skewed windows of one class and of two classes. ``off`` is ``margin`` times
    the highest of those scores, ``on`` is ``margin`` times ``off``: clean and label-skewed traffic stay below
    both with room to spare.
    """
    from .grouping import batch_groups

    model.eval()
    predicted = []
    for part in images.split(chunk):
        with batch_groups(model, policy="frozen"):
            predicted.append(model(part).argmax(dim=1))
    predicted = torch.cat(predicted)
    kind, features = features, image_features(images, features)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    fit, held = order[: len(order) // 2], order[len(order) // 2:]
    class_mean, class_std = class_statistics(features[fit], predicted[fit], classes)
    raw = ((features[held] - class_mean[predicted[held]]) / class_std[predicted[held]]).square().mean(dim=1)
    held_labels = labels[held].to(raw.device)
    size = min(window, held.numel())
    clean = [float(raw[torch.randperm(raw.numel(), generator=generator)[:size]].mean()) for _ in range(windows)]
    skewed = []
    for first in range(classes):
        for second in (first, (first + 1) % classes):
            pool = torch.nonzero((held_labels == first) | (held_labels == second)).flatten()
            if pool.numel():
                skewed.append(float(raw[pool[torch.randperm(pool.numel(), generator=generator)[:size]]].mean()))
    highest = max(clean + skewed)
    off = margin * highest
    return GateCalibration(class_mean=class_mean.tolist(), class_std=class_std.tolist(), on=margin * off, off=off,
                           min_images=min(min_images, window), features=kind,
                           samples={"images": float(images.shape[0]), "window": float(size),
                                    "clean_mean": sum(clean) / len(clean), "clean_max": max(clean),
                                    "skewed_max": max(skewed) if skewed else 0.0})
