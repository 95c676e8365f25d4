"""benchmarks/overload.py names, in its results, the commit of the code its services run: that of the checkout
their ``service`` package is imported from, which PYTHONPATH may point at for a run of another commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_served_commit_is_that_of_the_service_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    try:
        head = git("rev-parse", "--short", "HEAD", cwd=BENCHMARKS)
    except subprocess.CalledProcessError:
        pytest.skip("not run from a git checkout")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import overload

    assert overload.served_commit() == head
    other = tmp_path / "other"
    (other / "service").mkdir(parents=True)
    (other / "service" / "__init__.py").write_text("")
    git("init", "-q", cwd=other)
    git("add", ".", cwd=other)
    git("commit", "-q", "-m", "another service", cwd=other)
    monkeypatch.setenv("PYTHONPATH", str(other))
    assert overload.served_commit() == git("rev-parse", "--short", "HEAD", cwd=other) != head
