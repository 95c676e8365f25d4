"""The ONNX Runtime engine: the same groups, plans, streams, drift and report as the PyTorch engine.

The model is a graph written by :func:`robustnorm.export.export_onnx`: its norm layers compute their batch
statistics in the graph and take the plan's weights and the stream's statistics as inputs. A graph normalises
its whole input as one group, so each statistics group of a micro-batch is one run of exactly its real images
(ORT takes any batch size; this engine never pads). The graph's statistics are gathered into the same
:class:`robustnorm.GroupRun` a PyTorch forward records, so the drift report and the stream updates are the
library's, shared by both engines.

Where the folded graphs of the export lie beside it (:func:`robustnorm.export.export_folded_onnx`), a batch
whose per-layer drift nobody scores (``drift="none"``) and whose every group runs frozen statistics runs one of
them instead: frozen statistics folded into the convolutions, recording the image-score layers (``frozen``,
``adaptive`` falling back to it) or every layer's rows (``auto`` while its gate holds the population).

Providers: on a GPU (``device`` ``cuda[:N]``, or ``auto`` where onnxruntime-gpu sees one) TensorRT where
present, then CUDA, with IO binding; the CPU provider everywhere else, through a plain run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import robustnorm
from robustnorm.export import (
    FOLDED_KINDS,
    IMAGE_ROWS_SUFFIX,
    IMAGES,
    LOGITS,
    MEAN_SUFFIX,
    METADATA_PREFIX,
    SPREAD_SUFFIX,
    ExportedModel,
    folded_path_for,
    plan_feeds,
)
from robustnorm.layers import GroupStatistics
from robustnorm.policy import Policy

from .base import BatchReport, DriftWhen, EngineBase, GroupSpec, StreamSettings

logger = logging.getLogger(__name__)

CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER = ("CPUExecutionProvider", "CUDAExecutionProvider",
                                                   "TensorrtExecutionProvider")
INSTALL_HINT = ("the ONNX engine needs onnxruntime: pip install 'robustnorm[onnx]' (CPU) or 'robustnorm[gpu]' "
                "(onnxruntime-gpu)")


def onnxruntime() -> Any:
    """The onnxruntime module, or an ImportError that says what to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ort


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


class _Graph:
    """One ONNX Runtime session and how to run it: a plain run on the CPU (one call for every input and output,
    where binding them one by one costs the graph's few dozen small inputs and outputs a Python call each), IO
    binding on a GPU, with the images copied to the device once."""

    def __init__(self, ort: Any, session: Any, device: torch.device) -> None:
        self._ort, self.session, self.device = ort, session, device
        self.outputs = [output.name for output in session.get_outputs()]

    def run(self, images: np.ndarray, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device.type != "cuda":
            return dict(zip(self.outputs, self.session.run(self.outputs, {IMAGES: images, **feeds})))
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(IMAGES, self._ort.OrtValue.ortvalue_from_numpy(images, "cuda",
                                                                                   self.device.index or 0))
        for name, value in feeds.items():  # initializers too: they bind as OrtValues
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(value))
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))


