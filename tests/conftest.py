"""Shared test fixtures: where the CIFAR-10 archives are, and how to skip (or fail, in CI) without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def cifar10_dir() -> Path | None:
    """``$ROBUSTNORM_CIFAR10``, else ``<repo>/../shared/data/cifar10``; None when the archives are absent."""
    candidates = [os.environ.get("ROBUSTNORM_CIFAR10"), REPO_ROOT.parent / "shared" / "data" / "cifar10"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "test.tar.gz").is_file():
            return Path(candidate)
    return None


def require_cifar10() -> Path:
    """The CIFAR-10 folder; skips the test where it is absent, but fails in CI (``CI`` set), which has it."""
    found = cifar10_dir()
    if found is None:
        message = ("CIFAR-10 archives not found: set ROBUSTNORM_CIFAR10 or place them in ../shared/data/cifar10 "
                   "(train.tar.gz, test.tar.gz)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def cifar10() -> Path:
    return require_cifar10()
