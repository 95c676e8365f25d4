"""Helpers of the service tests (imported by the test modules): CIFAR-10 samples and a live server."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image

from service.cli import build_server

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
TEST_POLICY = "adaptive:8"
MIN_BATCH = 8


@dataclass(frozen=True)
class Sample:
    """One CIFAR-10 test image as the archive holds it (JPEG) and re-encoded losslessly as PNG."""

    name: str
    label: int
    jpeg: bytes
    png: bytes

    def pixels(self) -> torch.Tensor:
        """The normalised (3, 32, 32) tensor, computed independently of the service's decoder."""
        with Image.open(io.BytesIO(self.jpeg)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(3, 1, 1)
        return (tensor / 255.0 - mean) / std


def read_cifar10_test(archive: Path, per_class: int) -> list[Sample]:
    """The first ``per_class`` test images of every class, read straight from the archive, classes
    interleaved (the archive is ordered by class)."""
    by_class: dict[str, list[tuple[str, bytes]]] = {name: [] for name in CIFAR_CLASSES}
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if not member.isfile() or path.suffix != ".jpg" or path.parent.name not in by_class:
                continue
            bucket = by_class[path.parent.name]
            if len(bucket) < per_class:
                handle = tar.extractfile(member)
                assert handle is not None
                bucket.append((member.name, handle.read()))
    samples = []
    for index in range(per_class):
        for label, name in enumerate(CIFAR_CLASSES):
            if index < len(by_class[name]):
                path, jpeg = by_class[name][index]
                buffer = io.BytesIO()
                with Image.open(io.BytesIO(jpeg)) as image:
                    image.convert("RGB").save(buffer, format="PNG")
                samples.append(Sample(name=path, label=label, jpeg=jpeg, png=buffer.getvalue()))
    return samples


def free_socket() -> socket.socket:
    """A socket bound to a free loopback port (handed to uvicorn, so no other process can take the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_ready(url: str, until: float, alive: Callable[[], bool] = lambda: True) -> None:
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive():
            raise RuntimeError("the test server stopped before it was ready (see its log)")
        if time.monotonic() > until:
            raise TimeoutError(f"the server at {url} did not become ready in time")
        time.sleep(0.05)


class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread, serving ``app`` as ``robustnorm-serve`` does
    (its protocol and timeouts; the drain on signals needs the main thread, so tests of it run a process)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._socket = free_socket()
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(app, app.state.settings, log_level="warning", lifespan="on",
                                   timeout_graceful_shutdown=5)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="uvicorn-test", daemon=True)

    def start(self, ready_timeout: float = 60.0, *, until_ready: bool = True) -> None:
        """Start serving; wait until the app has started and, with ``until_ready``, is warmed up."""
        self._thread.start()
        until = time.monotonic() + ready_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the test server failed to start (see its log)")
            if time.monotonic() > until:
                raise TimeoutError("the test server did not start in time")
            time.sleep(0.02)
        if until_ready:
            wait_ready(self.url, until, self._thread.is_alive)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def serve(app: FastAPI) -> Iterator[LiveServer]:
    """Generator for fixtures: a started server, stopped (and drained) afterwards."""
    server = LiveServer(app)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def examples() -> dict[str, bytes]:
    """The real photographs of examples/ (JPEG and PNG), by file name."""
    return {path.name: path.read_bytes() for path in sorted((REPO_ROOT / "examples").iterdir())
            if path.suffix in (".jpg", ".png")}


class ServiceProcess:
    """``python -m service`` in a process of its own on a free loopback port (for signals and its memory);
    its output goes to ``log``."""

    def __init__(self, *options: str, log: Path, environment: dict[str, str] | None = None) -> None:
        with free_socket() as sock:
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "service", "--device", "cpu", "--port", str(self.port), *options]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(environment or {})}
        with log.open("w") as output:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        try:
            wait_ready(self.url, time.monotonic() + timeout, lambda: self.process.poll() is None)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise RuntimeError(f"the service did not become ready:\n{self.output()}") from None

    def rss_bytes(self) -> int:
        """Resident memory of the process, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
