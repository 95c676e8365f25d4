"""Engines: one contract (:class:`Engine`), PyTorch (:mod:`.torch`) and ONNX Runtime (:mod:`.onnx`) as siblings,
and one loader (:func:`load_engine`, in :mod:`.loader`)."""

from __future__ import annotations

from .base import (
    BatchDrift,
    BatchReport,
    DriftWhen,
    Engine,
    EngineBase,
    GroupOutcome,
    GroupSpec,
    PendingDrift,
    StreamSettings,
)
from .loader import choose_engine, default_model, load_engine, resolve_device
from .torch import TorchEngine, pad_sizes

__all__ = ["BatchDrift", "BatchReport", "DriftWhen", "Engine", "EngineBase", "GroupOutcome", "GroupSpec",
           "PendingDrift", "StreamSettings", "TorchEngine", "choose_engine", "default_model", "load_engine",
           "pad_sizes", "resolve_device"]
