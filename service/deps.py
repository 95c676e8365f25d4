"""FastAPI dependencies and their ``Annotated`` aliases (tests override them via ``app.dependency_overrides``).

Every dependency is a coroutine, though none waits for anything: FastAPI runs a plain ``def`` dependency on its
thread pool, a hand-off to another thread and back for each, several per request.

Who may call what. A key is sent as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``. When a request carries
both, or several of either, they must all be the same key, else 401: no header silently wins over another.
Every key has one role:

- tenant (``api_keys``): ``/predict``, ``/v1/model`` and ``/v1/stats``, where it sees its own batches only;
- admin (``admin_keys``): every route, every tenant's statistics, and ``POST /v1/streams/reset``;
- metrics (``metrics_keys``): ``/metrics`` only, for a scraper.

With tenant keys configured, every route except ``/healthz``, ``/readyz`` and the API docs needs a key, and a
key of the wrong role gets 403. ``/metrics`` needs an admin or metrics key once tenant or metrics keys are
configured (it shows every tenant's traffic). Without tenant keys, ``/predict``, ``/v1/model`` and
``/v1/stats`` are open. A key sent to a service that has keys must be one of them (401). Keys are compared in
constant time: every configured key is compared, as a SHA-256 digest of fixed length.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request

from .cli import REQUEST_STARTED
from .errors import Draining, Forbidden, InvalidRequest, NotFound, NotReady, Unauthorized
from .metrics import Metrics
from .predictor import Predictor
from .settings import Settings

MAX_TENANT_LENGTH = 128
SEND_A_KEY = "send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"

Role = Literal["tenant", "admin", "metrics"]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_predictor(request: Request) -> Predictor:
    predictor = getattr(request.app.state, "predictor", None)
    if predictor is None:
        raise NotReady("the service is starting; retry shortly")
    return predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]


async def refuse_when_draining(request: Request) -> None:
    """503 for a request that arrives once the service is draining. A request whose first byte arrived before
    the drain began was accepted then, and runs (unless the service has stopped)."""
    predictor = getattr(request.app.state, "predictor", None)
    if (predictor is not None and predictor.draining
            and not predictor.arrived_before_drain(request.scope.get(REQUEST_STARTED))):
        raise Draining("the service is shutting down and takes no new requests; retry on another replica")


# -- keys and roles ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the role and name of its key, or no role when it sent none."""

    role: Role | None = None
    name: str | None = None


