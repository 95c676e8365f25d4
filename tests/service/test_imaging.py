"""Image decoding: formats, EXIF orientation, modes, resize and crop, normalisation, and what is refused."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import BadImage, DeadlineExceeded, TooLarge, UnsupportedType
from service.imaging import Preprocessing, check_media_type, decode_image, decode_images

SPEC = Preprocessing(channels=3, height=4, width=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_pixels=10_000)


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "GIF", "WEBP"])
def test_lossless_formats_decode_to_the_exact_pixels(image_format: str) -> None:
    options = {"lossless": True} if image_format == "WEBP" else {}
    pixels = decode_image(encode(solid((255, 0, 51)), image_format, **options), SPEC)
    assert pixels.shape == (3, 4, 4) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]), atol=1 / 255)


def test_jpeg_decodes_close_to_its_pixels() -> None:
    pixels = decode_image(encode(solid((200, 100, 50), (16, 16)), "JPEG", quality=95), SPEC)
    assert torch.allclose(pixels.mean(dim=(1, 2)), torch.tensor([200, 100, 50]) / 255, atol=3 / 255)


def test_gif_uses_its_first_frame() -> None:
    frames = [solid((255, 0, 0)).convert("P"), solid((0, 0, 255)).convert("P")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, SPEC)[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_normalises_with_the_cards_mean_and_std() -> None:
    spec = Preprocessing(channels=3, height=4, width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), max_pixels=100)
    pixels = decode_image(encode(solid((255, 255, 0)), "PNG"), spec)
    assert pixels[:, 0, 0].tolist() == pytest.approx([2.0, 1.0, -0.5])


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", quality=100, exif=exif.tobytes())
    spec = Preprocessing(channels=3, height=8, width=4, mean=(0, 0, 0), std=(1, 1, 1), max_pixels=100)
    pixels = decode_image(data, spec)
    # Displayed upright the image is 4 wide and 8 tall, white on top.
    assert pixels[:, :3].mean() > 0.9 and pixels[:, 5:].mean() < 0.1


def white_image(mode: str) -> tuple[Image.Image, str]:
    """A white 4x4 image in ``mode``, and a format that stores that mode."""
    if mode == "I;16":
        return Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "PNG"
    return solid((255, 255, 255)).convert(mode), "JPEG" if mode == "CMYK" else "PNG"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image, image_format = white_image(mode)
    pixels = decode_image(encode(image, image_format), SPEC)
    assert pixels.shape == (3, 4, 4)
    assert pixels.min() > 0.95, (mode, pixels[:, 0, 0])


def test_palette_with_transparency_and_grayscale_models() -> None:
    image = solid((10, 20, 30)).convert("P")
    image.info["transparency"] = 0
    pixels = decode_image(encode(image, "PNG", transparency=0), SPEC)
    assert pixels.shape == (3, 4, 4)
    gray = Preprocessing(channels=1, height=4, width=4, mean=(0.0,), std=(1.0,), max_pixels=100)
    assert decode_image(encode(solid((255, 255, 255)), "PNG"), gray).shape == (1, 4, 4)


def test_resizes_the_shorter_side_and_crops_the_centre() -> None:
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (2, 0, 14, 8))  # red, except for blue margins outside the centre crop
    pixels = decode_image(encode(image, "PNG"), SPEC)
    assert pixels.shape == (3, 4, 4)
    assert pixels[0].min() > 0.95 and pixels[2].max() < 0.05  # only the red centre survives the crop


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    # A PNG header that claims 100000 x 100000 pixels, with no pixel data at all.
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")
    with pytest.raises(TooLarge, match="pixels"):
        decode_image(data, SPEC)


def test_too_many_pixels_for_the_limit() -> None:
    with pytest.raises(TooLarge):
        decode_image(encode(solid((0, 0, 0), (200, 100)), "PNG"), SPEC)


def test_corrupt_truncated_and_unsupported_inputs() -> None:
    with pytest.raises(BadImage):
        decode_image(b"definitely not an image", SPEC)
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(BadImage):
        decode_image(jpeg[: len(jpeg) // 2], SPEC)
    with pytest.raises(UnsupportedType, match="TIFF"):
        decode_image(encode(solid((0, 0, 0)), "TIFF"), SPEC)


def test_errors_name_the_image_they_are_about() -> None:
    good = encode(solid((0, 0, 0)), "PNG")
    assert decode_images([good, good], SPEC).shape == (2, 3, 4, 4)
    with pytest.raises(BadImage, match="image 1"):
        decode_images([good, b"junk"], SPEC)


def test_a_request_is_refused_whole_by_its_total_pixels_before_any_image_is_decoded() -> None:
    big = encode(solid((0, 0, 0), (100, 100)), "PNG")  # 10,000 pixels: each image alone is within the limit
    assert decode_images([big, big], SPEC, max_total_pixels=20_000).shape == (2, 3, 4, 4)
    with pytest.raises(TooLarge, match="30000 pixels in all; the limit is 20001 per request"):
        decode_images([big, big, big], SPEC, max_total_pixels=20_001)
    # The total is checked on the headers: a corrupt image after the budget is spent is never decoded.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    jpeg = encode(noise, "JPEG")
    truncated = jpeg[: len(jpeg) // 2]  # a readable header over pixels that cannot be decoded
    with pytest.raises(BadImage, match="cannot decode"):
        decode_image(truncated, SPEC)
    with pytest.raises(TooLarge):
        decode_images([big, big, truncated], SPEC, max_total_pixels=20_001)


def test_decoding_stops_once_the_deadline_has_passed() -> None:
    good = encode(solid((0, 0, 0)), "PNG")
    with pytest.raises(DeadlineExceeded, match="0 of 2 decoded"):
        decode_images([good, good], SPEC, deadline=time.monotonic() - 1)
    assert decode_images([good, good], SPEC, deadline=time.monotonic() + 60).shape == (2, 3, 4, 4)


def test_declared_media_types() -> None:
    for media_type in (None, "", "image/jpeg", "image/PNG; charset=binary", "application/octet-stream", "image/webp"):
        check_media_type(media_type)
    for media_type in ("text/plain", "image/tiff", "image/svg+xml", "application/pdf"):
        with pytest.raises(UnsupportedType):
            check_media_type(media_type)


def test_normalisation_equals_the_tensor_arithmetic_bit_for_bit() -> None:
    # The service normalises in place in NumPy; the reference is (x / 255 - mean) / std on a float32 tensor.
    spec = Preprocessing(channels=3, height=32, width=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616),
                         max_pixels=10_000)
    generator = np.random.default_rng(0)
    for index in range(8):
        pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        data = encode(Image.fromarray(pixels), "PNG" if index % 2 else "JPEG", **({} if index % 2 else {"quality": 90}))
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
        tensor = torch.from_numpy(decoded).permute(2, 0, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        assert torch.equal(decode_image(data, spec), (tensor / 255.0 - mean) / std)