class OnnxEngine(EngineBase):
    """An exported graph in an ONNX Runtime session. Not thread-safe: call :meth:`run` from one thread."""

    pad_sizes: tuple[int, ...] = ()  # any batch size runs as it is

    def __init__(self, onnx_path: str | Path, card: robustnorm.ModelCard, *, policy: Policy, max_batch_size: int,
                 device: str = "cpu", streams: StreamSettings | None = None,
                 temporary: tempfile.TemporaryDirectory[str] | None = None, threads: int = 0) -> None:
        super().__init__(card, policy, streams or StreamSettings())
        ort = onnxruntime()
        self.max_batch_size = max_batch_size
        self._temporary = temporary
        self.onnx_path = Path(onnx_path)
        writable = os.access(self.onnx_path.parent, os.W_OK)  # TensorRT caches its engines beside the graph
        self.device, providers = choose_providers(
            device, ort.get_available_providers(), input_size=card.input_size, max_batch_size=max_batch_size,
            cache_dir=self.onnx_path.parent if writable else None)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the plan inputs are overridable initializers on purpose
        # No busy-waiting between runs: the cores are shared with decoding and the HTTP server.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()
        if self.device.type == "cuda" and CUDA_PROVIDER not in self.providers:
            raise ValueError(f"ONNX Runtime could not start its CUDA provider (running {self.providers}); check the "
                             "CUDA and cuDNN libraries onnxruntime-gpu needs, or use --device cpu")
        self.exported = ExportedModel.from_metadata(self.onnx_path, self.session.get_modelmeta().custom_metadata_map)
        self.norm_layers = len(self.exported.layers)
        if self.exported.robust != (card.norm == "robustnorm") and self.norm_layers:
            raise ValueError(f"{self.onnx_path} holds {'RobustNorm' if self.exported.robust else 'BatchNorm'} "
                             f"layers but its card says norm={card.norm!r}; use the card written beside it")
        self._graph = _Graph(ort, self.session, self.device)
        missing = sorted(set(self.exported.output_names) - set(self._graph.outputs))
        if missing:
            raise ValueError(f"{self.onnx_path} lacks the outputs {missing[:5]}; re-export it with robustnorm export")
        self._population = {name: (torch.tensor(mean, dtype=torch.float32), torch.tensor(spread, dtype=torch.float32))
                            for name, (mean, spread) in self.exported.population.items()}
        # kind -> (graph, the layers it records), for the folded graphs found beside the export
        self.folded: dict[str, tuple[_Graph, list[str]]] = {}
        for kind in FOLDED_KINDS:
            path = folded_path_for(self.onnx_path, kind)
            if self.norm_layers and path.is_file():
                session = ort.InferenceSession(str(path), options, providers=providers)
                layers = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_PREFIX + "layers", "[]"))
                self.folded[kind] = (_Graph(ort, session, self.device), layers)

    def warm_up(self) -> None:
        shape = tuple(int(v) for v in self.card.input_size)
        frozen = robustnorm.parse_policy("frozen")
        for size in sorted({1, self.max_batch_size}):
            self.run(torch.randn(size, *shape), [GroupSpec(size)], frozen)
            for graph, _ in self.folded.values():  # each session's first runs are slow: not a client's
                graph.run(np.random.standard_normal((size, *shape)).astype(np.float32), {})

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

    def run(self, pixels: torch.Tensor, groups: Sequence[GroupSpec], policy: Policy, *, drift: DriftWhen = "now"
            ) -> tuple[torch.Tensor, BatchReport]:
        """Probabilities of the real images and the batch report: one graph run per group."""
        started = time.perf_counter()
        sizes = tuple(group.size for group in groups)
        array = np.ascontiguousarray(pixels[: sum(sizes)].numpy(), dtype=np.float32)
        selection = self.streams_for(policy, groups)
        streams = selection.streams if selection is not None else None
        plans = policy.plan(sizes, self.exported.robust, streams)
        graph, layers = self._graph, self.exported.layers
        frozen = all(plan.population_only for plan in plans)
        folded = self.folded.get("frozen-rows" if selection is not None else "frozen") if frozen else None
        if drift == "none" and folded is not None:
            graph, layers = folded
        outputs, start = [], 0
        for g, (size, plan) in enumerate(zip(sizes, plans)):
            stream = streams[g] if streams is not None else None
            held = stream.statistics_arrays() if stream is not None and plan.stream_weight else None
            outputs.append(graph.run(array[start:start + size], plan_feeds(plan, held) if graph is self._graph else {}))
            start += size
        run = self._group_run(sizes, policy, plans, outputs, selection, layers)
        logits = torch.from_numpy(np.concatenate([output[LOGITS] for output in outputs]))
        if selection is not None:
            selection.update(run, pixels[: sum(sizes)], logits.argmax(dim=1))
        report = self.report(run, groups, policy, time.perf_counter() - started, sum(sizes), selection, drift)
        return logits.float().softmax(dim=1), report

    def _group_run(self, sizes: tuple[int, ...], policy: Policy, plans: list[robustnorm.GroupPlan],
                   outputs: list[dict[str, np.ndarray]], selection: Any, layers: Sequence[str]) -> robustnorm.GroupRun:
        """What ``robustnorm.batch_groups(..., record=True)`` records of ``layers``, gathered from the graph's
        outputs."""
        run = robustnorm.GroupRun(sizes=sizes, record=True, layer_names={}, policy=policy, streams=selection)
        if self.norm_layers:
            run.ran = [plan.statistics for plan in plans]
            run.fallback = [plan.fallback for plan in plans]
            run.stream_images = [plan.stream_images for plan in plans]
        else:  # a model without norm layers has only fixed statistics, as batch_groups reports
            run.ran, run.fallback, run.stream_images = ["frozen"] * len(sizes), [False] * len(sizes), [0] * len(sizes)
        counts = torch.tensor(sizes)
        robust = self.exported.robust
        def joined(key: str, stack: bool) -> torch.Tensor:
            """One output of every group, stacked (per-group values) or concatenated (per-image rows); one group's
            as it is, without a copy (the common case)."""
            arrays = [output[key] for output in outputs]
            if len(arrays) == 1:
                return torch.from_numpy(arrays[0][None] if stack else arrays[0])
            return torch.from_numpy(np.stack(arrays) if stack else np.concatenate(arrays))

        for name in layers:
            mean, spread = joined(name + MEAN_SUFFIX, True), joined(name + SPREAD_SUFFIX, True)
            rows = joined(name + IMAGE_ROWS_SUFFIX, False)
            run.stats[name] = GroupStatistics(mean=mean, spread=spread, counts=counts, image_mean=rows[:, 0],
                                              image_spread=None, image_rows=rows)
            run.robust_layers[name] = robust
            run.population[name] = self._population[name]
        return run