def sent_key(request: Request) -> str | None:
    """The key a request carries, if any; 401 when it carries different ones."""
    keys = {value.strip() for value in request.headers.getlist("x-api-key") if value.strip()}
    for value in request.headers.getlist("authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            keys.add(credentials.strip())
    if len(keys) > 1:
        raise Unauthorized("the request carries different keys (in X-API-Key and Authorization, or in several "
                           "headers of one kind); send one key")
    return next(iter(keys), None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _name_of(keys: dict[str, str], key: str) -> str | None:
    """The name ``key`` has among ``keys``. Every key is compared, on fixed-length digests, so the time taken
    says nothing about which key or which prefix matched."""
    presented, name = _digest(key), None
    for known, known_name in keys.items():
        if hmac.compare_digest(_digest(known), presented):
            name = known_name
    return name


def caller_of(request: Request, settings: Settings) -> Caller:
    """Who sent ``request``: the role and name of its key (401 for a key that is not valid)."""
    roles: tuple[tuple[Role, dict[str, str]], ...] = (
        ("tenant", settings.api_keys), ("admin", settings.admin_keys), ("metrics", settings.metrics_keys))
    if not any(keys for _, keys in roles):
        return Caller()  # no keys configured: whatever a request sends is not ours to check
    key = sent_key(request)
    if key is None:
        return Caller()
    found = [(role, name) for role, keys in roles if (name := _name_of(keys, key)) is not None]
    if not found:
        raise Unauthorized(f"the key is not valid; {SEND_A_KEY}")
    role, name = found[0]  # settings keep every key in one role
    return Caller(role, name)


async def get_caller(request: Request, settings: SettingsDep) -> Caller:
    return caller_of(request, settings)


CallerDep = Annotated[Caller, Depends(get_caller)]


def check_client(caller: Caller, settings: Settings) -> Caller:
    """For /predict, /v1/model and /v1/stats: a tenant's or an admin's key when tenant keys are configured."""
    if caller.role == "metrics":
        raise Forbidden("a metrics key reads /metrics only; use a tenant's key")
    if caller.role is None and settings.api_keys:
        raise Unauthorized(f"an API key is required; {SEND_A_KEY}")
    return caller


async def require_metrics_reader(caller: CallerDep, settings: SettingsDep) -> Caller:
    """For /metrics: an admin's or a scraper's key once tenant or metrics keys are configured."""
    if caller.role == "tenant":
        raise Forbidden("/metrics shows every tenant's traffic: it needs an admin or a metrics key, not a tenant's")
    if caller.role is None and (settings.api_keys or settings.metrics_keys):
        raise Unauthorized(f"/metrics needs an admin or a metrics key; {SEND_A_KEY}")
    return caller


async def require_admin(caller: CallerDep, settings: SettingsDep) -> str:
    """The admin's name, for admin routes: 404 when no admin key is configured, 401 without a valid key, 403
    for another role's key."""
    if not settings.admin_keys:
        raise NotFound("admin routes are off: set ROBUSTNORM_ADMIN_KEYS to enable them")
    if caller.role == "admin":
        assert caller.name is not None
        return caller.name
    if caller.role is not None:
        raise Forbidden(f"this route needs an admin key; a {caller.role} key may not use it")
    raise Unauthorized(f"an admin key is required; {SEND_A_KEY}")


async def require_client(caller: CallerDep, settings: SettingsDep) -> Caller:
    return check_client(caller, settings)


ClientDep = Annotated[Caller, Depends(require_client)]
MetricsReaderDep = Annotated[Caller, Depends(require_metrics_reader)]
AdminDep = Annotated[str, Depends(require_admin)]


def tenant_of(request: Request, settings: Settings, caller: Caller) -> str | None:
    """The tenant a request's images are batched with.

    A tenant from an API key is the service's own; one from a header is only as trustworthy as the gateway
    that sets it. An admin's requests form a tenant of their own.
    """
    if settings.batch_key == "api_key":
        assert caller.name is not None, "batch_key='api_key' needs API keys, so every request has a key"
        return caller.name if caller.role == "tenant" else f"admin:{caller.name}"
    if settings.batch_key == "header":
        value = request.headers.get(settings.tenant_header, "")
        if len(value) > MAX_TENANT_LENGTH:
            raise InvalidRequest(f"header {settings.tenant_header} is longer than {MAX_TENANT_LENGTH} characters")
        return value
    return None


def client_address(request: Request, settings: Settings) -> str:
    """The address of the client that sent a request: the connecting peer, or, with ``trust_forwarded_for``, the
    last X-Forwarded-For entry (the one the trusted proxy in front appended; earlier ones the client may have
    written itself)."""
    if settings.trust_forwarded_for:
        forwarded = ",".join(request.headers.getlist("x-forwarded-for")).rsplit(",", 1)[-1].strip()
        if forwarded:
            return forwarded[:MAX_TENANT_LENGTH]
    return request.client.host if request.client is not None else "unknown"


def stream_of(request: Request, settings: Settings, tenant: str | None) -> str | None:
    """The stream a request's images join under a stream policy (``None``: the one shared stream): its tenant's
    when tenants are batched apart, else its client's (``stream_key='client'``) or the shared one."""
    if tenant is not None:
        return tenant
    if settings.stream_key == "client":
        return f"client:{client_address(request, settings)}"
    return None


def identify(request: Request, settings: Settings) -> str | None:
    """The tenant of a request that may call /predict (401 or 403 for one that may not): what the dependencies
    of the route find, for code that runs before it (service.door)."""
    return tenant_of(request, settings, check_client(caller_of(request, settings), settings))


async def get_tenant(request: Request, settings: SettingsDep, caller: ClientDep) -> str | None:
    return tenant_of(request, settings, caller)


TenantDep = Annotated[str | None, Depends(get_tenant)]


@dataclass(frozen=True)
class StatsScope:
    """What /v1/stats shows a caller: everything, one tenant's own batches, or aggregates only."""

    view: Literal["all", "tenant", "aggregate"]
    tenant: str | None = None


async def get_stats_scope(caller: ClientDep, settings: SettingsDep) -> StatsScope:
    """An admin sees everything, a tenant of an API key its own batches (when batches are keyed by it), and so
    does an open single-tenant service; anyone else (tenants named by a header, tenants sharing batches) sees
    aggregates only, never a batch that may hold another tenant's images."""
    if caller.role == "admin" or (caller.role is None and settings.batch_key == "none"):
        return StatsScope("all")
    if caller.role == "tenant" and settings.batch_key == "api_key":
        return StatsScope("tenant", caller.name)
    return StatsScope("aggregate")


StatsScopeDep = Annotated[StatsScope, Depends(get_stats_scope)]
