"""The shift grid (robustnorm.evaluation.shift): cells against a slow, batch-by-batch computation, skewed
scenes, resume, and the summaries."""

from __future__ import annotations

import json

import pytest
import torch

from robustnorm import ModelCard, create_model
from robustnorm.calibrate_shift import stream_accuracies
from robustnorm.cli import main
from robustnorm.data import CIFAR10_CLASSES, ImageDataset, normalize
from robustnorm.evaluation import shift as shifting
from robustnorm.evaluation.shift import (
    ShiftCell,
    ShiftGrid,
    class_runs,
    make_scenes,
    model_policies,
    run_cells,
    shift_cells,
)
from robustnorm.evaluation.shift_report import summarize, summary_markdown
from robustnorm.evaluation.streams import stream_predictions
from robustnorm.gate import calibrate_gate
from robustnorm.grouping import batch_groups
from robustnorm.policy import parse_policy
from robustnorm.stream import StreamStore

IMAGES = 64
WINDOW = 16
POLICIES = ("frozen", "batch", "blend:16", "adaptive:4", "stream:16:16", "auto:16:16")


@pytest.fixture(scope="module")
def model_and_card() -> tuple[torch.nn.Module, ModelCard]:
    torch.manual_seed(0)
    model = create_model("resnet20", norm="bn")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32))
    card = ModelCard(name="tiny", architecture="resnet20", norm="bn", labels=list(CIFAR10_CLASSES),
                     policy="blend:16")
    return model.eval(), card


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x01 = torch.rand(IMAGES, 3, 32, 32, generator=generator)
    return x01, torch.arange(10).repeat(7)[:IMAGES][torch.randperm(IMAGES, generator=generator)]


@torch.no_grad()
def slow_accuracy(model: torch.nn.Module, card: ModelCard, x01: torch.Tensor, labels: torch.Tensor, policy: str,
                  n: int, gate: object = None) -> tuple[float, StreamStore | None]:
    """One forward per batch of n, in order; a stream policy through one stream, counted after its window."""
    parsed = parse_policy(policy)
    store = StreamStore(parsed.window, gate=gate) if parsed.uses_streams else None
    hits = []
    for start in range(0, x01.shape[0] - n + 1, n):
        streams = store.select([None]) if store is not None else None
        with batch_groups(model, [n], policy=parsed, streams=streams):
            logits = model(normalize(x01[start:start + n], card.mean, card.std))
        hits += (logits.argmax(dim=1) == labels[start:start + n]).tolist()
    counted = hits[parsed.window:] if parsed.uses_streams else hits
    return sum(counted) / len(counted), store


def check_cells(model: torch.nn.Module, card: ModelCard, x01: torch.Tensor, labels: torch.Tensor,
                policies: tuple[str, ...], scenes: tuple[tuple[str, int], ...], gate: object = None) -> list[dict]:
    cells = [ShiftCell(policy, n, corruption, severity, skew) for policy in policies for n in (1, 8)
             for corruption, severity in scenes for skew in (False, True)]
    made = make_scenes(x01, labels, cells, seed=0)
    records = run_cells(model, card, cells, made, gate=gate)
    assert [shifting.key_of(record) for record in records] == [cell.key for cell in cells]
    for cell, record in zip(cells, records):
        scene = made[cell.scene]
        expected, store = slow_accuracy(model, card, scene.x01, scene.labels, cell.policy, cell.n, gate)
        assert record["accuracy"] == pytest.approx(expected, abs=1e-6), cell
        assert record["images"] == IMAGES // cell.n * cell.n
        assert record["counted_from"] == (WINDOW if store is not None else 0)
        if cell.policy.startswith("auto") and not cell.skew:
            assert store is not None and store.get(None).switches > 0  # the gate did switch to the stream
    return records


def test_cells_equal_a_batch_by_batch_computation(model_and_card: tuple, data: tuple) -> None:
    model, card = model_and_card
    check_cells(model, card, *data, ("batch", "stream:16:16"), (("contrast", 5),))


