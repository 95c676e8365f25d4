"""The headline table: which claims of arXiv 2006.11007 reproduce, by threat model, from the JSON that
``robustnorm evaluate`` wrote. Its counted summary is pasted into ``docs/results.md``.

    python benchmarks/headline.py benchmarks/results/robustness/robustness.json

Writes ``headline.md`` beside the JSON and prints it. Every verdict follows a rule stated in the table, applied
to the measured numbers, so that the wording cannot drift from the data:

- claim A, "adversarial inputs shift BatchNorm's input distribution": the batch drift score separates
  adversarial batches from clean ones with ROC AUC >= 0.9 (whole-batch PGD through the deployed model);
- claim B, "batch statistics remove much of BatchNorm's vulnerability": on the BatchNorm model, ``batch``
  recovers at least half of what the attack takes from ``frozen``:
  ``acc(batch, attacked) - acc(frozen, attacked) >= 0.5 * (clean(frozen) - acc(frozen, attacked))``;
- claim C, "RobustNorm is more robust than BatchNorm": the RobustNorm model's robust accuracy exceeds the
  BatchNorm model's by at least 5 points under the same policy, threat model, gradient, eps and batch size.
Robust figures are only counted when the same attack drives the ``frozen`` model of that network below 10%
(``frozen_attack_accuracy``), so that a weak or masked attack cannot pass for robustness; for claim B a ``batch``
figure below half the clean accuracy fails the rule whatever a stronger attack would leave ``frozen`` with. On the
rows of the adaptive gradient, each policy's figure is the lowest over the gradients measured for that cell
(adaptive cross-entropy, the adaptive clamped margin, transferred from ``frozen``, unknown batchmates): an attacker
uses the strongest, and an adaptive attack that does worse than a transferred one is being masked (or, where the
margin wins, is weak: the coupled cross-entropy of images sharing batch statistics, ``robustnorm/attacks.py``). Such
rows name the stronger attack. Masking only inflates robust accuracy, so a favourable verdict ("reproduces") that
rests on an adaptive-only figure of a model and policy whose adaptive gradient was beaten by 5 points or more by a
transferred one elsewhere is withheld ("masking suspected").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
MASKING_LIMIT = 0.10
MASKED_BY = 0.05  # an adaptive figure this far above the transferred one shows the gradient is masked
ROWS = [  # (threat, gradient, n): the threat models the table reports
    ("whole", "adaptive", 128), ("whole", "transfer", 128), ("lone", "adaptive", 128), ("lone", "transfer", 128),
    ("whole", "adaptive", 32), ("lone", "adaptive", 32), ("lone", "unknown", 32), ("fraction:0.1", "adaptive", 32),
    ("fraction:0.5", "adaptive", 32), ("whole", "adaptive", 8), ("lone", "adaptive", 8),
]


def _cell(model: dict, policy: str, n: int, threat: str, gradient: str, eps: float) -> dict | None:
    for record in model.get("robust", []):
        if (record["policy"], record["n"], record["threat"], record["gradient"], record["attack"]) == \
                (policy, n, threat, gradient, "pgd") and abs(record["eps_255"] - eps) < 1e-6:
            return record
    return None


def _strongest(model: dict, policy: str, n: int, threat: str, gradient: str, eps: float) -> dict | None:
    """The cell of ``gradient``; for the adaptive gradient, the lowest robust accuracy over all gradients."""
    if gradient != "adaptive":
        return _cell(model, policy, n, threat, gradient, eps)
    cells = [c for g in ("adaptive", "margin", "transfer", "unknown") if (c := _cell(model, policy, n, threat, g, eps))]
    strongest = min(cells, key=lambda c: (c["robust_accuracy"], c["gradient"] != "adaptive"), default=None)
    return None if strongest is None else {**strongest, "compared": tuple(c["gradient"] for c in cells)}


def _shown(cell: dict, gradient: str) -> str:
    if cell["gradient"] == gradient:
        return _percent(cell["robust_accuracy"])
    if gradient in cell.get("compared", ()):
        return f"{_percent(cell['robust_accuracy'])} ({cell['gradient']} gradient stronger)"
    return f"{_percent(cell['robust_accuracy'])} (only the {cell['gradient']} gradient measured)"


def _masking_suspected(model: dict, cell: dict) -> bool:
    """An adaptive-only figure of a model and policy whose adaptive gradient a transferred one beat elsewhere."""
    if cell["gradient"] != "adaptive" or cell.get("compared", ("adaptive",)) != ("adaptive",):
        return False
    for adaptive in model.get("robust", []):
        if adaptive["policy"] != cell["policy"] or adaptive["gradient"] != "adaptive" or adaptive["attack"] != "pgd":
            continue
        transfer = _cell(model, adaptive["policy"], adaptive["n"], adaptive["threat"], "transfer", adaptive["eps_255"])
        if transfer is not None and adaptive["robust_accuracy"] - transfer["robust_accuracy"] >= MASKED_BY:
            return True
    return False


def _clean(model: dict, policy: str, n: int) -> float | None:
    return next((r["accuracy"] for r in model.get("clean", []) if r["policy"] == policy and r["n"] == n), None)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _by_norm(report: dict) -> tuple[dict | None, dict | None]:
    models = report["models"]
    bn = next((m for m in models if m.get("p") is None), None)
    rn = max((m for m in models if m.get("p") is not None), default=None,
             key=lambda m: _clean(m, "frozen", 128) or 0.0)
    return bn, rn


class Row(NamedTuple):
    """One row of the full table; ``threat`` and ``eps`` also group it in the summary."""

    claim: str
    threat: str
    eps: str
    setting: str  # the row's threat-model column
    measured: str
    verdict: str

    def render(self) -> str:
        return f"| {self.claim} | {self.setting} | {self.measured} | {self.verdict} |"


def claim_a(bn: dict | None) -> list[Row]:
    if bn is None or "drift" not in bn:
        return [Row("A", "—", "—", "drift evidence not run", "—", "—")]
    auc = bn["drift"]["auc"]
    rows = []
    for condition in ("pgd_whole", "pgd_lone"):
        score = auc.get(condition, {}).get("batch_score")
        verdict = "not measured" if score is None else ("reproduces" if score >= 0.9 else "does not reproduce")
        shown = "—" if score is None else f"{score:.3f}"
        threat, eps = f"{condition.replace('pgd_', 'PGD, ')} batch", f"{bn['drift']['eps_255']:g}/255"
        rows.append(Row("A", threat, eps, f"{threat}, n = {bn['drift']['n']}, {eps}",
                        f"batch drift score ROC AUC {shown} (rule: >= 0.9)", verdict))
    return rows


def claim_b(bn: dict | None, eps: float) -> list[Row]:
    rows: list[Row] = []
    if bn is None:
        return rows
    for threat, gradient, n in ROWS:
        frozen = _strongest(bn, "frozen", n, threat, gradient, eps)
        batch = _strongest(bn, "batch", n, threat, gradient, eps)
        if frozen is None or batch is None:
            continue
        clean = frozen["clean_accuracy"]
        taken = clean - frozen["robust_accuracy"]
        recovered = batch["robust_accuracy"] - frozen["robust_accuracy"]
        masked = batch["frozen_attack_accuracy"] is not None and batch["frozen_attack_accuracy"] >= MASKING_LIMIT
        if masked and batch["robust_accuracy"] < 0.5 * clean:
            # B needs acc(batch) >= clean / 2 + acc(frozen) / 2; a stronger attack only lowers both figures, so
            # below half the clean accuracy no attack on frozen, however strong, could make B reproduce.
            verdict = "does not reproduce"
        elif masked:
            verdict = "attack too weak to judge"
        elif taken <= 0:
            verdict = "no vulnerability to remove"
        else:
            verdict = "reproduces" if recovered >= 0.5 * taken else "does not reproduce"
            if verdict == "reproduces" and _masking_suspected(bn, batch):
                verdict = "masking suspected (no transferred attack measured)"
        measured = f"frozen {_shown(frozen, gradient)} -> batch {_shown(batch, gradient)} (clean {_percent(clean)})"
        rows.append(Row("B", threat, f"{eps:g}/255", f"{threat}, {gradient} gradient, n = {n}, {eps:g}/255",
                        measured, verdict))
    return rows


def claim_c(bn: dict | None, rn: dict | None, eps: float) -> list[Row]:
    rows: list[Row] = []
    if bn is None or rn is None:
        return rows
    for policy in ("frozen", "batch"):
        for threat, gradient, n in ROWS:
            ours = _strongest(rn, policy, n, threat, gradient, eps)
            theirs = _strongest(bn, policy, n, threat, gradient, eps)
            if ours is None or theirs is None:
                continue
            masked = any(r["frozen_attack_accuracy"] is not None and r["frozen_attack_accuracy"] >= MASKING_LIMIT
                         for r in (ours, theirs))
            gain = ours["robust_accuracy"] - theirs["robust_accuracy"]
            verdict = "attack too weak to judge" if masked else ("reproduces" if gain >= 0.05 else "does not reproduce")
            if verdict == "reproduces" and _masking_suspected(rn, ours):
                verdict = "masking suspected (no transferred attack measured)"
            measured = f"RobustNorm {_shown(ours, gradient)} vs BatchNorm {_shown(theirs, gradient)}"
            rows.append(Row("C", threat, f"{eps:g}/255",
                            f"{policy}, {threat}, {gradient} gradient, n = {n}, {eps:g}/255", measured, verdict))
    return rows


CLAIMS = f"""Claims of arXiv 2006.11007 and the rule each verdict applies:

