"""The ONNX Runtime engine: the same batches, policies, drift and answers as the PyTorch engine, run by ORT.

The model is a graph written by :func:`robustnorm.export.export_onnx`: its norm layers compute their batch
statistics in the graph, the policy is fed per run (``min_batch`` and ``fallback_n0``) and the per-layer batch
statistics come back as outputs. A graph normalises its whole input as one group, so each statistics group of
a micro-batch (the whole batch, or one group per tenant under ``isolation=grouped``) is one run of exactly
its real images: ORT takes any batch size, and this engine never pads. The drift report is computed from the
graph's statistics by the library (:func:`robustnorm.drift_report`), so both engines share its definitions.

Providers: on a GPU (``device`` ``cuda[:N]``, or ``auto`` where onnxruntime-gpu sees one) TensorRT where
present, then CUDA, with IO binding (the images are copied to the device once per run, outputs come back to
the host); the CPU provider everywhere else, through IO binding too.

Selected with the ``engine`` setting (``onnx``). ``model`` may be a ``.onnx`` file from ``robustnorm export``
(its card beside it, ``NAME.card.json``); any other model (bundled, directory, ``module:factory``) is exported
at start-up into a temporary directory. The batching, result routing and threading are the PyTorch engine's
(:class:`~service.engine.TorchEngine`, whose model-facing step ``infer`` this class replaces).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import robustnorm
from robustnorm.export import (
    FALLBACK_N0,
    IMAGE_MEAN_SUFFIX,
    IMAGE_SPREAD_SUFFIX,
    IMAGES,
    LOGITS,
    MEAN_SUFFIX,
    MIN_BATCH,
    SPREAD_SUFFIX,
    ExportedModel,
    card_path_for,
    export_onnx,
    policy_feeds,
)

from .engine import TorchEngine, canonical_policy, default_model
from .settings import Settings

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER = ("CPUExecutionProvider", "CUDAExecutionProvider",
                                                   "TensorrtExecutionProvider")
INSTALL_HINT = ("the ONNX engine needs onnxruntime: pip install 'robustnorm[onnx]' (CPU) or 'robustnorm[gpu]' "
                "(onnxruntime-gpu)")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return onnxruntime


def choose_providers(device: str, available: Sequence[str], *, input_size: Sequence[int], max_batch_size: int,
                     cache_dir: Path | None = None) -> tuple[torch.device, list[Any]]:
    """The device and ONNX Runtime providers for the ``device`` setting, given the providers ORT offers.

    ``auto`` is the GPU when onnxruntime-gpu offers CUDA, else the CPU. TensorRT (where present) gets one
    optimisation profile from 1 to ``max_batch_size`` images and an engine cache in ``cache_dir``.
    """
    if device == "mps":
        raise ValueError("the ONNX engine runs on 'cpu' or 'cuda[:N]'; use --engine torch for 'mps'")
    wants_gpu = device.startswith("cuda") or (device == "auto" and CUDA_PROVIDER in available)
    if not wants_gpu:
        return torch.device("cpu"), [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        raise ValueError(f"device {device!r} needs onnxruntime-gpu (this onnxruntime offers {list(available)}); "
                         "install 'robustnorm[gpu]', or use --device cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    providers: list[Any] = []
    if TENSORRT_PROVIDER in available:
        shape = "x".join(str(int(v)) for v in input_size)
        options: dict[str, Any] = {
            "device_id": index,
            "trt_profile_min_shapes": f"{IMAGES}:1x{shape}",
            "trt_profile_opt_shapes": f"{IMAGES}:{max_batch_size}x{shape}",
            "trt_profile_max_shapes": f"{IMAGES}:{max_batch_size}x{shape}",
        }
        if cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        providers.append((TENSORRT_PROVIDER, options))
    providers += [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]
    return torch.device("cuda", index), providers


class OnnxEngine(TorchEngine):
    """An exported graph in an ONNX Runtime session, and the thread it runs in."""

    def __init__(self, onnx_path: str | Path, card: robustnorm.ModelCard, *, policy: str, max_batch_size: int,
                 device: str = "cpu", temporary: tempfile.TemporaryDirectory[str] | None = None,
                 threads: int = 0) -> None:
        # Not TorchEngine.__init__: there is no PyTorch model here, only what the shared methods read.
        ort = _onnxruntime()
        self.card = card
        self.policy = canonical_policy(policy)
        self.max_batch_size = max_batch_size
        self.pad_sizes: tuple[int, ...] = ()  # any batch size runs as it is
        self.labels = list(card.labels)
        self._temporary = temporary
        self.onnx_path = Path(onnx_path)
        writable = os.access(self.onnx_path.parent, os.W_OK)  # TensorRT caches its engines beside the graph
        self.device, providers = choose_providers(
            device, ort.get_available_providers(), input_size=card.input_size, max_batch_size=max_batch_size,
            cache_dir=self.onnx_path.parent if writable else None)
        options = ort.SessionOptions()
        # The policy inputs are overridable initializers on purpose; ORT would warn about it at every start.
        options.log_severity_level = 3
        # No busy-waiting between runs: the cores are shared with decoding and the HTTP server.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        self.session: ort.InferenceSession = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()
        if self.device.type == "cuda" and CUDA_PROVIDER not in self.providers:
            raise ValueError(f"ONNX Runtime could not start its CUDA provider (running {self.providers}); check the "
                             "CUDA and cuDNN libraries onnxruntime-gpu needs, or use --device cpu")
        self.exported = ExportedModel.from_metadata(self.onnx_path, self.session.get_modelmeta().custom_metadata_map)
        self.norm_layers = len(self.exported.layers)
        self._check_card(card)
        self._outputs = [output.name for output in self.session.get_outputs()]
        missing = sorted(set(self.exported.output_names) - set(self._outputs))
        if missing:
            raise ValueError(f"{self.onnx_path} lacks the outputs {missing[:5]}; re-export it with robustnorm export")
        self._population = {name: (torch.tensor(mean, dtype=torch.float32), torch.tensor(spread, dtype=torch.float32))
                            for name, (mean, spread) in self.exported.population.items()}
        self._policy_values: dict[str, dict[str, Any]] = {}
        self._ort = ort
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustnorm-engine")

    def _check_card(self, card: robustnorm.ModelCard) -> None:
        calibration = card.calibration
        if calibration is not None and not set(calibration.image_layers) <= set(self.exported.image_layers):
            raise ValueError(f"the card's drift calibration scores images on layers {calibration.image_layers}, but "
                             f"{self.onnx_path} outputs image statistics for {self.exported.image_layers}; "
                             "re-export the model with its calibrated card")
        if self.exported.robust != (card.norm == "robustnorm") and self.norm_layers:
            raise ValueError(f"{self.onnx_path} holds {'RobustNorm' if self.exported.robust else 'BatchNorm'} "
                             f"layers but its card says norm={card.norm!r}; use the card written beside it")

    @classmethod
    def from_settings(cls, settings: Settings, *, threads: int = 0) -> OnnxEngine:
        """A ``.onnx`` file from ``robustnorm export`` as it is; any other model exported at start-up.

        ``threads`` is ONNX Runtime's intra-op thread count (0: its default).
        """
        _onnxruntime()  # fail before loading anything when ORT is missing
        model = settings.model or default_model()
        temporary = None
        if Path(model).suffix == ".onnx":
            onnx_path = Path(model)
            if not onnx_path.is_file():
                raise ValueError(f"ONNX model {onnx_path} not found")
            card = robustnorm.read_card(card_path_for(onnx_path))
        else:
            if settings.is_factory_model:
                assert settings.weights is not None and settings.card is not None
                torch_model, card = robustnorm.load_external(model, settings.weights, settings.card)
            else:
                torch_model, card = robustnorm.load_model(model)
            started = time.perf_counter()
            temporary = tempfile.TemporaryDirectory(prefix="robustnorm-onnx-")
            onnx_path = Path(temporary.name) / f"{card.name}.onnx"
            export_onnx(torch_model, card, onnx_path, check=False)
            logger.info("exported %s to ONNX in %.1f s", card.name, time.perf_counter() - started)
        policy = settings.policy or card.policy  # flag > environment > card, as with the PyTorch engine
        if settings.pad_batches == "on":
            logger.info("pad_batches=on is ignored by the ONNX engine: ONNX Runtime runs any batch size as it is")
        engine = cls(onnx_path, card, policy=policy, max_batch_size=settings.max_batch_size, device=settings.device,
                     temporary=temporary, threads=threads)
        logger.info("loaded model %s (version %s, %s norm) in ONNX Runtime %s on %s (%s) with policy %s", card.name,
                    card.version, card.norm, engine._ort.__version__, engine.device, ", ".join(engine.providers),
                    engine.policy)
        return engine

    def close(self) -> None:
        super().close()
        if self._temporary is not None:
            self._temporary.cleanup()

    # -- running on the engine thread -------------------------------------------------------------------
    def _policy_inputs(self, policy: str) -> dict[str, Any]:
        """The policy inputs as OrtValues (overridable initializers bind as OrtValues, not as arrays)."""
        if policy not in self._policy_values:
            feeds = policy_feeds(policy, self.exported.robust)
            self._policy_values[policy] = {name: self._ort.OrtValue.ortvalue_from_numpy(feeds[name])
                                           for name in (MIN_BATCH, FALLBACK_N0)}
        return self._policy_values[policy]

    def _run_group(self, images: np.ndarray, policy: str) -> dict[str, np.ndarray]:
        """One run of the graph on one statistics group, through IO binding."""
        binding = self.session.io_binding()
        if self.device.type == "cuda":
            binding.bind_ortvalue_input(IMAGES, self._ort.OrtValue.ortvalue_from_numpy(
                images, "cuda", self.device.index or 0))
        else:
            binding.bind_cpu_input(IMAGES, images)
        for name, value in self._policy_inputs(policy).items():
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))

    def infer(self, pixels: torch.Tensor, sizes: Sequence[int], policy: str
               ) -> tuple[torch.Tensor, robustnorm.GroupRun, robustnorm.DriftReport, int]:
        """Probabilities of the real images, what ran, and the drift report: one graph run per group."""
        images = sum(sizes)
        array = np.ascontiguousarray(pixels[:images].numpy(), dtype=np.float32)
        outputs, start = [], 0
        for size in sizes:
            outputs.append(self._run_group(array[start:start + size], policy))
            start += size
        logits = torch.from_numpy(np.concatenate([output[LOGITS] for output in outputs]))
        run = self._group_run(tuple(int(size) for size in sizes), policy, outputs)
        report = robustnorm.drift_report(run, self.drift_calibration(policy))
        return logits.float().softmax(dim=1), run, report, images

    def _group_run(self, sizes: tuple[int, ...], policy: str, outputs: list[dict[str, np.ndarray]]
                   ) -> robustnorm.GroupRun:
        """What ``robustnorm.batch_groups(..., record=True)`` records, rebuilt from the graph's outputs."""
        run = robustnorm.GroupRun(sizes=sizes, record=True, layer_names={})
        parsed = robustnorm.parse_policy(policy)
        plans = [parsed.resolve(n, self.exported.robust) for n in sizes]
        if self.norm_layers:
            run.ran = [plan.kind for plan in plans]
            run.fallback = [parsed.kind == "adaptive" and plan.kind != "batch" for plan in plans]
        else:  # a model without norm layers has only fixed statistics, as batch_groups reports
            run.ran, run.fallback = ["frozen"] * len(sizes), [False] * len(sizes)
        counts = torch.tensor(sizes)
        for name in self.exported.layers:
            mean = torch.from_numpy(np.stack([output[name + MEAN_SUFFIX] for output in outputs]))
            spread = torch.from_numpy(np.stack([output[name + SPREAD_SUFFIX] for output in outputs]))
            if name in self.exported.image_layers:
                image_mean, image_spread = (
                    torch.from_numpy(np.concatenate([output[name + suffix] for output in outputs]))
                    for suffix in (IMAGE_MEAN_SUFFIX, IMAGE_SPREAD_SUFFIX))
            else:  # the drift report reads image layers only
                image_mean = image_spread = mean.new_zeros((0, mean.shape[1]))
            run.stats[name] = robustnorm.GroupStatistics(mean=mean, spread=spread, counts=counts,
                                                         image_mean=image_mean, image_spread=image_spread)
            run.robust_layers[name] = self.exported.robust
            run.population[name] = self._population[name]
        return run


def create_engine(settings: Settings) -> TorchEngine:
    """The engine the ``engine`` setting names: ``torch`` (PyTorch) or ``onnx`` (ONNX Runtime)."""
    engine = OnnxEngine.from_settings(settings) if settings.engine == "onnx" else TorchEngine.from_settings(settings)
    card = engine.card
    if card.calibration is not None and engine.drift_calibration(engine.policy) is None:
        logger.warning("the drift scores of %s are calibrated for policy %s, not for %s: batches report per-layer "
                       "drift but no batch or image drift score; to score them, calibrate for this policy "
                       "(robustnorm calibrate %s --policy %s --out DIR) and serve DIR", card.name,
                       engine.calibrated_policy, engine.policy, card.name, engine.policy)
    return engine
