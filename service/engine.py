"""The PyTorch engine: loads the model and runs micro-batches on it in one dedicated thread.

Every batch runs inside ``robustnorm.batch_groups(model, sizes=..., record=True)``: each statistics group of
the batch (the whole batch, or one group per tenant) is normalised with its own statistics under the policy
the model's settings choose for its size ``n``, and the run records which statistics actually ran and the
batch statistics the drift report is computed from. Batches may be padded to a few fixed sizes (powers of
two), so the device sees few shapes; padding lies past ``sum(sizes)`` and never influences any statistic.

On CUDA the forward runs under bf16 autocast with channels_last tensors. The model is only ever touched from
the engine thread, so a policy switch for a batch can never race another batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

import robustnorm

from .batcher import Batch
from .imaging import Preprocessing
from .settings import Settings

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


def pad_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch_size``, which is always one of the sizes."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def canonical_policy(text: str) -> str:
    """The canonical form of a policy string; ``ValueError`` listing the valid forms when malformed."""
    return str(robustnorm.parse_policy(text))


@dataclass(frozen=True)
class TopClass:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class GroupReport:
    """One statistics group of a forward pass: the images that were normalised together."""

    batch_id: str
    index: int  # position of the group within the forward pass
    size: int  # real images in the group: the n the policy saw
    policy: str  # the effective policy (e.g. "adaptive:16")
    statistics: str  # what ran: "batch", "blend" or "frozen"
    fallback: bool  # True when an adaptive policy fell back
    batch_score: float | None  # calibrated batch drift score (None when the model is uncalibrated)
    layers: dict[str, dict[str, float]]  # layer -> measure -> drift of this group
    inference_seconds: float  # the whole forward pass this group ran in
    finished_at: float  # wall-clock time (time.time()) the forward finished


@dataclass(frozen=True)
class ImageOutput:
    """The answer for one image."""

    index: int
    label: str
    score: float
    top_k: list[TopClass]
    drift_score: float | None
    group: GroupReport


@dataclass(frozen=True)
class BatchOutput:
    """The result of one forward pass, with each item's images routed back by item id."""

    id: str
    policy: str
    images: int  # real images
    padded_to: int  # images in the device tensor
    seconds: float
    groups: list[GroupReport]
    image_scores: list[float] | None
    layers: dict[str, dict[str, list[float]]]  # layer -> measure -> one value per group
    results: dict[str, list[ImageOutput]] = field(repr=False)


