"""HTTP load generator for ``POST /predict``: single-JPEG requests, closed or open loop, asyncio and httpx.

Each request is one JPEG in a ``multipart/form-data`` body (one part named ``file``), the form both the
service and the LitServe app of ``benchmarks/litserve_app.py`` accept (LitServe reads only JSON or form bodies).
``--client raw`` sends the same requests with a lean HTTP/1.1 client of its own (:class:`RawClient`), which
takes a fraction of httpx's CPU per request: on a machine the client shares with the server, httpx can take a
core and limit what is measured.

- Closed loop (``--concurrency N``): N clients, each sending its next request as soon as the previous one is
  answered. Latency is from send to answer.
- Open loop (``--rate R``): requests arrive as a Poisson process of R per second (seeded), each on its own
  task whatever the state of earlier ones. Latency is from the scheduled arrival, so a client that falls
  behind does not hide the server's queueing.

A warm-up (``--warmup`` seconds) comes first, and the load runs on from it without a pause into the window
of ``--duration`` seconds, so the window sees a steady state. Counted are the requests sent within the window;
each is answered (by HTTP status) or a transport error (by exception type), waited for after the window.
Throughput counts the 200s that arrived within the window (whenever sent), per second of the window. Latency
percentiles are over the counted 200s. ``late``: counted 200s that took longer than ``--deadline``.

Against the robustnorm service (``--metrics``, on by default: it is skipped when ``/metrics`` does not
answer in Prometheus' format with ``robustnorm_batch_size``), the batch sizes the service ran during the
window are read from ``robustnorm_batch_size`` before and after: mean images per batch and the histogram;
and the mean time of its forward passes from ``robustnorm_inference_duration_seconds``.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --concurrency 32 --duration 20 --out load.json
    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --rate 500 --duration 20 --deadline 0.5

As a library: ``run_load(url, images, concurrency=32, duration=20.0)`` returns the report as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import random
import re
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

logger = logging.getLogger("loadgen")

BATCH_SIZE_METRIC = "robustnorm_batch_size"  # service/metrics.py: real images per batch, a histogram
INFERENCE_METRIC = "robustnorm_inference_duration_seconds"  # service/metrics.py: seconds per forward pass
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


@dataclass
class _Sample:
    """One request: when it was due, when it was answered, and how."""

    due: float
    done: float
    status: int | None  # None: a transport error
    error: str | None = None


def make_jpegs(count: int = 16, size: int = 32, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` distinct smooth colour images of ``size`` x ``size`` as JPEG bytes (content does not matter
    for speed, only the decoding work: a natural-looking gradient with noise)."""
    from PIL import Image

    generator = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    images = []
    for _ in range(count):
        base = generator.uniform(0, 255, 3).astype(np.float32)
        slope = generator.uniform(-120, 120, (2, 3)).astype(np.float32)
        pixels = base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
        pixels += generator.normal(0, 12, (size, size, 3)).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def read_jpegs(folder: Path, limit: int = 256) -> list[bytes]:
    """Up to ``limit`` ``*.jpg``/``*.jpeg`` files of ``folder``, sorted by name."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not paths:
        raise ValueError(f"no .jpg or .jpeg file in {folder}")
    return [p.read_bytes() for p in paths]


# -- Prometheus: the batch-size histogram ------------------------------------------------------------------
def parse_histogram(text: str, name: str = BATCH_SIZE_METRIC) -> dict[str, Any] | None:
    """``{"buckets": {le: cumulative count}, "sum": s, "count": c}`` of histogram ``name`` (no labels) in a
    Prometheus text exposition, or None when it is not there."""
    buckets: dict[float, float] = {}
    total = count = None
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        sample, value = match["name"], float(match["value"])
        if sample == f"{name}_bucket":
            le = re.search(r'le="([^"]+)"', match["labels"] or "")
            if le:
                buckets[math.inf if le[1] == "+Inf" else float(le[1])] = value
        elif sample == f"{name}_sum":
            total = value
        elif sample == f"{name}_count":
            count = value
    if count is None or total is None:
        return None
    return {"buckets": dict(sorted(buckets.items())), "sum": total, "count": count}


def histogram_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What was observed between two scrapes: batches, images, mean batch size and the batches per bucket
    (keyed by the bucket's upper bound: ``"4"`` counts batches of 3 or 4 images when the bounds are 2, 4)."""
    batches = after["count"] - before["count"]
    images = after["sum"] - before["sum"]
    per_bucket: dict[str, int] = {}
    previous = 0.0
    for le, cumulative in after["buckets"].items():
        delta = cumulative - before["buckets"].get(le, 0.0)
        key = "+Inf" if math.isinf(le) else f"{le:g}"
        per_bucket[key] = round(delta - previous)
        previous = delta
    return {"batches": int(batches), "images": int(images),
            "mean_batch_size": images / batches if batches else None, "histogram": per_bucket}