- **A**, adversarial inputs shift BatchNorm's input distribution: the batch drift score separates adversarial
  batches from clean ones with ROC AUC >= 0.9 (BatchNorm model, batches through its deployed policy).
- **B**, batch statistics remove much of BatchNorm's vulnerability: on the BatchNorm model, `batch` recovers at
  least half of what the attack takes from `frozen`.
- **C**, RobustNorm is the robust choice: the RobustNorm model's robust accuracy exceeds the BatchNorm model's by
  at least 5 points under the same policy, threat model, gradient, eps and batch size.

A robust figure counts only where the same attack takes the network's `frozen` model below
{100 * MASKING_LIMIT:.0f}% ("attack too weak to judge" otherwise), with one exception: B needs `batch` at no less
than half the clean accuracy whatever `frozen` is left with, and a stronger attack only lowers figures, so a `batch`
figure below that is "does not reproduce" even where the attack on `frozen` is weak. On the adaptive rows each
figure is the lowest over the gradients measured (adaptive cross-entropy, adaptive clamped margin, transferred
from `frozen`, unknown batchmates), and the row names the stronger one; "only the transfer gradient measured"
marks cells whose adaptive attack has not run yet.
"""


def _identities() -> dict[str, str]:
    """What a model version is: a bundled model, or the committed training record that holds its card."""
    found = {json.loads(card.read_text())["version"]: "bundled"
             for card in (REPO_ROOT / "robustnorm" / "bundled").glob("*/card.json")}
    for card in sorted((REPO_ROOT / "benchmarks" / "results" / "training").rglob("*.card.json")):
        found.setdefault(json.loads(card.read_text())["version"],
                         f"not bundled: training record `{card.relative_to(REPO_ROOT)}`")
    return found


def models_table(report: dict) -> list[str]:
    lines = ["| model | version | p | deployed policy | clean `frozen` n = 128 % | robust cells | what it is |",
             "|---|---|---|---|---|---|---|"]
    identities = _identities()
    for model in report["models"]:
        p = "—" if model.get("p") is None else f"{model['p']:g}"
        clean = _percent(_clean(model, "frozen", 128))
        lines.append(f"| {model['model']} | {model['version']} | {p} | `{model['policy']}` | {clean} | "
                     f"{len(model.get('robust', []))} | "
                     f"{identities.get(model['version'], 'not bundled, no committed record')} |")
    return lines


DRIFT_CONDITIONS = ("pgd_whole", "pgd_lone", "gaussian_noise", "gaussian_blur", "contrast", "jpeg")


def drift_table(report: dict) -> list[str]:
    """ROC AUC of the batch and per-image drift scores, clean batches against each condition, per model."""
    models = [m for m in report["models"] if "drift" in m]
    if not models:
        return []
    lines = ["| condition | " + " | ".join(f"{m['model']}: batch score | image score" for m in models) + " |",
             "|---|" + "---|---|" * len(models)]
    for condition in DRIFT_CONDITIONS:
        cells = []
        for model in models:
            auc = model["drift"]["auc"].get(condition, {})
            cells += [f"{auc[key]:.3f}" if auc.get(key) is not None else "—" for key in ("batch_score", "image_score")]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    first = models[0]["drift"]
    lines.append(f"\nBatches of n = {first['n']} ({first['images']} images), PGD-20 at {first['eps_255']:g}/255 "
                 f"through the deployed policy, corruptions at severity {first['severity']}; 0.5 is chance.")
    return lines


def claim_rows(report: dict) -> list[Row]:
    bn, rn = _by_norm(report)
    rows = claim_a(bn)
    for eps in (8.0, 4.0, 2.0):  # 4/255: the sweep at n = 128 only
        rows += claim_b(bn, eps)
        rows += claim_c(bn, rn, eps)
    return rows


def summary(report: dict) -> str:
    """The full table's verdicts counted per claim, threat model and eps: the table in ``docs/results.md``."""
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for row in claim_rows(report):
        tally = counts.setdefault((row.claim, row.threat, row.eps), {})
        verdict = row.verdict.split(" (")[0]
        tally[verdict] = tally.get(verdict, 0) + 1
    lines = ["| claim | threat model | eps | verdicts (rows of the full table) |", "|---|---|---|---|"]
    for (claim, threat, eps), tally in counts.items():
        verdicts = ", ".join(f"{verdict} ({count})" for verdict, count in tally.items())
        lines.append(f"| {claim} | {threat} | {eps} | {verdicts} |")
    return "\n".join(lines) + "\n"


