"""CIFAR-10-C's corruptions: the registry and its sets, the API's contract (shape, dtype, range, seeds, errors),
vectorised steps against slow references written the original's way, and the bundled model's error by severity."""

from __future__ import annotations

import colorsys
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import robustnorm
from robustnorm import _corruption_ops as ops
from robustnorm.corruptions import (
    CORRUPTIONS,
    TEST_CORRUPTIONS,
    VALIDATION_CORRUPTIONS,
    corrupt,
    get_corruption,
)
from robustnorm.data import balanced_subset, load_cifar10, make_generator, normalize, to_float

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform", "speckle_noise", "spatter"}


@pytest.fixture(scope="module")
def smooth() -> torch.Tensor:
    """Four synthetic 32x32 images: smooth colour fields, so no test of the contract needs the data."""
    generator = make_generator(11)
    coarse = torch.rand(4, 3, 5, 5, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear").mul(0.9).add(0.05)


@pytest.fixture(scope="module")
def real(cifar10: Path) -> torch.Tensor:
    test = load_cifar10("test", cifar10)
    return to_float(test.images[balanced_subset(test.labels, 2)])  # 20 images, 2 per class


def test_the_benchmark_and_validation_sets() -> None:
    assert TEST_CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
    assert VALIDATION_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert not set(TEST_CORRUPTIONS) & set(VALIDATION_CORRUPTIONS)
    assert set(TEST_CORRUPTIONS) | set(VALIDATION_CORRUPTIONS) == set(CORRUPTIONS)
    assert all(len(c.levels) == 5 and c.family in {"noise", "blur", "weather", "digital"} for c in CORRUPTIONS.values())
    assert get_corruption("JPEG") is get_corruption("jpeg_compression")


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_contract_shape_dtype_range_and_seeds(name: str, smooth: torch.Tensor) -> None:
    before = smooth.clone()
    out = corrupt(name, smooth, 3, generator=7)
    assert out.shape == smooth.shape and out.dtype == smooth.dtype
    assert out.min() >= 0 and out.max() <= 1 and not out.isnan().any()
    assert torch.equal(smooth, before), "the input must not change"
    assert torch.equal(out, corrupt(name, smooth, 3, generator=7))
    assert torch.equal(corrupt(name, smooth, 3, make_generator(5)), corrupt(name, smooth, 3, make_generator(5)))
    if name in RANDOM:
        assert not torch.equal(out, corrupt(name, smooth, 3, generator=8))
        twins = corrupt(name, smooth[:1].expand(2, -1, -1, -1), 3, generator=7)
        assert not torch.equal(twins[0], twins[1]), "every image of a batch draws its own randomness"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_dtypes_come_back_as_they_came(dtype: torch.dtype, smooth: torch.Tensor) -> None:
    out = corrupt("motion_blur", smooth.to(dtype), 2, generator=0)
    assert out.dtype == dtype and out.min() >= 0 and out.max() <= 1
    assert corrupt("fog", smooth[:0], 1).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_changes_real_images_and_severity_5_more(name: str, real: torch.Tensor) -> None:
    distance = [float((corrupt(name, real, s, generator=0) - real).abs().mean()) for s in (1, 5)]
    assert distance[0] > 0
    if name == "elastic_transform":
        # Level 1 is a large affine warp, level 5 a small one plus local jitter: pixels move less, but the
        # image is rougher, and the model's error grows (test_error_grows_with_severity_on_the_bundled_model).
        return
    assert distance[1] > distance[0], f"{name}: {distance}"


def test_noise_has_the_right_strength() -> None:
    grey = torch.full((8, 3, 32, 32), 0.5)
    assert float(corrupt("gaussian_noise", grey, 5, 0).std()) == pytest.approx(0.10, rel=0.05)
    assert float(corrupt("shot_noise", grey, 1, 0).std()) == pytest.approx(math.sqrt(0.5 * 500) / 500, rel=0.05)
    assert float((corrupt("impulse_noise", grey, 5, 0) != grey).float().mean()) == pytest.approx(0.07, rel=0.1)
    assert float((corrupt("contrast", grey, 5) - grey).abs().max()) < 1e-6


@pytest.mark.parametrize("bad", [torch.rand(2, 32, 32), torch.rand(2, 1, 32, 32), torch.rand(2, 3, 4, 4),
                                 (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), torch.rand(2, 3, 32, 32) * 2 - 1,
                                 np.random.rand(2, 3, 32, 32)])
def test_bad_pixels_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        corrupt("snow", bad, 1)


def test_bad_severity_name_or_seed_is_refused(smooth: torch.Tensor) -> None:
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt("fog", smooth, severity)
    with pytest.raises(ValueError, match=r"valid names are .*'gaussian_noise'"):
        corrupt("rain", smooth, 1)
    with pytest.raises(ValueError, match="seed"):
        corrupt("fog", smooth, 1, generator=-1)
    with pytest.raises(ValueError, match="generator"):
        corrupt("fog", smooth, 1, generator=np.random.default_rng(0))


def test_the_library_core_does_not_import_scipy() -> None:
    code = "import sys, robustnorm; assert 'scipy' not in sys.modules and 'robustnorm.corruptions' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- vectorised steps against references


def test_glass_shuffle_matches_the_original_sequential_loop(smooth: torch.Tensor) -> None:
    x = smooth.double().numpy()
    out = ops.glass_shuffle(x, np.random.default_rng(3))
    shift = np.random.default_rng(3).integers(-1, 1, size=(2, 4, 1, 30, 30))  # the same draws
    for n in range(4):
        image = x[n].transpose(1, 2, 0).copy()  # (H, W, C), as the original held it
        for h in range(31, 1, -1):
            for w in range(31, 1, -1):
                dy, dx = shift[0, n, 0, h - 2, w - 2], shift[1, n, 0, h - 2, w - 2]
                # The original's statement; on numpy views it copies (h+dy, w+dx) into (h, w).
                image[h, w], image[h + dy, w + dx] = image[h + dy, w + dx], image[h, w]
        np.testing.assert_array_equal(out[n], image.transpose(2, 0, 1))


def test_motion_blur_matches_imagemagicks_kernel_written_out() -> None:
    image = np.random.default_rng(0).random((1, 2, 12, 16))
    radius, sigma, angle = 6, 2.5, 33.0
    width = 2 * radius + 1
    kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    kernel /= kernel.sum()
    expected = np.zeros_like(image)
    for y in range(12):
        for x in range(16):
            for i in range(width):
                dx = math.ceil(i * math.cos(math.radians(angle)) - 0.5)
                dy = math.ceil(i * math.sin(math.radians(angle)) - 0.5)
                expected[0, :, y, x] += kernel[i] * image[0, :, min(max(y + dy, 0), 11), min(max(x + dx, 0), 15)]
    np.testing.assert_allclose(ops.motion_blur(image, radius, sigma, np.array([angle])), expected, atol=1e-12)


@pytest.mark.parametrize("factor", [1.0, 1.13, 1.25, 1.75, 2.25])
def test_clipped_zoom_matches_zooming_the_crop(factor: float) -> None:
    image = np.random.default_rng(1).random((32, 32, 3))
    crop = math.ceil(32 / factor)
    top = (32 - crop) // 2
    zoomed = ndimage.zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - 32) // 2
    expected = zoomed[trim : trim + 32, trim : trim + 32].transpose(2, 0, 1)
    np.testing.assert_allclose(ops.clipped_zoom(image.transpose(2, 0, 1)[None], factor)[0], expected, atol=1e-12)


