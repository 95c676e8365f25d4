"""A slowloris against the service at its default settings: what 1,000 hostile connections cost.

Starts ``robustnorm-serve`` (bundled default model, default timeouts and upload limit) on loopback, measures a
normal client alone (one single-image request every 50 ms for ``--seconds``), then the same client while
``--connections`` hostile connections are held open: heads that never end, connections that send nothing, and
uploads that send ``--upload-mib`` of a declared 8 MiB body and then one byte every half second. Reports the
server's peak resident memory above its baseline, the normal client's p50/p99 in both phases, how long the
server kept each kind of hostile connection, and what it answered them.

    python benchmarks/slowloris.py                   # -> benchmarks/results/slowloris/slowloris-<date>.json
    python benchmarks/slowloris.py --front haproxy   # the same through the shipped HAProxy in front of the service
                                                     # -> slowloris-haproxy-<date>.json

Behind HAProxy (``haproxy`` on the PATH, deploy/haproxy/haproxy.cfg with loopback binds), the attacker and the
normal client both talk to the proxy; the service's memory is measured as before, and HAProxy's beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from overload import free_port, haproxy, wait_ready

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "slowloris"
MiB = 1024 * 1024
DECLARED = 8 * MiB


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def hold(port: int, kind: str, upload: int, limit: float) -> tuple[str, float, bytes]:
    """One hostile connection until the server closes it (or ``limit`` seconds pass)."""
    started = time.monotonic()
    answer = b""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        return kind, 0.0, f"connect failed: {error}".encode()
    try:
        if kind == "headers":
            writer.write(b"POST /predict HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        elif kind == "upload":
            writer.write(f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {DECLARED}\r\n\r\n".encode() + bytes(upload))
            await asyncio.wait_for(writer.drain(), limit)
        while time.monotonic() - started < limit:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.5)
            except asyncio.TimeoutError:
                if kind != "idle":
                    writer.write(b"a")
                continue
            if not data:
                break
            answer += data
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
    return kind, time.monotonic() - started, answer


async def normal_client(url: str, photo: bytes, seconds: float) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.monotonic()
            response = await client.post("/predict", content=photo, headers={"Content-Type": "image/jpeg"})
            latencies.append(time.monotonic() - started if response.status_code == 200 else float("inf"))
            await asyncio.sleep(0.05)
    return latencies


async def attack(url: str, port: int, pids: list[int], photo: bytes, args: argparse.Namespace) -> dict:
    third = args.connections // 3
    kinds = ["headers"] * third + ["idle"] * third + ["upload"] * (args.connections - 2 * third)
    peaks = [[rss(pid)] for pid in pids]
    hostile = asyncio.gather(*(hold(port, kind, int(args.upload_mib * MiB), args.hold_limit) for kind in kinds))

    async def sample() -> None:
        while not hostile.done():
            for peak, pid in zip(peaks, pids):
                peak.append(rss(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    await asyncio.sleep(0.5)
    latencies = await normal_client(url, photo, args.seconds)
    held = await hostile
    await sampler
    by_kind: dict[str, dict] = {}
    for kind in ("headers", "idle", "upload"):
        rows = [(seconds, answer) for k, seconds, answer in held if k == kind]
        statuses: dict[str, int] = {}
        for _, answer in rows:
            status = answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else ("closed" if not answer else
                                                                                   answer[:40].decode("latin-1"))
            statuses[status] = statuses.get(status, 0) + 1
        by_kind[kind] = {"connections": len(rows), "held_max_s": max(s for s, _ in rows),
                         "held_median_s": statistics.median(s for s, _ in rows), "answers": statuses}
    return {"latencies": latencies, "peak_rss": [max(peak) for peak in peaks], "by_kind": by_kind}


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "failed": sum(v == float("inf") for v in ordered),
            "p50_ms": 1e3 * ordered[len(ordered) // 2], "p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--upload-mib", type=float, default=1.0, help="bytes each stalled upload sends first")
    parser.add_argument("--seconds", type=float, default=8.0, help="normal client's time per phase")
    parser.add_argument("--hold-limit", type=float, default=20.0, help="seconds the attacker holds at most")
    parser.add_argument("--front", choices=("service", "haproxy"), default="service",
                        help="attack the service itself, or the shipped HAProxy in front of it")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    photo = (REPO / "examples" / "cat.jpg").read_bytes()
    server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--device", "cpu",
                               "--log-level", "warning"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, server, 120, "the service did not become ready")
        with contextlib.ExitStack() as stack:
            pids = [server.pid]
            if args.front == "haproxy":
                logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slowloris-")))
                proxy = stack.enter_context(haproxy(url, tenant_rate=None, log=logs / "haproxy.log"))
                url, port = proxy.url, int(proxy.url.rsplit(":", 1)[1])
                pids.append(proxy.pid)
            for _ in range(20):
                httpx.post(f"{url}/predict", content=photo, headers={"Content-Type": "image/jpeg"})
            alone = asyncio.run(normal_client(url, photo, args.seconds))
            baselines = [rss(pid) for pid in pids]
            attacked = asyncio.run(attack(url, port, pids, photo, args))
    finally:
        server.terminate()
        server.wait(30)
    baseline = baselines[0]
    quiet, loud = summary(alone), summary(attacked["latencies"])
    report = {
        "what": "a slowloris of --connections hostile connections (a third each: endless heads, silent "
                "connections, stalled uploads) against robustnorm-serve at default settings, beside a normal "
                "client sending one image every 50 ms",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": "python benchmarks/slowloris.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "connections": args.connections, "upload_mib": args.upload_mib,
        "front": args.front,
        "rss_baseline_mib": baseline / MiB, "rss_growth_peak_mib": (attacked["peak_rss"][0] - baseline) / MiB,
        "haproxy_rss_growth_peak_mib": (attacked["peak_rss"][1] - baselines[1]) / MiB if len(pids) > 1 else None,
        "normal_client_alone": quiet, "normal_client_under_attack": loud,
        "p99_ratio": loud["p99_ms"] / quiet["p99_ms"], "hostile": attacked["by_kind"],
    }
    front = "-haproxy" if args.front == "haproxy" else ""
    out = args.out or RESULTS / f"slowloris{front}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({key: report[key] for key in ("rss_growth_peak_mib", "normal_client_alone",
                                                   "normal_client_under_attack", "p99_ratio")}, indent=1))
    print(json.dumps({"json": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
