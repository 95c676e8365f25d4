"""Accuracy under distribution shift: the shift grid of ``robustnorm evaluate --sections shift``.

A cell is (model, policy, n, corruption, severity, skew) -> accuracy on a seeded, class-balanced subset of the
test images (:func:`shift_images`); ``corruption`` is one of CIFAR-10-C's corruptions, or ``clean`` (severity 0).
Contracts:

- corruptions are seeded per (corruption, severity) (:func:`scene_images`): every model, policy and n sees the
  very same corrupted images;
- under a policy without streams, the images form consecutive batches of n, each one statistics group, many
  batches per forward (:func:`robustnorm.scoring.predictions`); a partial last batch is left out;
- under a stream policy (``stream`` or ``auto``) the images flow as one stream in consecutive batches of n, each
  answered before the next enters the stream (:func:`.streams.stream_predictions`, the scenes of a severity
  advancing together as groups), and the cell counts the images after the stream's first WINDOW (``counted_from``);
- ``common_accuracy`` is every cell's accuracy over the images from :data:`COMMON_FROM` on, which the cells of
  every policy at that n count, so that policies compare on the same images;
- skewed cells (``skew``) run the same corrupted images sorted into runs of one class (:func:`class_runs`), as
  a camera that sees one kind of object at a time;
- a cell whose policy runs the same statistics as another at that n (``adaptive:MIN_BATCH`` is ``batch`` or its
  fallback) reuses its predictions and names it in ``same_as``; ``frozen`` predicts every image once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..corruptions import CORRUPTIONS, TEST_CORRUPTIONS, corrupt, get_corruption
from ..data import ImageDataset, balanced_subset, make_generator, normalize
from ..gate import GateCalibration
from ..io import ModelCard
from ..policy import Policy, parse_policy
from ..scoring import predictions
from .streams import stream_predictions

logger = logging.getLogger(__name__)

CLEAN = "clean"
CARD = "card"  # in a list of policies: the model card's own policy
DEFAULT_POLICIES = ("frozen", "batch", "blend:16", "blend:64", "blend:512", CARD, "adaptive:16", "stream:256:256",
                    "auto:256:256")
DEFAULT_SIZES = (1, 8, 32, 128)
DEFAULT_SKEW_SIZES = (32, 128)
DEFAULT_SKEW_SEVERITIES = (5,)
SEVERITIES = (1, 2, 3, 4, 5)
COMMON_FROM = 256  # common_accuracy counts images COMMON_FROM.. (the largest stream window of the default grid)


@dataclass(frozen=True)
class ShiftGrid:
    """Which cells to run: policies (``card`` stands for the card's own), batch sizes, corruptions, severities,
    and the batch sizes and severities of the label-skewed cells (clean skewed cells at every skew size)."""

    policies: tuple[str, ...] = DEFAULT_POLICIES
    sizes: tuple[int, ...] = DEFAULT_SIZES
    corruptions: tuple[str, ...] = TEST_CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    skew_sizes: tuple[int, ...] = DEFAULT_SKEW_SIZES
    skew_severities: tuple[int, ...] = DEFAULT_SKEW_SEVERITIES

    def __post_init__(self) -> None:
        for policy in self.policies:
            if policy != CARD:
                parse_policy(policy)
        for corruption in self.corruptions:
            full = get_corruption(corruption).name
            if full != corruption:
                raise ValueError(f"name corruption {corruption!r} by its full name, {full!r}")
        if any(n < 1 for n in (*self.sizes, *self.skew_sizes)):
            raise ValueError("batch sizes must be >= 1")
        if any(s not in SEVERITIES for s in (*self.severities, *self.skew_severities)):
            raise ValueError(f"severities are {SEVERITIES}")


@dataclass(frozen=True)
class ShiftCell:
    """One cell of the grid for one model: accuracy under ``policy`` in batches of ``n`` on a scene."""

    policy: str
    n: int
    corruption: str
    severity: int  # 0 for clean images
    skew: bool = False

    @property
    def key(self) -> tuple[str, int, str, int, bool]:
        return (self.policy, self.n, self.corruption, self.severity, self.skew)

    @property
    def scene(self) -> tuple[str, int, bool]:
        return (self.corruption, self.severity, self.skew)


def key_of(record: dict) -> tuple[str, int, str, int, bool]:
    """The key of a cell's record (as :attr:`ShiftCell.key`)."""
    return (record["policy"], record["n"], record["corruption"], record["severity"], record["skew"])


def card_gate(card: ModelCard) -> GateCalibration | None:
    """The ``auto`` policy's drift gate from the card (``calibration.gate``), or None."""
    gate = card.calibration.gate if card.calibration is not None else None
    return GateCalibration.from_dict(gate) if gate else None


def model_policies(card: ModelCard, grid: ShiftGrid) -> tuple[list[Policy], dict[str, str]]:
    """The grid's policies for ``card`` in order, without repeats (``card`` replaced by the card's policy), and the
    policies left out with the reason (``auto`` needs the card's drift gate)."""
    chosen: dict[str, Policy] = {}
    skipped: dict[str, str] = {}
    for name in grid.policies:
        policy = parse_policy(card.policy if name == CARD else name)
        if policy.kind == "auto" and card_gate(card) is None:
            skipped[str(policy)] = "the card has no drift gate (calibration.gate) for the auto policy"
            continue
        chosen.setdefault(str(policy), policy)
    return list(chosen.values()), skipped


def scenes(grid: ShiftGrid) -> list[tuple[str, int]]:
    """(corruption, severity) pairs of the grid, clean first (severity 0), then severity by severity."""
    return [(CLEAN, 0)] + [(corruption, severity) for severity in grid.severities for corruption in grid.corruptions]


def shift_cells(card: ModelCard, grid: ShiftGrid) -> list[ShiftCell]:
    """Every cell of ``grid`` for the model of ``card``, scene by scene."""
    policies, _ = model_policies(card, grid)
    cells = []
    for corruption, severity in scenes(grid):
        skewed = grid.skew_sizes if severity == 0 or severity in grid.skew_severities else ()
        for skew, sizes in ((False, grid.sizes), (True, skewed)):
            cells += [ShiftCell(str(policy), n, corruption, severity, skew) for policy in policies for n in sizes]
    return cells


def shift_images(test: ImageDataset, images: int, seed: int) -> Tensor:
    """Indices of the fixed subset of ``test``: ``images // classes`` of every class (balanced, in a seeded
    order), or every image in a seeded order when ``images`` covers the whole set."""
    if images >= len(test):
        return torch.randperm(len(test), generator=make_generator(seed))
    return balanced_subset(test.labels, images // len(test.classes), seed=seed)


def scene_images(x01: Tensor, corruption: str, severity: int, seed: int) -> Tensor:
    """The subset under ``corruption`` at ``severity``, seeded per (corruption, severity)."""
    if corruption == CLEAN:
        return x01
    return corrupt(corruption, x01, severity, make_generator(seed, list(CORRUPTIONS).index(corruption), severity))


def class_runs(labels: Tensor, seed: int) -> Tensor:
    """An order of the images in runs of one class: every class's images together (in their order), the classes
    in a seeded order."""
    labels = labels.cpu()
    classes = labels.unique()
    order = classes[torch.randperm(classes.numel(), generator=make_generator(seed, 1))]
    return torch.cat([(labels == c).nonzero().squeeze(1) for c in order.tolist()])


def single_class_batches(labels: Tensor, n: int) -> float:
    """The fraction of the whole batches of ``n`` that hold one class."""
    usable = labels.numel() - labels.numel() % n
    batches = labels[:usable].view(-1, n)
    return float((batches == batches[:, :1]).all(dim=1).float().mean()) if usable else float("nan")


@dataclass
class Scene:
    """One scene's images (in [0, 1], in the order they are served) and labels; normalised once when needed."""

    x01: Tensor
    labels: Tensor
    normalized: dict[tuple, Tensor] = field(default_factory=dict, repr=False)  # by (mean, std)


SceneKey = tuple[str, int, bool]  # (corruption, severity, skew)


def make_scenes(x01: Tensor, labels: Tensor, cells: Iterable[ShiftCell], seed: int) -> dict[SceneKey, Scene]:
    """The scenes ``cells`` need, each corrupted once (a skewed scene reorders its unskewed one's images)."""
    order = class_runs(labels, seed)
    made: dict[SceneKey, Scene] = {}
    for corruption, severity, skew in dict.fromkeys(cell.scene for cell in cells):
        if (corruption, severity, False) in made:
            base = made[(corruption, severity, False)].x01
        else:
            base = scene_images(x01, corruption, severity, seed)
        made[(corruption, severity, skew)] = (Scene(base[order.to(base.device)], labels[order.to(labels.device)])
                                               if skew else Scene(base, labels))
    return made


def cell_record(cell: ShiftCell, predicted: Tensor, labels: Tensor, counted_from: int, seconds: float,
                same_as: str | None) -> dict:
    """A cell's JSON record from its predictions (whole batches of n, in serving order)."""
    images = predicted.numel()
    hits = (predicted == labels[:images].to(predicted.device)).float()

    def mean_from(start: int) -> float:
        return float(hits[start:].mean()) if images > start else float("nan")

    record = {"policy": cell.policy, "n": cell.n, "corruption": cell.corruption, "severity": cell.severity,
              "skew": cell.skew, "images": images, "counted_from": counted_from, "accuracy": mean_from(counted_from),
              "common_accuracy": mean_from(COMMON_FROM), "same_as": same_as, "seconds": round(seconds, 2)}
    if cell.skew:
        record["single_class_batches"] = single_class_batches(labels, cell.n)
    return record


def _uses_batch(policy: Policy) -> bool:
    return policy.kind in ("batch", "blend")


@torch.no_grad()
def run_cells(model: nn.Module, card: ModelCard, cells: Sequence[ShiftCell], scenes_by_key: dict[SceneKey, Scene], *,
              gate: GateCalibration | None = None, on_records: Callable[[list[dict]], None] | None = None
              ) -> list[dict]:
    """Run ``cells`` (of one model) on their scenes; ``on_records`` gets the records of each (policy, n) as they
    are done. Returns every record."""
    robust = card.norm == "robustnorm"
    done: list[dict] = []
    cache: dict[tuple[str, int, SceneKey], Tensor] = {}  # (statistics, n or 0, scene) -> predictions
    for (policy_text, n), group in _by_policy_and_size(cells).items():
        started = time.perf_counter()
        policy = parse_policy(policy_text)
        if policy.uses_streams:
            streams = {_stream_name(cell): _normalized(scenes_by_key[cell.scene], card) for cell in group}
            predicted = stream_predictions(model, streams, policy, batch_size=n, gate=gate)
            per_cell = [(cell, predicted[_stream_name(cell)], policy.window or 0, None) for cell in group]
        else:
            concrete = policy.resolve(n, robust)
            same_as = str(concrete) if str(concrete) != policy_text else None
            per_cell = []
            for cell in group:
                key = (str(concrete), n if _uses_batch(concrete) else 0, cell.scene)
                if key not in cache:
                    scene = scenes_by_key[cell.scene]
                    cache[key] = predictions(model, card, scene.x01, concrete, key[1] or 1)
                usable = scenes_by_key[cell.scene].labels.numel() // n * n
                per_cell.append((cell, cache[key][:usable], 0, same_as))
        seconds = (time.perf_counter() - started) / len(group)
        records = [cell_record(cell, predicted_cell, scenes_by_key[cell.scene].labels, counted_from, seconds, same_as)
                   for cell, predicted_cell, counted_from, same_as in per_cell]
        done += records
        if on_records is not None:
            on_records(records)
    return done


def _by_policy_and_size(cells: Sequence[ShiftCell]) -> dict[tuple[str, int], list[ShiftCell]]:
    grouped: dict[tuple[str, int], list[ShiftCell]] = {}
    for cell in cells:
        grouped.setdefault((cell.policy, cell.n), []).append(cell)
    return grouped


def _stream_name(cell: ShiftCell) -> str:
    return f"{cell.corruption}@{cell.severity}{'/skew' if cell.skew else ''}"


def _normalized(scene: Scene, card: ModelCard) -> Tensor:
    key = (tuple(card.mean), tuple(card.std))
    if key not in scene.normalized:
        scene.normalized[key] = normalize(scene.x01, card.mean, card.std)
    return scene.normalized[key]
