"""``POST /flow/{name}/requests/{id}/retry`` on both backends."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from flowloom import FlowService
from flowloom.http import create_app
from http_fixtures import BACKENDS, make_service

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def up() -> threading.Event:
    return threading.Event()


@pytest.fixture(params=BACKENDS)
def fs(request: pytest.FixtureRequest, up: threading.Event) -> Iterator[FlowService]:
    def flaky(data: bytes, options: Any) -> bytes:
        if not up.is_set():
            raise ConnectionError("down")
        return data + b"|ok"

    with make_service(request.param) as service:
        service.register("flaky", lambda workflow, context: workflow.dag.node("call", flaky))
        yield service


@pytest.fixture
async def client(fs: FlowService) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(fs, wait_timeout=10)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://flowloom") as client:
        yield client


async def test_retry_answers_200_then_409_and_404(
    client: httpx.AsyncClient, up: threading.Event
) -> None:
    failed = await client.post("/flow/flaky", content=b"x", headers={"X-Request-Id": "f1"})
    assert failed.status_code == 424
    up.set()
    retried = await client.post("/flow/flaky/requests/f1/retry")
    assert retried.status_code == 200
    assert retried.json() == {"request_id": "f1", "flow": "flaky", "status": "running"}
    assert retried.headers["x-request-id"] == "f1"
    with anyio.fail_after(10):
        result = await client.get("/flow/flaky/requests/f1/result", headers={"X-Wait": "10"})
    assert result.status_code == 200
    assert result.content == b"x|ok"
    state = (await client.get("/flow/flaky/requests/f1")).json()
    assert state["status"] == "completed"
    assert len(state["retries"]) == 1

    again = await client.post("/flow/flaky/requests/f1/retry")  # completed: nothing to retry
    assert again.status_code == 409
    assert again.json()["status"] == "completed"
    assert "only a failed or stopped request" in again.json()["error"]

    assert (await client.post("/flow/flaky/requests/nope/retry")).status_code == 404
    assert (await client.post("/flow/other/requests/f1/retry")).status_code == 404
    assert (await client.post("/flow/flaky/requests/bad{id}/retry")).status_code == 400


async def test_retry_is_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/flow/{name}/requests/{request_id}/retry"]["post"]
    assert set(operation["responses"]) >= {"200", "404", "409"}
