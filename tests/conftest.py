"""Shared test fixtures: where the CIFAR-10 archives are, and how to skip (or fail, in CI) without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from robustnorm.data import find_cifar10


def cifar10_dir() -> Path | None:
    """The CIFAR-10 folder (``$ROBUSTNORM_CIFAR10``; docs/data.md) when its archives exist."""
    found = find_cifar10()
    return found if found is not None and (found / "test.tar.gz").is_file() else None


def require_cifar10() -> Path:
    """The CIFAR-10 folder; skips the test where it is absent, but fails in CI (``CI`` set), which has it."""
    found = cifar10_dir()
    if found is None:
        message = ("CIFAR-10 archives not found: set ROBUSTNORM_CIFAR10 to the folder holding train.tar.gz and "
                   "test.tar.gz (docs/data.md)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def cifar10() -> Path:
    return require_cifar10()
