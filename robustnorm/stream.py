"""Per-stream running statistics of the recent traffic, for the ``stream`` and ``auto`` policies.

A stream is one source of traffic: the whole service (one global stream) or one tenant. For every
normalization layer it keeps, in a ring buffer, one row per recent image: the image's own per-channel mean
and second moment (BatchNorm layers) or mean, maximum and minimum (RobustNorm layers), for the last
``window`` images. Its statistics are those of the pooled window: the mean of the means, the pooled variance
``E[x^2] - E[x]^2``, and for RobustNorm the range ``max - min`` over every image of the window.

Why a range over the window: a range grows with the number of values it spans, and RobustNorm's tracked
range is the range of a training batch. A range over the last ``window`` images is therefore on the tracked
range's scale when ``window`` is near the training batch size (128 for the bundled models), and it does not
shrink towards one image's range when traffic arrives one image at a time, as an average of per-batch ranges
would.

With ``trim`` (a share, 0 by default) the window's statistics and its gate score leave out, per channel, that
share of the images at each end: a client whose images are a minority of a shared stream's traffic then cannot
drag the statistics everyone's images are normalised with, however extreme its images (``trimmed_mean``).

A stream counts each distinct image once: an image whose pixels equal those of one already in the window
(:func:`image_fingerprints`) adds nothing to it, to its statistics or to its gate. Clients repeat images (retries,
probes, load tests, one popular picture); a window of copies of one image is not a distribution, and its
statistics and gate score are that one image's, which the gate would take for shifted traffic.

The store bounds its state: at most ``max_streams`` streams (the least recently used one is dropped), idle
streams expire after ``idle_seconds``, and one micro-batch contributes at most ``max_batch_share`` of the
window, so no single batch can replace a stream's estimate. Streams are updated only from the engine's
thread; :meth:`StreamStore.reset` may be called from any thread.

The drift gate of the ``auto`` policy (:mod:`robustnorm.gate`) keeps, per stream, each recent image's raw gate
score beside its statistics; the stream's gate score is their mean over the window.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .gate import GateCalibration

if TYPE_CHECKING:
    from .grouping import GroupRun

GLOBAL_STREAM = ""  # the key of the one stream that serves traffic without a tenant


def trimmed_mean(values: Tensor, cut: int) -> Tensor:
    """Mean over dim 0 without the ``cut`` largest and the ``cut`` smallest values of each column."""
    if cut <= 0:
        return values.mean(dim=0)
    return values.sort(dim=0).values[cut:values.shape[0] - cut].mean(dim=0)


def trimmed_count(held: int, trim: float) -> int:
    """Images left out at each end when ``trim`` of ``held`` images are (at least one image always stays)."""
    return min(int(trim * held), (held - 1) // 2)


# Values of an image a fingerprint reads at most (evenly spaced): all of a 32x32 RGB image, every 37th of 224x224.
FINGERPRINT_VALUES = 4096


def image_fingerprints(pixels: Tensor) -> list[int]:
    """One hash per image of ``pixels`` (n, ...) of its exact values (at most ``FINGERPRINT_VALUES`` of them, evenly
    spaced): equal images get equal fingerprints, distinct natural images practically never do."""
    flat = pixels.detach().reshape(pixels.shape[0], -1)
    step = max(1, -(-flat.shape[1] // FINGERPRINT_VALUES))
    sample = np.ascontiguousarray((flat if step == 1 else flat[:, ::step]).to("cpu", torch.float32).numpy())
    return [hash(row.tobytes()) for row in sample]


def _rows_of(rows: Tensor, start: int, n: int) -> Tensor:
    """Rows ``start`` to ``start + n``: the tensor itself when that is all of it (no dispatch per layer)."""
    return rows if start == 0 and n == rows.shape[0] else rows[start:start + n]


def rows_statistics(rows: Tensor, robust: bool, trim: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean and spread (pooled variance, or range) of per-image rows (k, R, C).

    With ``trim`` > 0, per channel the ``trim`` share of the images with the highest values and the share with the
    lowest are left out: the mean and the second moment are trimmed means, and the range runs from the highest
    maximum left to the lowest minimum left, so that a minority of outlying images (a client sending garbage, or
    images crafted to move the statistics) cannot drag the window's statistics.
    """
    cut = trimmed_count(rows.shape[0], trim)
    mean = trimmed_mean(rows[:, 0], cut)
    if robust:
        if cut == 0:
            return mean, rows[:, 1].amax(dim=0) - rows[:, 2].amin(dim=0)
        highest = rows[:, 1].topk(cut + 1, dim=0).values[-1]
        lowest = rows[:, 2].topk(cut + 1, dim=0, largest=False).values[-1]
        return mean, highest - lowest
    return mean, (trimmed_mean(rows[:, 1], cut) - mean.square()).clamp_min(0)


