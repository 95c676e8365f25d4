"""The HTTP routes of docs/service.md: thin handlers over the :class:`~service.predictor.Predictor`."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from .cli import REQUEST_STARTED
from .deadlines import REQUEST_START_HEADER, accepted_at, within
from .deps import (
    AdminDep,
    ClientDep,
    MetricsDep,
    MetricsReaderDep,
    PredictorDep,
    SettingsDep,
    StatsScopeDep,
    TenantDep,
    refuse_when_draining,
    stream_of,
)
from .door import ARRIVAL, PREDICT
from .errors import ClientGone, DeadlineExceeded, InvalidRequest
from .inputs import read_images
from .predictor import ImageAnswer, Predictor, Totals
from .schemas import (
    ErrorResponse,
    HealthResponse,
    LatestBatch,
    LayerDrift,
    ModelResponse,
    PredictQuery,
    PredictResponse,
    ReadyResponse,
    StatsResponse,
    StreamReset,
    StreamResetResponse,
    predict_body,
)
from .settings import Settings

router = APIRouter()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ANSWER_MARGIN = 0.02  # share of a request's time kept for sending its answer (an answer ready later is a 504)
_NOT_WHILE_DRAINING = [Depends(refuse_when_draining)]
T = TypeVar("T")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One or more images: multipart file parts, a raw image body, or JSON with base64 strings. "
                       "JPEG, PNG, WebP, BMP and GIF (first frame) are read.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
            "image/*": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
            "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "byte"}}}}},
        },
    }
}


async def _client_gone(request: Request) -> None:
    """Returns once the client hangs up (after the body, uvicorn's receive waits for nothing else)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or 499 as soon as the client hangs up: ``work`` is cancelled then, so the request's
    images leave the queue before they reach the engine."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone("the client hung up before its answer was ready; its images were dropped")
    return task.result()


ErrorResponder = Callable[[Request, Exception], Response]


async def serve_predict(scope: Scope, receive: Receive, send: Send, *, predictor: Predictor, settings: Settings,
                        tenant: str | None, on_error: ErrorResponder) -> None:
    """``POST /predict`` as plain ASGI, for the requests the door (:mod:`service.door`) admitted: the route below
    without FastAPI's routing, dependency solving and response validation, which cost the event loop more than
    the answer itself. The door has identified the caller already; the query is validated by the same model,
    and errors are answered by the same handlers (``on_error``)."""
    scope["route"] = PREDICT  # the template the request metrics label it with
    request = Request(scope, receive, send)
    try:
        await refuse_when_draining(request)
        try:
            query = PredictQuery.model_validate(dict(request.query_params))
        except ValidationError as error:
            raise RequestValidationError([{**problem, "loc": ("query", *problem["loc"])}
                                          for problem in error.errors()]) from None
        response = await answer_predict(request, predictor=predictor, settings=settings, tenant=tenant,
                                        query=query)
    except Exception as error:
        response = on_error(request, error)
    await response(scope, receive, send)


@router.post("/predict", status_code=status.HTTP_200_OK, openapi_extra=_PREDICT_BODY, response_model=PredictResponse,
             dependencies=_NOT_WHILE_DRAINING, responses=_errors(400, 401, 403, 408, 413, 415, 422, 429, 503, 504))
async def predict(request: Request, predictor: PredictorDep, settings: SettingsDep, tenant: TenantDep,
                  query: Annotated[PredictQuery, Query()]) -> Response:
    """Classify images. Each image's answer says which batch it ran in and which statistics ran."""
    return await answer_predict(request, predictor=predictor, settings=settings, tenant=tenant, query=query)


async def answer_predict(request: Request, *, predictor: Predictor, settings: Settings, tenant: str | None,
                         query: PredictQuery) -> Response:
    """The answer to a prediction request whose caller is known (``tenant``) and whose query is valid."""
    first_byte = request.scope.get(REQUEST_STARTED) or time.monotonic()
    started = accepted_at(first_byte, request.headers.get(REQUEST_START_HEADER),
                          trusted=settings.trust_request_start)
    deadline = started + min(query.timeout or settings.request_deadline, settings.request_deadline)
    supplied_id = request.headers.get("x-request-id", "")
    request_id = supplied_id if _REQUEST_ID.match(supplied_id) else uuid.uuid4().hex

    predictor.check_accepting(first_byte)
    effective_policy = predictor.resolve_policy(query.policy)
    classes = len(predictor.engine.labels)
    k = settings.default_top_k if query.top_k is None else query.top_k
    if query.top_k is not None and query.top_k > classes:
        raise InvalidRequest(f"top_k={query.top_k} but the model knows {classes} classes")
    try:
        images = await within(read_images(request, settings), deadline - time.monotonic())
    except asyncio.TimeoutError:
        raise DeadlineExceeded("the request's deadline passed while its body was arriving") from None
    # Refused (429) when it could not be answered in time: before decoding, so that refusing is cheap. The door
    # (service.door) admitted it as one of the requests being answered already.
    predictor.admit(len(images), policy=effective_policy, tenant=tenant, deadline=deadline, arriving=False)
    stream = stream_of(request, settings, tenant)

    async def decode_and_run() -> tuple[float, list[ImageAnswer]]:
        pixels = await predictor.decode(images, deadline)
        decoded = time.monotonic()
        return decoded, await predictor.predict(pixels, policy=effective_policy, tenant=tenant, stream=stream,
                                                deadline=deadline, arrival=request.scope.get(ARRIVAL))

    decoded, answers = await _unless_client_leaves(request, decode_and_run())
    forwards = {answer.group.batch_id: answer.group.inference_seconds for answer in answers}
    card = predictor.engine.card
    if time.monotonic() > deadline - ANSWER_MARGIN * (deadline - started):
        # Sending takes a moment too: an answer this close to its deadline would arrive after it.
        predictor.metrics.drop_late("answer", len(answers))
        raise DeadlineExceeded("the answer was ready only at the request's deadline; it was dropped", "answer")
    # Plain data serialised once: every value is the service's own, so building and validating models of it (what
    # FastAPI does with a returned model) would only cost time. Its shape is PredictResponse's.
    body = predict_body(request_id=request_id, model=card.name, version=card.version, answers=answers,
                        labels=card.labels, top_k=k,
                        timings={"decode_seconds": decoded - started, "inference_seconds": sum(forwards.values()),
                                 "total_seconds": time.monotonic() - started})
    return Response(body, media_type="application/json", headers={"X-Request-ID": request_id})


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)  # probes that send HEAD (the answer is the same, bodiless)
async def healthz() -> HealthResponse:
    """The process is alive (it may still be loading the model)."""
    return HealthResponse()


