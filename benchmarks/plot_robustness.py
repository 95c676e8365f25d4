"""Plots for ``robustnorm evaluate`` results: accuracy against batch size per policy, robust accuracy against
eps per policy and threat model, and per-layer drift per condition.

    python benchmarks/plot_robustness.py benchmarks/results/robustness/robustness.json

Writes PNGs beside the JSON file. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_clean(report: dict, out: Path) -> Path:
    models = report["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        policies = dict.fromkeys(row["policy"] for row in model.get("clean", []))
        for policy in policies:
            rows = sorted((r for r in model["clean"] if r["policy"] == policy), key=lambda r: r["n"])
            axis.plot([r["n"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=policy)
        axis.set(xscale="log", xlabel="batch size n", ylabel="clean top-1 accuracy (%)", title=model["model"])
        axis.set_xticks([1, 2, 4, 8, 16, 32, 64, 128, 256], labels=["1", "2", "4", "8", "16", "32", "64", "128", "256"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Clean accuracy against batch size, {report['dataset']}")
    figure.tight_layout()
    path = out / "clean_accuracy_vs_batch_size.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


THREATS = ("whole", "lone")  # one panel each; fractions and poisoning run at one eps only (see headline.md)
SIZE_STYLES = {1: (":", "v"), 8: ("-.", "s"), 32: ("--", "^"), 128: ("-", "o")}


def _strongest(rows: list[dict]) -> dict[tuple, dict]:
    """Per (policy, threat, n, eps): the PGD cell of lowest robust accuracy over the gradients measured
    (adaptive cross-entropy, adaptive margin, transferred from ``frozen``, unknown batchmates). A masked or weak
    adaptive gradient shows higher accuracy than another; an attacker uses the stronger, so the plots do too."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["policy"], r["threat"], r["n"], r["eps_255"])
        if key not in best or r["robust_accuracy"] < best[key]["robust_accuracy"]:
            best[key] = r
    return best


def plot_robust(report: dict, out: Path) -> Path:
    """One row per model, one panel per threat model; colour: policy, line style and marker: batch size.
    Each point is the strongest gradient's; a hollow marker where that was not the adaptive cross-entropy."""
    models = report["models"]
    figure, axes = plt.subplots(len(models), len(THREATS), figsize=(6.5 * len(THREATS), 4.5 * len(models)),
                                squeeze=False)
    for row, model in zip(axes, models):
        best = _strongest([r for r in model.get("robust", []) if r["attack"] == "pgd"])
        policies = list(dict.fromkeys(key[0] for key in best))
        colours = {policy: f"C{i}" for i, policy in enumerate(policies)}
        for axis, threat in zip(row, THREATS):
            for policy in policies:
                for n, (line, marker) in SIZE_STYLES.items():
                    points = sorted((key[3], cell) for key, cell in best.items() if key[:3] == (policy, threat, n))
                    if not points:
                        continue
                    eps, accuracy = [p[0] for p in points], [100 * p[1]["robust_accuracy"] for p in points]
                    axis.plot(eps, accuracy, linestyle=line, color=colours[policy], label=f"{policy}, n={n}")
                    for x, y, (_, cell) in zip(eps, accuracy, points):
                        adaptive = cell["gradient"] == "adaptive"
                        axis.plot(x, y, marker=marker, color=colours[policy],
                                  markerfacecolor=colours[policy] if adaptive else "none")
            axis.set(xlabel="L-inf eps (x/255)", ylabel="robust accuracy (%)", xticks=[1, 2, 4, 8],
                     title=f"{model['model']}: PGD-20, {threat} batch, strongest gradient")
            axis.set_ylim(bottom=-1)
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=7, ncol=2, title_fontsize=7,
                            title="hollow: margin, transferred or unknown-batchmates gradient stronger")
            else:
                axis.text(0.5, 0.5, "not measured", transform=axis.transAxes, ha="center", va="center")
    figure.tight_layout()
    path = out / "robust_accuracy_vs_eps.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


DRIFT_MEASURES = {"mean_shift": ("mean shift (population std units)", "linear"),
                  "log_var_ratio": ("log variance ratio to population", "linear"),
                  "kl": ("Gaussian KL to population", "log")}


def plot_drift(report: dict, out: Path) -> Path:
    """One column per model, one row per drift measure (docs/drift.md), one line per condition."""
    models = [m for m in report["models"] if "drift" in m]
    columns = max(1, len(models))
    figure, axes = plt.subplots(len(DRIFT_MEASURES), columns, figsize=(7 * columns, 3.8 * len(DRIFT_MEASURES)),
                                squeeze=False)
    for column, model in enumerate(models):
        for row, (measure, (label, scale)) in enumerate(DRIFT_MEASURES.items()):
            axis = axes[row][column]
            for condition, layers in model["drift"]["layers"].items():
                names = list(layers)
                axis.plot(range(len(names)), [layers[name][measure] for name in names], marker=".", label=condition)
            axis.set(yscale=scale, xlabel="norm layer (forward order)", ylabel=label,
                     title=f"{model['model']}: per-layer {measure}, n={model['drift']['n']}")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    path = out / "drift_per_layer.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    report = json.loads(args.results.read_text())
    for path in (plot_clean(report, args.results.parent), plot_robust(report, args.results.parent),
                 plot_drift(report, args.results.parent)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
