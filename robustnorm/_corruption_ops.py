"""Array operations behind :mod:`robustnorm.corruptions`, on numpy batches ``(N, C, H, W)`` (or ``(N, H, W)``).

Most re-implement, vectorised over the batch, a step that CIFAR-10-C's generator took one image at a time from
scikit-image, OpenCV or ImageMagick; their docstrings name the step and the conventions kept (borders,
roundings). Every blur, zoom and sampling acts on the last two axes only.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# ----------------------------------------------------------------------------------------- filters and zooms


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of the last two axes; the defaults are ``skimage.filters.gaussian``'s (edge pixels
    repeated beyond the border, kernel cut at 4 sigma)."""
    if sigma <= 0:
        return x.copy()
    return ndimage.gaussian_filter(x, (0,) * (x.ndim - 2) + (sigma, sigma), mode=mode, truncate=truncate)


def correlate(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D``: correlation of the last two axes with a 2-D kernel, borders reflected without
    repeating the edge pixel (OpenCV's default border, scipy's ``mirror``)."""
    return ndimage.correlate(x, kernel.reshape((1,) * (x.ndim - 2) + kernel.shape), mode="mirror")


def box_blur3(x: np.ndarray) -> np.ndarray:
    """``cv2.blur(x, (3, 3))``: the mean over each 3x3 neighbourhood, borders as in :func:`correlate`."""
    return ndimage.uniform_filter(x, (1,) * (x.ndim - 2) + (3, 3), mode="mirror")


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Defocus kernel: the pixels of a 17x17 grid within ``radius`` of the centre, normalised, then smoothed by
    a 3x3 Gaussian of standard deviation ``alias_blur`` (``cv2.GaussianBlur``); trimmed of all-zero borders."""
    if radius > 8:
        raise ValueError(f"disk radius {radius} > 8: the 17x17 grid would cut the disk")
    offsets = np.arange(-8, 9)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias_blur**2))
    taps /= taps.sum()
    kernel = ndimage.correlate1d(ndimage.correlate1d(disk, taps, axis=0, mode="mirror"), taps, axis=1, mode="mirror")
    used = np.flatnonzero(kernel.any(axis=0))  # symmetric, so rows and columns trim alike
    return kernel[used[0] : used[-1] + 1, used[0] : used[-1] + 1]


