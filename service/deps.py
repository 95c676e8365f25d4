"""FastAPI dependencies and their ``Annotated`` aliases (tests override them via ``app.dependency_overrides``)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .errors import Forbidden, InvalidRequest, NotFound, NotReady, Unauthorized
from .metrics import Metrics
from .predictor import Predictor
from .settings import Settings

MAX_TENANT_LENGTH = 128


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_predictor(request: Request) -> Predictor:
    predictor = getattr(request.app.state, "predictor", None)
    if predictor is None:
        raise NotReady("the service is starting; retry shortly")
    return predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]


def _api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _matches(keys: dict[str, str], key: str | None) -> list[str]:
    """Names of the configured keys equal to ``key``; every key is compared in constant time, so the time
    taken does not say which prefix matched."""
    matches = [name for known, name in keys.items()
               if hmac.compare_digest(known.encode(), (key or "").encode())]
    return matches if key else []


def require_admin(request: Request, settings: SettingsDep) -> str:
    """The admin's name, for admin routes: 404 when no admin key is configured, 401 without a valid key, 403
    for a tenant's key."""
    if not settings.admin_keys:
        raise NotFound("admin routes are off: set ROBUSTNORM_ADMIN_KEYS to enable them")
    key = _api_key(request)
    admins = _matches(settings.admin_keys, key)
    if admins:
        return admins[0]
    if _matches(settings.api_keys, key):
        raise Forbidden("this route needs an admin key; a tenant's key may not use it")
    raise Unauthorized("an admin key is required: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'")


AdminDep = Annotated[str, Depends(require_admin)]


def get_tenant(request: Request, settings: SettingsDep) -> str | None:
    """The tenant a request's images are batched with, after checking its API key when keys are configured.

    A tenant from an API key is the service's own; one from a header is only as trustworthy as the gateway
    that sets it.
    """
    tenant: str | None = None
    if settings.api_keys:
        matches = _matches(settings.api_keys, _api_key(request))
        if not matches:
            raise Unauthorized("a valid API key is required: send it as 'X-API-Key: KEY' or "
                               "'Authorization: Bearer KEY'")
        tenant = matches[0]
    if settings.batch_key == "api_key":
        return tenant
    if settings.batch_key == "header":
        value = request.headers.get(settings.tenant_header, "")
        if len(value) > MAX_TENANT_LENGTH:
            raise InvalidRequest(f"header {settings.tenant_header} is longer than {MAX_TENANT_LENGTH} characters")
        return value
    return None


TenantDep = Annotated[str | None, Depends(get_tenant)]