def test_brightness_and_saturate_match_an_hsv_round_trip() -> None:
    rng = np.random.default_rng(2)
    pixels = np.concatenate([rng.random((60, 3)), [[0, 0, 0], [1, 1, 1], [0.4, 0.4, 0.4], [0.2, 0.5, 0.5]]])
    x = torch.from_numpy(pixels.T.reshape(1, 3, 8, 8).copy())

    def round_trip(change: object) -> np.ndarray:
        return np.array([colorsys.hsv_to_rgb(*change(*colorsys.rgb_to_hsv(*p))) for p in pixels]).T.reshape(1, 3, 8, 8)

    brighter = round_trip(lambda h, s, v: (h, s, min(v + 0.3, 1)))
    saturated = round_trip(lambda h, s, v: (h, min(s * 2.5 + 0.2, 1), v))
    np.testing.assert_allclose(corrupt("brightness", x, 5).numpy(), brighter, atol=1e-6)
    np.testing.assert_allclose(corrupt("saturate", x, 5).numpy(), saturated, atol=1e-6)


def test_equalize_hist_matches_opencvs_rule() -> None:
    images = np.random.default_rng(4).integers(3, 40, size=(3, 9, 9)).astype(np.uint8)
    images[2] = 17  # a flat image stays as it is
    out = ops.equalize_hist(images)
    for image, result in zip(images[:2], out[:2]):
        hist = np.bincount(image.ravel(), minlength=256)
        lowest = int(np.flatnonzero(hist)[0])
        scale = 255 / (image.size - hist[lowest])
        lut = [round(float((hist[lowest + 1 : v + 1].sum()) * scale)) if v > lowest else 0 for v in range(256)]
        np.testing.assert_array_equal(result, np.array(lut)[image])
    np.testing.assert_array_equal(out[2], images[2])


# --------------------------------------------------------------------------------------- the bundled model


@pytest.mark.slow
def test_error_grows_with_severity_on_the_bundled_model(cifar10: Path) -> None:
    test = load_cifar10("test", cifar10)
    index = balanced_subset(test.labels, 25, seed=1)  # 250 images
    x, y = to_float(test.images[index]), test.labels[index]
    model, card = robustnorm.load_model("cifar10-resnet20-bn")
    robustnorm.set_policy(model.eval(), "frozen")  # the benchmark's protocol: training statistics only

    def error(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(normalize(images, card.mean, card.std)).argmax(1) != y).float().mean())

    clean = error(x)
    by_severity = {s: [error(corrupt(name, x, s, generator=0)) for name in TEST_CORRUPTIONS] for s in (1, 5)}
    mean1, mean5 = (sum(by_severity[s]) / len(TEST_CORRUPTIONS) for s in (1, 5))
    assert mean5 > mean1 > clean, (clean, mean1, mean5)
    grows = [name for name, e1, e5 in zip(TEST_CORRUPTIONS, by_severity[1], by_severity[5]) if e5 > e1]
    assert len(grows) >= 12, f"error grows from severity 1 to 5 for only {grows}"
