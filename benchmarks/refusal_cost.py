"""What a refusal costs the service, against what an answer costs: the CPU behind its overload figures.

Under overload a replica exposed without a proxy refuses most requests itself (``benchmarks/overload.py``: two
in three at 3x its capacity), and every refusal is taken from the one core that also serves. This measures
both costs on one running service: ``robustnorm-serve`` (bundled default model, ``--trust-request-start``, one
intra-op thread) on 127.0.0.1, then closed loops of single-JPEG requests on kept-alive connections:

- ``refused``: every request carries an ``X-Request-Start`` 100 s old, so the door answers it 504 (its deadline
  is gone) on the path that also answers 429s: the head parsed, the tenant identified, admission asked, the
  body read, the error answered and counted;
- ``answered``: the same requests without the header, answered 200.

The service's CPU seconds (user + system, all its threads, from ``/proc/PID/stat``) over the requests of each
phase give the CPU per request; the last line says what share of a core refusing ``--factor - 1`` times the
measured capacity would take. Then the floor beneath the refusal: the same client against uvicorn alone (uvloop,
httptools, on the same CPUs) serving ``benchmarks/refusal_floor_app.py``, an ASGI app that reads the body and
answers 429 (``floor``): what uvicorn itself spends per request, whatever the app does. Linux only.

    python benchmarks/refusal_cost.py                    # -> benchmarks/results/overload/refusal_cost-<date>.json
    python benchmarks/refusal_cost.py --service-cpus 1   # the service on CPU 1, the client on the others
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import overload
from serve_compare import proc_stat

REQUEST = ("POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n"
           "{extra}\r\n")


def request(body: bytes, refused: bool) -> bytes:
    extra = f"X-Request-Start: t={int((time.time() - 100) * 1e6)}\r\n" if refused else ""
    return REQUEST.format(length=len(body), extra=extra).encode() + body


async def closed_loop(port: int, payload: bytes, clients: int, seconds: float) -> dict[str, int]:
    """``clients`` kept-alive connections sending ``payload`` one after another for ``seconds``; status counts."""
    codes: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                writer.write(payload)
                head = await reader.readuntil(b"\r\n\r\n")
                code = head[9:12].decode()
                codes[code] = codes.get(code, 0) + 1
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return codes


def phase(pid: int, port: int, payload: bytes, clients: int, seconds: float) -> dict[str, Any]:
    before, started = proc_stat(Path(f"/proc/{pid}/stat")), time.perf_counter()
    codes = asyncio.run(closed_loop(port, payload, clients, seconds))
    after, wall = proc_stat(Path(f"/proc/{pid}/stat")), time.perf_counter() - started
    assert before is not None and after is not None
    count = sum(codes.values())
    return {"codes": codes, "per_s": round(count / wall, 1),
            "service_cpu_ms_per_request": round(1e3 * (after[1] - before[1]) / count, 4),
            "service_cores": round((after[1] - before[1]) / wall, 3)}


def floor(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The refused phases against uvicorn alone serving ``refusal_floor_app.py``, as the service is started."""
    port = overload.free_port()
    command = [sys.executable, "-m", "uvicorn", "refusal_floor_app:app", "--host", "127.0.0.1", "--port", str(port),
               "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    pin = (lambda: os.sched_setaffinity(0, overload.SERVICE_CPUS)) if overload.SERVICE_CPUS else None
    process = subprocess.Popen(command, cwd=Path(__file__).parent, preexec_fn=pin)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("uvicorn with refusal_floor_app did not start") from None
                time.sleep(0.2)
        body = (overload.REPO / "examples" / "cat.jpg").read_bytes()
        payload = request(body, refused=True)
        phase(process.pid, port, payload, args.refused_clients, 2.0)  # warm-up
        return [phase(process.pid, port, payload, args.refused_clients, args.seconds) for _ in range(args.repeats)]
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--repeats", type=int, default=3, help="alternating refused/answered phases")
    parser.add_argument("--refused-clients", type=int, default=16)
    parser.add_argument("--answered-clients", type=int, default=32)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load, as a multiple of capacity")
    overload.add_service_cpus(parser)
    parser.add_argument("--out", type=Path, default=overload.RESULTS)
    args = parser.parse_args(argv)
    overload.pin_service(parser, args.service_cpus)
    body = (overload.REPO / "examples" / "cat.jpg").read_bytes()
    runs: dict[str, list[dict[str, Any]]] = {"refused": [], "answered": []}
    with tempfile.TemporaryDirectory(prefix="refusal-") as logs, overload.service(
            "--request-deadline", "1", "--trust-request-start", log=Path(logs) / "service.log") as url:
        port = int(url.rsplit(":", 1)[1])
        pid = overload.SERVICE_PIDS[url]
        phase(pid, port, request(body, refused=False), args.answered_clients, 3.0)  # warm-up
        for _ in range(args.repeats):
            runs["refused"].append(phase(pid, port, request(body, refused=True), args.refused_clients, args.seconds))
            runs["answered"].append(phase(pid, port, request(body, refused=False), args.answered_clients,
                                          args.seconds))
    runs["floor"] = floor(args)
    medians = {kind: {key: statistics.median(run[key] for run in measured)
                      for key in ("per_s", "service_cpu_ms_per_request")} for kind, measured in runs.items()}
    refusal, answer = (medians[kind]["service_cpu_ms_per_request"] / 1e3 for kind in ("refused", "answered"))
    capacity = medians["answered"]["per_s"]
    # At factor x capacity with every answer still given, (factor - 1) x capacity refusals a second.
    refusing_share = (args.factor - 1) * capacity * refusal
    commit = overload.served_commit()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime()), "commit": commit,
              "what": __doc__.split("\n\n")[1].replace("\n", " "),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "service_cpus": sorted(overload.SERVICE_CPUS) or "shared with the client"},
              "runs": runs, "medians": medians,
              "at_factor": {"factor": args.factor, "capacity_per_s": capacity,
                            "refusals_per_s": round((args.factor - 1) * capacity, 1),
                            "core_share_refusing": round(refusing_share, 3),
                            "answers_per_s_left_if_cpu_bound": round((1 - refusing_share) / answer, 1)}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"refusal_cost-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    left = report["at_factor"]["answers_per_s_left_if_cpu_bound"]
    print(f"refused: {1e3 * refusal:.3f} ms of service CPU each ({medians['refused']['per_s']:.0f}/s); answered: "
          f"{1e3 * answer:.3f} ms each ({capacity:.0f}/s). At {args.factor:g}x that capacity, refusing takes "
          f"{100 * refusing_share:.0f}% of a core, leaving about {left:.0f} answers/s if the service is CPU-bound. "
          f"uvicorn alone refusing: {medians['floor']['service_cpu_ms_per_request']:.3f} ms each; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
