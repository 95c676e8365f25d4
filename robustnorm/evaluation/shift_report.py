"""Summaries of a shift grid's results (``robustnorm evaluate --sections shift``): errors per severity, mean
corruption error, and the error each policy removes relative to ``frozen``.

Contract: :func:`summarize` reads the results JSON (as a dict) and returns one row per (model, policy, n) (and
``skew``): the mean error over the corruptions at each severity, the mean corruption error (the mean over every
corruption and severity the row holds), the clean error, and, against ``frozen`` at the same n on the very same
cells, ``error_removed = (err_frozen - err) / err_frozen`` and ``extra_error_removed = (err_frozen - err) /
(err_frozen - clean_err_frozen)`` (the share of the error that shift adds to ``frozen`` which the policy takes
away). Errors read ``common_accuracy`` by default: the images from ``common_from`` on, which every policy's cells
count (stream policies count nothing earlier), so that policies compare on the same images.
:func:`summary_markdown` renders the rows as markdown tables.
"""

from __future__ import annotations

from collections import defaultdict

CLEAN = "clean"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


KIND_ORDER = ("frozen", "batch", "blend", "adaptive", "stream", "auto")


def policy_order(policy: str) -> tuple:
    """A sort key: frozen, batch, blend (by N0), adaptive, stream, auto."""
    kind, _, rest = policy.partition(":")
    numbers = tuple(float(part) for part in rest.split(":") if part.replace(".", "", 1).isdigit())
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), numbers, policy)


def summarize(results: dict, *, field: str = "common_accuracy", skew: bool = False) -> list[dict]:
    """One row per model, policy and n (skewed cells when ``skew``): models in the results' order, then policies
    by :func:`policy_order`, then n (module docstring)."""
    rows = []
    for entry in results["models"]:
        errors: dict[tuple[str, int], dict[tuple[str, int], float]] = defaultdict(dict)
        for cell in entry["cells"]:
            if cell["skew"] == skew and cell.get(field) is not None:
                errors[(cell["policy"], cell["n"])][(cell["corruption"], cell["severity"])] = 1.0 - cell[field]
        for (policy, n), cells in sorted(errors.items(), key=lambda item: (policy_order(item[0][0]), item[0][1])):
            shifted = {scene: error for scene, error in cells.items() if scene[0] != CLEAN}
            frozen = errors.get(("frozen", n), {})
            common = [scene for scene in shifted if scene in frozen]
            row = {"model": entry["model"], "policy": policy, "n": n, "skew": skew,
                   "card": policy == entry.get("card_policy"), "cells": len(shifted),
                   "clean_error": cells.get((CLEAN, 0), float("nan")),
                   "error_by_severity": {severity: _mean([e for (_, s), e in shifted.items() if s == severity])
                                         for severity in sorted({s for _, s in shifted})},
                   "mean_error": _mean(list(shifted.values()))}
            err = _mean([shifted[scene] for scene in common])
            err_frozen = _mean([frozen[scene] for scene in common])
            frozen_clean = frozen.get((CLEAN, 0), float("nan"))
            row["error_removed"] = (err_frozen - err) / err_frozen if common and err_frozen > 0 else float("nan")
            extra = err_frozen - frozen_clean
            row["extra_error_removed"] = (err_frozen - err) / extra if common and extra > 0 else float("nan")
            rows.append(row)
    return rows


def _pct(value: float, signed: bool = False) -> str:
    if value != value:  # NaN
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _table(rows: list[dict], severities: list[int], skew: bool) -> list[str]:
    clean_head = "clean, skewed" if skew else "clean"
    shifted = "skewed, " if skew else ""
    head = ["model", "policy", "n", f"{clean_head} error %",
            *(f"{shifted}severity {s} error %" for s in severities),
            f"{shifted}mean corruption error %", "error removed vs frozen %", "extra error removed vs frozen %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        policy = f"{row['policy']} (card)" if row["card"] else row["policy"]
        lines.append("| " + " | ".join([
            row["model"], policy, str(row["n"]), _pct(row["clean_error"]),
            *(_pct(row["error_by_severity"].get(s, float("nan"))) for s in severities),
            _pct(row["mean_error"]), _pct(row["error_removed"], True), _pct(row["extra_error_removed"], True)]) + " |")
    return lines


def summary_markdown(results: dict, *, field: str = "common_accuracy") -> str:
    """The summary rows as markdown: one table for the scenes in serving order, one for label-skewed scenes."""
    parts = []
    for skew in (False, True):
        rows = summarize(results, field=field, skew=skew)
        if not rows:
            continue
        severities = sorted({s for row in rows for s in row["error_by_severity"]})
        parts.append("\n".join(_table(rows, severities, skew)))
    return "\n\n".join(parts) + "\n"


def corruption_table(results: dict, n: int, *, field: str = "common_accuracy", skew: bool = False) -> str:
    """Accuracy (%) per corruption at batch size ``n``: one row per model, policy and severity, one column per
    corruption (markdown)."""
    corruptions: dict[str, None] = {}
    rows: dict[tuple[str, str, int], dict[str, float]] = {}
    for entry in results["models"]:
        for cell in entry["cells"]:
            if cell["n"] == n and cell["skew"] == skew and cell["corruption"] != CLEAN and cell.get(field) is not None:
                corruptions[cell["corruption"]] = None
                key = (entry["model"], cell["policy"], cell["severity"])
                rows.setdefault(key, {})[cell["corruption"]] = cell[field]
    order = {entry["model"]: k for k, entry in enumerate(results["models"])}
    cards = {entry["model"]: entry.get("card_policy") for entry in results["models"]}
    head = ["model", "policy", "severity", *corruptions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, policy, severity in sorted(rows, key=lambda key: (order[key[0]], policy_order(key[1]), key[2])):
        values = rows[(model, policy, severity)]
        name = f"{policy} (card)" if policy == cards[model] else policy
        lines.append("| " + " | ".join([model, name, str(severity),
                                        *(_pct(values[c]) if c in values else "-" for c in corruptions)]) + " |")
    return "\n".join(lines) + "\n"
