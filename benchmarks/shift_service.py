"""Distribution shift through the running service: single-image requests, one at a time, default settings.

Protocol (seeded, on CIFAR-10's 10,000 test images, JPEG q75 copy):
- the service is started as a user would (``python -m service --model NAME``, otherwise default settings; an
  admin key lets the script reset the streams between scenarios) on 127.0.0.1;
- one client sends every image as its own ``image/png`` request over one kept-alive connection (concurrency 1),
  so every micro-batch holds one image;
- scenarios: ``clean`` (the test set, shuffled); ``skew`` (clean, in runs of 500 images of one class or of two
  classes, as a fixed camera sees); each of the 15 CIFAR-10-C test corruptions at severity 5 on the whole
  test set (a stream of its own, reset before it); ``changing`` (clean, c1, clean, c2, ... in segments of 2,000
  images, without resets);
- references on the very same (8-bit) images, through the library: ``frozen`` and ``batch`` at n = 128.

Goals checked in the summary: on the corruptions, accuracy after each stream's first 256 images at least
``batch`` at n = 128 and at least half of the extra error of shift removed; clean at most 0.3 points and skew
at most 1 point below ``frozen``; on changing traffic, images 257-512 of each segment within 2 points of
images 1,001-2,000.

    python benchmarks/shift_service.py --model cifar10-resnet20-bn
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import robustnorm
from robustnorm.corruptions import TEST_CORRUPTIONS, corrupt
from robustnorm.data import load_cifar10, normalize, to_float

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "shift-benchmark-admin"
RUN_LENGTH = 500
SEGMENT = 2000
WARM = 256


def quantised(x01: torch.Tensor) -> torch.Tensor:
    """What the service sees of a float image: 8-bit pixels (PNG), as uint8."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8)


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Service:
    """The service in a subprocess, and one kept-alive connection to it."""

    def __init__(self, model: str, port: int, policy: str | None, log: Path, options: Sequence[str] = ()) -> None:
        command = [sys.executable, "-m", "service", "--model", model, "--port", str(port), "--log-level", "warning",
                   *options]
        if policy:
            command += ["--policy", policy]
        env = {**os.environ, "ROBUSTNORM_ADMIN_KEYS": json.dumps({ADMIN_KEY: "benchmark"})}
        self.log = log.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.others: dict[str, http.client.HTTPConnection] = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                self.connection.request("GET", "/readyz")
                response = self.connection.getresponse()
                response.read()
                if response.status == 200:
                    return
            except OSError:
                self.connection.close()
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited; see {log}")
            time.sleep(0.5)
        raise RuntimeError(f"the service did not become ready; see {log}")

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             source: str | None = None) -> dict:
        """One request on the kept-alive connection, or on one from the loopback address ``source`` (another
        client, to the service)."""
        connection = self.connection
        if source is not None:
            if source not in self.others:
                self.others[source] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60,
                                                                 source_address=(source, 0))
            connection = self.others[source]
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # the server closes a kept-alive connection left idle (while the references run): connect again
            connection.close()
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)

    def reset(self) -> None:
        self.call("POST", "/v1/streams/reset", b"{}", {"X-API-Key": ADMIN_KEY, "Content-Type": "application/json"})

    def stream(self, images: torch.Tensor) -> dict[str, list]:
        """Send each image alone, in order; what the service answered."""
        answers: dict[str, list] = {"index": [], "statistics": [], "stream_images": [], "seconds": []}
        for image in images:
            started = time.perf_counter()
            body = self.call("POST", "/predict", png(image), {"Content-Type": "image/png"})
            answers["seconds"].append(time.perf_counter() - started)
            prediction = body["predictions"][0]
            answers["index"].append(prediction["index"])
            answers["statistics"].append(prediction["batch"]["statistics"])
            answers["stream_images"].append(prediction["batch"]["stream_images"])
        return answers

    def close(self) -> None:
        self.connection.close()
        for other in self.others.values():
            other.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@torch.no_grad()
def references(model: torch.nn.Module, card: robustnorm.ModelCard, images: torch.Tensor, labels: torch.Tensor
               ) -> dict[str, list[int]]:
    """Per image, whether ``frozen`` and ``batch`` at n = 128 (consecutive batches) classify it correctly."""
    x = normalize(to_float(images), card.mean, card.std)
    out: dict[str, list[int]] = {}
    for policy, size in (("frozen", 1024), ("batch", 128)):
        correct = []
        for start in range(0, len(x), size):
            part = x[start:start + size]
            with robustnorm.batch_groups(model, [part.shape[0]], policy=policy):
                correct.append((model(part).argmax(dim=1) == labels[start:start + size]).int())
        out[policy if policy == "frozen" else "batch@128"] = torch.cat(correct).tolist()
    return out


def accuracy(correct: list[int] | np.ndarray, start: int = 0, stop: int | None = None) -> float:
    part = np.asarray(correct[start:stop], dtype=float)
    return float(part.mean() * 100) if part.size else float("nan")


