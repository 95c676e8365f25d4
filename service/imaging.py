"""Image decoding: encoded bytes to the normalised tensor the model expects (runs off the event loop).

Reads JPEG, PNG, WebP, BMP and GIF (its first frame) with Pillow; applies the EXIF orientation; converts any
mode to RGB (alpha is dropped, as ``Image.convert("RGB")`` does when the training data is loaded); resizes
the shorter side to the model's input size and crops the centre, in one resampling step; normalises with
the model card's mean and std. The byte and pixel limits are checked before any pixel is decoded, so a
decompression bomb costs only its header.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, DeadlineExceeded, ServiceError, TooLarge, UnsupportedType

# Pillow format name -> the media type it is served as. MPO is how Pillow names JPEGs from phone cameras.
SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                     "BMP": "image/bmp", "GIF": "image/gif"}
ACCEPTED_MEDIA_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/bmp", "image/x-bmp",
    "image/x-ms-bmp", "image/gif",
})
# Declared types that say nothing about the format: the bytes decide.
UNTYPED_MEDIA_TYPES = frozenset({"", "application/octet-stream", "image/*"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True)
class Preprocessing:
    """What a model needs from an image: channels, size, normalisation, and the limits on inputs."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"images are decoded to 1 or 3 channels; the model wants {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    @functools.cached_property
    def mean_array(self) -> np.ndarray:
        return np.array(self.mean, dtype=np.float32)

    @functools.cached_property
    def std_array(self) -> np.ndarray:
        return np.array(self.std, dtype=np.float32)


def check_media_type(content_type: str | None) -> None:
    """Raise 415 for a declared media type the service never reads (``None``: nothing declared)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in UNTYPED_MEDIA_TYPES or media_type in ACCEPTED_MEDIA_TYPES:
        return
    raise UnsupportedType(f"content type {media_type!r} is not supported; send JPEG, PNG, WebP, BMP or GIF")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` and check format and size from the header alone (no pixels decoded yet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise TooLarge(f"image has too many pixels ({error})") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image (corrupt, truncated, or not an image at all)") from None
    except Exception as error:  # Pillow's plugins raise many exception types on malformed input
        raise BadImage(f"cannot read the image header: {error}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedType(f"image format {image.format} is not supported; send JPEG, PNG, WebP, BMP or GIF")
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise TooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return image


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Any Pillow mode to ``L`` or ``RGB``: 16-bit and float images scaled to 8 bits, transparency dropped."""
    if image.mode == mode:
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float32)
        top = float(values.max(initial=0.0))
        if image.mode.startswith("I;16"):
            peak = 65535.0
        elif image.mode == "F" and top <= 1.0:
            peak = 1.0
        else:  # 32-bit integer or float images: 8-bit values if they fit, else 16-bit
            peak = 255.0 if top <= 255.0 else 65535.0
        scaled = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow asks for this step for palettes with transparency
    return image.convert(mode)


def _resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale the shorter side to fit, crop the centre: one resampling over the source box that survives."""
    source_width, source_height = image.size
    if (source_width, source_height) == (width, height):
        return image
    scale = max(width / source_width, height / source_height)
    box_width, box_height = width / scale, height / scale
    left, top = (source_width - box_width) / 2, (source_height - box_height) / 2
    return image.resize((width, height), Image.Resampling.BILINEAR,
                        box=(left, top, left + box_width, top + box_height))


def decode_image(data: bytes, spec: Preprocessing) -> torch.Tensor:
    """One encoded image to a normalised float32 tensor of shape ``spec.shape``.

    Raises :class:`BadImage` (400), :class:`TooLarge` (413) or :class:`UnsupportedType` (415).
    """
    return _decode_opened(_open(data, spec.max_pixels), spec)


def _decode_opened(image: Image.Image, spec: Preprocessing) -> torch.Tensor:
    """Decode an image whose header :func:`_open` has checked."""
    try:
        if image.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is far larger than needed; the
            # request keeps every side at least as large as the resize needs, whatever the EXIF rotation.
            needed = max(spec.width, spec.height) / min(image.size)
            if needed < 0.5:
                image.draft(image.mode, (math.ceil(image.size[0] * needed), math.ceil(image.size[1] * needed)))
        image = ImageOps.exif_transpose(image)  # decodes the pixels (GIF: the first frame)
        image = _to_mode(image, "L" if spec.channels == 1 else "RGB")
        image = _resize_crop(image, spec.width, spec.height)
        pixels = np.array(image, dtype=np.float32)
    except ServiceError:
        raise
    except Exception as error:  # untrusted bytes: whatever Pillow raises on them is a bad image, not a bug
        raise BadImage(f"cannot decode the image: {error}") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    # (x / 255 - mean) / std in place, channels last: the same float32 operations as on a tensor, a fraction of
    # the cost for the small images most requests carry.
    pixels /= 255.0
    pixels -= spec.mean_array
    pixels /= spec.std_array
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode_images(blobs: Sequence[bytes], spec: Preprocessing, *, max_total_pixels: int | None = None,
                  deadline: float | None = None) -> torch.Tensor:
    """Several encoded images to one ``(k, C, H, W)`` tensor; an error names the image it is about.

    Every header is checked first, so a request whose images hold more than ``max_total_pixels`` pixels in all
    is refused (413) before any is decoded; ``deadline`` (``time.monotonic()``) is checked before each image,
    so a request out of time stops decoding (504) and frees its decoding thread for other requests.
    """
    return decode_opened(open_images(blobs, spec, max_total_pixels=max_total_pixels), spec, deadline=deadline)


def open_images(blobs: Sequence[bytes], spec: Preprocessing, *, max_total_pixels: int | None = None
                ) -> list[Image.Image]:
    """The images of ``blobs`` opened, their headers checked, no pixel decoded yet (the first half of
    :func:`decode_images`)."""
    opened, total = [], 0
    for index, data in enumerate(blobs):
        with _naming(index, len(blobs)):
            opened.append(_open(data, spec.max_pixels))
        total += opened[-1].size[0] * opened[-1].size[1]
    if max_total_pixels is not None and total > max_total_pixels:
        raise TooLarge(f"the request's {len(blobs)} images hold {total} pixels in all; the limit is "
                       f"{max_total_pixels} per request (send fewer or smaller images)")
    return opened


def decode_opened(opened: Sequence[Image.Image], spec: Preprocessing, *, deadline: float | None = None
                  ) -> torch.Tensor:
    """Images from :func:`open_images` decoded into one ``(k, C, H, W)`` tensor (the second half of
    :func:`decode_images`)."""
    batch = torch.empty((len(opened), *spec.shape), dtype=torch.float32)
    for index, image in enumerate(opened):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"the request's deadline passed while decoding its images ({index} of "
                                   f"{len(opened)} decoded)")
        with _naming(index, len(opened)):
            batch[index] = _decode_opened(image, spec)
    return batch


@contextlib.contextmanager
def _naming(index: int, count: int) -> Iterator[None]:
    """Prefix an error's message with the image it is about, when the request holds several."""
    try:
        yield
    except ServiceError as error:
        if count > 1:
            error.message = f"image {index}: {error.message}"
            error.args = (error.message,)
        raise
