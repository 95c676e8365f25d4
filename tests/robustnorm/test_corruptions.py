"""Corruptions on real CIFAR-10 images: range, references, severity ordering and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustnorm.corruptions import (
    CORRUPTIONS,
    contrast,
    corrupt,
    gaussian_blur,
    gaussian_noise,
    get_corruption,
    jpeg,
)
from robustnorm.data import balanced_subset, load_cifar10, make_generator, to_float


@pytest.fixture(scope="module")
def x(cifar10: Path) -> torch.Tensor:
    test = load_cifar10("test", cifar10)
    return to_float(test.images[balanced_subset(test.labels, 2)])  # 20 images, 2 per class


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_severity_stays_in_range_and_grows(name: str, x: torch.Tensor) -> None:
    distances = []
    for severity in range(1, 6):
        out = corrupt(name, x, severity, make_generator(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        distances.append(float((out - x).abs().mean()))
    assert x.min() >= 0 and distances[0] > 0
    assert distances == sorted(distances), f"{name}: distance to the clean images should grow, {distances}"


def test_gaussian_blur_matches_a_float64_reference(x: torch.Tensor) -> None:
    sigma = 0.8
    radius = 3  # ceil(3 * 0.8)
    offsets = np.arange(-radius, radius + 1)
    kernel_1d = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = np.outer(kernel_1d, kernel_1d) / kernel_1d.sum() ** 2
    image = x[0].double().numpy()
    padded = np.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    expected = np.zeros_like(image)
    for c in range(image.shape[0]):
        for i in range(image.shape[1]):
            for j in range(image.shape[2]):
                expected[c, i, j] = (padded[c, i : i + 2 * radius + 1, j : j + 2 * radius + 1] * kernel).sum()
    assert np.allclose(gaussian_blur(x[:1], sigma)[0].numpy(), expected, atol=1e-5)
    assert torch.equal(gaussian_blur(x, 0), x)


def test_contrast_keeps_each_channel_mean_and_scales_the_spread(x: torch.Tensor) -> None:
    out = contrast(x, 0.5)  # lowering contrast never leaves [0, 1], so nothing is clipped
    assert torch.allclose(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(out.std(dim=(2, 3)), 0.5 * x.std(dim=(2, 3)), atol=1e-6)


def test_gaussian_noise_is_seeded_and_has_the_asked_spread() -> None:
    grey = torch.full((8, 3, 32, 32), 0.5)
    first = gaussian_noise(grey, 0.05, make_generator(1))
    assert torch.equal(first, gaussian_noise(grey, 0.05, make_generator(1)))
    assert not torch.equal(first, gaussian_noise(grey, 0.05, make_generator(2)))
    assert abs(float((first - grey).std()) - 0.05) < 0.002


def test_jpeg_round_trip(x: torch.Tensor) -> None:
    high, low = jpeg(x, 95), jpeg(x, 10)
    assert torch.equal(high * 255, (high * 255).round())  # decoded 8-bit pixels
    assert float((high - x).abs().mean()) < 0.02 < float((low - x).abs().mean())
    with pytest.raises(ValueError, match="RGB"):
        jpeg(x[:, :1], 75)


def test_registry_applies_the_level_of_each_severity(x: torch.Tensor) -> None:
    blur = get_corruption("gaussian_blur")
    assert torch.equal(corrupt("gaussian_blur", x, 3), gaussian_blur(x, blur.levels[2]))
    assert torch.equal(corrupt("jpeg", x, 5), jpeg(x, int(CORRUPTIONS["jpeg"].levels[4])))
    with pytest.raises(ValueError, match="valid names are"):
        corrupt("snow", x, 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt("contrast", x, 6)
    with pytest.raises(ValueError, match="float batch"):
        corrupt("contrast", (x * 255).to(torch.uint8), 1)
