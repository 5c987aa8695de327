"""``GET /metrics`` behind the token, HTTP metrics by route template, callback outcomes,
``X-Trace-Id`` and ``traceparent`` on ``POST /flow/{name}``, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest

from apps import observed_app
from flowloom import FlowService
from flowloom.http import create_app
from http_fixtures import BACKENDS, Receiver, make_service
from otlp_receiver import OtlpReceiver
from test_metrics import Samples, parse, total, value

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


def client_for(fs: FlowService) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(fs))
    return httpx.AsyncClient(transport=transport, base_url="http://flowloom")


@pytest.fixture(params=BACKENDS)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    options = {"enable_monitoring": True, "token": TOKEN, "callback_allow": "127.0.0.1"}
    with make_service(request.param, **options) as fs:
        observed_app.register(fs)
        async with client_for(fs) as http:
            yield http


async def scrape(client: httpx.AsyncClient) -> Samples:
    answer = await client.get("/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return parse(answer.text)


async def scrape_until(client: httpx.AsyncClient, done: Callable[[Samples], bool]) -> Samples:
    samples = await scrape(client)
    with anyio.move_on_after(20):
        while not done(samples):
            await anyio.sleep(0.05)
            samples = await scrape(client)
    return samples


async def test_metrics_need_the_token_and_count_http_calls_by_route(client):
    assert (await client.get("/metrics")).status_code == 401
    for body in (b"x", b"y"):
        answer = await client.post("/flow/diamond", content=body, headers=AUTH)
        assert answer.status_code == 200
    assert (await client.post("/flow/broken", content=b"z", headers=AUTH)).status_code == 424
    rid = (await client.post("/flow/diamond?x=1", content=b"w", headers=AUTH)).headers[
        "x-request-id"
    ]
    assert (await client.get(f"/flow/diamond/requests/{rid}", headers=AUTH)).status_code == 200
    assert (await client.get("/no/such/path", headers=AUTH)).status_code == 404
    assert (await client.get("/flow/nope/requests/r1", headers=AUTH)).status_code == 404
    assert (await client.get("/flow/diamond", headers=AUTH)).status_code == 405

    samples = await scrape_until(client, lambda s: total(s, "flowloom_requests_ended_total") >= 4)
    calls = "flowloom_http_requests_total"
    run = {"route": "/flow/{name}", "method": "POST"}
    assert value(samples, calls, **run, status="200") == 3
    assert value(samples, calls, **run, status="424") == 1
    state = {"route": "/flow/{name}/requests/{request_id}", "method": "GET"}
    assert value(samples, calls, **state, status="200") == 1
    assert value(samples, calls, **state, status="404") == 1
    assert value(samples, calls, route="unmatched", method="GET", status="404") == 1
    assert value(samples, calls, route="/metrics", method="GET", status="401") == 1
    assert value(samples, calls, route="/flow/{name}", method="GET", status="405") == 1
    # every call so far, and the scrapes before this one (a call is counted once answered)
    scrapes = value(samples, calls, route="/metrics", method="GET", status="200")
    assert total(samples, calls) == 9 + scrapes
    assert value(samples, "flowloom_http_request_duration_seconds_count", **run) == 4
    assert value(samples, "flowloom_requests_started_total", flow="diamond") == 3
    assert value(samples, "flowloom_requests_ended_total", flow="broken", status="failed") == 1
    label_values = {v for _, labels in samples for _, v in labels}
    assert rid not in label_values
    assert "/no/such/path" not in label_values


async def test_callback_outcomes_are_counted(client):
    with Receiver(200) as taker, Receiver(410) as refuser:
        for url in (taker.url, refuser.url):
            answer = await client.post(
                "/flow/diamond",
                content=b"cb",
                headers={**AUTH, "X-Callback-Url": url, "X-Async": "true"},
            )
            assert answer.status_code == 202
        samples = await scrape_until(client, lambda s: total(s, "flowloom_callbacks_total") >= 2)
        assert taker.received.qsize() == 1
        assert refuser.received.qsize() == 1
    assert value(samples, "flowloom_callbacks_total", outcome="delivered") == 1
    assert value(samples, "flowloom_callbacks_total", outcome="rejected") == 1
    assert total(samples, "flowloom_callbacks_total") == 2


async def test_trace_id_answer_header_and_caller_traceparent(client):
    answer = await client.post("/flow/diamond", content=b"t", headers=AUTH)
    trace_id = answer.headers["x-trace-id"]
    rid = answer.headers["x-request-id"]
    assert len(trace_id) == 32
    state = (await client.get(f"/flow/diamond/requests/{rid}", headers=AUTH)).json()
    assert state["trace_id"] == trace_id

    child = await client.post(
        "/flow/diamond", content=b"t", headers={**AUTH, "traceparent": TRACEPARENT}
    )
    assert child.headers["x-trace-id"] == CALLER_TRACE
    queued = await client.post(
        "/flow/diamond",
        content=b"t",
        headers={**AUTH, "traceparent": TRACEPARENT, "X-Async": "true"},
    )
    assert queued.status_code == 202
    assert queued.headers["x-trace-id"] == CALLER_TRACE
    failed = await client.post(
        "/flow/broken", content=b"t", headers={**AUTH, "traceparent": "garbage"}
    )
    assert failed.status_code == 424
    assert len(failed.headers["x-trace-id"]) == 32
    assert failed.headers["x-trace-id"] != CALLER_TRACE


async def test_without_monitoring_there_is_no_metrics_endpoint():
    with make_service("embedded") as fs:
        async with client_for(fs) as http:
            assert (await http.get("/metrics")).status_code == 404
            assert "/metrics" not in (await http.get("/openapi.json")).json()["paths"]


async def test_the_http_server_span_parents_the_request():
    receiver = OtlpReceiver().start()
    try:
        with make_service("embedded", otlp_endpoint=receiver.endpoint) as fs:
            observed_app.register(fs)
            async with client_for(fs) as http:
                answer = await http.post(
                    "/flow/diamond", content=b"h", headers={"traceparent": TRACEPARENT}
                )
                assert answer.status_code == 200
        spans = receiver.trace(CALLER_TRACE)
    finally:
        receiver.stop()
    [server] = [s for s in spans if s.name == "POST /flow/diamond"]
    [root] = [s for s in spans if s.name == "flow diamond"]
    assert server.parent_id == "b7ad6b7169203331"
    assert server.kind == 2  # SERVER
    assert root.parent_id == server.span_id
    assert {s.parent_id for s in spans if s.name.startswith("vertex ")} == {root.span_id}