async def scrape_histograms(client: httpx.AsyncClient, url: str) -> dict[str, dict[str, Any] | None] | None:
    """The service's batch-size and inference-time histograms now, or None when ``url`` does not serve the
    batch sizes."""
    try:
        response = await client.get(url)
    except httpx.TransportError as error:
        logger.info("no metrics at %s: %s", url, error)
        return None
    if response.status_code != 200:
        logger.info("no metrics at %s: HTTP %d", url, response.status_code)
        return None
    batch_sizes = parse_histogram(response.text, BATCH_SIZE_METRIC)
    if batch_sizes is None:
        return None
    return {"batch_sizes": batch_sizes, "inference": parse_histogram(response.text, INFERENCE_METRIC)}


# -- load ---------------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _report(samples: list[_Sample], window: tuple[float, float], deadline: float | None) -> dict[str, Any]:
    start, end = window
    counted = [s for s in samples if start <= s.due < end]
    statuses = Counter(str(s.status) for s in counted if s.status is not None)
    errors = Counter(s.error for s in counted if s.status is None)
    ok_latency = [s.done - s.due for s in counted if s.status == 200]
    # throughput: the 200s that arrived in the window, whenever sent (the load runs on from the warm-up)
    in_window = sum(1 for s in samples if s.status == 200 and start <= s.done < end)
    late = sum(1 for latency in ok_latency if deadline is not None and latency > deadline)
    milliseconds = [1e3 * v for v in ok_latency]
    return {
        "sent": len(counted),
        "answered": dict(sorted(statuses.items())),
        "transport_errors": dict(sorted(errors.items())),
        "transport_errors_total": sum(errors.values()),
        "late": late if deadline is not None else None,
        "throughput_ok_per_s": in_window / (end - start),
        "latency_ms": {"p50": _percentile(milliseconds, 50), "p90": _percentile(milliseconds, 90),
                       "p99": _percentile(milliseconds, 99), "mean": float(np.mean(milliseconds)) if milliseconds
                       else None, "max": max(milliseconds, default=None)},
    }


class RawClient:
    """A lean HTTP/1.1 client for the same requests: each image's multipart request is built once, and sent on
    kept-alive connections (at most ``limit``, reused once free); the answer's head is parsed for its status
    and length, its body read and dropped. It spends a fraction of httpx's CPU per request, so that a client
    on the same machine as the server takes less of the server's CPU."""

    BOUNDARY = "loadgen-boundary"

    def __init__(self, url: str, images: Sequence[bytes], limit: int, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname or "127.0.0.1", parts.port or 80, timeout
        self.requests = {image: self._request(parts.path or "/", image) for image in images}
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.free = asyncio.Semaphore(limit)

    def _request(self, path: str, image: bytes) -> bytes:
        body = (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={self.BOUNDARY}\r\n\r\n").encode() + body

    async def post(self, image: bytes) -> int:
        """The status of one request with ``image``; OSError or asyncio.TimeoutError on a transport failure. A
        kept-alive connection the server closed meanwhile is replaced once."""
        async with self.free:
            while True:
                reused = bool(self.idle)
                reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
                try:
                    return await self._exchange(reader, writer, image)
                except (OSError, asyncio.IncompleteReadError):
                    writer.close()
                    if not reused:
                        raise
                except BaseException:
                    writer.close()
                    raise

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, image: bytes) -> int:
        writer.write(self.requests[image])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        status, length, keep = int(head[9:12]), 0, True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        await asyncio.wait_for(reader.readexactly(length), self.timeout)
        if keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _send(client: httpx.AsyncClient | RawClient, url: str, image: bytes, due: float,
                samples: list[_Sample]) -> None:
    try:
        if isinstance(client, RawClient):
            status = await client.post(image)
        else:
            response = await client.post(url, files={"file": ("image.jpg", image, "image/jpeg")})
            await response.aread()
            status = response.status_code
        samples.append(_Sample(due, time.perf_counter(), status))
    except (httpx.TransportError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError) as error:
        samples.append(_Sample(due, time.perf_counter(), None, type(error).__name__))


async def _closed_loop(client: httpx.AsyncClient | RawClient, url: str, images: list[bytes], concurrency: int,
                       stop: float, samples: list[_Sample]) -> None:
    async def one_client(index: int) -> None:
        k = index
        while time.perf_counter() < stop:
            await _send(client, url, images[k % len(images)], time.perf_counter(), samples)
            k += concurrency

    await asyncio.gather(*(one_client(i) for i in range(concurrency)))


async def _open_loop(client: httpx.AsyncClient | RawClient, url: str, images: list[bytes], rate: float, stop: float,
                     samples: list[_Sample], seed: int) -> None:
    arrivals = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    due, k = time.perf_counter(), 0
    while True:
        due += arrivals.expovariate(rate)
        if due >= stop:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(client, url, images[k % len(images)], due, samples))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
    if tasks:
        await asyncio.gather(*tasks)