def headline(report: dict) -> str:
    lines = ["| claim | threat model | measured (robust top-1 %, PGD-20) | verdict |", "|---|---|---|---|"]
    lines += [row.render() for row in claim_rows(report)]
    # attacked images whose predictions count; fewer in whole batches the batch size does not divide, and
    # under poisoning, which scores the victims
    sizes = sorted({(r["threat"], r["n"], r["scored_images"]) for m in report["models"] for r in m.get("robust", [])
                    if r["scored_images"] != report["robust_images"]})
    fewer = "; ".join(f"{images} in {threat} batches of {n}" for threat, n, images in sizes)
    setting = (f"Robust accuracy on {report['robust_images']} fixed test images"
               + (f" (other counts: {fewer})" if fewer else "")
               + f", clean accuracy on {report['test_images']}; {report['dataset']}; device {report['device']}.")
    parts = [CLAIMS, setting, "", *models_table(report), "", "Verdicts per claim (the rows below, counted):", "",
             summary(report), *lines]
    drift = drift_table(report)
    if drift:
        parts += ["", "Drift evidence (claim A in full): ROC AUC, clean batches against each condition.", "", *drift]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="robustness.json from robustnorm evaluate")
    args = parser.parse_args()
    text = headline(json.loads(args.results.read_text()))
    (args.results.parent / "headline.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
