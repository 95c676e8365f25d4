"""benchmarks/compare_p.py: whole-batch PGD cells per model, resumable per model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _compare(tmp_path: Path, cifar10: Path, *extra: str) -> dict:
    out = tmp_path / "compare_p.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_p.py"), "--models", "cifar10-resnet20-bn",
                    "--images", "20", "--n", "8", "--steps", "2", "--eps-255", "8", "--data", str(cifar10),
                    "--out", str(out), *extra], check=True, cwd=ROOT, capture_output=True)
    return json.loads(out.read_text())


def test_compare_p_runs_the_cells_and_resume_keeps_them(cifar10: Path, tmp_path: Path) -> None:
    first = _compare(tmp_path, cifar10)
    (row,) = first["rows"]
    cells = {(c["policy"], c["gradient"]) for c in row["cells"]}
    assert cells == {("frozen", "adaptive"), ("batch", "adaptive"), ("batch", "transfer")}
    assert all(c["scored_images"] == 16 and c["eps_255"] == 8 for c in row["cells"])
    assert row["cells"][0]["robust_accuracy"] < row["cells"][0]["clean_accuracy"]  # PGD 8/255 hurts frozen
    marked = dict(first, rows=[dict(row, marker=True)])  # a kept row stays untouched
    (tmp_path / "compare_p.json").write_text(json.dumps(marked))
    assert _compare(tmp_path, cifar10, "--resume")["rows"][0].get("marker") is True
    assert "marker" not in _compare(tmp_path, cifar10)["rows"][0]  # without --resume it runs again
