"""Who may call: X-Flowloom-Signature over the whole call, GoFlow's body-only
X-Hub-Signature, what a secret alone protects, and what /health and 503s tell."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from flowloom import BackendUnavailable, FlowService, RequestState
from flowloom.backends import MemoryBackend, RequestRecord
from flowloom.engine import Transition
from flowloom.http import create_app
from flowloom.http.auth import WINDOW, sign_request
from flowloom.names import REQUEST_ID
from http_fixtures import AppClient, Gate, Receiver, register_flows

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SECRET = b"shared"


@pytest.fixture
def fs() -> Iterator[FlowService]:
    gate = Gate()
    gate.opened.set()
    with FlowService(worker_concurrency=2) as service:
        register_flows(service, gate)
        yield service


def client_for(fs: FlowService, **options: object) -> httpx.AsyncClient:
    return AppClient(create_app(fs, **options))  # type: ignore[arg-type]


def signed(
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    headers = dict(headers or {})
    lower = {k.lower(): v for k, v in headers.items()}
    headers["X-Flowloom-Signature"] = sign_request(
        SECRET, method, path, query, lower, body, timestamp
    )
    return headers


# -- X-Flowloom-Signature -------------------------------------------------------------------------
async def test_a_signed_call_runs_and_its_replays_elsewhere_are_refused(fs: FlowService) -> None:
    async with client_for(fs, hmac_secret=SECRET) as client:
        body = b"pay 10"
        headers = signed("POST", "/flow/myflow", "a=1", body)
        ok = await client.post("/flow/myflow?a=1", content=body, headers=headers)
        assert ok.status_code == 200, ok.text
        assert ok.content == b'you said "pay 10"'
        # the captured body and signature, replayed against another flow, query or body
        for path, content in [
            ("/flow/options?a=1", body),
            ("/flow/myflow?a=2", body),
            ("/flow/myflow", body),
            ("/flow/myflow?a=1", b"pay 1000"),
        ]:
            replay = await client.post(path, content=content, headers=headers)
            assert replay.status_code == 401, (path, replay.text)
        # ... or with a callback URL or a request id it did not sign
        for extra in [
            {"X-Callback-Url": "http://127.0.0.1:9/steal"},
            {"X-Request-Id": "chosen-id"},
        ]:
            replay = await client.post(
                "/flow/myflow?a=1", content=body, headers={**headers, **extra}
            )
            assert replay.status_code == 401, extra
        # ... or as another method on the same path
        assert (await client.request("PUT", "/flow/myflow?a=1", headers=headers)).status_code in (
            401,
            405,
        )
    assert len(fs.requests("myflow")) == 1
    assert fs.requests("options") == []


async def test_the_signed_headers_count(fs: FlowService) -> None:
    async with client_for(fs, hmac_secret=SECRET, callback_allow="127.0.0.1") as client:
        with Receiver() as receiver:
            extra = {"X-Callback-Url": receiver.url + "/hook", "X-Request-Id": "signed-1"}
            headers = signed("POST", "/flow/myflow", body=b"b", headers=extra)
            ok = await client.post("/flow/myflow", content=b"b", headers=headers)
            assert ok.status_code == 200, ok.text
            assert ok.headers["x-request-id"] == "signed-1"
            delivery = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
        # a replay within the window of a call with an id is a duplicate
        again = await client.post("/flow/myflow", content=b"b", headers=headers)
        assert again.status_code == 409
    # the callback carries both signatures
    assert delivery.headers["x-flowloom-signature"].startswith("t=")
    stamp = int(delivery.headers["x-flowloom-signature"].split(",")[0][2:])
    assert delivery.path == "/hook"
    assert delivery.headers["x-flowloom-signature"] == sign_request(
        SECRET, "POST", "/hook", "", {}, delivery.body, stamp
    )


@pytest.mark.parametrize("skew", [-WINDOW - 5, WINDOW + 5])
async def test_a_signature_outside_the_window_is_refused(fs: FlowService, skew: int) -> None:
    async with client_for(fs, hmac_secret=SECRET) as client:
        stamp = int(time.time()) + skew
        headers = signed("POST", "/flow/myflow", body=b"x", timestamp=stamp)
        response = await client.post("/flow/myflow", content=b"x", headers=headers)
    assert response.status_code == 401
    assert "300 s" in response.json()["error"]


@pytest.mark.parametrize(
    "value",
    ["", "sha256=abc", "t=now,sha256=abc", "t=1,sha1=abc", "t=" + "9" * 5000 + ",sha256=ab"],
)
async def test_a_malformed_signature_is_400(fs: FlowService, value: str) -> None:
    async with client_for(fs, hmac_secret=SECRET) as client:
        response = await client.post(
            "/flow/myflow", content=b"x", headers={"X-Flowloom-Signature": value}
        )
    assert response.status_code in (400, 401), response.text
    assert response.status_code == (401 if value == "" else 400)
    assert fs.requests("myflow") == []


async def test_a_secret_alone_guards_every_endpoint_but_health(fs: FlowService) -> None:
    request_id = fs.execute("myflow", b"x")
    fs.result("myflow", request_id, timeout=10)
    async with client_for(fs, hmac_secret=SECRET) as client:
        for method, path, query in [
            ("GET", "/flows", ""),
            ("GET", "/flow/myflow/definition", ""),
            ("GET", "/flow/myflow/requests", "limit=5"),
            ("GET", f"/flow/myflow/requests/{request_id}", ""),
            ("GET", f"/flow/myflow/requests/{request_id}/result", ""),
            ("GET", f"/flow/myflow/requests/{request_id}/output", "vertex=test"),
            ("POST", f"/flow/myflow/requests/{request_id}/stop", ""),
            ("GET", "/workers", ""),
            ("GET", "/openapi.json", ""),
        ]:
            url = path + ("?" + query if query else "")
            refused = await client.request(method, url)
            assert refused.status_code == 401, path
            # a signature of another path does not open this one
            other = signed(method, "/flows")
            if path != "/flows":
                assert (await client.request(method, url, headers=other)).status_code == 401
            answered = await client.request(method, url, headers=signed(method, path, query))
            assert answered.status_code in (200, 409), (path, answered.text)
        assert (await client.get("/health")).status_code == 200
        spec = json.loads(
            (await client.get("/openapi.json", headers=signed("GET", "/openapi.json"))).content
        )
    params = spec["paths"]["/flows"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["X-Flowloom-Signature"]
    assert "401" in spec["paths"]["/flows"]["get"]["responses"]


async def test_with_a_token_the_secret_guards_execute_only(fs: FlowService) -> None:
    async with client_for(fs, hmac_secret=SECRET, token="t") as client:
        bearer = {"Authorization": "Bearer t"}
        assert (await client.get("/flows", headers=bearer)).status_code == 200
        unsigned = await client.post("/flow/myflow", content=b"x", headers=bearer)
        assert unsigned.status_code == 401
        headers = {**bearer, **signed("POST", "/flow/myflow", body=b"x")}
        assert (await client.post("/flow/myflow", content=b"x", headers=headers)).status_code == 200


# -- /health and 503s ---------------------------------------------------------------------------
async def test_health_tells_the_backend_only_to_the_token_holder(fs: FlowService) -> None:
    async with client_for(fs, token="t") as client:
        anonymous = await client.get("/health")
        assert anonymous.status_code == 200
        assert anonymous.json() == {"status": "ok"}
        known = await client.get("/health", headers={"Authorization": "Bearer t"})
        assert known.json() == {"status": "ok", "backend": "embedded"}
    async with client_for(fs) as client:  # no token: nothing to hide it from
        assert (await client.get("/health")).json() == {"status": "ok", "backend": "embedded"}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    probe = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "the private Redis did not start"
            time.sleep(0.05)
    probe.close()
    try:
        yield f"redis://:hunter2@127.0.0.1:{port}/0", process
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)


async def test_health_of_a_stopped_redis_is_down_within_a_second(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, process = private_redis
    port = url.rsplit(":", 1)[1].split("/")[0]
    redis.Redis.from_url(url.replace(":hunter2@", "")).config_set("requirepass", "hunter2")
    with FlowService(redis_url=url) as fs:
        async with client_for(fs, token="t") as client:
            assert (await client.get("/health")).status_code == 200
            process.send_signal(signal.SIGSTOP)  # it holds every connection, answers nothing
            try:
                for _ in range(3):
                    started = time.monotonic()
                    down = await client.get("/health", headers={"Authorization": "Bearer t"})
                    assert time.monotonic() - started < 1.5
                    assert down.status_code == 503
                    assert down.json() == {"status": "unavailable", "backend": "redis"}
                    assert port not in down.text
                    anonymous = await client.get("/health")
                    assert anonymous.json() == {"status": "unavailable"}
            finally:
                process.send_signal(signal.SIGCONT)
            started = time.monotonic()
            while (await client.get("/health")).status_code != 200:
                assert time.monotonic() - started < 10
        fs.close()


class FailingBackend(MemoryBackend):
    """A backend that has lost its store: every call raises what the Redis backend
    raises once its bounded wait is over (it names its address)."""

    def state(self, request_id: str) -> RequestState | None:
        raise BackendUnavailable("redis://10.1.2.3:6379/0: Connection refused")

    def submit(self, record: RequestRecord, transition: Transition) -> None:
        raise BackendUnavailable("redis://10.1.2.3:6379/0: Connection refused")


async def test_a_failing_backend_is_a_503_without_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with FlowService(backend=FailingBackend()) as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        async with client_for(fs) as client:
            response = await client.get("/flow/myflow/requests/some-id")
            assert response.status_code == 503, response.text
            assert response.json() == {"error": "the backend is unavailable"}
            assert response.headers["retry-after"] == "1"
            for headers in [{}, {"X-Async": "true"}]:
                executed = await client.post("/flow/myflow", content=b"x", headers=headers)
                assert executed.status_code == 503
                assert "10.1.2.3" not in executed.text
                # the id the request would have: to send it again under it
                assert REQUEST_ID.fullmatch(executed.headers["x-request-id"])
            given = await client.post("/flow/myflow", content=b"x", headers={"X-Request-Id": "r-7"})
            assert (given.status_code, given.headers["x-request-id"]) == (503, "r-7")
            spec = (await client.get("/openapi.json")).json()
            state = spec["paths"]["/flow/{name}/requests/{request_id}"]["get"]
            assert "503" in state["responses"]  # the spec says so
            run = spec["paths"]["/flow/{name}"]["post"]["responses"]["503"]
            assert "X-Request-Id" in run["headers"]
    assert "10.1.2.3" in caplog.text  # the operator's log has the cause
    assert "Traceback" not in caplog.text
