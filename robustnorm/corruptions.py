"""CIFAR-10-C's corruptions (Hendrycks & Dietterich, 2019) on float batches in [0, 1] of shape ``(N, 3, H, W)``.

The 15 corruptions of the benchmark (:data:`TEST_CORRUPTIONS`) and the 4 its release holds out for validation
(:data:`VALIDATION_CORRUPTIONS`), each at severities 1 to 5 with the parameters of CIFAR-10-C's own generator
(``make_cifar_c.py``, for 32x32 images; ImageNet-C's are different). The implementation is the project's own,
vectorised over the batch (numpy, scipy, Pillow; the array steps are in :mod:`robustnorm._corruption_ops`).
The semantics are the original's, except:

- motion_blur and snow's streaks: ImageMagick's motion blur, re-implemented (its one-sided Gaussian line kernel,
  ``2 ceil(radius) + 1`` taps, at a random angle per image).
- frost: the original blends in crops of five frost photographs; here the frost is procedural (cloudy ice and
  needle-like crystals, coloured with the mean and spread of each photograph), deterministic given the seed.
- spatter: OpenCV's Canny, chamfer distance transform, box blurs and histogram equalisation, re-implemented
  with OpenCV's conventions (borders, roundings), vectorised over the batch.
- no rounding to 8 bits between steps or at the end (the original saved uint8 images), except where a codec
  works on 8-bit images as in the original: jpeg_compression and pixelate.
- other image sizes work; parameters in pixels stay CIFAR's, elastic_transform's and pixelate's scale with it.

Every corruption returns a new tensor in [0, 1] of the input's shape, dtype and device, computed on the CPU.
Randomness comes from ``generator`` (a ``torch.Generator``, an integer seed, or torch's global generator when
None): the same seed gives the same output, and every image of a batch draws its own noise.

    x_shifted = corrupt("motion_blur", x, severity=3, generator=0)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import _corruption_ops as ops

Level = Any  # one severity's parameters: a number or a tuple, as in CIFAR-10-C's tables
MIN_SIZE = 8

# ----------------------------------------------------------------------------------------------- noise


def _gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0, sigma, x.shape)


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    # scikit-image's salt and pepper: every value, with probability `amount`, turns 0 or 1, evenly.
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(x.dtype), x)


def _speckle_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(0, sigma, x.shape)


# ------------------------------------------------------------------------------------------------ blur


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return ops.gaussian(x, sigma)


def _defocus_blur(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = level
    return ops.correlate(x, ops.disk_kernel(radius, alias_blur))


def _glass_blur(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    sigma, max_delta, iterations = level
    assert max_delta == 1, "glass_shuffle reproduces the original's loop for a maximum offset of 1 only"
    x = ops.gaussian(x, sigma)
    for _ in range(iterations):
        x = ops.glass_shuffle(x, rng)
    return ops.gaussian(x, sigma)


def _motion_blur(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = level
    return ops.motion_blur(x, radius, sigma, rng.uniform(-45, 45, len(x)))


def _zoom_blur(x: np.ndarray, stop: float, rng: np.random.Generator) -> np.ndarray:
    # The original's factors, np.arange(1, stop, 0.01): 7, 12, 16, 21 and 26 of them (float steps included).
    factors = np.arange(1, stop, 0.01)
    return (x + sum(ops.clipped_zoom(x, factor) for factor in factors)) / (len(factors) + 1)


# --------------------------------------------------------------------------------------------- weather


def _snow(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, keep = level
    n, _, height, width = x.shape
    flakes = ops.clipped_zoom(rng.normal(loc, scale, (n, 1, height, width)), zoom)
    flakes = np.clip(np.where(flakes < threshold, 0, flakes), 0, 1)
    flakes = ops.motion_blur(flakes, radius, sigma, rng.uniform(-135, -45, n))
    whitened = keep * x + (1 - keep) * np.maximum(x, ops.grey(x) * 1.5 + 0.5)
    return whitened + flakes + flakes[..., ::-1, ::-1]


def _frost(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    image_weight, frost_weight = level
    return image_weight * x + frost_weight * ops.frost_texture(len(x), *x.shape[-2:], rng)


def _fog(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    thickness, decay = level
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    fogged = x + thickness * ops.plasma_maps(len(x), *x.shape[-2:], decay, rng)
    return fogged * peak / (peak + thickness)


PALE_TURQUOISE = np.array([175, 238, 238]).reshape(1, 3, 1, 1) / 255
MUD_BROWN = np.array([63, 42, 20]).reshape(1, 3, 1, 1) / 255
EMBOSS = np.array([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])


def _water_sheen(liquid: np.ndarray) -> np.ndarray:
    """The original's texture of water drops (N, H, W): the distance to the drops' edges, capped, smoothed,
    equalised and embossed (OpenCV's steps, with its uint8 roundings)."""
    edges = ops.canny(np.clip(liquid * 255, 0, 255).astype(np.uint8), 50, 150)
    distance = ops.box_blur3(ops.distance_to(edges, 20)).astype(np.uint8)
    distance = ops.equalize_hist(distance).astype(np.float64)
    distance = np.clip(np.rint(ops.correlate(distance, EMBOSS)), 0, 255)
    return np.rint(ops.box_blur3(distance))


def _spatter(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    loc, scale, sigma, threshold, strength, mud = level
    n, _, height, width = x.shape
    liquid = ops.gaussian(rng.normal(loc, scale, (n, height, width)), sigma)
    liquid = np.where(liquid < threshold, 0, liquid)
    if not mud:
        sheen = liquid * _water_sheen(liquid)
        peak = sheen.max(axis=(1, 2), keepdims=True)
        sheen = strength * np.divide(sheen, peak, out=np.zeros_like(sheen), where=peak > 0)
        return x + sheen[:, None] * PALE_TURQUOISE
    splashes = ops.gaussian((liquid > threshold).astype(np.float64), strength)
    splashes = np.where(splashes < 0.8, 0, splashes)[:, None]
    return x * (1 - splashes) + MUD_BROWN * splashes


# --------------------------------------------------------------------------------------------- digital


def _brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    return ops.shift_value(x, shift)


def _saturate(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    factor, offset = level
    return ops.scale_saturation(x, factor, offset)


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(2, 3), keepdims=True)
    return (x - mean) * factor + mean


def _elastic_transform(x: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    n, _, height, width = x.shape
    alpha, sigma, jitter = (fraction * min(height, width) for fraction in level)
    # A random affine warp: three points around the centre, each moved by up to `jitter` pixels; every output
    # pixel samples the input where the inverse warp (fitted from the moved points back) sends it.
    centre, side = np.array([width // 2, height // 2], dtype=np.float64), min(height, width) // 3
    anchors = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    moved = anchors + rng.uniform(-jitter, jitter, (n, 3, 2))
    moved_homogeneous = np.concatenate([moved, np.ones((n, 3, 1))], axis=2)
    inverse = np.linalg.solve(moved_homogeneous, np.broadcast_to(anchors, moved.shape))
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    source = np.stack([cols, rows, np.ones_like(rows)], axis=-1) @ inverse[:, None]  # (N, H, W, (x, y))
    warped = ops.sample(x, source[..., 1], source[..., 0], border="mirror")
    if alpha == 0:
        return warped
    # Then a smooth random displacement field of amplitude `alpha` and smoothness `sigma`.
    dx = ops.gaussian(rng.uniform(-1, 1, (n, height, width)), sigma, mode="reflect", truncate=3) * alpha
    dy = ops.gaussian(rng.uniform(-1, 1, (n, height, width)), sigma, mode="reflect", truncate=3) * alpha
    return ops.sample(warped, rows + dy, cols + dx, border="reflect")


def _as_uint8_images(x: np.ndarray) -> np.ndarray:
    return np.rint(x * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _from_uint8_images(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255


def _jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    decoded = []
    for image in _as_uint8_images(x):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as reread:
            decoded.append(np.asarray(reread.convert("RGB")))
    return _from_uint8_images(decoded)


def _pixelate(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    height, width = x.shape[-2:]
    small = (max(1, int(width * fraction)), max(1, int(height * fraction)))
    box = Image.Resampling.BOX
    return _from_uint8_images([np.asarray(Image.fromarray(image).resize(small, box).resize((width, height), box))
                               for image in _as_uint8_images(x)])


# -------------------------------------------------------------------------------------------- registry


def _numpy_rng(generator: torch.Generator | int | None) -> np.random.Generator:
    """The numpy generator of one call: from an integer seed, or seeded by one draw from a torch generator
    (torch's global generator when None)."""
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"seed must be a non-negative integer, got {generator}")
        return np.random.default_rng(int(generator))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, an integer seed or None, got {type(generator)}")
    device = generator.device if generator is not None else "cpu"
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))


def _check_pixels(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch tensor of RGB pixels, got {type(x)}")
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[2:]) < MIN_SIZE:
        raise ValueError(f"expected a batch of RGB images (N, 3, H, W) with H, W >= {MIN_SIZE}, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float pixels in [0, 1], got {x.dtype}: convert uint8 images with "
                         "robustnorm.data.to_float")
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):
        raise ValueError(f"expected pixels in [0, 1], got values in [{float(x.min())}, {float(x.max())}]: "
                         "corrupt images before normalising them")


@dataclass(frozen=True)
class Corruption:
    """A CIFAR-10-C corruption: its family (noise, blur, weather, digital), the parameters of severities 1 to 5
    as in CIFAR-10-C's generator, and the function that applies one severity's parameters to a numpy batch."""

    name: str
    family: str
    levels: tuple[Level, ...]
    apply: Callable[[np.ndarray, Level, np.random.Generator], np.ndarray]

    def __call__(
        self, x: torch.Tensor, severity: int, generator: torch.Generator | int | None = None
    ) -> torch.Tensor:
        _check_pixels(x)
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
            raise ValueError(f"severity of {self.name} must be an integer 1..5, got {severity!r}")
        rng = _numpy_rng(generator)
        if x.shape[0] == 0:
            return x.clone()
        pixels = x.detach().to("cpu", torch.float32).numpy().copy()
        out = self.apply(pixels, self.levels[severity - 1], rng)
        return torch.from_numpy(np.clip(out, 0, 1).astype(np.float32)).to(device=x.device, dtype=x.dtype)


_REGISTERED = (
    Corruption("gaussian_noise", "noise", (0.04, 0.06, 0.08, 0.09, 0.10), _gaussian_noise),
    Corruption("shot_noise", "noise", (500, 250, 100, 75, 50), _shot_noise),
    Corruption("impulse_noise", "noise", (0.01, 0.02, 0.03, 0.05, 0.07), _impulse_noise),
    Corruption("defocus_blur", "blur", ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), _defocus_blur),
    Corruption("glass_blur", "blur", ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
               _glass_blur),
    Corruption("motion_blur", "blur", ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), _motion_blur),
    Corruption("zoom_blur", "blur", (1.06, 1.11, 1.16, 1.21, 1.26), _zoom_blur),
    Corruption("snow", "weather", ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                                   (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                                   (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)), _snow),
    Corruption("frost", "weather", ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)), _frost),
    Corruption("fog", "weather", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), _fog),
    Corruption("brightness", "digital", (0.05, 0.1, 0.15, 0.2, 0.3), _brightness),
    Corruption("contrast", "digital", (0.75, 0.5, 0.4, 0.3, 0.15), _contrast),
    # (alpha, sigma, affine jitter) as fractions of the image side: CIFAR-10-C's 32 * (0, 0, 0.08), ...
    Corruption("elastic_transform", "digital", ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                                                (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)), _elastic_transform),
    Corruption("pixelate", "digital", (0.95, 0.9, 0.85, 0.75, 0.65), _pixelate),
    Corruption("jpeg_compression", "digital", (80, 65, 58, 50, 40), _jpeg_compression),
    # The release's four extra corruptions, for validation (choosing methods without touching the 15).
    Corruption("speckle_noise", "noise", (0.06, 0.1, 0.12, 0.16, 0.2), _speckle_noise),
    Corruption("gaussian_blur", "blur", (0.4, 0.6, 0.7, 0.8, 1), _gaussian_blur),
    Corruption("spatter", "weather", ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                                      (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                                      (0.65, 0.1, 0.5, 0.68, 0.6, 1)), _spatter),
    Corruption("saturate", "digital", ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), _saturate),
)

CORRUPTIONS: dict[str, Corruption] = {corruption.name: corruption for corruption in _REGISTERED}
TEST_CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTIONS)[:15]
VALIDATION_CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTIONS)[15:]
ALIASES = {"jpeg": "jpeg_compression"}  # an earlier name


def get_corruption(name: str) -> Corruption:
    """The corruption called ``name`` (or one of :data:`ALIASES`); ``ValueError`` listing the valid names."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names are {list(CORRUPTIONS)}")
    return CORRUPTIONS[key]


def corrupt(
    name: str, x: torch.Tensor, severity: int, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    """Corruption ``name`` at ``severity`` (1 to 5) of a float batch ``(N, 3, H, W)`` in [0, 1]."""
    return get_corruption(name)(x, severity, generator)
