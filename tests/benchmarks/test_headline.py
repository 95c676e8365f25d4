"""The headline table's verdicts follow their stated rules on hand-made results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "headline.py"
spec = importlib.util.spec_from_file_location("headline", SCRIPT)
headline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headline)


def record(policy: str, robust: float, frozen_attack: float = 0.0, clean: float = 0.9, threat: str = "whole",
           gradient: str = "adaptive") -> dict:
    return {"policy": policy, "n": 128, "threat": threat, "gradient": gradient, "attack": "pgd", "eps_255": 8.0,
            "robust_accuracy": robust, "clean_accuracy": clean, "frozen_attack_accuracy": frozen_attack,
            "scored_images": 2000}


def report(bn_cells: list[dict], rn_cells: list[dict], auc: float = 0.95) -> dict:
    drift = {"n": 32, "eps_255": 8.0, "images": 1984, "severity": 3,
             "auc": {"pgd_whole": {"batch_score": auc, "image_score": 0.5}, "pgd_lone": {"batch_score": 0.5}}}
    return {"models": [{"model": "bn", "version": "0123456789ab", "policy": "frozen", "p": None, "robust": bn_cells,
                        "drift": drift, "clean": [{"policy": "frozen", "n": 128, "accuracy": 0.9}]},
                       {"model": "rn", "version": "ba9876543210", "policy": "frozen", "p": 1.0, "robust": rn_cells,
                        "clean": [{"policy": "frozen", "n": 128, "accuracy": 0.89}]}],
            "robust_images": 2000, "test_images": 10000, "dataset": "d", "device": "cpu", "torch": "t"}


def full_table(text: str) -> list[str]:
    """The lines of the full table (after the counted summary)."""
    return text.split("| claim | threat model | measured")[1].splitlines()


def verdicts(text: str, claim: str) -> list[str]:
    return [line.split("|")[4].strip() for line in full_table(text) if line.startswith(f"| {claim} |")]


def test_claim_b_needs_half_of_the_lost_accuracy_back() -> None:
    # frozen loses 90 points; batch recovering 46 of them is "much", 40 is not
    enough = headline.headline(report([record("frozen", 0.0), record("batch", 0.46)], []))
    too_little = headline.headline(report([record("frozen", 0.0), record("batch", 0.40)], []))
    assert verdicts(enough, "B") == ["reproduces"] and verdicts(too_little, "B") == ["does not reproduce"]


def test_a_weak_attack_is_not_judged() -> None:
    cells = [record("frozen", 0.3, frozen_attack=0.3), record("batch", 0.8, frozen_attack=0.3)]
    assert verdicts(headline.headline(report(cells, [])), "B") == ["attack too weak to judge"]
    # ... unless batch is below half the clean accuracy: no stronger attack could make B reproduce then
    low = [record("frozen", 0.3, frozen_attack=0.3), record("batch", 0.44, frozen_attack=0.3)]
    assert verdicts(headline.headline(report(low, [])), "B") == ["does not reproduce"]


def test_the_margin_gradient_counts_as_an_adaptive_attack() -> None:
    bn = [record("frozen", 0.0), record("batch", 0.30), record("batch", 0.02, gradient="margin")]
    text = headline.headline(report(bn, []))
    row = next(line for line in full_table(text) if line.startswith("| B | whole, adaptive"))
    assert "batch 2.0 (margin gradient stronger)" in row


def test_claim_c_compares_the_two_networks_cell_by_cell() -> None:
    bn = [record("frozen", 0.01), record("batch", 0.20)]
    rn = [record("frozen", 0.10), record("batch", 0.22)]
    assert verdicts(headline.headline(report(bn, rn)), "C") == ["reproduces", "does not reproduce"]


def test_claim_a_uses_the_batch_drift_auc() -> None:
    assert verdicts(headline.headline(report([], [], auc=0.95)), "A") == ["reproduces", "does not reproduce"]
    assert verdicts(headline.headline(report([], [], auc=0.7)), "A")[0] == "does not reproduce"


def test_an_adaptive_attack_weaker_than_a_transferred_one_is_judged_by_the_stronger() -> None:
    # RobustNorm under batch keeps 30% against its adaptive gradient but 1% against the frozen model's
    bn = [record("frozen", 0.0), record("batch", 0.01)]
    rn = [record("frozen", 0.0), record("batch", 0.30), record("batch", 0.01, gradient="transfer")]
    text = headline.headline(report(bn, rn))
    assert verdicts(text, "C") == ["does not reproduce", "does not reproduce"]
    batch_row = next(line for line in full_table(text) if line.startswith("| C | batch, whole, adaptive"))
    assert "RobustNorm 1.0 (transfer gradient stronger) vs BatchNorm 1.0 |" in batch_row
    # without the transferred cell the adaptive figure stands, and would count
    assert verdicts(headline.headline(report(bn, rn[:2])), "C") == ["does not reproduce", "reproduces"]


def test_a_favourable_adaptive_only_figure_of_a_masked_model_is_withheld() -> None:
    # RobustNorm's adaptive gradient under batch is beaten by a transferred one on whole batches, so its
    # adaptive-only fraction figure (15% against BatchNorm's 2%) cannot count as robustness
    bn = [record("frozen", 0.0), record("batch", 0.01), record("batch", 0.02, threat="fraction:0.1")]
    bn = [{**cell, "n": 32} if cell["threat"] != "whole" else cell for cell in bn]
    rn = [record("frozen", 0.0), record("batch", 0.30), record("batch", 0.01, gradient="transfer"),
          {**record("batch", 0.15, threat="fraction:0.1"), "n": 32}]
    rows = [line for line in full_table(headline.headline(report(bn, rn))) if "fraction:0.1" in line]
    assert [row.split("|")[4].strip() for row in rows] == ["masking suspected (no transferred attack measured)"]
    # without evidence of masking the same figures count
    unmasked = [rn[0], record("batch", 0.01, gradient="transfer"), rn[3]]
    rows = [line for line in full_table(headline.headline(report(bn, unmasked))) if "fraction:0.1" in line]
    assert [row.split("|")[4].strip() for row in rows] == ["reproduces"]


def test_a_row_without_its_adaptive_cell_says_which_gradient_it_shows() -> None:
    bn = [record("frozen", 0.0), record("batch", 0.01)]
    rn = [record("frozen", 0.0), record("batch", 0.02, gradient="transfer")]
    row = next(line for line in full_table(headline.headline(report(bn, rn)))
               if line.startswith("| C | batch, whole, adaptive"))
    assert "RobustNorm 2.0 (only the transfer gradient measured) vs BatchNorm 1.0 |" in row


def test_the_models_table_says_which_entries_are_the_bundled_models() -> None:
    import json

    card = json.loads((SCRIPT.parents[1] / "robustnorm" / "bundled" / "cifar10-resnet20-bn" / "card.json").read_text())
    results = report([], [])
    results["models"][0].update(model="cifar10-resnet20-bn", version=card["version"])
    rows = [line for line in headline.headline(results).splitlines() if line.startswith(("| cifar10", "| rn |"))]
    assert rows[0].endswith("| bundled |")
    assert rows[1].endswith("| not bundled, no committed record |")  # "rn": no card of that version anywhere


def test_the_drift_table_shows_both_scores_per_condition() -> None:
    text = headline.headline(report([], [], auc=0.95))
    assert "| pgd_whole | 0.950 | 0.500 |" in text
    assert "| pgd_lone | 0.500 | — |" in text  # a score not measured is shown as missing, not invented
    assert "| jpeg | — | — |" in text


def test_the_results_headline_is_the_committed_results_counted() -> None:
    import json

    root = SCRIPT.parents[1]
    results = json.loads((root / "benchmarks" / "results" / "robustness" / "robustness.json").read_text())
    record = (root / "docs" / "results.md").read_text()
    start, end = "<!-- headline summary: start -->\n", "<!-- headline summary: end -->"
    block = record[record.index(start) + len(start): record.index(end)]
    assert block == headline.summary(results), "rerun benchmarks/headline.py and paste its summary into docs/results.md"
    assert (root / "benchmarks" / "results" / "robustness" / "headline.md").read_text() == headline.headline(results)


def test_the_summary_counts_the_full_tables_verdicts_per_threat_model() -> None:
    bn = [record("frozen", 0.0), record("batch", 0.46), record("frozen", 0.0, threat="lone"),
          record("batch", 0.02, threat="lone")]
    text = headline.summary(report(bn, []))
    assert "| B | whole | 8/255 | reproduces (1) |" in text
    assert "| B | lone | 8/255 | does not reproduce (1) |" in text