@functools.lru_cache(maxsize=256)
def _clipped_zoom_matrix(size: int, factor: float) -> np.ndarray:
    """The linear map along one axis of CIFAR-10-C's ``clipped_zoom``: crop the centre ``ceil(size / factor)``
    pixels, scale them by ``factor`` with linear interpolation (``scipy.ndimage.zoom``, order 1) and keep the
    centre ``size`` pixels. Zooming the identity gives the map column by column."""
    crop = math.ceil(size / factor)
    top = (size - crop) // 2
    scaled = ndimage.zoom(np.eye(crop), (factor, 1), order=1)
    trim = (scaled.shape[0] - size) // 2
    matrix = np.zeros((size, size))
    matrix[:, top : top + crop] = scaled[trim : trim + size]
    return matrix


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of every image by ``factor`` >= 1, keeping its size (bilinear is separable, so the
    2-D zoom is one matrix per axis)."""
    rows = _clipped_zoom_matrix(x.shape[-2], float(factor)).astype(x.dtype)
    cols = _clipped_zoom_matrix(x.shape[-1], float(factor)).astype(x.dtype)
    return rows @ x @ cols.T


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's ``-motion-blur radius x sigma +angle``, each image of ``x`` (N, C, H, W) at its own angle
    (degrees). ImageMagick's kernel is one-sided: ``2 ceil(radius) + 1`` taps weighted ``exp(-i^2 / 2 sigma^2)``
    for i = 0, 1, ..., tap i reading the pixel ``round(i cos a)`` columns and ``round(i sin a)`` rows away, with
    the edge pixels repeated beyond the border; so a pixel is smeared along the angle's direction."""
    n, channels, height, width = x.shape
    taps = np.arange(2 * math.ceil(radius) + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    weights /= weights.sum()
    radians = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    col_shift = np.ceil(taps * np.cos(radians) - 0.5).astype(np.int64)  # ImageMagick's rounding, (N, taps)
    row_shift = np.ceil(taps * np.sin(radians) - 0.5).astype(np.int64)
    batch = np.arange(n)[:, None, None, None]
    channel = np.arange(channels)[None, :, None, None]
    out = np.zeros_like(x)
    for tap, weight in enumerate(weights):
        rows = np.clip(np.arange(height) + row_shift[:, tap : tap + 1], 0, height - 1)[:, None, :, None]
        cols = np.clip(np.arange(width) + col_shift[:, tap : tap + 1], 0, width - 1)[:, None, None, :]
        out += weight * x[batch, channel, rows, cols]
    return out


def glass_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One pass of CIFAR-10-C's local pixel shuffle (maximum offset 1). Its loop writes
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views, which copies rather than swaps: pixel (h, w), for
    h and w from the far border down to 2, takes the value at offset (dy, dx), each uniform in {-1, 0}. Running
    backwards, every pixel reads a neighbour not yet written, so one gather over the whole batch does the pass."""
    n, channels, height, width = x.shape
    shift = rng.integers(-1, 1, size=(2, n, 1, height - 2, width - 2))
    rows = np.arange(2, height)[:, None] + shift[0]
    cols = np.arange(2, width)[None, :] + shift[1]
    out = x.copy()
    out[:, :, 2:, 2:] = x[np.arange(n)[:, None, None, None], np.arange(channels)[None, :, None, None], rows, cols]
    return out


def sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, border: str) -> np.ndarray:
    """Bilinear samples of every image of ``x`` (N, C, H, W) at pixel coordinates ``rows``, ``cols`` (N, H, W).
    ``border="mirror"`` reflects about the edge pixels (OpenCV's default, scipy's ``mirror``); ``"reflect"``
    repeats them, then reflects (scipy's ``reflect``): grid_sample's reflection with and without aligned corners."""
    height, width = x.shape[-2:]
    if border == "mirror":
        grid = np.stack([2 * cols / (width - 1) - 1, 2 * rows / (height - 1) - 1], axis=-1)
    else:
        grid = np.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], axis=-1)
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                        torch.from_numpy(grid.astype(np.float32)), mode="bilinear", padding_mode="reflection",
                        align_corners=border == "mirror")
    return out.numpy()


# ---------------------------------------------------------------------------------------------- colour


def grey(x: np.ndarray) -> np.ndarray:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` (``cv2.COLOR_RGB2GRAY``), keeping a channel axis of 1."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def shift_value(x: np.ndarray, shift: float) -> np.ndarray:
    """RGB to HSV, ``V = clip(V + shift)``, back to RGB (scikit-image's conversions). At fixed hue and saturation
    every channel is proportional to V, so each pixel scales by V'/V; a black pixel (S = 0) turns grey V'."""
    value = x.max(axis=1, keepdims=True)
    new_value = np.clip(value + shift, 0, 1)
    scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * scale, new_value)


def scale_saturation(x: np.ndarray, factor: float, offset: float) -> np.ndarray:
    """RGB to HSV, ``S = clip(S * factor + offset)``, back to RGB (scikit-image's conversions). Every channel is
    ``V (1 - S w)`` with w fixed by the hue, so ``V - channel`` scales by S'/S. Grey pixels have S = 0 and hue 0
    (red), so a positive offset tints them red: R stays V, G and B become ``V (1 - S')``."""
    value = x.max(axis=1, keepdims=True)
    saturation = np.divide(value - x.min(axis=1, keepdims=True), value, out=np.zeros_like(value), where=value > 0)
    new_saturation = np.clip(saturation * factor + offset, 0, 1)
    ratio = np.divide(new_saturation, saturation, out=np.zeros_like(value), where=saturation > 0)
    red_hue = np.array([0.0, 1.0, 1.0], dtype=x.dtype).reshape(1, 3, 1, 1)
    return np.where(saturation > 0, value - (value - x) * ratio, value * (1 - new_saturation * red_hue))


# ------------------------------------------------------------------------------------------ random fields


def plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps ``(n, size, size)`` scaled to [0, 1] (``size`` a power of two), as
    CIFAR-10-C's fog draws them: every new point is the mean of its four neighbours plus ``wibble`` times a
    uniform draw in [-wibble, wibble], with ``wibble`` starting at 100 and divided by ``decay`` per level."""
    maps = np.zeros((n, size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square_sum = corners + np.roll(corners, -1, axis=1)
        square_sum = square_sum + np.roll(square_sum, -1, axis=2)
        maps[:, half::step, half::step] = square_sum / 4 + wibble * rng.uniform(-wibble, wibble, square_sum.shape)
        centres = maps[:, half::step, half::step]
        row_sum = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0::step, half::step] = row_sum / 4 + wibble * rng.uniform(-wibble, wibble, row_sum.shape)
        col_sum = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, 0::step] = col_sum / 4 + wibble * rng.uniform(-wibble, wibble, col_sum.shape)
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def plasma_maps(n: int, height: int, width: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` :func:`plasma_fractal` maps, each cropped to ``height`` x ``width``, shape (n, 1, H, W)."""
    size = 1 << max(height - 1, width - 1, 1).bit_length()
    return plasma_fractal(n, size, decay, rng)[:, None, :height, :width]


# Per RGB channel, the mean, the spread within a 32x32 crop and the spread of crop means of the five frost
# photographs CIFAR-10-C blends in, at its scale (a fifth, resized without smoothing: grainy); its second and
# third photographs are the same picture.
FROST_PALETTES = np.array([
    [(0.306, 0.583, 0.647), (0.084, 0.052, 0.049), (0.066, 0.037, 0.030)],
    [(0.777, 0.794, 0.830), (0.070, 0.072, 0.074), (0.031, 0.034, 0.037)],
    [(0.777, 0.794, 0.830), (0.070, 0.072, 0.074), (0.031, 0.034, 0.037)],
    [(0.562, 0.620, 0.670), (0.094, 0.094, 0.099), (0.040, 0.039, 0.042)],
    [(0.403, 0.448, 0.494), (0.135, 0.134, 0.131), (0.066, 0.064, 0.060)],
])


def _standardise(field: np.ndarray) -> np.ndarray:
    centred = field - field.mean(axis=(-2, -1), keepdims=True)
    return centred / np.maximum(centred.std(axis=(-2, -1), keepdims=True), 1e-8)


def frost_texture(n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural frost, (n, 3, H, W) in [0, 1]: cloudy ice (a plasma fractal), feathery needles (sparse crystal
    seeds smeared by :func:`motion_blur` in three directions 60 degrees apart) and bright grain, mixed to the
    photographs' texture (neighbouring pixels correlate about 0.4, three apart about 0.2), then coloured with one
    of :data:`FROST_PALETTES` drawn uniformly per image, as the original draws a photograph and a crop."""
    clouds = plasma_maps(n, height, width, 2.0, rng)
    angles = rng.uniform(0, 360, n)
    needles = sum(motion_blur((rng.random((n, 1, height, width)) < 0.06).astype(np.float64), 4, 2.0, angles + 60 * k)
                  for k in range(3))
    grain = rng.exponential(size=(n, 1, height, width))
    mix = 0.5 * _standardise(clouds) + 0.6 * _standardise(needles) + 0.63 * _standardise(grain)
    palette = FROST_PALETTES[rng.integers(0, len(FROST_PALETTES), n)][..., None, None]  # (n, 3 stats, 3, 1, 1)
    mean, spread, between = palette[:, 0], palette[:, 1], palette[:, 2]
    return np.clip(mean + between * rng.standard_normal((n, 1, 1, 1)) + spread * _standardise(mix), 0, 1)


# ----------------------------------------------------------------------------------------- spatter's steps


def canny(images: np.ndarray, low: float, high: float) -> np.ndarray:
    """``cv2.Canny(images, low, high)`` of uint8 images (N, H, W), as a bool edge map: 3x3 Sobel gradients (edge
    pixels repeated), L1 magnitude, non-maximum suppression across the gradient's direction (quantised to 0, 45,
    90, 135 degrees, zero magnitude outside the image), then every pixel above ``low`` that survives suppression
    and is 8-connected through such pixels to one above ``high``."""
    p = np.pad(images.astype(np.int32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    magnitude = np.abs(gx) + np.abs(gy)
    padded = np.pad(magnitude, ((0, 0), (1, 1), (1, 1)))
    height, width = magnitude.shape[1:]

    def neighbour(dr: int | np.ndarray, dc: int | np.ndarray) -> np.ndarray:
        rows = np.arange(height)[:, None] + 1 + dr
        cols = np.arange(width)[None, :] + 1 + dc
        return padded[np.arange(len(images))[:, None, None], rows, cols]

    tan22 = math.tan(math.radians(22.5))
    horizontal = np.abs(gy) < np.abs(gx) * tan22
    vertical = np.abs(gy) > np.abs(gx) * (tan22 + 2)  # tan 67.5 = tan 22.5 + 2
    sign = np.where((gx < 0) != (gy < 0), -1, 1)
    keep_h = (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1))
    keep_v = (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0))
    keep_d = (magnitude > neighbour(-1, -sign)) & (magnitude > neighbour(1, sign))
    candidate = (magnitude > low) & np.where(horizontal, keep_h, np.where(vertical, keep_v, keep_d))
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True
    labels, count = ndimage.label(candidate, structure=within_image)
    connected = np.zeros(count + 1, dtype=bool)
    connected[labels[candidate & (magnitude > high)]] = True
    connected[0] = False
    return connected[labels]


# OpenCV's 5x5 chamfer weights for DIST_L2 (1, 1.4, 2.1969: a step, a diagonal step, a knight's move) in its
# 16-bit fixed point.
_CHAMFER = (65536, 91750, 143976)


def distance_to(edges: np.ndarray, cap: float) -> np.ndarray:
    """``cv2.distanceTransform(~edges, DIST_L2, 5)`` capped at ``cap`` (``cv2.threshold(..., THRESH_TRUNC)``),
    float32 (N, H, W): the chamfer distance of every pixel to the nearest edge of its image. OpenCV's two raster
    passes, with each row's left-to-right (right-to-left) step done at once as a running minimum."""
    n, height, width = edges.shape
    step, diagonal, knight = _CHAMFER
    dist = np.full((n, height + 4, width + 4), 1 << 40, dtype=np.int64)  # two rows and columns of "far" around
    ramp = np.arange(width) * step

    def reach_from(row: int, neighbours: tuple[tuple[int, int, int], ...]) -> np.ndarray:
        return np.minimum.reduce([dist[:, row + dr, 2 + dc : 2 + dc + width] + cost for dr, dc, cost in neighbours])

    above = ((-2, -1, knight), (-2, 1, knight), (-1, -2, knight), (-1, -1, diagonal), (-1, 0, step),
             (-1, 1, diagonal), (-1, 2, knight))
    for row in range(2, height + 2):
        reach = np.where(edges[:, row - 2], 0, reach_from(row, above))
        dist[:, row, 2 : 2 + width] = np.minimum.accumulate(reach - ramp, axis=1) + ramp
    below = tuple((-dr, dc, cost) for dr, dc, cost in above)
    for row in range(height + 1, 1, -1):
        reach = np.minimum(dist[:, row, 2 : 2 + width], reach_from(row, below))
        dist[:, row, 2 : 2 + width] = np.minimum.accumulate((reach + ramp)[:, ::-1], axis=1)[:, ::-1] - ramp
    distance = dist[:, 2:-2, 2:-2].astype(np.float32) * np.float32(1 / 65536)
    return np.minimum(distance, np.float32(cap))


def equalize_hist(images: np.ndarray) -> np.ndarray:
    """``cv2.equalizeHist`` of uint8 images (N, H, W): the lowest value present maps to 0 and value v to
    ``round(255 (cdf(v) - cdf(lowest)) / (pixels - count(lowest)))``; a flat image stays as it is."""
    n = len(images)
    flat = images.reshape(n, -1).astype(np.int64)
    hist = np.bincount((flat + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    cdf = hist.cumsum(axis=1)
    lowest_count = hist[np.arange(n), (hist > 0).argmax(axis=1)][:, None]
    spread = flat.shape[1] - lowest_count
    lut = np.rint(np.clip((cdf - lowest_count) * 255 / np.maximum(spread, 1), 0, 255))
    lut = np.where(spread > 0, lut, np.arange(256))
    return np.take_along_axis(lut, flat, axis=1).reshape(images.shape).astype(np.uint8)