def skew_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Runs of ``RUN_LENGTH`` images of one class, then of two classes, ..., covering the test set."""
    pools = {c: torch.nonzero(labels == c).flatten().tolist() for c in range(10)}
    order: list[int] = []
    run = 0
    while any(pools.values()):
        first = run % 10
        classes = [first] if run % 2 == 0 else [first, (first + 3) % 10]
        taken: list[int] = []
        for c in classes:
            share = RUN_LENGTH // len(classes)
            taken += pools[c][:share]
            pools[c] = pools[c][share:]
        if not taken:
            taken = [i for c in range(10) for i in pools[c]][:RUN_LENGTH]
            for c in range(10):
                pools[c] = [i for i in pools[c] if i not in set(taken)]
        order += [taken[i] for i in torch.randperm(len(taken), generator=generator).tolist()]
        run += 1
    return torch.tensor(order)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=robustnorm.DEFAULT_MODEL)
    parser.add_argument("--policy", help="serve this policy instead of the card's (default: the card's)")
    parser.add_argument("--images", type=int, default=10_000, help="test images per stream (default all 10,000)")
    parser.add_argument("--corruptions", default=",".join(TEST_CORRUPTIONS))
    parser.add_argument("--scenarios", default="clean,skew,corruptions,changing")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/shift/service-MODEL.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or ROOT / "benchmarks" / "results" / "shift" / f"service-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    model, card = robustnorm.load_model(args.model)
    test = load_cifar10("test")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(test.labels), generator=generator)[: args.images]
    clean, labels = test.images[order], test.labels[order]
    x01 = to_float(clean)
    scenarios = args.scenarios.split(",")
    corruptions = [name for name in args.corruptions.split(",") if name]
    corrupted = {name: quantised(corrupt(name, x01, 5, args.seed + i)) for i, name in enumerate(corruptions)}
    service = Service(args.model, args.port, args.policy, out.with_suffix(".log"))
    served = service.call("GET", "/v1/model")
    results: dict = {
        "date": dt.date.today().isoformat(), "model": args.model, "version": served["version"],
        "policy": served["policy"], "images": len(labels), "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/shift_service.py", *sys.argv[1:]]), "scenarios": {}}
    try:
        def record(name: str, images: torch.Tensor, truth: torch.Tensor, reset: bool = True) -> dict:
            if reset:
                service.reset()
            started = time.perf_counter()
            answers = service.stream(images)
            correct = (torch.tensor(answers["index"]) == truth).int().tolist()
            entry = {"service": correct, **references(model, card, images, truth),
                     "statistics": answers["statistics"], "stream_images": answers["stream_images"],
                     "p50_ms": float(np.percentile(answers["seconds"], 50) * 1000),
                     "p99_ms": float(np.percentile(answers["seconds"], 99) * 1000),
                     "seconds": time.perf_counter() - started}
            print(f"{name:18s} service {accuracy(correct, WARM):5.1f}  frozen {accuracy(entry['frozen'], WARM):5.1f}  "
                  f"batch@128 {accuracy(entry['batch@128'], WARM):5.1f}  adapted "
                  f"{100 * answers['statistics'].count('stream') / len(correct):5.1f}%  p50 {entry['p50_ms']:.1f} ms",
                  flush=True)
            return entry

        if "clean" in scenarios:
            results["scenarios"]["clean"] = record("clean", clean, labels)
        if "skew" in scenarios:
            skewed = skew_order(labels, generator)
            results["scenarios"]["skew"] = record("skew", clean[skewed], labels[skewed])
        if "corruptions" in scenarios:
            for name in corruptions:
                results["scenarios"][name] = record(name, corrupted[name], labels)
        if "changing" in scenarios:
            service.reset()
            segments, images, truth = [], [], []
            for i, name in enumerate(corruptions):
                for segment_name, source in (("clean", clean), (name, corrupted[name])):
                    start = ((2 * i + (segment_name != "clean")) * SEGMENT) % max(1, len(labels) - SEGMENT + 1)
                    segments.append(segment_name)
                    images.append(source[start:start + SEGMENT])
                    truth.append(labels[start:start + SEGMENT])
            entry = record("changing", torch.cat(images), torch.cat(truth), reset=False)
            entry["segments"] = segments
            results["scenarios"]["changing"] = entry
    finally:
        service.close()
    results["summary"] = summarise(results["scenarios"], corruptions)
    out.write_text(json.dumps(results) + "\n")
    print(json.dumps(results["summary"], indent=2))
    return 0


def summarise(scenarios: dict, corruptions: list[str]) -> dict:
    """The goals: figures in %, after each stream's first 256 images."""
    summary: dict = {}
    if "clean" in scenarios:
        clean = scenarios["clean"]
        summary["clean"] = {"service": accuracy(clean["service"]), "frozen": accuracy(clean["frozen"])}
        summary["clean"]["below_frozen"] = summary["clean"]["frozen"] - summary["clean"]["service"]
    if "skew" in scenarios:
        skew = scenarios["skew"]
        summary["skew"] = {"service": accuracy(skew["service"]), "frozen": accuracy(skew["frozen"]),
                           "batch@128": accuracy(skew["batch@128"])}
        summary["skew"]["below_frozen"] = summary["skew"]["frozen"] - summary["skew"]["service"]
    shifted = [name for name in corruptions if name in scenarios]
    if shifted:
        per = {name: {key: accuracy(scenarios[name][key], WARM) for key in ("service", "frozen", "batch@128")}
               for name in shifted}
        mean = {key: float(np.mean([per[name][key] for name in shifted])) for key in ("service", "frozen", "batch@128")}
        summary["corruptions"] = {"per_corruption": per, "mean": mean}
        if "clean" in summary:
            extra = summary["clean"]["frozen"] - mean["frozen"]  # the error shift adds under frozen
            removed = (mean["service"] - mean["frozen"]) / extra if extra else None
            summary["corruptions"]["extra_error_removed"] = removed
    if "changing" in scenarios:
        changing = scenarios["changing"]
        early, late = [], []
        for k in range(len(changing["segments"])):
            base = k * SEGMENT
            early.append(accuracy(changing["service"], base + WARM, base + 2 * WARM))
            late.append(accuracy(changing["service"], base + 1000, base + SEGMENT))
        summary["changing"] = {"after_change_257_512": float(np.mean(early)), "settled_1001_2000": float(np.mean(late)),
                               "gap": float(np.mean(late) - np.mean(early))}
    return summary


if __name__ == "__main__":
    sys.exit(main())
