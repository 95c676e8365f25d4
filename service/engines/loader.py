"""Settings -> engine: which model, which device, and the policy rule "flag > environment > card" (the
flag/environment order is the settings' own), in one place."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import torch

import robustnorm
from robustnorm.policy import Policy

from ..settings import Settings
from .base import Engine, StreamSettings
from .torch import TorchEngine

logger = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; an unavailable device fails with what to do."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} was asked for but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {setting!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but is not available; use --device cpu or auto")
    return device


def default_model() -> str:
    """The bundled default model: ``robustnorm.DEFAULT_MODEL``, or while only a variant of it is bundled
    (a preview, say) that variant, else the first bundled model. Unbundled, the name fails to load with a
    message that lists what is bundled."""
    bundled = robustnorm.list_models()
    if robustnorm.DEFAULT_MODEL in bundled or not bundled:
        return robustnorm.DEFAULT_MODEL
    variants = [name for name in bundled if name.startswith(robustnorm.DEFAULT_MODEL)]
    return (variants or bundled)[0]


def _stream_settings(settings: Settings) -> StreamSettings:
    return StreamSettings(max_streams=settings.max_streams, idle_seconds=settings.stream_idle_seconds,
                          max_batch_share=settings.stream_batch_share, trim=settings.stream_trim)


def _policy(settings: Settings, card: robustnorm.ModelCard) -> Policy:
    return robustnorm.parse_policy(settings.policy or card.policy)  # flag > environment > card


def _load_torch_model(settings: Settings, device: torch.device | None = None
                      ) -> tuple[torch.nn.Module, robustnorm.ModelCard]:
    if settings.is_factory_model:
        assert settings.model is not None and settings.weights is not None and settings.card is not None
        return robustnorm.load_external(settings.model, settings.weights, settings.card, device=device)
    return robustnorm.load_model(settings.model or default_model(), device=device)


def _load_onnx(settings: Settings, threads: int) -> Engine:
    from robustnorm.export import card_path_for, export_onnx

    from .onnx import OnnxEngine, onnxruntime

    onnxruntime()  # fail before loading anything when ORT is missing
    model = settings.model or default_model()
    temporary = None
    if Path(model).suffix == ".onnx":
        onnx_path = Path(model)
        if not onnx_path.is_file():
            raise ValueError(f"ONNX model {onnx_path} not found")
        card = robustnorm.read_card(card_path_for(onnx_path))
    else:
        torch_model, card = _load_torch_model(settings)
        started = time.perf_counter()
        temporary = tempfile.TemporaryDirectory(prefix="robustnorm-onnx-")
        onnx_path = Path(temporary.name) / f"{card.name}.onnx"
        export_onnx(torch_model, card, onnx_path, check=False)
        logger.info("exported %s to ONNX in %.1f s", card.name, time.perf_counter() - started)
    if settings.pad_batches == "on":
        logger.info("pad_batches=on is ignored by the ONNX engine: ONNX Runtime runs any batch size as it is")
    engine = OnnxEngine(onnx_path, card, policy=_policy(settings, card), max_batch_size=settings.max_batch_size,
                        device=settings.device, streams=_stream_settings(settings), temporary=temporary,
                        threads=threads)
    logger.info("loaded model %s (version %s, %s norm) in ONNX Runtime on %s (%s) with policy %s", card.name,
                card.version, card.norm, engine.device, ", ".join(engine.providers), engine.policy)
    return engine


def _load_torch(settings: Settings) -> Engine:
    device = resolve_device(settings.device)
    model, card = _load_torch_model(settings, device)
    padding = settings.pad_batches == "on" or (settings.pad_batches == "auto" and device.type == "cuda")
    engine = TorchEngine(model, card, device=device, policy=_policy(settings, card),
                         max_batch_size=settings.max_batch_size, padding=padding, streams=_stream_settings(settings))
    if engine.norm_layers == 0:
        logger.warning("model %s has no BatchNorm or RobustNorm layers: every batch runs fixed statistics", card.name)
    logger.info("loaded model %s (version %s, %s norm) on %s with policy %s%s", card.name, card.version, card.norm,
                device, engine.policy, f", padding to {engine.pad_sizes}" if padding else "")
    return engine


def settle_torch_threads(engine: Engine) -> None:
    """One PyTorch thread where ONNX Runtime runs the graph on the CPU.

    PyTorch then handles only the small tensors around the graph (streams, gate, drift); with its default pool
    of a thread per core, its parallel regions would compete with ONNX Runtime's threads for the same cores
    and spin between batches."""
    if getattr(engine, "providers", None) is not None and engine.device.type == "cpu":
        torch.set_num_threads(1)


def choose_engine(settings: Settings) -> str:
    """The engine kind ``auto`` stands for: ONNX Runtime for a ``.onnx`` model, and on the CPU where
    onnxruntime and onnx are installed (it runs the whole graph, statistics included, outside Python); PyTorch
    otherwise (on GPUs too, where it is the measured path)."""
    if settings.engine != "auto":
        return settings.engine
    model = settings.model or ""
    if Path(model).suffix == ".onnx":
        return "onnx"
    installed = all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
    return "onnx" if installed and resolve_device(settings.device).type == "cpu" else "torch"


def load_engine(settings: Settings, *, threads: int = 0) -> Engine:
    """The engine the ``engine`` setting names (``auto``: see :func:`choose_engine`): ``torch`` (PyTorch) or
    ``onnx`` (ONNX Runtime; ``threads`` is its intra-op thread count, 0 for its default). Under ``auto`` a model
    that cannot be exported to ONNX is served by PyTorch, with a warning."""
    kind = choose_engine(settings)
    if kind == "onnx" and settings.engine == "auto":
        try:
            engine = _load_onnx(settings, threads)
        except Exception as error:  # any export failure: PyTorch serves every model
            logger.warning("ONNX Runtime cannot serve this model (%s: %s); serving it with PyTorch",
                           type(error).__name__, error)
            engine = _load_torch(settings)
    else:
        engine = _load_onnx(settings, threads) if kind == "onnx" else _load_torch(settings)
    card = engine.card
    if card.calibration is not None and engine.drift_calibration(engine.policy) is None:
        logger.warning("the drift scores of %s are calibrated for policy %s, not for %s: batches report per-layer "
                       "drift but no batch or image drift score; to score them, calibrate for this policy "
                       "(robustnorm calibrate %s --policy %s --out DIR) and serve DIR", card.name,
                       engine.calibrated_policy, engine.policy, card.name, engine.policy)
    return engine
