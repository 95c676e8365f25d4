"""Process settings that make PyTorch on the CPU fast: keep freed memory for reuse.

PyTorch allocates a new buffer for nearly every activation and gradient. With glibc's default malloc
settings, buffers of more than a few megabytes are mapped from the kernel on allocation and returned to it on
free, so every forward pass pays for fresh, zero-filled pages. Asking malloc to keep up to a limit of freed
memory in its heap removes that cost. Measured on this project's 2-core CPU machine (ResNet-20, batches of
128, one thread, 1,024 images per call, beside a training run and an evaluation; `python
benchmarks/bench_allocator.py` -> `benchmarks/results/allocator_cpu_1thread.json`): `frozen` forward 257 -> 600
images/s, `batch` forward and backward (an attack step) 63 -> 198 images/s.

The price is resident memory: up to the limit of freed memory stays with the process instead of going back
to the system. ``ROBUSTNORM_RETAIN_FREED_MEMORY=0`` turns it off; another value sets the limit in MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

DEFAULT_LIMIT_MIB = 1024
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(limit_mib: int | None = None) -> bool:
    """Ask glibc's malloc to serve large buffers from its heap and keep up to ``limit_mib`` MiB of freed
    memory (default ``$ROBUSTNORM_RETAIN_FREED_MEMORY`` or 1,024; 0 leaves malloc alone). Returns whether
    the setting took effect: False where the C library is not glibc (macOS, Windows, musl)."""
    if limit_mib is None:
        setting = os.environ.get("ROBUSTNORM_RETAIN_FREED_MEMORY", str(DEFAULT_LIMIT_MIB))
        try:
            limit_mib = int(setting)
        except ValueError:
            raise ValueError(f"ROBUSTNORM_RETAIN_FREED_MEMORY must be a number of MiB, got {setting!r}") from None
    if limit_mib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    limit = min(limit_mib * 2**20, 2**31 - 1)  # mallopt takes a C int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
    logger.debug("malloc keeps up to %d MiB of freed memory: %s", limit_mib, applied)
    return applied
