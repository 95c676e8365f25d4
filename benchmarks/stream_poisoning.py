"""Poisoning through the stream: can a client sending 10% of the traffic move the others' predictions?

Under a stream policy (``stream``, or ``auto`` once its gate has switched), every image of a stream enters the
statistics that later images of the same stream are normalised with. With the service's default settings
(``batch_key=none``) all traffic is one stream, so one client's images reach everyone's answers. This script
measures how far, through the library exactly as the service runs it at concurrency 1 (single-image batches,
one :class:`robustnorm.StreamStore` with the service's defaults, the card's policy and drift gate):

- victims: a seeded stream of test images (clean, or one corruption at severity 5, where the gate has reason to
  switch), in which every 10th image is the attacker's (10% of the traffic);
- a benign run, where those places hold other test images of the victims' kind (clean, or the same corruption),
  a second benign run with yet other such images (``benign-other``: how many predictions any change of the 10%
  moves, the floor under every attack's figure), and attacked runs, where those places hold
  * ``noise``: uniform random pixels;
  * ``extremes``: images all black and all white in turn (the largest moves of means and spreads);
  * ``poison-batch`` and ``poison-blend``: the project's poisoning attack (``robustnorm evaluate``'s
    ``poison:K``, PGD with an unbounded budget: any image the attacker likes), one poisoner per batch of 10,
    crafted to misclassify its 9 batchmates, drawn from other test images, under ``batch`` statistics (a 10%
    share of the batch statistics, as 10% of a stream's window) or under ``blend:10`` (the population and those
    batch statistics half and half, as ``auto:256:256`` mixes the population and a full window);
- a victim's prediction is *flipped* when it differs from the benign run's; reported over the victims after the
  stream's first 256 images, with the victims' accuracy and the share of the stream's images that ran with
  stream statistics (``switched``);
- each with the stream untrimmed (``stream_trim`` 0, the default) and trimmed (0.2: per channel, the fifth of
  the window's images with the highest values and the fifth with the lowest are left out of its statistics and
  of its gate score).

The same through the real service (``--service``): ``python -m service --model NAME`` with default settings
but ``--stream-key`` (``client``, the default: each client address has a stream of its own; ``shared``: all
traffic is one stream), the victims' requests from 127.0.0.1 and the attacker's (and, in the benign runs, the
other 10%) from 127.0.0.2, one request at a time, every image rounded to 8 bits (PNG).

    python benchmarks/stream_poisoning.py                  # both bundled models, about 20 minutes on 1 core
    python benchmarks/stream_poisoning.py --service        # through the service, about 40 minutes
    python benchmarks/stream_poisoning.py --smoke          # a few hundred images, a minute

Results: ``benchmarks/results/shift/stream_poisoning.json`` (``stream_poisoning_service.json`` with ``--service``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from shift_service import Service, png, quantised

import robustnorm
from robustnorm.corruptions import corrupt
from robustnorm.data import load_cifar10, normalize, to_float
from robustnorm.evaluation.cells import Cell
from robustnorm.evaluation.craft import craft
from robustnorm.gate import GateCalibration

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cifar10-resnet20-bn", "cifar10-resnet20-robustnorm")
SHARE = 10  # one image in SHARE is the attacker's
WARM = 256
SCENARIOS = ("clean", "gaussian_noise", "contrast")  # the victims' traffic


def interleave(victims: torch.Tensor, attacker: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream: after every SHARE - 1 victims one attacker image (cycling through ``attacker``); returns the
    stream and a mask of the victims' places."""
    total = victims.shape[0] * SHARE // (SHARE - 1)
    is_victim = torch.arange(total) % SHARE != SHARE - 1
    stream = torch.empty(total, *victims.shape[1:], dtype=victims.dtype)
    stream[is_victim] = victims[: int(is_victim.sum())]
    places = int((~is_victim).sum())
    stream[~is_victim] = attacker[torch.arange(places) % attacker.shape[0]]
    return stream, is_victim


def crafted_poison(model: torch.nn.Module, card: robustnorm.ModelCard, pool: torch.Tensor, labels: torch.Tensor,
                   policy: str, count: int, steps: int, seed: int) -> torch.Tensor:
    """``count`` poisoners, each crafted in a batch of SHARE with SHARE - 1 clean batchmates from ``pool`` so
    that the batchmates are misclassified under ``policy`` (the poison:1 threat model, unbounded budget)."""
    n = SHARE
    x = pool[: count * n]
    y = labels[: count * n]
    attackers = torch.zeros(count * n, dtype=torch.bool)
    attackers[::n] = True
    generator = torch.Generator().manual_seed(seed)
    cell = Cell.parse(policy, n, "poison:1", "pgd", 255.0, "adaptive")
    done = craft(model, card, x, y, cell, steps=steps, generator=generator, attackers=attackers)
    return done.images[attackers]


