"""robustnorm.runtime: malloc settings for fast CPU forwards (the speed itself is a benchmark, not a test)."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from robustnorm.runtime import retain_freed_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                           reason="glibc's mallopt is only on Linux")


@glibc
def test_retaining_freed_memory_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBUSTNORM_RETAIN_FREED_MEMORY", raising=False)
    assert retain_freed_memory() is True
    assert retain_freed_memory(256) is True


def test_zero_leaves_malloc_alone_and_a_bad_setting_says_what_is_expected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTNORM_RETAIN_FREED_MEMORY", "0")
    assert retain_freed_memory() is False
    monkeypatch.setenv("ROBUSTNORM_RETAIN_FREED_MEMORY", "lots")
    with pytest.raises(ValueError, match="number of MiB"):
        retain_freed_memory()
