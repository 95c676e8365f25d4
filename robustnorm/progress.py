"""Progress bars for long command-line work (train, evaluate, calibrate, benchmarks): tqdm, on stderr.

Contract: :func:`progress_bar` returns a ``tqdm`` bar (rate and time left) that draws only where a person is
watching: ``enabled=True`` always draws, ``enabled=False`` (``--quiet``) never does, and ``enabled=None`` (the
default of every command line) draws when stderr is a terminal and the ``CI`` environment variable is unset,
so CI logs and redirected output stay free of bars. A disabled bar still counts, so callers never branch on it.
Library functions draw nothing unless asked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shows_progress(enabled: bool | None = None) -> bool:
    """Whether a bar asked for with ``enabled`` draws (module docstring)."""
    if enabled is not None:
        return enabled
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool | None = False, **options: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or counted by hand with ``update``), drawn as ``enabled`` says."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not shows_progress(enabled),
                dynamic_ncols=True, **options)
