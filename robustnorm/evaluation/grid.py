"""Evaluating one model on a grid: clean accuracy per policy and batch size, label-skewed batches, robust cells.

Contracts:
- :func:`evaluation_images` fixes the test images (in the grid's order) and the class-balanced subset the
  robust cells attack: the same for every caller with the same seed;
- :func:`evaluate_model` returns a JSON-ready dict with the sections ``clean``, ``skewed`` and ``robust``; given
  an earlier, interrupted result for the same model it keeps what that holds and runs only the rest, cheapest
  cells first; a cell that repeats one already computed is copied (``same_as``, zero seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import Tensor, nn

from ..data import ImageDataset, balanced_subset, make_generator
from ..io import ModelCard
from ..policy import parse_policy
from ..progress import progress_bar
from ..scoring import accuracy
from .cells import Cell, CellKey, key_of
from .craft import PerImageAttacks
from .plan import CellFilter, Grid, attack_images, in_cost_order, policies, robust_cells, same_computation
from .run import run_cell

logger = logging.getLogger(__name__)


def evaluation_images(test: ImageDataset, test_images: int, robust_images: int,
                      seed: int) -> tuple[ImageDataset, Tensor]:
    """The test images for clean accuracy, in the grid's order, and the indices (into them) of the fixed,
    class-balanced subset that robust cells attack; the same for every caller with the same ``seed``."""
    if test_images < len(test):
        test = test.subset(balanced_subset(test.labels, test_images // len(test.classes), seed=seed))
    else:  # a fixed shuffle: the archive is ordered by class, and batches must mix classes
        test = test.subset(torch.randperm(len(test), generator=make_generator(seed)))
    return test, balanced_subset(test.labels, robust_images // len(test.classes), seed=seed + 1)


def skewed_order(labels: Tensor, group_size: int, classes_per_batch: int, seed: int = 0) -> Tensor:
    """An index order in which every consecutive batch of ``group_size`` holds only ``classes_per_batch``
    classes (as a client's burst often does); images that cannot fill such a batch are left out."""
    generator = make_generator(seed, group_size, classes_per_batch)
    labels = labels.cpu()
    queues = {int(c): (labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=generator)]
              .tolist() for c in labels.unique()}
    shares = [group_size // classes_per_batch + (1 if i < group_size % classes_per_batch else 0)
              for i in range(classes_per_batch)]
    order: list[int] = []
    while True:
        ranked = sorted(queues, key=lambda c: (-len(queues[c]), float(torch.rand(1, generator=generator))))
        chosen = ranked[:classes_per_batch]
        if len(chosen) < classes_per_batch or any(len(queues[c]) < s for c, s in zip(chosen, shares)):
            return torch.tensor(order, dtype=torch.long)
        for c, share in zip(chosen, shares):
            order += queues[c][:share]
            del queues[c][:share]


def clean_sections(model: nn.Module, card: ModelCard, test_x01: Tensor, test_labels: Tensor, grid: Grid,
                   seed: int = 0, progress: bool | None = False) -> dict[str, list[dict]]:
    """``{"clean": [...], "skewed": [...]}``: clean accuracy per policy and batch size, and on label-skewed
    batches, under frozen, batch, the card's policy (and, for clean accuracy, blend with each N0 of the grid)."""
    deployed = policies(card)
    clean_policies = list(dict.fromkeys([*deployed, *(parse_policy(f"blend:{n0:g}") for n0 in grid.blend_n0)]))
    sections: dict[str, list[dict]] = {"clean": [], "skewed": []}
    total = len(clean_policies) * len(grid.clean_sizes) + len(grid.skew_classes) * len(grid.skew_sizes)
    with progress_bar(total=total, desc=f"{card.name} clean", unit="setting", enabled=progress) as bar:
        for policy in clean_policies:
            for n in grid.clean_sizes:
                sections["clean"].append({"policy": str(policy), "n": n,
                                          "images": test_x01.shape[0] - test_x01.shape[0] % n,
                                          "accuracy": accuracy(model, card, test_x01, test_labels, policy, n)})
                logger.info("clean %s n=%d: %.4f", policy, n, sections["clean"][-1]["accuracy"])
                bar.update()
        for classes in grid.skew_classes:
            for n in grid.skew_sizes:
                bar.update()
                order = skewed_order(test_labels, n, classes, seed).to(test_labels.device)
                if order.numel() == 0:
                    logger.warning("skipped skewed batches of %d with %d classes: too few test images", n, classes)
                    continue
                for policy in deployed:
                    sections["skewed"].append({
                        "policy": str(policy), "n": n, "classes_per_batch": classes, "images": int(order.numel()),
                        "accuracy": accuracy(model, card, test_x01[order], test_labels[order], policy, n)})
    return sections