class TorchEngine:
    """A model, its card and the thread it runs in."""

    def __init__(self, model: nn.Module, card: robustnorm.ModelCard, *, device: torch.device, policy: str,
                 max_batch_size: int, padding: bool) -> None:
        self.model = model.eval()
        self.card = card
        self.device = device
        self.policy = canonical_policy(policy)
        self.max_batch_size = max_batch_size
        self.pad_sizes = pad_sizes(max_batch_size) if padding else ()
        self.labels = list(card.labels)
        self.norm_layers = len(robustnorm.policy_layers(model))
        self._active_policy = self.policy
        robustnorm.set_policy(self.model, self.policy)
        self._cuda = device.type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # few shapes thanks to padding: autotune each once
            self.model.to(memory_format=torch.channels_last)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustnorm-engine")

    @classmethod
    def from_settings(cls, settings: Settings) -> TorchEngine:
        """Load the configured model: bundled name, saved directory, or ``module:factory`` + weights + card."""
        device = resolve_device(settings.device)
        if settings.is_factory_model:
            assert settings.weights is not None and settings.card is not None
            model, card = robustnorm.load_external(settings.model, settings.weights, settings.card, device=device)
        else:
            model, card = robustnorm.load_model(settings.model or default_model(), device=device)
        policy = settings.policy or card.policy  # flag > environment > card (the flag/env order is Settings')
        padding = settings.pad_batches == "on" or (settings.pad_batches == "auto" and device.type == "cuda")
        engine = cls(model, card, device=device, policy=policy, max_batch_size=settings.max_batch_size,
                     padding=padding)
        if engine.norm_layers == 0:
            logger.warning("model %s has no BatchNorm or RobustNorm layers: every batch runs fixed statistics",
                           card.name)
        logger.info("loaded model %s (version %s, %s norm) on %s with policy %s%s", card.name, card.version,
                    card.norm, device, engine.policy, f", padding to {engine.pad_sizes}" if padding else "")
        return engine

    def drift_calibration(self, policy: str) -> robustnorm.DriftCalibration | None:
        """The card's drift calibration for a batch run under ``policy``, or ``None`` (no scores).

        A calibration is made under one policy (``robustnorm calibrate`` deploys it in the card too, and the
        calibration records it), and only there do clean batches score about 0: the bundled RobustNorm model's
        clean batches of 32 score about -6 under ``batch``. A misleading score is worse than none, so other
        policies report per-layer drift only.
        """
        if self.card.calibration is None or policy != self.calibrated_policy:
            return None
        return self.card.calibration

    @functools.cached_property
    def calibrated_policy(self) -> str:
        """The policy the card's drift calibration was made under (older cards: the card's own); read on every
        batch, parsed once."""
        calibration = self.card.calibration
        return canonical_policy(calibration.policy if calibration and calibration.policy else self.card.policy)

    def preprocessing(self, max_pixels: int) -> Preprocessing:
        channels, height, width = (int(v) for v in self.card.input_size)
        return Preprocessing(channels=channels, height=height, width=width, mean=tuple(self.card.mean),
                             std=tuple(self.card.std), max_pixels=max_pixels)

    # -- running on the engine thread -------------------------------------------------------------------
    async def run(self, batch: Batch[ImageOutput]) -> BatchOutput:
        """Run ``batch`` on the engine thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, batch)

    async def warm_up(self) -> None:
        """Run every batch shape once (each pad size, or 1 and the max) so the first requests are not slow."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def padded_size(self, images: int) -> int:
        return next((size for size in self.pad_sizes if size >= images), images)

    def _warm_up(self) -> None:
        started = time.perf_counter()
        shape = tuple(int(v) for v in self.card.input_size)
        for size in self.pad_sizes or sorted({1, self.max_batch_size}):
            self.infer(torch.randn(size, *shape), [size], self.policy)
        logger.info("warm-up done in %.2f s", time.perf_counter() - started)

    def infer(self, pixels: torch.Tensor, sizes: Sequence[int], policy: str
               ) -> tuple[torch.Tensor, robustnorm.GroupRun, robustnorm.DriftReport, int]:
        """Probabilities of the real images, what ran, and the drift report, for one grouped forward.

        The engine's one model-facing step: batching, padding sizes, threads and reporting stay in this class,
        and an engine for another runtime (:class:`service.engine_onnx.OnnxEngine`) overrides only this.
        """
        images = sum(sizes)
        padded = self.padded_size(images)
        if padded > pixels.shape[0]:
            pixels = torch.cat([pixels, pixels.new_zeros((padded - pixels.shape[0], *pixels.shape[1:]))])
        if self._cuda:
            pixels = pixels.pin_memory().to(self.device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
        else:
            pixels = pixels.to(self.device)
        if policy != self._active_policy:
            robustnorm.set_policy(self.model, policy)
            self._active_policy = policy
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self._cuda and torch.cuda.is_bf16_supported()
                    else contextlib.nullcontext())
        with torch.inference_mode(), robustnorm.batch_groups(self.model, sizes, record=True) as run:
            with autocast:
                logits = self.model(pixels)
            probabilities = logits[:images].float().softmax(dim=1)
            report = robustnorm.drift_report(run, self.drift_calibration(policy))
        return probabilities, run, report, padded

    def forward(self, batch: Batch[ImageOutput]) -> BatchOutput:
        """Run one batch (call on the engine thread; the model is not thread-safe)."""
        items = batch.items
        sizes = batch.sizes
        started = time.perf_counter()
        probabilities, run, report, padded = self.infer(torch.cat([item.pixels for item in items]), sizes,
                                                         batch.policy)
        k = min(max(item.top_k for item in items), len(self.labels))
        top_scores, top_indices = (t.cpu().tolist() for t in probabilities.topk(k, dim=1))
        seconds = time.perf_counter() - started
        finished_at = time.time()
        groups = [
            GroupReport(batch_id=batch.id, index=g, size=size, policy=batch.policy, statistics=run.ran[g],
                        fallback=run.fallback[g],
                        batch_score=report.batch_score[g] if g < len(report.batch_score) else None,
                        layers={layer: {measure: values[g] for measure, values in measures.items()}
                                for layer, measures in report.layers.items()},
                        inference_seconds=seconds, finished_at=finished_at)
            for g, size in enumerate(sizes)
        ]
        results: dict[str, list[ImageOutput]] = {}
        row = 0
        for g, group_items in enumerate(batch.groups):
            for item in group_items:
                outputs = []
                for _ in range(item.size):
                    top = [TopClass(index=i, label=self.labels[i], score=s)
                           for i, s in zip(top_indices[row][: item.top_k], top_scores[row][: item.top_k])]
                    drift = report.image_score[row] if report.image_score is not None else None
                    outputs.append(ImageOutput(index=top[0].index, label=top[0].label, score=top[0].score,
                                               top_k=top, drift_score=drift, group=groups[g]))
                    row += 1
                results[item.id] = outputs
        return BatchOutput(id=batch.id, policy=batch.policy, images=sum(sizes), padded_to=padded, seconds=seconds,
                           groups=groups, image_scores=report.image_score, layers=report.layers, results=results)