@pytest.mark.slow
def test_every_kind_of_policy_equals_a_batch_by_batch_computation(model_and_card: tuple, data: tuple) -> None:
    model, card = model_and_card
    x01, labels = data
    gate = calibrate_gate(model, normalize(x01, card.mean, card.std), labels, window=WINDOW, classes=10,
                          min_images=8, margin=0.5)  # a low margin: the gate switches on these images
    records = check_cells(model, card, x01, labels, POLICIES, (("clean", 0), ("contrast", 5)), gate)
    adaptive = {record["n"]: record["same_as"] for record in records if record["policy"] == "adaptive:4"}
    assert adaptive == {1: "blend:16", 8: "batch"}  # BatchNorm's default fallback below MIN_BATCH


def test_corruptions_are_seeded_per_corruption_and_severity(data: tuple) -> None:
    x01, labels = data
    cells = [ShiftCell("frozen", 1, "gaussian_noise", severity) for severity in (4, 5)]
    once, again = make_scenes(x01, labels, cells, seed=0), make_scenes(x01, labels, cells[1:], seed=0)
    assert torch.equal(once[("gaussian_noise", 5, False)].x01, again[("gaussian_noise", 5, False)].x01)
    assert not torch.equal(once[("gaussian_noise", 4, False)].x01, once[("gaussian_noise", 5, False)].x01)


def test_skewed_scenes_are_the_same_images_in_runs_of_one_class(data: tuple) -> None:
    x01, labels = data
    cells = [ShiftCell("frozen", 8, "contrast", 5, skew) for skew in (False, True)]
    scenes = make_scenes(x01, labels, cells, seed=0)
    plain, skewed = scenes[("contrast", 5, False)], scenes[("contrast", 5, True)]
    changes = int((skewed.labels[1:] != skewed.labels[:-1]).sum())
    assert changes == len(labels.unique()) - 1  # every class in one run
    order = class_runs(labels, seed=0)
    assert torch.equal(skewed.x01, plain.x01[order]) and torch.equal(skewed.labels, labels[order])
    assert sorted(order.tolist()) == list(range(IMAGES))


def test_grid_lists_skewed_cells_and_leaves_auto_out_without_a_gate(model_and_card: tuple) -> None:
    _, card = model_and_card
    grid = ShiftGrid(policies=("frozen", "card", "auto:16"), sizes=(1, 8), corruptions=("fog",), severities=(4, 5),
                     skew_sizes=(8,), skew_severities=(5,))
    policies, skipped = model_policies(card, grid)
    assert [str(policy) for policy in policies] == ["frozen", "blend:16"] and list(skipped) == ["auto:16"]
    cells = shift_cells(card, grid)
    assert {cell.scene for cell in cells if cell.skew} == {("clean", 0, True), ("fog", 5, True)}
    assert all(cell.n == 8 for cell in cells if cell.skew)
    assert len(cells) == 2 * (2 * 3 + 2)


def test_stream_accuracies_count_after_the_warm_up(model_and_card: tuple, data: tuple) -> None:
    model, card = model_and_card
    x01, labels = data
    x = normalize(x01, card.mean, card.std)
    scores = stream_accuracies(model, {"a": (x, labels, WINDOW), "b": (x[:40], labels[:40], 0)}, "stream:16", None)
    predicted = stream_predictions(model, {"a": x, "b": x[:40]}, "stream:16")
    assert predicted["a"].numel() == 40  # as long as the shortest stream
    assert scores["a"] == pytest.approx(100 * float((predicted["a"][WINDOW:] == labels[WINDOW:40]).float().mean()))
    assert scores["b"] == pytest.approx(100 * float((predicted["b"] == labels[:40]).float().mean()))


