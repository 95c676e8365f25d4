"""The PyTorch engine: one grouped forward per micro-batch, on the CPU, CUDA or MPS.

Every batch runs inside ``robustnorm.batch_groups(model, sizes, policy=..., record=True, streams=...)``: each
statistics group is normalised under the policy's plan for it, and the run records which statistics ran and
the batch statistics the drift report is computed from. Batches may be padded to a few fixed sizes (powers
of two), so the device sees few shapes; padding lies past ``sum(sizes)`` and never influences any statistic.
On CUDA the forward runs under bf16 autocast with channels_last tensors.

A batch whose per-layer drift nobody will score (``drift="none"``: beyond ``drift_max_rate``, or drift metrics off)
and in which every group runs frozen statistics (``frozen``; ``adaptive`` where it falls back to ``frozen``;
``auto`` while each group's gate holds the population) runs a copy of the model with the frozen statistics folded
into the convolutions (:func:`robustnorm.fold.fold_frozen`), which still records the image-score layers and, under
``auto``, every layer's rows for the streams. Its answers equal the unfolded model's up to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

import robustnorm
from robustnorm.fold import FoldedModel, fold_frozen
from robustnorm.policy import Policy

from .base import BatchReport, DriftWhen, EngineBase, GroupSpec, StreamSettings

logger = logging.getLogger(__name__)


def pad_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch_size``, which is always one of the sizes."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


class TorchEngine(EngineBase):
    """A PyTorch model and its card. Not thread-safe: call :meth:`run` from one thread at a time."""

    def __init__(self, model: nn.Module, card: robustnorm.ModelCard, *, device: torch.device, policy: Policy,
                 max_batch_size: int, padding: bool, streams: StreamSettings | None = None) -> None:
        super().__init__(card, policy, streams or StreamSettings())
        self.model = model.eval()
        self.device = device
        self.max_batch_size = max_batch_size
        self.pad_sizes = pad_sizes(max_batch_size) if padding else ()
        self.norm_layers = len(robustnorm.policy_layers(model))
        self._cuda = device.type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # few shapes thanks to padding: autotune each once
            self.model.to(memory_format=torch.channels_last)
        self.folded = self._fold()
        calibration = card.calibration
        self._image_layers = tuple(calibration.image_layers) if calibration is not None else ()

    def _fold(self) -> FoldedModel | None:
        """The frozen model with its statistics folded into the convolutions, or None where it cannot be."""
        if not self.norm_layers:
            return None
        try:
            folded = fold_frozen(self.model)
        except ValueError as error:
            logger.info("frozen batches run the unfolded model: %s", error)
            return None
        except Exception as error:  # folding only speeds frozen batches up: serve without it
            logger.warning("frozen batches run the unfolded model, folding it failed: %r", error)
            return None
        if folded.unfolded:
            logger.info("norm layers left unfolded (their input could not be recovered precisely): %s",
                        ", ".join(folded.unfolded))
        return folded.to(memory_format=torch.channels_last) if self._cuda else folded

    def padded_size(self, images: int) -> int:
        return next((size for size in self.pad_sizes if size >= images), images)

    def warm_up(self) -> None:
        """Run every batch shape once (each pad size, or 1 and the max) so the first requests are not slow."""
        started = time.perf_counter()
        shape = tuple(int(v) for v in self.card.input_size)
        frozen = robustnorm.parse_policy("frozen")
        for size in self.pad_sizes or sorted({1, self.max_batch_size}):
            # frozen: warming up must not feed random images into the streams; both the unfolded and the
            # folded model
            for drift in ("now", "none"):
                self.run(torch.randn(size, *shape), [GroupSpec(size)], frozen, drift=drift)
        logger.info("warm-up done in %.2f s", time.perf_counter() - started)

    def close(self) -> None:
        """Nothing to release: the model is freed with the engine."""

    def run(self, pixels: torch.Tensor, groups: Sequence[GroupSpec], policy: Policy, *, drift: DriftWhen = "now"
            ) -> tuple[torch.Tensor, BatchReport]:
        """Probabilities of the real images (on the CPU) and the batch report, for one grouped forward."""
        started = time.perf_counter()
        sizes = [group.size for group in groups]
        images = sum(sizes)
        padded = self.padded_size(images)
        if padded > pixels.shape[0]:
            pixels = torch.cat([pixels, pixels.new_zeros((padded - pixels.shape[0], *pixels.shape[1:]))])
        if self._cuda:
            pixels = pixels.pin_memory().to(self.device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
        else:
            pixels = pixels.to(self.device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self._cuda and torch.cuda.is_bf16_supported()
                    else contextlib.nullcontext())
        selection = self.streams_for(policy, groups)
        folded = self.folded if drift == "none" and self.folded is not None else None
        with torch.inference_mode():
            if folded is not None and folded.runs_frozen(sizes, policy, selection):
                net, grouped = folded, folded.groups(sizes, policy=policy, record=self._image_layers,
                                                     streams=selection)
            else:
                net, grouped = self.model, robustnorm.batch_groups(self.model, sizes, policy=policy, record=True,
                                                                   streams=selection)
            with grouped as run:
                with autocast:
                    logits = net(pixels)
                probabilities = logits[:images].float().softmax(dim=1).cpu()
        report = self.report(run, groups, policy, time.perf_counter() - started, padded, selection, drift)
        return probabilities, report
