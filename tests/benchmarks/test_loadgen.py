"""benchmarks/loadgen.py: the Prometheus histogram arithmetic, and closed and open loops against a tiny server
that answers every third request 503 and counts batches in /metrics."""

from __future__ import annotations

import importlib.util
import io
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loadgen.py"
spec = importlib.util.spec_from_file_location("loadgen", SCRIPT)
loadgen = importlib.util.module_from_spec(spec)
sys.modules["loadgen"] = loadgen  # dataclasses resolve the module's annotations through sys.modules
spec.loader.exec_module(loadgen)

EXPOSITION = """# HELP robustnorm_batch_size Real images per batch (padding excluded).
# TYPE robustnorm_batch_size histogram
robustnorm_batch_size_bucket{{le="1.0"}} {b1}
robustnorm_batch_size_bucket{{le="2.0"}} {b2}
robustnorm_batch_size_bucket{{le="4.0"}} {b4}
robustnorm_batch_size_bucket{{le="+Inf"}} {b4}
robustnorm_batch_size_count {b4}
robustnorm_batch_size_sum {images}
robustnorm_inference_duration_seconds_count {b4}
robustnorm_inference_duration_seconds_sum {seconds}
"""


def test_histogram_delta_counts_batches_per_bucket() -> None:
    before = loadgen.parse_histogram(EXPOSITION.format(b1=2, b2=2, b4=2, images=2, seconds=0.1))
    after = loadgen.parse_histogram(EXPOSITION.format(b1=5, b2=7, b4=8, images=2 + 3 + 8 + 4, seconds=0.7))
    delta = loadgen.histogram_delta(before, after)
    assert delta == {"batches": 6, "images": 15, "mean_batch_size": 2.5,
                     "histogram": {"1": 3, "2": 2, "4": 1, "+Inf": 0}}
    assert loadgen.parse_histogram("# nothing here\n") is None


def test_generated_images_are_distinct_jpegs() -> None:
    images = loadgen.make_jpegs(4, size=24)
    assert len(set(images)) == 4
    assert all(Image.open(io.BytesIO(image)).format == "JPEG" for image in images)
    assert Image.open(io.BytesIO(images[0])).size == (24, 24)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    requests = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert b'name="file"' in body and b"image/jpeg" in body
        with self.lock:
            type(self).requests += 1
            status = 503 if self.requests % 3 == 0 else 200
        self._answer(status, b'{"predictions": []}', "application/json")

    def do_GET(self) -> None:
        count = type(self).requests
        text = EXPOSITION.format(b1=count, b2=count, b4=count, images=count, seconds=0.001 * count)
        self._answer(200, text.encode(), "text/plain; version=0.0.4")

    def _answer(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # socketserver's 5 drops the open loop's new connections (1 s SYN retries)


@pytest.fixture
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("client", ["httpx", "raw"])
@pytest.mark.parametrize("load", [{"concurrency": 4}, {"rate": 100.0}])
def test_run_load_counts_answers_and_reads_batches(server: str, load: dict, client: str) -> None:
    # loose bounds on counts: the machine running the tests may be busy with other work
    report = loadgen.run_load(server, loadgen.make_jpegs(3), duration=1.0, warmup=0.2, deadline=30.0,
                              client=client, **load)
    assert report["client"] == client
    answered = report["answered"]
    assert report["sent"] == sum(answered.values()) + report["transport_errors_total"] >= 5
    assert "200" in answered and set(answered) <= {"200", "503"}
    assert report["late"] == 0 and report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["throughput_ok_per_s"] > 0
    batches = report["batch_sizes"]  # every request is a batch of one in this server's metrics
    assert batches["mean_batch_size"] == 1.0 and batches["batches"] > 0
    assert report["inference_mean_ms"] == pytest.approx(1.0)
