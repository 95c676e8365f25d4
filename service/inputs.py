"""Request bodies to encoded images: multipart form parts, a raw ``image/*`` body, or JSON with base64.

Sizes are enforced while the body is read (the declared ``Content-Length`` first, then the bytes as they
arrive), and the number of images before any part is parsed, so an oversized request costs little.
Decoding the images themselves is :mod:`service.imaging`'s job.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import BadImage, InvalidRequest, TooLarge, TooManyImages, UnsupportedType
from .imaging import check_media_type
from .schemas import PredictJSON
from .settings import Settings

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)
SUPPORTED_BODIES = ("multipart/form-data (one file part per image), a raw image/* body, or application/json "
                    '{"images": [base64, ...]}')


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, or :class:`TooLarge` as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} is {int(declared)} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """The encoded images of a prediction request, whatever form the body takes."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        images = await _multipart_images(request, content_type, settings)
    elif media_type == "application/json":
        images = await _json_images(request, settings)
    elif media_type.startswith("image/") or media_type in ("", "application/octet-stream"):
        check_media_type(media_type)
        images = [await read_body(request, settings.max_image_bytes, "the image")]
    else:
        raise UnsupportedType(f"content type {media_type!r} is not supported; send {SUPPORTED_BODIES}")
    if not images:
        raise InvalidRequest(f"the request holds no image; send {SUPPORTED_BODIES}")
    if any(not image for image in images):
        raise BadImage("an image is empty (0 bytes)")
    return images


def _check_count(count: int, settings: Settings, what: str = "images") -> None:
    if count > settings.max_images_per_request:
        raise TooManyImages(f"the request holds {count} {what}; the limit is {settings.max_images_per_request} "
                            "images per request, one per part (split it into several requests)")


# A part's header line at most. File names are never used, so a long one does no harm: the body's size is
# bounded already.
MAX_PART_HEADER_BYTES = 64 * 1024


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def _parse_multipart(body: bytes, boundary: bytes, max_part_bytes: int) -> list[_Part]:
    """The parts of a whole multipart body, in order; 413 for a part over ``max_part_bytes``."""
    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]  # the name and value of the header being read

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[header[0].strip().lower()] = header[1].strip()
        header[:] = [b"", b""]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        if len(part.data) + end - start > max_part_bytes:
            raise TooLarge(f"image {len(parts) - 1} is larger than the limit of {max_part_bytes} bytes")
        part.data += data[start:end]

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end, "on_part_data": on_part_data}
    try:
        parser = MultipartParser(boundary, callbacks, max_header_size=MAX_PART_HEADER_BYTES)  # type: ignore[arg-type]
    except TypeError:  # an older python-multipart, without a limit on part headers
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise BadImage(f"malformed multipart body: {error}") from None
    return parts


async def _multipart_images(request: Request, content_type: str, settings: Settings) -> list[bytes]:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadImage("a multipart/form-data body needs a boundary in its Content-Type")
    body = await read_body(request, settings.max_request_bytes, "the request body")
    # Every part starts with "--boundary" and the body ends with "--boundary--": count before parsing.
    _check_count(body.count(b"--" + boundary) - 1, settings, what="parts")
    images = []
    for index, part in enumerate(_parse_multipart(body, boundary, settings.max_image_bytes)):
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"filename" not in disposition:
            name = disposition.get(b"name", b"").decode("utf-8", "replace")[:64]
            raise InvalidRequest(f"form field {name!r} (part {index}) is not a file part; send each image as a file "
                                 "(curl -F image=@cat.jpg) and parameters in the query string")
        check_media_type(part.headers.get(b"content-type", b"").decode("latin-1"))
        images.append(bytes(part.data))
    return images


async def _json_images(request: Request, settings: Settings) -> list[bytes]:
    body = await read_body(request, settings.max_request_bytes, "the request body")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: arrays nested thousands deep
        raise BadImage(f"the body is not valid JSON: {error}") from None
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        _check_count(len(document["images"]), settings)
    try:
        payload = PredictJSON.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
        raise InvalidRequest(f'expected {{"images": [base64, ...]}}: {problems}') from None
    images = []
    for index, text in enumerate(payload.images):
        match = _DATA_URL.match(text)
        if match:
            check_media_type(match.group("type"))
            text = text[match.end():]
        if any(character in text for character in "\r\n\t "):
            text = "".join(text.split())  # MIME base64 (and the base64 tool) wraps lines: RFC 2045 allows it
        if len(text) * 3 // 4 > settings.max_image_bytes + 3:
            raise TooLarge(f"image {index} is larger than the limit of {settings.max_image_bytes} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"image {index} is not valid base64") from None
        if len(data) > settings.max_image_bytes:
            raise TooLarge(f"image {index} is {len(data)} bytes; the limit is {settings.max_image_bytes}")
        images.append(data)
    return images
