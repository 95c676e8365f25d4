"""Summary of a shift grid (``robustnorm evaluate --sections shift``): markdown tables and a plot.

    python benchmarks/shift_summary.py benchmarks/results/shift/grid.json

Writes ``summary.md`` beside the JSON (mean error per severity, mean corruption error, error removed relative to
``frozen``, per model, policy and batch size; label-skewed scenes in a second table; accuracy per corruption at the
smallest and largest batch size; see :mod:`robustnorm.evaluation.shift_report`) and ``accuracy_vs_severity.png``
(accuracy against severity, severity 0 being clean images: one line per policy, one panel per model and batch
size); for a JSON named other than ``grid.json``, ``NAME-summary.md`` and ``NAME-accuracy_vs_severity.png``.
Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from robustnorm.evaluation.shift_report import corruption_table, summarize, summary_markdown


def plot(results: dict, path: Path, field: str = "common_accuracy") -> Path:
    rows = summarize(results, field=field)
    models = list(dict.fromkeys(row["model"] for row in rows))
    sizes = sorted({row["n"] for row in rows})
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    colours = {policy: f"C{k % 10}" for k, policy in enumerate(policies)}  # one colour per policy in every panel
    styles = {policy: "--" if k >= 10 or policy.startswith(("stream", "auto")) else "-"
              for k, policy in enumerate(policies)}
    figure, axes = plt.subplots(len(models), len(sizes), figsize=(3.6 * len(sizes), 3.4 * len(models) + 0.6),
                                squeeze=False, sharey=True)
    for i, model in enumerate(models):
        for j, n in enumerate(sizes):
            axis = axes[i][j]
            for row in (r for r in rows if r["model"] == model and r["n"] == n):
                points = sorted({0: row["clean_error"], **row["error_by_severity"]}.items())
                label = f"{row['policy']} (card)" if row["card"] else row["policy"]
                axis.plot([s for s, _ in points], [100 * (1 - e) for _, e in points], marker="o", label=label,
                          color=colours[row["policy"]], linestyle=styles[row["policy"]], alpha=0.85)
            axis.set(title=f"{model}, n = {n}", xlabel="severity (0: clean)", xticks=range(6))
            axis.grid(alpha=0.3)
            if j == 0:
                axis.set_ylabel("accuracy (%)")
            if j == len(sizes) - 1:
                axis.legend(fontsize=7)
    spec = results["grid_spec"]
    figure.suptitle(f"Accuracy under CIFAR-10-C corruptions (mean over corruptions), {spec['images']} test images,\n"
                    f"counted from image {spec['common_from'] + 1} of each stream")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the shift grid's results JSON")
    parser.add_argument("--field", default="common_accuracy", choices=("common_accuracy", "accuracy"),
                        help="common_accuracy (default): every policy on the same images; accuracy: each cell's own")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    prefix = "" if args.results.stem == "grid" else f"{args.results.stem}-"
    markdown = args.results.with_name(f"{prefix}summary.md")
    sizes = sorted({cell["n"] for entry in results["models"] for cell in entry["cells"]})
    per_corruption = [f"Accuracy % per corruption, n = {n}:\n\n{corruption_table(results, n, field=args.field)}"
                      for n in sizes if n in (sizes[0], sizes[-1])]
    markdown.write_text("\n".join([summary_markdown(results, field=args.field), *per_corruption]))
    figure = plot(results, args.results.with_name(f"{prefix}accuracy_vs_severity.png"), args.field)
    print(f"wrote {markdown} and {figure}")


if __name__ == "__main__":
    main()