async def run_load_async(url: str, images: Sequence[bytes], *, concurrency: int | None = None,
                         rate: float | None = None, duration: float = 10.0, warmup: float = 2.0,
                         deadline: float | None = None, timeout: float = 30.0, metrics: bool = True,
                         seed: int = 0, max_connections: int = 1024, client: str = "httpx") -> dict[str, Any]:
    """The load report (see the module docstring); exactly one of ``concurrency`` and ``rate`` is given.
    ``client``: ``httpx`` or ``raw`` (:class:`RawClient`)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give either concurrency (closed loop) or rate (open loop)")
    if not images:
        raise ValueError("no images to send")
    base = url.rstrip("/")
    predict = f"{base}/predict"
    images = list(images)
    connections = concurrency if concurrency is not None else max_connections
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    samples: list[_Sample] = []
    started = time.perf_counter()
    start, end = started + warmup, started + warmup + duration
    # The load runs without a pause from the warm-up into the window, so the window sees a steady state; the
    # metrics have a client of their own, so that a scrape never waits for a load connection.
    if client not in ("httpx", "raw"):
        raise ValueError(f"client must be 'httpx' or 'raw', not {client!r}")
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, pool=None)) as pooled, \
            httpx.AsyncClient(timeout=timeout) as scraper:
        sender = pooled if client == "httpx" else RawClient(predict, images, connections, timeout)
        if concurrency is not None:
            load = _closed_loop(sender, predict, images, concurrency, end, samples)
        else:
            assert rate is not None
            load = _open_loop(sender, predict, images, rate, end, samples, seed)
        running = asyncio.create_task(load)
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        before = await scrape_histograms(scraper, f"{base}/metrics") if metrics else None
        scraped = [time.perf_counter() - start]
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        after = await scrape_histograms(scraper, f"{base}/metrics") if before is not None else None
        scraped.append(time.perf_counter() - end)
        await running
        finished = time.perf_counter()
        if isinstance(sender, RawClient):
            await sender.aclose()
    report: dict[str, Any] = {
        "url": predict, "client": client, "mode": "closed" if concurrency is not None else "open",
        "concurrency": concurrency, "rate_per_s": rate, "duration_s": duration, "warmup_s": warmup,
        "deadline_s": deadline, "timeout_s": timeout, "distinct_images": len(images),
        "image_bytes_mean": float(np.mean([len(image) for image in images])),
        **_report(samples, (start, end), deadline),
        "drain_s": finished - end,  # time after the window until the last answer
        "scrape_lag_s": scraped,  # when the metrics were read, after the window's start and its end
    }
    report["batch_sizes"] = report["inference_mean_ms"] = None
    if before is not None and after is not None:
        report["batch_sizes"] = histogram_delta(before["batch_sizes"], after["batch_sizes"])
        if before["inference"] is not None and after["inference"] is not None:
            batches = after["inference"]["count"] - before["inference"]["count"]
            seconds = after["inference"]["sum"] - before["inference"]["sum"]
            report["inference_mean_ms"] = 1e3 * seconds / batches if batches else None
    return report


def run_load(url: str, images: Sequence[bytes], **options: Any) -> dict[str, Any]:
    """Synchronous :func:`run_load_async` (its own event loop)."""
    return asyncio.run(run_load_async(url, images, **options))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (POST URL/predict)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop: clients, each with one request in flight")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds counted (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load first, not counted (default 2)")
    parser.add_argument("--deadline", type=float, help="seconds after which a 200 counts as late")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (default 30 s)")
    parser.add_argument("--images", type=Path, help="folder of JPEG files to send (default: 16 generated images)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the generated images (default 32)")
    parser.add_argument("--no-metrics", action="store_true", help="do not read the batch sizes from /metrics")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals and generated images")
    parser.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                        help="httpx (default), or a lean raw HTTP/1.1 client that takes less CPU per request")
    parser.add_argument("--out", type=Path, help="write the JSON report here (default: standard output only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    images = read_jpegs(args.images) if args.images else make_jpegs(size=args.image_size, seed=args.seed)
    report = run_load(args.url, images, concurrency=args.concurrency, rate=args.rate, duration=args.duration,
                      warmup=args.warmup, deadline=args.deadline, timeout=args.timeout,
                      metrics=not args.no_metrics, seed=args.seed, client=args.client)
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