@router.get("/readyz", responses=_errors(503))
@router.head("/readyz", include_in_schema=False)
async def readyz(predictor: PredictorDep) -> ReadyResponse:
    """The model is loaded and warmed up, and the service is not draining."""
    predictor.check_ready()
    card = predictor.engine.card
    return ReadyResponse(model=card.name, version=card.version)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                       **_errors(401, 403)})
async def metrics(_: MetricsReaderDep, metrics: MetricsDep) -> Response:
    """Prometheus metrics (names in docs/architecture.md). With keys configured: an admin's or a scraper's key."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", dependencies=_NOT_WHILE_DRAINING, responses=_errors(401, 403, 503))
async def model_card(_: ClientDep, predictor: PredictorDep, settings: SettingsDep) -> ModelResponse:
    """The model card and how this service runs the model."""
    engine = predictor.engine
    card = engine.card
    return ModelResponse(
        name=card.name, version=card.version, architecture=card.architecture, norm=card.norm, p=card.p,
        labels=list(card.labels), input_size=[int(v) for v in card.input_size], mean=list(card.mean),
        std=list(card.std), card_policy=card.policy, policy=str(engine.policy),
        policy_override=settings.allow_policy_override, calibrated=engine.drift_calibration(engine.policy) is not None,
        calibration=card.calibration.to_dict() if card.calibration is not None else None,
        max_batch_size=settings.max_batch_size, batch_key=settings.batch_key, isolation=settings.isolation,
        device=str(engine.device), padding=list(engine.pad_sizes))


@router.get("/v1/stats", dependencies=_NOT_WHILE_DRAINING, responses=_errors(401, 403, 503))
async def stats(scope: StatsScopeDep, predictor: PredictorDep) -> StatsResponse:
    """Totals since start and the drift of the latest batch, per normalization layer. A tenant's key sees its
    own batches and totals only, an admin's key everything; where tenants are named by a header (or share
    batches), only aggregates: the totals, no batch."""
    card = predictor.engine.card
    if scope.view == "tenant":
        assert scope.tenant is not None
        latest, totals = predictor.tenant_latest.get(scope.tenant), predictor.tenant_totals.get(scope.tenant, Totals())
    else:
        latest, totals = (predictor.latest if scope.view == "all" else None), predictor.totals
    return StatsResponse(
        model=card.name, version=card.version, batches=totals.batches, images=totals.images,
        fallback_groups=totals.fallback_groups, queued_images=predictor.queued_images,
        streams=predictor.engine.stream_count(),
        latest=None if latest is None else LatestBatch(
            id=latest.batch_id, group=latest.index, size=latest.outcome.size, policy=latest.policy,
            statistics=latest.outcome.statistics, fallback=latest.outcome.fallback,  # type: ignore[arg-type]
            stream_images=latest.outcome.stream_images, drift_score=latest.outcome.batch_score,
            finished_at=datetime.fromtimestamp(latest.finished_at, tz=timezone.utc),
            layers={name: LayerDrift(**measures) for name, measures in latest.layers.items()}),
    )


@router.post("/v1/streams/reset", dependencies=_NOT_WHILE_DRAINING, responses=_errors(400, 401, 403, 404, 503))
async def reset_streams(_: AdminDep, predictor: PredictorDep, body: StreamReset | None = None
                        ) -> StreamResetResponse:
    """Forget the running statistics of the named streams (every stream when none are named). Admin key only;
    the route does not exist unless an admin key is configured."""
    keys = None if body is None or body.streams is None else list(body.streams)
    return StreamResetResponse(dropped=predictor.reset_streams(keys))
