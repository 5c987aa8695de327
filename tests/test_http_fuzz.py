"""Fuzz the HTTP API with schemathesis against the spec it serves: no input, valid or not,
gets a server error, and every answer matches the spec. Bounded in examples and time."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.applications import Starlette

from flowloom import FlowService, Request
from flowloom.http import create_app
from flowloom.http.addresses import Address
from http_fixtures import Gate, register_flows

TOKEN = "fuzz-token"


async def loopback_resolver(host: str, port: int) -> list[Address]:
    """Every name is 127.0.0.1 here: generated callback URLs reach loopback only."""
    return [ipaddress.ip_address("127.0.0.1")]


@pytest.fixture(scope="module", params=["open", "token", "callbacks"])
def app(request: pytest.FixtureRequest) -> Iterator[Starlette]:
    gate = Gate()
    gate.opened.set()  # "gated" runs straight through here
    with FlowService(worker_concurrency=4) as fs:
        register_flows(fs, gate)
        fs.execute("myflow", Request(b"seed", request_id="order-1001"))  # the spec's example
        callbacks = request.param == "callbacks"
        app = create_app(
            fs,
            token=TOKEN if request.param == "token" else None,
            max_body=4096,
            wait_timeout=0.5,
            callbacks=callbacks,
            callback_allow="127.0.0.1",
        )
        # generated URLs resolve to loopback (and go nowhere else)
        app.state.flowloom.callbacks.resolver = loopback_resolver
        yield app


@pytest.fixture(scope="module")
def api_schema(app: Starlette) -> Any:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app, headers=auth_headers(app))
    # HTTP lets any header through, and the query string of execute is the handlers' own
    loaded.config.generation.update(allow_extra_parameters=False)
    checks = loaded.config.checks
    # 413 is how an over-long body is refused; 424 is a flow whose handler failed
    rejection = checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    acceptance = checks.positive_data_acceptance
    acceptance.expected_statuses = [*acceptance.expected_statuses, "424"]
    return loaded


def auth_headers(app: Starlette) -> dict[str, str]:
    spec = app.state.flowloom
    return {"Authorization": f"Bearer {TOKEN}"} if spec.settings.token else {}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@pytest.mark.timeout(120)
def test_no_server_errors_and_answers_match_the_spec(case: Any, app: Starlette) -> None:
    response = case.call(headers=auth_headers(app))
    assert response.status_code < 500, (case.method, case.path, response.text)
    case.validate_response(response)