def fake_test_set(images: int = 200) -> ImageDataset:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageDataset(pixels, torch.arange(10).repeat(images // 10), tuple(CIFAR10_CLASSES))


def record_cells_run(monkeypatch: pytest.MonkeyPatch) -> list[ShiftCell]:
    """The cells ``robustnorm evaluate`` runs from now on, in order (it still runs them)."""
    ran: list[ShiftCell] = []
    original = shifting.run_cells

    def counting(model: torch.nn.Module, card: ModelCard, cells: list, *args: object, **kwargs: object) -> list:
        ran.extend(cells)
        return original(model, card, cells, *args, **kwargs)

    monkeypatch.setattr(shifting, "run_cells", counting)
    return ran


def test_resume_runs_only_the_missing_cells(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("robustnorm.data.load_cifar10", lambda split, root=None: fake_test_set())
    out = tmp_path / "grid.json"
    command = ["evaluate", "--sections", "shift", "--models", "cifar10-resnet20-bn", "--shift-images", "40",
               "--shift-policies", "frozen", "batch", "--corruptions", "contrast", "--severities", "5",
               "--skew-sizes", "8", "--shift-out", str(out), "--quiet", "--device", "cpu"]
    assert main([*command, "--shift-sizes", "1", "8"]) == 0
    first = json.loads(out.read_text())
    cells = first["models"][0]["cells"]
    assert len(cells) == 2 * (2 * 2 + 2) and first["grid_spec"]["images"] == 40

    ran = record_cells_run(monkeypatch)
    assert main([*command, "--shift-sizes", "1", "8", "4", "--resume"]) == 0
    assert ran and all(cell.n == 4 for cell in ran) and len(ran) == 2 * 2
    second = json.loads(out.read_text())
    assert second["models"][0]["cells"][: len(cells)] == cells and len(second["runs"]) == 2
    ran.clear()
    assert main([*command, "--shift-sizes", "1", "8", "4", "--resume"]) == 0
    assert ran == []


def test_resume_reruns_the_auto_cells_of_a_recalibrated_gate(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("robustnorm.data.load_cifar10", lambda split, root=None: fake_test_set())
    out = tmp_path / "grid.json"
    command = ["evaluate", "--sections", "shift", "--models", "cifar10-resnet20-bn", "--shift-images", "40",
               "--shift-policies", "frozen", "card", "--corruptions", "contrast", "--severities", "5",
               "--skew-sizes", "--shift-sizes", "8", "--shift-out", str(out), "--quiet", "--device", "cpu",
               "--resume"]
    assert main(command) == 0
    first = json.loads(out.read_text())
    assert sorted({cell["policy"] for cell in first["models"][0]["cells"]}) == ["auto:256:256", "frozen"]

    ran = record_cells_run(monkeypatch)
    assert main(command) == 0
    assert ran == []  # the same gate: nothing to run
    digest = first["models"][0]["gate_digest"]
    first["models"][0]["gate_digest"] = "an-older-gate"  # as a file written before the card's gate was recalibrated
    out.write_text(json.dumps(first))
    assert main(command) == 0
    assert ran and {cell.policy for cell in ran} == {"auto:256:256"}
    second = json.loads(out.read_text())
    assert second["models"][0]["gate_digest"] == digest
    assert len(second["models"][0]["cells"]) == len(first["models"][0]["cells"])


def test_summary_relative_to_frozen() -> None:
    def cell(policy: str, corruption: str, severity: int, accuracy: float) -> dict:
        return {"policy": policy, "n": 8, "corruption": corruption, "severity": severity, "skew": False,
                "accuracy": accuracy, "common_accuracy": accuracy}

    results = {"models": [{"model": "m", "card_policy": "batch", "cells": [
        cell("frozen", "clean", 0, 0.9), cell("batch", "clean", 0, 0.88),
        cell("frozen", "fog", 5, 0.5), cell("batch", "fog", 5, 0.7),
        cell("frozen", "snow", 5, 0.6), cell("batch", "snow", 5, 0.6)]}]}
    rows = {row["policy"]: row for row in summarize(results)}
    assert rows["frozen"]["mean_error"] == pytest.approx(0.45)
    assert rows["batch"]["mean_error"] == pytest.approx(0.35)
    assert rows["batch"]["error_removed"] == pytest.approx(0.10 / 0.45)
    assert rows["batch"]["extra_error_removed"] == pytest.approx((0.45 - 0.35) / (0.45 - 0.10))
    assert rows["batch"]["error_by_severity"] == {5: pytest.approx(0.35)}
    assert "batch (card)" in summary_markdown(results)