@torch.no_grad()
def run_stream(model: torch.nn.Module, card: robustnorm.ModelCard, gate: GateCalibration | None,
               stream01: torch.Tensor, trim: float) -> tuple[torch.Tensor, float]:
    """Predicted class of every image of one stream of single-image requests under the card's policy (as
    :func:`robustnorm.evaluation.streams.stream_predictions` runs one stream), and the share of its images that
    ran after the gate had switched to stream statistics."""
    x = normalize(stream01, card.mean, card.std)
    policy = robustnorm.parse_policy(card.policy)
    store = (robustnorm.StreamStore(policy.window or 1, max_streams=1, trim=trim, gate=gate)
             if policy.uses_streams else None)
    predicted, adapted = torch.empty(x.shape[0], dtype=torch.long), 0
    for i in range(x.shape[0]):
        selection = store.select([None]) if store is not None else None
        stream = selection.streams[0] if selection is not None else None
        adapted += stream is not None and (policy.kind != "auto" or stream.shifted)
        with robustnorm.batch_groups(model, [1], policy=policy, streams=selection):
            predicted[i] = model(x[i:i + 1]).argmax(dim=1)[0]
    return predicted, adapted / x.shape[0]


Runner = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]
"""Runs one stream (images in [0, 1], the mask of the victims' places): every image's predicted class and the
share of the images that ran with stream statistics."""


def library_runners(model: torch.nn.Module, card: robustnorm.ModelCard, trims: list[float]
                    ) -> Iterator[tuple[str, Runner]]:
    gate = (GateCalibration.from_dict(card.calibration.gate)
            if card.calibration is not None and card.calibration.gate else None)
    for trim in trims:
        yield f"trim={trim:g}", lambda stream01, _, trim=trim: run_stream(model, card, gate, stream01, trim)


VICTIM, ATTACKER = "127.0.0.1", "127.0.0.2"


def service_runners(name: str, stream_keys: list[str], port: int, logs: Path) -> Iterator[tuple[str, Runner]]:
    """The real service (``python -m service --model NAME``, default settings but ``--stream-key``), the
    victims' requests from one loopback address and the attacker's from another, one request at a time."""
    for key in stream_keys:
        service = Service(name, port, None, logs / f"poisoning-{name}-{key}.log", ["--stream-key", key])
        try:
            yield f"service stream_key={key}", functools.partial(run_service, service)
        finally:
            service.close()


def run_service(service: Service, stream01: torch.Tensor, is_victim: torch.Tensor) -> tuple[torch.Tensor, float]:
    service.reset()
    predicted, adapted = torch.empty(stream01.shape[0], dtype=torch.long), 0
    for i, image in enumerate(quantised(stream01)):
        body = service.call("POST", "/predict", png(image), {"Content-Type": "image/png"},
                            source=VICTIM if is_victim[i] else ATTACKER)
        answer = body["predictions"][0]
        predicted[i] = answer["index"]
        adapted += answer["batch"]["statistics"] == "stream"
    return predicted, adapted / stream01.shape[0]


