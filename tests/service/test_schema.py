"""Every operation of the OpenAPI schema, fuzzed by schemathesis against the real server with a fixed seed.

Requests generated from the schema (valid and invalid parameters and bodies) must never get a 5xx, and every
answer must conform to the schema: a documented status code, content type, headers and body. The one 5xx a
client can ask for is a 504 for ``POST /predict?timeout=`` shorter than the work takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import LiveServer, serve

from service.app import _error_response, create_app
from service.schemas import ErrorResponse
from service.settings import Settings

MODEL = "cifar10-resnet20-robustnorm"
SEED = 20261206


def no_server_error(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case) -> bool:
    """No 5xx, except the 504 of a request that asked for a deadline (``?timeout=``) shorter than its work."""
    asked_for_deadline = case.path == "/predict" and "timeout" in (case.query or {})
    if response.status_code >= 500 and not (response.status_code == 504 and asked_for_deadline):
        raise AssertionError(f"{response.status_code} for {case.method} {case.path}: {response.text[:300]}")
    return True


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def settings_under_test() -> Settings:
    return Settings(model=MODEL, device="cpu", allow_policy_override=True)


# The schema as the app describes it (building the app loads nothing: the model loads when it starts).
# schemathesis.pytest.from_fixture would read it from the running server, but does not work with pytest 9.
schema = schemathesis.openapi.from_dict(create_app(settings_under_test(), registry=CollectorRegistry()).openapi())


@pytest.fixture(scope="module")
def api_server() -> Iterator[LiveServer]:
    yield from serve(create_app(settings_under_test(), registry=CollectorRegistry()))


@schema.parametrize()
@seed(SEED)
@settings(max_examples=100, deadline=None, derandomize=False, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented_and_never_5xx(case: schemathesis.Case, api_server: LiveServer
                                                             ) -> None:
    case.call_and_validate(base_url=api_server.url, checks=CHECKS)


def test_error_answers_have_the_documented_shape() -> None:
    """Error bodies are built without pydantic (they are most answers under overload): the documented model still
    reads them back unchanged, with nothing more."""
    answer = _error_response(429, "overloaded", "retry later", {"Retry-After": "1"})
    parsed = ErrorResponse.model_validate_json(answer.body)
    assert parsed.model_dump() == {"error": {"code": "overloaded", "message": "retry later"}}
    assert json.loads(answer.body) == parsed.model_dump(), "no field beyond the model's"
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