def evaluate_model(model: nn.Module, card: ModelCard, test_x01: Tensor, test_labels: Tensor, robust_x01: Tensor,
                   robust_labels: Tensor, grid: Grid, seed: int = 0, pool: Tensor | None = None,
                   pool_labels: Tensor | None = None, previous: dict | None = None,
                   on_progress: Callable[[dict], None] | None = None, max_cell_images: int | None = None,
                   only: CellFilter | None = None, progress: bool | None = False) -> dict:
    """Run the whole grid for one model; returns a JSON-ready dict.

    ``pool``: clean batchmates for the threat models with clean images in the batch (default: the robust
    subset itself). ``previous``: an earlier, interrupted result for the same model and version, whose
    sections and robust cells are kept rather than recomputed. ``on_progress(results)`` runs after every
    robust cell, so a caller can save partial results. ``max_cell_images``: leave out the cells whose attack
    runs more images per step than this (lone attackers and EOT at large n), to be filled in later with
    ``--resume`` on faster hardware; left-out cells are logged, never reported. ``only`` likewise leaves out
    the robust cells it does not admit. ``progress``: a bar per section (:func:`robustnorm.progress.progress_bar`).
    """
    results: dict = {"model": card.name, "version": card.version, "policy": card.policy, "p": card.p,
                     "clean": [], "skewed": [], "robust": []}
    if previous is not None:
        for section in ("clean", "skewed", "robust"):
            results[section] = list(previous.get(section, []))
    if not results["clean"]:
        results.update(clean_sections(model, card, test_x01, test_labels, grid, seed, progress))
    robust = card.norm == "robustnorm"
    done: dict[CellKey, tuple[Cell, dict]] = {key_of(record): (Cell.from_record(record), record)
                                              for record in results["robust"]}
    if pool is None or pool_labels is None:
        pool, pool_labels = robust_x01, robust_labels
    subset = robust_x01.shape[0]
    pending = []
    for cell in in_cost_order(robust_cells(card, grid), robust, subset):
        if cell.key in done or (only is not None and not only.admits(cell)):
            continue
        cost = attack_images(cell, robust, subset)
        if max_cell_images is not None and cost > max_cell_images:
            logger.info("left out %s: %d images per attack step > --max-cell-images %d", cell.key, cost,
                        max_cell_images)
            continue
        pending.append(cell)
    per_image = PerImageAttacks()
    for cell in progress_bar(pending, desc=f"{card.name} robust", unit="cell", enabled=progress):
        twin = next((record for earlier, record in done.values() if same_computation(earlier, cell, robust)), None)
        if twin is not None:
            copied = twin["same_as"] or (twin["policy"] if twin["gradient"] == cell.gradient
                                         else f"{twin['policy']}, {twin['gradient']} gradient")
            record = dict(twin, policy=str(cell.policy), gradient=cell.gradient, seconds=0.0, same_as=copied)
        else:
            record = asdict(run_cell(model, card, robust_x01, robust_labels, cell, steps=grid.steps, seed=seed,
                                     pool=pool, pool_labels=pool_labels, per_image=per_image))
        results["robust"].append(record)
        done[cell.key] = (cell, record)
        logger.info("robust %s", record)
        if on_progress is not None:
            on_progress(results)
    return results