def image_spread_from_rows(rows: Tensor, robust: bool) -> Tensor:
    """Each image's own spread (variance, or range) from its rows (n, R, C)."""
    if robust:
        return rows[:, 1] - rows[:, 2]
    return (rows[:, 1] - rows[:, 0].square()).clamp_min(0)


@dataclass
class _Ring:
    rows: Tensor  # (window, R, C)
    count: int = 0
    position: int = 0

    def push(self, new: Tensor) -> None:
        window = self.rows.shape[0]
        new = new[-window:]
        start, n = self.position, new.shape[0]
        if start + n <= window:  # no wrap: one slice
            self.rows[start:start + n] = new
        else:
            index = (start + torch.arange(n, device=new.device)) % window
            self.rows[index.to(self.rows.device)] = new.to(self.rows.dtype)
        self.position = (start + n) % window
        self.count = min(window, self.count + new.shape[0])

    def held(self) -> Tensor:
        return self.rows[: self.count]


_BLOCK_ROWS = 16


class _BlockSummary:
    """Per block of 16 consecutive rows of a ring: the sum of its rows and, for RobustNorm rows, the maximum of the
    maxima and the minimum of the minima. A push refreshes the blocks it wrote, and the window's statistics
    reduce the blocks rather than every row: a sixteenth of the rows read per batch."""

    def __init__(self, rows: Tensor, robust: bool) -> None:
        window, fields, channels = rows.shape
        blocks = -(-window // _BLOCK_ROWS)
        self.sums = rows.new_zeros((blocks, fields, channels))
        self.maxima = rows.new_zeros((blocks, channels)) if robust else None
        self.minima = rows.new_zeros((blocks, channels)) if robust else None

    def refresh(self, ring: _Ring, first: int, n: int) -> None:
        """Recompute the blocks holding ring rows ``first`` to ``first + n`` (modulo the window)."""
        window = ring.rows.shape[0]
        touched = range(len(self.sums)) if n >= window else sorted({(first + i) % window // _BLOCK_ROWS
                                                                      for i in range(n)})
        for block in touched:
            start = block * _BLOCK_ROWS
            part = ring.rows[start:min(start + _BLOCK_ROWS, ring.count)]  # rows past the count are unwritten
            if part.shape[0] == 0:
                continue
            self.sums[block] = part.sum(dim=0)
            if self.maxima is not None and self.minima is not None:
                self.maxima[block] = part[:, 1].amax(dim=0)
                self.minima[block] = part[:, 2].amin(dim=0)

    def statistics(self, count: int) -> tuple[Tensor, Tensor]:
        """:func:`rows_statistics` without trimming of the ``count`` rows held (written from row 0 on)."""
        used = -(-count // _BLOCK_ROWS)
        means = self.sums[:used].sum(dim=0) / count  # (R, C)
        if self.maxima is not None and self.minima is not None:
            return means[0], self.maxima[:used].amax(dim=0) - self.minima[:used].amin(dim=0)
        return means[0], (means[1] - means[0].square()).clamp_min(0)


@dataclass
class _Packed:
    """The rows of every layer of one kind (BatchNorm or RobustNorm) side by side along the channels, in one ring:
    one push and one reduction per batch for all of them, where a ring per layer took a few dozen small
    tensor operations."""

    ring: _Ring  # (window, R, total channels)
    spans: dict[str, tuple[int, int]]  # layer -> its channels [start, stop)
    summary: _BlockSummary | None = None  # for the untrimmed statistics

    def statistics(self, robust: bool, trim: float) -> tuple[Tensor, Tensor]:
        """The window's (mean, spread) over every channel of the kind (:func:`rows_statistics`)."""
        if self.summary is not None:  # kept for untrimmed windows only
            return self.summary.statistics(self.ring.count)
        return rows_statistics(self.ring.held(), robust, trim)

    def push(self, new: Tensor) -> None:
        first = self.ring.position
        self.ring.push(new)
        if self.summary is not None:
            self.summary.refresh(self.ring, first, new.shape[0])


@dataclass
class Stream:
    """The running statistics of one stream, per norm layer, and its drift gate's state."""

    key: str
    window: int
    trim: float = 0.0  # share of outlying images left out at each end (rows_statistics, and the gate's score)
    packed: dict[bool, _Packed] = field(default_factory=dict)  # robust -> the rows of those layers
    robust: dict[str, bool] = field(default_factory=dict)
    images: int = 0  # images ever pushed
    last_used: float = 0.0
    shifted: bool = False  # the gate's decision (auto): True while the traffic looks shifted
    gate_score: float | None = None
    switches: int = 0
    gate_ring: _Ring | None = None  # each recent image's raw gate score, (window, 1, 1)
    recent: dict[int, None] = field(default_factory=dict, repr=False)  # fingerprints of the window, oldest first
    _statistics: dict[bool, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)  # since the last push
    _statistics_arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        """Images the estimate holds: ``min(images pushed, window)``."""
        return min(self.images, self.window)

    def statistics(self, layer: str) -> tuple[Tensor, Tensor] | None:
        """The window's (mean, spread) for ``layer``, or ``None`` while the stream holds nothing."""
        kind = self.robust.get(layer)
        packed = self.packed.get(kind) if kind is not None else None
        if packed is None or packed.ring.count == 0 or layer not in packed.spans:
            return None
        assert kind is not None
        pooled = self._pooled(kind, packed)
        start, stop = packed.spans[layer]
        return pooled[0][start:stop], pooled[1][start:stop]

    def _pooled(self, kind: bool, packed: _Packed) -> tuple[Tensor, Tensor]:
        """The window's statistics of every layer of one kind, computed once per push."""
        pooled = self._statistics.get(kind)
        if pooled is None:
            pooled = self._statistics[kind] = packed.statistics(kind, self.trim)
        return pooled

    def statistics_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:meth:`statistics` of every layer the stream holds, as float32 NumPy views on the CPU: one conversion per
        layer kind and push, where a conversion per layer and batch cost a few dozen tensor operations (what an
        ONNX Runtime graph is fed)."""
        arrays = self._statistics_arrays
        if arrays is None:
            arrays = {}
            for kind, packed in self.packed.items():
                if packed.ring.count == 0:
                    continue
                mean, spread = (t.detach().cpu().float().numpy() for t in self._pooled(kind, packed))
                arrays.update({name: (mean[start:stop], spread[start:stop])
                               for name, (start, stop) in packed.spans.items()})
            self._statistics_arrays = arrays
        return arrays

    def push(self, rows: dict[str, Tensor], robust: dict[str, bool]) -> None:
        """Add one micro-batch's per-image rows, ``layer -> (n, R, C)`` (the same n for every layer)."""
        kinds: dict[bool, dict[str, Tensor]] = {}
        for name, new in rows.items():
            kinds.setdefault(robust[name], {})[name] = new.detach() if new.requires_grad else new
        added = 0
        for kind, layers in kinds.items():
            packed = self.packed.get(kind)
            if packed is None or list(packed.spans) != list(layers):  # the first push (the layers never change)
                spans, start = {}, 0
                for name, new in layers.items():
                    spans[name] = (start, start + new.shape[2])
                    start += new.shape[2]
                    self.robust[name] = kind
                first = next(iter(layers.values()))
                ring = _Ring(first.new_zeros((self.window, first.shape[1], start)))
                packed = self.packed[kind] = _Packed(ring, spans, _BlockSummary(ring.rows, kind) if self.trim == 0
                                                     else None)
            packed.push(torch.cat(list(layers.values()), dim=2))
            added = next(iter(layers.values())).shape[0]
        self._statistics.clear()
        self._statistics_arrays = None
        self.images += added

    def new_images(self, fingerprints: Sequence[int]) -> list[int]:
        """Indices of the images whose fingerprints neither the window nor an earlier image of the batch has."""
        seen, fresh = self.recent, []
        batch: set[int] = set()
        for i, fingerprint in enumerate(fingerprints):
            if fingerprint not in seen and fingerprint not in batch:
                batch.add(fingerprint)
                fresh.append(i)
        return fresh

    def remember(self, fingerprints: Iterable[int]) -> None:
        """Note the fingerprints of images pushed, forgetting those the window no longer holds."""
        recent = self.recent
        for fingerprint in fingerprints:
            recent[fingerprint] = None
        while len(recent) > self.window:
            del recent[next(iter(recent))]

    def update_gate(self, raw: Tensor, calibration: GateCalibration) -> bool | None:
        """Add the images' raw gate scores (n,), re-score the window and switch with hysteresis. Returns the new
        state when it changed, else None."""
        if self.gate_ring is None:
            self.gate_ring = _Ring(raw.new_zeros((self.window, 1, 1)))
        self.gate_ring.push(raw.detach().reshape(-1, 1, 1))
        if self.gate_ring.count < calibration.min_images:
            return None
        held = self.gate_ring.held().flatten()
        self.gate_score = float(trimmed_mean(held, trimmed_count(held.shape[0], self.trim)))
        if not self.shifted and self.gate_score > calibration.on:
            self.shifted = True
        elif self.shifted and self.gate_score < calibration.off:
            self.shifted = False
        else:
            return None
        self.switches += 1
        return self.shifted


class StreamStore:
    """Streams by key, bounded in number and age; what the engine reads before and updates after a batch."""

    def __init__(self, window: int, *, max_streams: int = 256, idle_seconds: float = 3600.0,
                 max_batch_share: float = 0.25, trim: float = 0.0, gate: GateCalibration | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1 or max_streams < 1 or idle_seconds <= 0 or not 0 < max_batch_share <= 1 or not 0 <= trim < 0.5:
            raise ValueError("a stream store needs window >= 1, max_streams >= 1, idle_seconds > 0, "
                             "0 < max_batch_share <= 1 and 0 <= trim < 0.5")
        self.window = window
        self.trim = trim
        self.max_streams = max_streams
        self.idle_seconds = idle_seconds
        self.max_batch_images = max(1, math.ceil(max_batch_share * window))
        self.gate = gate
        self._clock = clock
        self._streams: OrderedDict[str, Stream] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._streams)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def peek(self, key: str) -> Stream | None:
        with self._lock:
            return self._streams.get(key)

    def select(self, keys: Sequence[str | None]) -> StreamSelection:
        """The streams of a forward's groups, one per key (``None``: the global stream)."""
        return StreamSelection(self, [self.get(key) for key in keys])

    def get(self, key: str | None) -> Stream:
        """The stream for ``key`` (``None``: the global stream), created when new; expires idle streams and
        drops the least recently used one past ``max_streams``."""
        key = GLOBAL_STREAM if key is None else key
        now = self._clock()
        with self._lock:
            self._expire(now)
            stream = self._streams.get(key)
            if stream is None:
                stream = Stream(key=key, window=self.window, trim=self.trim)
                self._streams[key] = stream
                while len(self._streams) > self.max_streams:
                    self._streams.popitem(last=False)
                    self.evicted += 1
            self._streams.move_to_end(key)
            stream.last_used = now
            return stream

    def _expire(self, now: float) -> None:
        stale = [key for key, stream in self._streams.items() if now - stream.last_used > self.idle_seconds]
        for key in stale:
            del self._streams[key]
        self.expired += len(stale)

    def admitted(self, n: int) -> slice | Tensor:
        """Which of a group's ``n`` images may enter a stream: at most ``max_batch_images``, evenly spaced, so
        one batch never replaces more than its share of the window."""
        if n <= self.max_batch_images:
            return slice(None)
        return torch.linspace(0, n - 1, self.max_batch_images).round().long()

    def reset(self, keys: Iterable[str] | None = None) -> int:
        """Forget the given streams (all when ``keys`` is None). Returns how many were dropped."""
        with self._lock:
            if keys is None:
                dropped = len(self._streams)
                self._streams.clear()
                return dropped
            dropped = 0
            for key in keys:
                dropped += self._streams.pop(key, None) is not None
            return dropped


@dataclass
class StreamSelection:
    """The streams of one forward's groups (``batch_groups(..., streams=...)``) and the store they live in."""

    store: StreamStore | None
    streams: list[Stream | None]
    switched: list[tuple[str, bool]] = field(default_factory=list)  # (stream key, shifted) gate switches
    repeated: int = 0  # images left out of their stream because it held a copy of them (or the batch did)

    def update(self, run: GroupRun, pixels: Tensor | None = None, predicted: Tensor | None = None) -> None:
        """Add each group's images to its stream (bounded per batch; with ``pixels``, each distinct image once) and,
        for ``auto`` with a calibrated gate, score the images (``pixels`` and the model's ``predicted`` classes, real
        images only) into its gate."""
        sizes = run.sizes if run.sizes is not None else (next(iter(run.stats.values())).image_mean.shape[0],)
        gate = self.store.gate if self.store is not None else None
        if run.policy is None or run.policy.kind != "auto" or pixels is None or predicted is None:
            gate = None  # only auto's gate scores images, and it needs both
        raw: Tensor | None = None  # the images' raw gate scores, computed once a group adds images
        prints = image_fingerprints(pixels) if pixels is not None else None
        start = 0
        for stream, n in zip(self.streams, sizes):
            if stream is not None:
                admitted, added = self._admitted(stream, n, prints[start:start + n] if prints is not None else None)
                if added:
                    rows = {name: _rows_of(stats.image_rows, start, n) for name, stats in run.stats.items()
                            if stats.image_rows is not None}
                    if not isinstance(admitted, slice):
                        rows = {name: value[admitted] for name, value in rows.items()}
                    stream.push(rows, run.robust_layers)
                    if gate is not None:
                        raw = gate.image_raw(pixels, predicted) if raw is None else raw
                        changed = stream.update_gate(raw[start:start + n][admitted], gate)
                        if changed is not None:
                            self.switched.append((stream.key, changed))
            start += n

    def _admitted(self, stream: Stream, n: int, prints: list[int] | None) -> tuple[slice | Tensor, int]:
        """Which of a group's ``n`` images enter ``stream``, and how many: those it does not hold yet (all without
        fingerprints), at most the store's share of the window of them, evenly spaced."""
        fresh = stream.new_images(prints) if prints is not None else list(range(n))
        self.repeated += n - len(fresh)
        chosen = self.store.admitted(len(fresh)) if self.store is not None else slice(None)
        if not isinstance(chosen, slice):
            fresh = [fresh[i] for i in chosen.tolist()]
        if prints is not None:
            stream.remember(prints[i] for i in fresh)
        if len(fresh) == n:
            return slice(None), n
        return torch.tensor(fresh, dtype=torch.long), len(fresh)
