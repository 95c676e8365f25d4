"""The results file of ``robustnorm evaluate``: identity, atomic writes, resume and merge.

A results file is strict JSON (no NaN: :func:`without_nan`) with the run's identity (:data:`SAME_RUN`: format,
dataset, grid name, seed and image counts, plus the grid's spec) and one entry per model. Contracts:
- :func:`write_results` writes atomically: a run cut off mid-write leaves the previous file;
- :func:`resumable` returns the results an earlier run of the same identity left, and refuses any other's;
- :func:`merge_results` adds to one result the robust cells another of the same identity holds for the same
  model (weights and policy), and never replaces a figure: cells both hold must agree (except in time).
Accuracy cells are keyed to :func:`card_digest` (weights and deployed policy), the drift section also to
:func:`calibration_digest` (the drift calibration the scores read), and the shift grid's ``auto`` cells also to
:func:`gate_digest` (the drift gate they switch with).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..io import ModelCard
from .cells import key_of

RESULTS_FORMAT = 2  # 2: lone attackers, fractions and poisoning score every subset image (scored_images)
SAME_RUN = ("format", "dataset", "grid", "grid_spec", "seed", "robust_images", "test_images")
"""The keys two results must share to be combined (resumed or merged)."""


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def card_digest(card: ModelCard) -> str:
    """What the accuracy cells of a model depend on besides the data: its weights and deployed policy."""
    return _digest([card.version, card.policy])


def calibration_digest(card: ModelCard) -> str:
    """What the drift section depends on as well: the card's drift calibration (the scores read it)."""
    return _digest(card.calibration and card.calibration.to_dict())


def gate_digest(card: ModelCard) -> str:
    """What the ``auto`` policy's cells depend on as well: the card's drift gate (``calibration.gate``)."""
    gate = card.calibration.gate if card.calibration is not None else None
    return _digest(gate)


def without_nan(value: object) -> object:
    """``value`` as JSON reads it back, with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def write_results(path: Path, report: dict) -> None:
    """Write ``report`` to ``path`` atomically (module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(without_nan(report), indent=1, allow_nan=False) + "\n")
    partial.replace(path)


def _same_run(one: dict, other: dict) -> bool:
    return all(without_nan(one.get(key)) == without_nan(other.get(key)) for key in SAME_RUN)


def resumable(path: Path, report: dict) -> dict | None:
    """The results an earlier run with the same identity as ``report`` left in ``path`` (``None`` without a
    file); ``ValueError`` for results of another run."""
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())
    if not _same_run(earlier, report):
        raise ValueError(f"--resume: {path} holds results for another format, other data or another grid; "
                         "choose another --out")
    return earlier


def merge_devices(*devices: str) -> str:
    """The devices of several runs, each named once (``cpu (torch ...) + cuda (torch ...)``)."""
    return " + ".join(dict.fromkeys(part for device in devices for part in device.split(" + ")))


def merge_results(into: dict, other: dict) -> int:
    """Add to ``into`` the robust cells of ``other`` (the same run, e.g. a copy that another process resumed
    with ``--only-policies``) that it does not hold; returns how many were added (module docstring)."""
    if not _same_run(into, other):
        raise ValueError("--merge: the results are for another format, other data, another grid or seed")
    added = 0
    for entry in other["models"]:
        target = next((mine for mine in into["models"] if mine["model"] == entry["model"]), None)
        if target is None or target["card_digest"] != entry["card_digest"]:
            raise ValueError(f"--merge: {entry['model']} is not the same model in both results")
        held = {key_of(record): record for record in target["robust"]}
        for record in entry["robust"]:
            key = key_of(record)
            if key not in held:
                target["robust"].append(record)
                target["seconds"] = round(target["seconds"] + record["seconds"], 1)
                added += 1
            elif _timeless(held[key]) != _timeless(record):
                raise ValueError(f"--merge: {entry['model']} cell {key} differs between the results")
    into["device"] = merge_devices(into["device"], other["device"])
    return added


def _timeless(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "seconds"}
