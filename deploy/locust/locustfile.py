"""Locust load test of the robustnorm service: single images, small multi-image requests and bursts.

Images come from ``--images`` (environment ``LOCUST_IMAGES``): a folder, searched recursively, or a ``.tar``,
``.tar.gz`` or ``.tgz`` archive of JPEG, PNG, WebP, BMP or GIF files, such as the CIFAR-10 test archive.
Each simulated client sends, by weight:

- 6: one image as a raw ``image/*`` body (the common API call);
- 3: 2 to 8 images as multipart form parts (a client batching its own images);
- 1: 1 to 4 images as JSON with base64 strings;
- 1: a burst of 8 to 16 single-image requests at once (a client flushing a backlog).

A ``429 Too Many Requests`` is the service's back-pressure, not an error of it: the client waits for its
``Retry-After`` (at most 5 s) and the answer is reported as a failure named ``429 queue full``, so that the
summary counts 429s apart from real failures. The run's exit code is 1 only when some other failure occurred.

Headless, bounded, with CSV output (``<prefix>_stats.csv``, ``<prefix>_failures.csv``)::

    LOCUST_IMAGES=/path/to/cifar10/test.tar.gz locust -f deploy/locust/locustfile.py --headless \\
        --users 20 --spawn-rate 10 --run-time 30s --host http://127.0.0.1:8000 --csv results/run
"""

from __future__ import annotations

import base64
import json
import logging
import random
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Group
from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                  ".bmp": "image/bmp", ".gif": "image/gif"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
QUEUE_FULL = "429 queue full"
MAX_RETRY_AFTER = 5.0
STATISTICS = {"batch", "blend", "frozen", "stream"}


@dataclass(frozen=True)
class Image:
    name: str
    content_type: str
    data: bytes


def _content_type(name: str) -> str | None:
    return IMAGE_SUFFIXES.get(Path(name).suffix.lower())


def load_images(source: Path, limit: int, seed: int = 0) -> list[Image]:
    """Up to ``limit`` images from a folder or a tar archive, shuffled with ``seed`` (archives are often
    sorted by class, so the first ``limit`` would be one class)."""
    found: list[Image] = []
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            content_type = _content_type(path.name)
            if content_type and path.is_file():
                found.append(Image(path.name, content_type, path.read_bytes()))
    elif source.is_file() and (source.name.lower().endswith(TAR_SUFFIXES) or tarfile.is_tarfile(source)):
        # By content too: docker compose mounts an archive as /mnt/images, without its suffix.
        with tarfile.open(source, "r:*") as archive:
            for member in archive:
                content_type = _content_type(member.name)
                extracted = archive.extractfile(member) if member.isfile() and content_type else None
                if extracted is not None:
                    found.append(Image(Path(member.name).name, content_type, extracted.read()))
    else:
        raise ValueError(f"--images {source}: not a folder or a tar archive (.tar, .tar.gz, .tgz)")
    if not found:
        raise ValueError(f"--images {source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    random.Random(seed).shuffle(found)
    return found[:limit]


def multipart_body(images: list[Image]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one ``image`` file part per image, and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for number, image in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{number}-{image.name}"\r\n'
            f"Content-Type: {image.content_type}\r\n\r\n".encode() + image.data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def retry_after(header: str | None) -> float:
    """Seconds to wait after a 429: its ``Retry-After`` in seconds, 1 when absent or a date, at most 5."""
    try:
        seconds = float(header) if header else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def check_prediction(response: Any, images: int) -> str | None:
    """Why an answer is wrong, or None when it is a well-formed prediction for ``images`` images."""
    try:
        predictions = response.json()["predictions"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP 200 without a predictions list: {response.text[:200]!r}"
    if len(predictions) != images:
        return f"{len(predictions)} predictions for {images} images"
    for prediction in predictions:
        if prediction.get("batch", {}).get("statistics") not in STATISTICS:
            return f"prediction without the statistics that ran: {json.dumps(prediction)[:200]}"
    return None


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--images", type=str, env_var="LOCUST_IMAGES", default="",
                        help="folder or .tar/.tar.gz of images to send (required)")
    parser.add_argument("--max-images", type=int, env_var="LOCUST_MAX_IMAGES", default=2000,
                        help="images kept in memory, a seeded random sample")
    parser.add_argument("--image-seed", type=int, env_var="LOCUST_IMAGE_SEED", default=0,
                        help="seed of the sample of images")


POOL: list[Image] = []


@events.init.add_listener
def _load(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # imported as a library (tests), not run by locust
        return
    if not options.images:
        raise SystemExit("set --images (or LOCUST_IMAGES) to a folder or .tar/.tar.gz of images, "
                         "e.g. the CIFAR-10 test archive")
    try:
        POOL[:] = load_images(Path(options.images), options.max_images, options.image_seed)
    except (ValueError, OSError, tarfile.TarError) as error:
        raise SystemExit(str(error)) from error
    logger.info("loaded %d images from %s", len(POOL), options.images)


@events.quitting.add_listener
def _exit_code(environment: Any, **_: Any) -> None:
    """Exit 1 on any failure but 429s, which are counted apart (back-pressure is the service working)."""
    rejected = failed = 0
    for error in environment.stats.errors.values():
        if QUEUE_FULL in str(error.error):
            rejected += error.occurrences
        else:
            failed += error.occurrences
    total = environment.stats.total.num_requests
    logger.info("requests: %d, answered 429 (queue full): %d, other failures: %d", total, rejected, failed)
    environment.process_exit_code = 1 if failed else 0


class PredictUser(FastHttpUser):
    """One client of the API, mixing request shapes as real clients do."""

    wait_time = between(0.1, 1.0)
    concurrency = 16  # connections a burst may open at once

    def on_start(self) -> None:
        if not POOL:
            raise RuntimeError("no images loaded: run through locust with --images")
        self.rng = random.Random()

    def _pick(self, count: int) -> list[Image]:
        return self.rng.sample(POOL, min(count, len(POOL)))

    def _post(self, body: bytes, content_type: str, images: int, name: str) -> None:
        with self.client.post("/predict", data=body, headers={"Content-Type": content_type}, name=name,
                              catch_response=True) as response:
            if response.status_code == 200:
                problem = check_prediction(response, images)
                if problem:
                    response.failure(problem)
            elif response.status_code == 429:
                response.failure(QUEUE_FULL)
                gevent.sleep(retry_after(response.headers.get("Retry-After")))
            else:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")

    @task(6)
    def single_image(self) -> None:
        (image,) = self._pick(1)
        self._post(image.data, image.content_type, 1, "/predict single")

    @task(3)
    def multipart_images(self) -> None:
        images = self._pick(self.rng.randint(2, 8))
        body, content_type = multipart_body(images)
        self._post(body, content_type, len(images), "/predict multipart")

    @task(1)
    def json_images(self) -> None:
        images = self._pick(self.rng.randint(1, 4))
        body = json.dumps({"images": [base64.b64encode(image.data).decode("ascii") for image in images]})
        self._post(body.encode(), "application/json", len(images), "/predict json")

    @task(1)
    def burst(self) -> None:
        group = Group()
        for image in self._pick(self.rng.randint(8, 16)):
            group.spawn(self._post, image.data, image.content_type, 1, "/predict burst")
        group.join()