def measure(name: str, images: int, steps: int, seed: int,
            runners: Callable[[torch.nn.Module, robustnorm.ModelCard], Iterator[tuple[str, Runner]]]) -> dict:
    model, card = robustnorm.load_model(name)
    model.eval()
    test = load_cifar10("test")
    order = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(seed))
    places = images // (SHARE - 1) + 1
    victims_at, benign_at, other_at, pool_at = (order[:images], order[images:images + places],
                                                order[images + places:images + 2 * places], order[-2000:])
    x01 = to_float(test.images)
    labels = test.labels
    generator = torch.Generator().manual_seed(seed + 1)
    count = max(1, images // (SHARE - 1) // 2)  # crafted poisoners, each sent twice
    attackers = {
        "noise": torch.rand(count * 2, *x01.shape[1:], generator=generator),
        "extremes": torch.stack([torch.full(x01.shape[1:], float(i % 2)) for i in range(2)]),
    }
    started = time.perf_counter()
    for policy in ("batch", "blend:10"):
        attackers[f"poison-{policy.split(':')[0]}"] = crafted_poison(
            model, card, x01[pool_at], labels[pool_at], policy, count, steps, seed)
    craft_seconds = time.perf_counter() - started
    result: dict = {"version": card.version, "policy": card.policy, "craft_seconds": round(craft_seconds, 1),
                    "poisoners_crafted": count, "scenarios": {}}
    for label, run in runners(model, card):
        result["scenarios"][label] = by_scenario = {}
        for index, scenario in enumerate(SCENARIOS):
            def traffic(at: torch.Tensor, offset: int, scenario: str = scenario, index: int = index) -> torch.Tensor:
                images = x01[at]
                return images if scenario == "clean" else corrupt(scenario, images, 5, seed + 100 * offset + index)

            victims, truth = traffic(victims_at, 0), labels[victims_at]
            benign_stream, is_victim = interleave(victims, traffic(benign_at, 1))
            benign, benign_switched = run(benign_stream, is_victim)
            other_stream, _ = interleave(victims, traffic(other_at, 2))
            other, other_switched = run(other_stream, is_victim)
            scored = is_victim & (torch.arange(is_victim.shape[0]) >= WARM)
            victim_truth = torch.empty(is_victim.shape[0], dtype=torch.long)
            victim_truth[is_victim] = truth[: int(is_victim.sum())]
            rows = {"benign": {"accuracy": _pct(benign[scored] == victim_truth[scored]),
                               "switched": round(100 * benign_switched, 1)},
                    "benign-other": {"flipped": _pct(other[scored] != benign[scored]),
                                     "accuracy": _pct(other[scored] == victim_truth[scored]),
                                     "switched": round(100 * other_switched, 1)}}
            for attack, images01 in attackers.items():
                stream, _ = interleave(victims, images01)
                attacked, switched = run(stream, is_victim)
                rows[attack] = {"flipped": _pct(attacked[scored] != benign[scored]),
                                "accuracy": _pct(attacked[scored] == victim_truth[scored]),
                                "switched": round(100 * switched, 1)}
            by_scenario[scenario] = {"victims_counted": int(scored.sum()), "runs": rows}
            print(f"{name} {label} {scenario}: " + "; ".join(
                f"{attack} {row.get('flipped', 0):.1f}% flipped, acc {row['accuracy']:.1f}, "
                f"switched {row['switched']}%" for attack, row in rows.items()), flush=True)
    return result


def _pct(flags: torch.Tensor) -> float:
    return round(100 * flags.float().mean().item(), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=1800, help="victim images per stream")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps of the crafted poison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trims", type=lambda text: [float(v) for v in text.split(",")], default=[0.0, 0.2],
                        help="stream trims to measure (the service's stream_trim; default 0 and 0.2)")
    parser.add_argument("--service", action="store_true",
                        help="drive the real service instead of the library: the attacker is another client (its "
                             "own loopback address), the service runs with default settings and each --stream-keys")
    parser.add_argument("--stream-keys", type=lambda text: text.split(","), default=["client", "shared"],
                        help="with --service: the service's stream_key settings to measure (default client,shared)")
    parser.add_argument("--port", type=int, default=8831, help="with --service: the service's port")
    parser.add_argument("--smoke", action="store_true", help="300 victims, 3 steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/shift/stream_poisoning.json, "
                             "stream_poisoning_service.json with --service)")
    args = parser.parse_args(argv)
    results = ROOT / "benchmarks" / "results" / "shift"
    args.out = args.out or results / ("stream_poisoning_service.json" if args.service else "stream_poisoning.json")
    torch.set_num_threads(1)
    images, steps = (300, 3) if args.smoke else (args.images, args.steps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {"date": dt.date.today().isoformat(), "commit": commit.stdout.strip() or None,
              "command": " ".join(["python", "benchmarks/stream_poisoning.py", *(argv or sys.argv[1:])]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         + ("the script 1 thread, the service its defaults" if args.service else "1 thread"),
              "attacker_share": 1 / SHARE, "victims": images, "counted_after": WARM, "pgd_steps": steps,
              "models": {}}
    for name in args.models.split(","):
        runners = (functools.partial(lambda _model, _card, name: service_runners(
            name, args.stream_keys, args.port, Path(tempfile.gettempdir())), name=name) if args.service
            else functools.partial(library_runners, trims=args.trims))
        report["models"][name] = measure(name, images, steps, args.seed, runners)
    out = args.out.with_name(args.out.stem + "-smoke.json") if args.smoke else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"json": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
