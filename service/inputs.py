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
from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

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


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise TooManyImages(f"the request holds {count} images; the limit is {settings.max_images_per_request} "
                            "per request (split it into several requests)")


async def _multipart_images(request: Request, content_type: str, settings: Settings) -> list[bytes]:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadImage("a multipart/form-data body needs a boundary in its Content-Type")
    body = await read_body(request, settings.max_request_bytes, "the request body")
    # Every part starts with "--boundary" and the body ends with "--boundary--": count before parsing.
    _check_count(body.count(b"--" + boundary) - 1, settings)

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=settings.max_images_per_request,
                             max_fields=settings.max_images_per_request, max_part_size=settings.max_image_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise BadImage(f"malformed multipart body: {error.message}") from None
    try:
        images = []
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"form field {name!r} is not a file part; send each image as a file "
                                     "(curl -F image=@cat.jpg) and parameters in the query string")
            check_media_type(value.content_type)
            if value.size is not None and value.size > settings.max_image_bytes:
                raise TooLarge(f"image {value.filename!r} is {value.size} bytes; the limit is "
                               f"{settings.max_image_bytes}")
            images.append(await value.read())
        return images
    finally:
        await form.close()


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
