"""Typed request and response bodies of the HTTP API (they are what ``/docs`` documents)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import pydantic_core
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from .predictor import GroupPlace, ImageAnswer

StatisticsRan = Literal["batch", "blend", "frozen", "stream"]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: bad_image, unauthorized, forbidden, not_found, body_timeout, "
                                  "too_large, too_many_images, unsupported_type, invalid, queue_full, tenant_share, "
                                  "tenant_rate, overloaded, uploads_full, not_ready, draining, unavailable, deadline, "
                                  "inference_failed, internal; header_timeout and headers_too_large come from the "
                                  "HTTP layer")
    message: str = Field(description="what went wrong and what to do about it")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TopClass(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class BatchInfo(BaseModel):
    """The batch an image ran in: the images whose statistics normalised it."""

    id: str = Field(description="the forward pass; images of several requests share it")
    group: int = Field(description="statistics group within the forward pass (tenants isolated by groups)")
    size: int = Field(description="real images in the group: the n the policy saw (padding excluded)")
    policy: str = Field(description="effective policy of the batch, e.g. 'adaptive:16'")
    statistics: StatisticsRan = Field(description="the statistics that actually ran")
    fallback: bool = Field(description="true when an adaptive policy fell back (n below its MIN_BATCH) or an auto "
                                       "policy's drift gate held the population statistics")
    stream_images: int = Field(description="distinct images the stream's running statistics held when the batch "
                                           "ran (0 unless the policy is 'stream' or 'auto'; a copy of an image the "
                                           "stream holds is not added again)")
    drift_score: float | None = Field(description="calibrated batch drift score; null when uncalibrated, and unless "
                                                  "drift_metrics is 'inline' (batch drift is scored after the "
                                                  "answers leave; /v1/stats and the metrics show it)")
    inference_seconds: float


class ImagePrediction(BaseModel):
    label: str
    index: int
    score: float
    top_k: list[TopClass]
    drift_score: float | None = Field(description="calibrated per-image drift score (null when uncalibrated)")
    batch: BatchInfo


class Timings(BaseModel):
    decode_seconds: float
    inference_seconds: float = Field(description="forward passes of the batches the request's images ran in")
    total_seconds: float


class PredictResponse(BaseModel):
    request_id: str
    model: str
    version: str = Field(description="first 12 hex digits of the SHA-256 of the weights")
    predictions: list[ImagePrediction] = Field(description="one per image, in request order")
    timings: Timings


class PredictQuery(BaseModel):
    """The query parameters of ``POST /predict``."""

    top_k: int | None = Field(None, ge=1, description="classes listed per image")
    policy: str | None = Field(None, description="statistics policy for this request, when the service allows "
                                                 "overrides (e.g. 'frozen', 'adaptive:8')")
    timeout: float | None = Field(None, gt=0, description="seconds this request may take; capped by the service's "
                                                          "request deadline")


class PredictJSON(BaseModel):
    """The JSON form of a prediction request."""

    images: list[str] = Field(min_length=1, description="base64-encoded images (data: URLs accepted)")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    version: str


class ModelResponse(BaseModel):
    """The model card, plus how this service runs the model."""

    name: str
    version: str
    architecture: str
    norm: str
    p: float | None
    labels: list[str]
    input_size: list[int] = Field(description="[channels, height, width]")
    mean: list[float]
    std: list[float]
    card_policy: str = Field(description="the policy the model card recommends")
    policy: str = Field(description="the policy this service runs (flag > environment > card)")
    policy_override: bool = Field(description="whether a request may choose its own policy")
    calibrated: bool = Field(description="whether batches under this service's policy get drift scores: the card's "
                                         "calibration was made under card_policy, so only when policy equals it "
                                         "(else the scores are null; requests choosing another policy get none)")
    calibration: dict[str, Any] | None
    max_batch_size: int
    batch_key: str
    isolation: str
    device: str
    padding: list[int] = Field(description="batch sizes batches are padded to (empty: no padding)")


class LayerDrift(BaseModel):
    mean_shift: float | None = None
    log_var_ratio: float | None = None
    kl: float | None = None


class LatestBatch(BaseModel):
    id: str
    group: int
    size: int
    policy: str
    statistics: StatisticsRan
    fallback: bool
    stream_images: int
    drift_score: float | None
    finished_at: datetime
    layers: dict[str, LayerDrift] = Field(description="drift per normalization layer, in forward order")


class StatsResponse(BaseModel):
    model: str
    version: str
    batches: int = Field(description="forward passes since start")
    images: int = Field(description="images answered since start")
    fallback_groups: int = Field(description="statistics groups where an adaptive policy fell back")
    queued_images: int
    streams: int = Field(description="streams whose running statistics the service holds (stream policies)")
    latest: LatestBatch | None = Field(description="the latest batch (null before the first)")


class StreamReset(BaseModel):
    """Which streams to forget; none named: every stream."""

    streams: list[str] | None = Field(None, description="stream keys (tenant names; '' is the global stream)")


class StreamResetResponse(BaseModel):
    dropped: int = Field(description="streams forgotten")


def batch_body(place: GroupPlace) -> dict[str, Any]:
    """A response's ``batch`` object (:class:`BatchInfo`) for the group an image ran in."""
    outcome = place.outcome
    return {"id": place.batch_id, "group": place.index, "size": outcome.size, "policy": place.policy,
            "statistics": outcome.statistics, "fallback": bool(outcome.fallback),
            "stream_images": outcome.stream_images, "drift_score": outcome.batch_score,
            "inference_seconds": place.inference_seconds}


def prediction_body(answer: ImageAnswer, labels: Sequence[str], top_k: int, batch: dict[str, Any]
                    ) -> dict[str, Any]:
    """One image's entry of ``predictions`` (:class:`ImagePrediction`): the best class and the ``top_k`` first.
    The body is built as plain data, not validated models: every value is the service's own."""
    top = [{"index": index, "label": labels[index], "score": score}
           for index, score in zip(answer.classes[:top_k], answer.scores[:top_k])]
    best = top[0]
    return {"label": best["label"], "index": best["index"], "score": best["score"], "top_k": top,
            "drift_score": answer.drift_score, "batch": batch, "mean_shift": None, "log_var_ratio": None, "kl": None}


def predict_body(*, request_id: str, model: str, version: str, answers: Sequence[ImageAnswer],
                 labels: Sequence[str], top_k: int, timings: dict[str, float]) -> bytes:
    """The JSON of a :class:`PredictResponse` (non-finite numbers as null). Images of one group share its
    ``batch`` object."""
    batches: dict[int, dict[str, Any]] = {}
    predictions = []
    for answer in answers:
        batch = batches.get(id(answer.group))
        if batch is None:
            batch = batches[id(answer.group)] = batch_body(answer.group)
        predictions.append(prediction_body(answer, labels, top_k, batch))
    return pydantic_core.to_json({"request_id": request_id, "model": model, "version": version,
                                  "predictions": predictions, "timings": timings}, inf_nan_mode="null")
