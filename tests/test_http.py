"""The HTTP API (flowloom.http) through httpx against the ASGI app, and one real server."""

from __future__ import annotations

import gc
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.routing import Route

from flowloom import FlowService, Request, RequestFailed, RequestStopped, Status, Workflow
from flowloom.http import create_app
from flowloom.http.auth import sign_request
from flowloom.http.server import YOUNG_COLLECTION, collecting_for_calls
from http_fixtures import (
    BACKENDS,
    AppClient,
    Gate,
    Receiver,
    free_port,
    make_service,
    register_flows,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture(params=BACKENDS)
def fs(request: pytest.FixtureRequest, gate: Gate) -> Iterator[FlowService]:
    with make_service(request.param) as service:
        register_flows(service, gate)
        yield service
        gate.opened.set()


def client_for(fs: FlowService, **options: object) -> httpx.AsyncClient:
    options.setdefault("callback_allow", "127.0.0.1")  # the test receivers are on loopback
    return AppClient(create_app(fs, **options))  # type: ignore[arg-type]


@pytest.fixture
async def client(fs: FlowService) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(fs, wait_timeout=10) as client:
        yield client


async def wait_for_status(client: httpx.AsyncClient, path: str, status: str) -> dict:
    with anyio.fail_after(10):
        while True:
            body = (await client.get(path)).json()
            if body["status"] == status:
                return body
            await anyio.sleep(0.01)


# -- running a flow -------------------------------------------------------------------------
async def test_curl_myflow_answers_with_the_result(client: httpx.AsyncClient) -> None:
    response = await client.post("/flow/myflow", content=b"hallo")
    assert response.status_code == 200
    assert response.content == b'you said "hallo"'
    assert response.headers["x-request-status"] == "completed"
    assert len(response.headers["x-request-id"]) == 32


async def test_query_reaches_handlers_as_options(client: httpx.AsyncClient) -> None:
    response = await client.post("/flow/options?a=1&a=2&b=&c=%C3%A9", content=b"")
    assert response.status_code == 200
    assert json.loads(response.content) == {"a": ["1", "2"], "b": [""], "c": ["é"]}


async def test_async_mode_answers_202_with_the_id_then_result(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/flow/myflow", content=b"later", headers={"X-Async": "true", "X-Request-Id": "job-1"}
    )
    assert response.status_code == 202
    assert response.headers["x-request-id"] == "job-1"
    assert response.headers["location"] == "/flow/myflow/requests/job-1"
    assert response.json()["request_id"] == "job-1"
    result = await client.get("/flow/myflow/requests/job-1/result", headers={"X-Wait": "5"})
    assert result.status_code == 200
    assert result.content == b'you said "later"'


async def test_sync_wait_times_out_into_202(client: httpx.AsyncClient, gate: Gate) -> None:
    started = time.monotonic()
    response = await client.post("/flow/gated", content=b"x", headers={"X-Wait": "0.3"})
    assert 0.25 < time.monotonic() - started < 5
    assert response.status_code == 202
    request_id = response.headers["x-request-id"]
    assert response.json()["status"] in ("queued", "running")
    not_yet = await client.get(f"/flow/gated/requests/{request_id}/result")
    assert not_yet.status_code == 202
    gate.opened.set()
    done = await client.get(f"/flow/gated/requests/{request_id}/result", headers={"X-Wait": "10"})
    assert done.status_code == 200
    assert done.content == b"x|gate|after"


async def test_duplicate_request_id_is_409(client: httpx.AsyncClient) -> None:
    first = await client.post("/flow/myflow", headers={"X-Request-Id": "same"})
    assert first.status_code == 200
    again = await client.post("/flow/myflow", headers={"X-Request-Id": "same"})
    assert again.status_code == 409
    assert "exists" in again.json()["error"]


async def test_handler_error_is_the_requests_failure_not_a_500(
    client: httpx.AsyncClient, fs: FlowService
) -> None:
    response = await client.post("/flow/boom", content=b"bad")
    assert response.status_code == 424
    body = response.json()
    assert body["status"] == "failed"
    assert body["error"]["vertex"] == "explode"
    assert body["error"]["type"] == "ValueError"
    assert "boom: bad" in body["error"]["message"]
    state = await client.get(f"/flow/boom/requests/{body['request_id']}")
    assert state.json()["status"] == "failed"
    assert state.json()["error"] == body["error"]


# -- watching and controlling ---------------------------------------------------------------
async def test_pause_resume_stop(client: httpx.AsyncClient, gate: Gate) -> None:
    await client.post("/flow/gated", headers={"X-Async": "true", "X-Request-Id": "p1"})
    await anyio.to_thread.run_sync(gate.entered.acquire, True, 10)
    paused = await client.post("/flow/gated/requests/p1/pause")
    assert paused.status_code == 200
    assert paused.json() == {"request_id": "p1", "flow": "gated", "status": "paused"}
    assert paused.headers["x-request-status"] == "paused"
    gate.opened.set()
    with anyio.fail_after(10):  # the running task finishes; nothing after it starts
        while (state := (await client.get("/flow/gated/requests/p1")).json())["vertices"]["wait"][
            "status"
        ] != "completed":
            await anyio.sleep(0.01)
    await anyio.sleep(0.2)
    state = (await client.get("/flow/gated/requests/p1")).json()
    assert state["status"] == "paused"
    assert state["vertices"].get("after", {"status": "queued"})["status"] == "queued"
    resumed = await client.post("/flow/gated/requests/p1/resume")
    assert resumed.json()["status"] == "running"
    result = await client.get("/flow/gated/requests/p1/result", headers={"X-Wait": "10"})
    assert result.content == b"|gate|after"

    gate.opened.clear()
    await client.post("/flow/gated", headers={"X-Async": "true", "X-Request-Id": "s1"})
    stopped = await client.post("/flow/gated/requests/s1/stop")
    assert stopped.json()["status"] == "stopped"
    result = await client.get("/flow/gated/requests/s1/result")
    assert result.status_code == 409
    assert result.json()["status"] == "stopped"
    again = await client.post("/flow/gated/requests/s1/resume")
    assert again.status_code == 409
    assert again.json()["status"] == "stopped"


async def test_request_list_is_paged_and_filtered(client: httpx.AsyncClient) -> None:
    for i in range(5):
        await client.post("/flow/myflow", headers={"X-Request-Id": f"r{i}"})
    await client.post("/flow/boom", headers={"X-Request-Id": "bad"})
    page = (await client.get("/flow/myflow/requests", params={"limit": 2})).json()
    assert [r["request_id"] for r in page["requests"]] == ["r4", "r3"]
    assert page["next_offset"] == 2
    page = (await client.get("/flow/myflow/requests", params={"limit": 2, "offset": 4})).json()
    assert [r["request_id"] for r in page["requests"]] == ["r0"]
    assert page["next_offset"] is None
    failed = (await client.get("/flow/boom/requests", params={"status": "failed"})).json()
    assert [r["request_id"] for r in failed["requests"]] == ["bad"]
    completed = (await client.get("/flow/boom/requests", params={"status": "completed"})).json()
    assert completed["requests"] == []


async def test_flows_definition_workers_health(client: httpx.AsyncClient, fs: FlowService) -> None:
    assert (await client.get("/flows")).json() == {"flows": ["boom", "gated", "myflow", "options"]}
    definition = await client.get("/flow/gated/definition")
    assert definition.json() == json.loads(json.dumps(fs.definition("gated")))
    await client.post("/flow/myflow")
    workers = (await client.get("/workers")).json()["workers"]
    assert len(workers) >= 1
    assert all("name" in w for w in workers)
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_http_and_flowservice_give_the_same_answers(backend: str, gate: Gate) -> None:
    with make_service(backend) as fs:
        register_flows(fs, gate)
        async with client_for(fs) as client:
            # done over HTTP, read through FlowService
            ok = await client.post("/flow/myflow", content=b"one")
            rid = ok.headers["x-request-id"]
            assert fs.result("myflow", rid, timeout=5) == ok.content
            state = (await client.get(f"/flow/myflow/requests/{rid}")).json()
            assert state == fs.state("myflow", rid).to_json()
            # done through FlowService, read over HTTP
            rid = await anyio.to_thread.run_sync(fs.execute, "boom", Request(body=b"two"))
            with pytest.raises(RequestFailed) as failed:
                await anyio.to_thread.run_sync(lambda: fs.result("boom", rid, 5))
            answer = await client.get(f"/flow/boom/requests/{rid}/result")
            assert answer.status_code == 424
            assert answer.json()["error"] == failed.value.error.to_json()  # type: ignore[union-attr]
            assert (await client.get(f"/flow/boom/requests/{rid}")).json() == fs.state(
                "boom", rid
            ).to_json()
            # control: each side sees what the other did
            rid = await anyio.to_thread.run_sync(fs.execute, "gated", b"three")
            paused = await client.post(f"/flow/gated/requests/{rid}/pause")
            assert paused.json()["status"] == fs.state("gated", rid).status.value == "paused"
            assert fs.resume("gated", rid) is Status.RUNNING
            assert (await client.get(f"/flow/gated/requests/{rid}")).json()["status"] in (
                "running",
                "queued",
            )
            stopped = await client.post(f"/flow/gated/requests/{rid}/stop")
            assert stopped.json()["status"] == "stopped"
            with pytest.raises(RequestStopped):
                fs.result("gated", rid, timeout=5)
            gate.opened.set()
            listed = (await client.get("/flow/myflow/requests")).json()["requests"]
            from_service = [s.to_json() for s in fs.requests("myflow")]
            assert listed == [{k: v for k, v in s.items() if k != "vertices"} for s in from_service]


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/flow/nosuchflow"),
        ("GET", "/flow/nosuchflow/definition"),
        ("GET", "/flow/nosuchflow/requests"),
        ("GET", "/flow/myflow/requests/nosuchrequest"),
        ("GET", "/flow/nosuchflow/requests/nosuchrequest/result"),
        ("POST", "/flow/myflow/requests/nosuchrequest/pause"),
        ("POST", "/flow/myflow/requests/nosuchrequest/resume"),
        ("POST", "/flow/myflow/requests/nosuchrequest/stop"),
        ("GET", "/no/such/path"),
    ],
)
async def test_unknown_flow_or_request_is_404(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert response.json()["error"]


async def test_a_request_of_another_flow_is_404(client: httpx.AsyncClient) -> None:
    rid = (await client.post("/flow/myflow")).headers["x-request-id"]
    assert (await client.get(f"/flow/boom/requests/{rid}")).status_code == 404
    assert (await client.post(f"/flow/boom/requests/{rid}/stop")).status_code == 404


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/flow/.hidden", {}),
        ("/flow/a%20b", {}),
        ("/flow/" + "x" * 129, {}),
        ("/flow/myflow", {"X-Request-Id": "has space"}),
        ("/flow/myflow", {"X-Request-Id": "a/b"}),
        ("/flow/myflow", {"X-Request-Id": "x" * 129}),
        ("/flow/myflow", {"X-Async": "maybe"}),
        ("/flow/myflow", {"X-Wait": "soon"}),
        ("/flow/myflow", {"X-Wait": "-1"}),
        ("/flow/myflow", {"X-Wait": "nan"}),
        ("/flow/myflow", {"X-Wait": "100000"}),
        ("/flow/myflow", {"X-Callback-Url": "ftp://example.com/x"}),
        ("/flow/myflow", {"X-Callback-Url": "not a url"}),
        ("/flow/myflow", {"X-Callback-Url": "http://127.0.0.1:99999/"}),
        ("/flow/myflow?bad=%ff", {}),
    ],
)
async def test_malformed_input_is_400(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    response = await client.post(path, content=b"x", headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/flow/myflow/requests/bad%20id",
        "/flow/myflow/requests/-leading",
        "/flow/myflow/requests?limit=0",
        "/flow/myflow/requests?limit=1001",
        "/flow/myflow/requests?limit=ten",
        "/flow/myflow/requests?offset=-1",
        "/flow/myflow/requests?status=done",
        "/flow/myflow/requests?sort=asc",
        "/flow/.x/definition",
    ],
)
async def test_malformed_path_or_query_is_400(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 400, response.text


async def test_too_many_query_fields_is_400(client: httpx.AsyncClient) -> None:
    query = "&".join(f"k{i}=v" for i in range(1001))
    assert (await client.post(f"/flow/options?{query}")).status_code == 400


async def test_body_over_the_limit_is_413(fs: FlowService) -> None:
    async with client_for(fs, max_body=16) as client:
        assert (await client.post("/flow/myflow", content=b"x" * 16)).status_code == 200
        assert (await client.post("/flow/myflow", content=b"x" * 17)).status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(4):
                yield b"x" * 8

        assert (await client.post("/flow/myflow", content=chunks())).status_code == 413
    assert fs.requests("myflow")
    assert len(fs.requests("myflow")) == 1


# -- security ---------------------------------------------------------------------------------
async def test_bearer_token_protects_every_endpoint_but_health(fs: FlowService) -> None:
    async with client_for(fs, token="s3cret") as client:
        for method, path in [
            ("POST", "/flow/myflow"),
            ("GET", "/flows"),
            ("GET", "/flow/myflow/definition"),
            ("GET", "/flow/myflow/requests"),
            ("GET", "/workers"),
            ("GET", "/openapi.json"),
            ("GET", "/no/such/path"),
        ]:
            refused = await client.request(method, path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = await client.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        good = {"Authorization": "Bearer s3cret"}
        ran = await client.post("/flow/myflow", content=b"hi", headers=good)
        assert ran.content == b'you said "hi"'
        assert (await client.get("/flows", headers=good)).status_code == 200
        assert (await client.get("/health")).status_code == 200
        spec = (await client.get("/openapi.json", headers=good)).json()
        assert spec["security"] == [{"bearer": []}]
    assert all(
        "authorization" not in (fs.backend.record(s.request_id).headers) for s in fs.requests()
    )  # type: ignore[union-attr]


async def test_token_from_the_environment_and_the_service(
    fs: FlowService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWLOOM_TOKEN", "from-env")
    async with client_for(fs) as client:
        assert (await client.get("/flows")).status_code == 401
        ok = await client.get("/flows", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
    monkeypatch.delenv("FLOWLOOM_TOKEN")
    fs.token = "from-service"
    async with client_for(fs) as client:
        assert (await client.get("/flows")).status_code == 401
        ok = await client.get("/flows", headers={"Authorization": "bearer from-service"})
        assert ok.status_code == 200


def sign(body: bytes, secret: bytes, algorithm: str) -> str:
    return f"{algorithm}=" + hmac.new(secret, body, algorithm).hexdigest()


async def test_hmac_signature_checks_the_body(fs: FlowService) -> None:
    async with client_for(fs, hmac_secret="shared") as client:
        body = b"hallo"
        signed = {"X-Hub-Signature": sign(body, b"shared", "sha1")}
        ok = await client.post("/flow/myflow", content=body, headers=signed)
        assert ok.status_code == 200, ok.text
        github = {"X-Hub-Signature-256": sign(body, b"shared", "sha256")}
        assert (await client.post("/flow/myflow", content=body, headers=github)).status_code == 200
        # each header with its own algorithm only
        mismatched = {"X-Hub-Signature-256": sign(body, b"shared", "sha1")}
        response = await client.post("/flow/myflow", content=body, headers=mismatched)
        assert response.status_code == 400
        mismatched = {"X-Hub-Signature": sign(body, b"shared", "sha256")}
        response = await client.post("/flow/myflow", content=body, headers=mismatched)
        assert response.status_code == 400
        missing = await client.post("/flow/myflow", content=body)
        assert missing.status_code == 401
        wrong_secret = {"X-Hub-Signature": sign(body, b"other", "sha1")}
        response = await client.post("/flow/myflow", content=body, headers=wrong_secret)
        assert response.status_code == 401
        other_body = {"X-Hub-Signature": sign(b"hallo!", b"shared", "sha1")}
        response = await client.post("/flow/myflow", content=body, headers=other_body)
        assert response.status_code == 401
        malformed = {"X-Hub-Signature": "md5=abc"}
        assert (
            await client.post("/flow/myflow", content=body, headers=malformed)
        ).status_code == 400
        # with no token set, the secret guards the other endpoints too (but /health)
        assert (await client.get("/flows")).status_code == 401
        assert (await client.get("/health")).status_code == 200
        flows = {"X-Flowloom-Signature": sign_request(b"shared", "GET", "/flows")}
        assert (await client.get("/flows", headers=flows)).status_code == 200
    assert len(fs.requests("myflow")) == 2


# -- callbacks --------------------------------------------------------------------------------
async def test_callback_gets_the_final_answer(client: httpx.AsyncClient, gate: Gate) -> None:
    with Receiver() as receiver:
        response = await client.post(
            "/flow/gated",
            content=b"cb",
            headers={"X-Async": "true", "X-Callback-Url": receiver.url + "/done?x=1"},
        )
        assert response.status_code == 202
        request_id = response.headers["x-request-id"]
        gate.opened.set()
        delivery = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
        assert delivery.path == "/done?x=1"
        assert delivery.body == b"cb|gate|after"
        assert delivery.headers["x-request-id"] == request_id
        assert delivery.headers["x-request-status"] == "completed"
        assert delivery.headers["x-flow"] == "gated"

        failed = await client.post(
            "/flow/boom", content=b"cb", headers={"X-Callback-Url": receiver.url}
        )
        assert failed.status_code == 424
        delivery = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
        assert delivery.headers["x-request-status"] == "failed"
        assert json.loads(delivery.body)["error"]["type"] == "ValueError"


async def test_callback_is_signed_and_retried(fs: FlowService) -> None:
    with Receiver(answer=503) as receiver:
        async with client_for(fs, hmac_secret="k") as client:
            body = b"signed"
            await client.post(
                "/flow/myflow",
                content=body,
                headers={
                    "X-Hub-Signature": sign(body, b"k", "sha1"),
                    "X-Callback-Url": receiver.url,
                },
            )
            first = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
            second = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
    assert first.body == second.body == b'you said "signed"'
    assert first.headers["x-hub-signature-256"] == sign(first.body, b"k", "sha256")


# -- concurrency -------------------------------------------------------------------------------
async def test_many_waiting_posts_do_not_starve_the_server(
    client: httpx.AsyncClient, gate: Gate
) -> None:
    answers: list[httpx.Response] = []

    async def post(i: int) -> None:
        answers.append(await client.post("/flow/gated", content=b"%d" % i))

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(post, i)
        await anyio.sleep(0.5)  # all 200 are waiting for the gate now
        for _ in range(5):
            started = time.monotonic()
            assert (await client.get("/flows")).status_code == 200
            queued = await client.post("/flow/myflow", headers={"X-Async": "true"})
            assert queued.status_code == 202  # the workers are all held by the gate
            assert (await client.get(queued.headers["location"])).status_code == 200
            assert time.monotonic() - started < 1.0
        gate.opened.set()
    assert len(answers) == 200
    assert all(a.status_code == 200 for a in answers)
    assert sorted(a.content for a in answers) == sorted(b"%d|gate|after" % i for i in range(200))


# -- the spec -----------------------------------------------------------------------------------
async def test_openapi_spec_matches_the_routes(fs: FlowService) -> None:
    app = create_app(fs)
    routes = {
        (method.lower(), route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    async with client_for(fs) as client:
        spec = (await client.get("/openapi.json")).json()
    described = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert described == routes
    assert "security" not in spec


def test_serving_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    before = gc.get_threshold()
    with collecting_for_calls():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_COLLECTION, *before[1:])
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


# -- a real server ------------------------------------------------------------------------------
SERVER = textwrap.dedent(
    """
    import sys
    from flowloom import FlowService
    from flowloom.http import serve

    def gate(data, options):
        import time
        time.sleep(30)
        return data

    fs = FlowService(port=int(sys.argv[1]))
    fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: b'you said "%s"' % d))
    fs.register("slow", lambda wf, ctx: wf.dag.node("sleep", gate))
    fs._ensure_worker()
    try:
        serve(fs, host="127.0.0.1", port=fs.port, access_log=False, log_level="warning")
    finally:
        fs.backend.close()
    print("served", flush=True)
    """
)


def wait_until_up(base: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("server did not start")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_real_server_serves_and_returns_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FLOWLOOM_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_until_up(base, process)
        response = httpx.post(base + "/flow/myflow", content=b"hallo", timeout=10)
        assert response.status_code == 200
        assert response.text == 'you said "hallo"'
        # a sync call waiting for a slow flow answers 202 at once when the server stops
        with httpx.Client(base_url=base, timeout=20) as client:
            import threading

            answers: list[httpx.Response] = []
            waiting = threading.Thread(
                target=lambda: answers.append(client.post("/flow/slow", content=b"z"))
            )
            waiting.start()
            time.sleep(0.5)
            started = time.monotonic()
            process.send_signal(sig)
            waiting.join(15)
        assert answers
        assert answers[0].status_code == 202
        assert time.monotonic() - started < 5
        out, err = process.communicate(timeout=20)
        assert process.returncode == 0, err
        assert "served" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- the curl examples of docs/http.md --------------------------------------------------------
DOCS = Path(__file__).parent.parent / "docs" / "http.md"
DOC_SERVERS = {  # the port a docs example uses -> the app and environment it serves
    "8080": ("examples/myflow.py", {}),
    "8081": ("examples/checkout.py", {}),
    "8082": ("examples/myflow.py", {"FLOWLOOM_TOKEN": "s3cret", "FLOWLOOM_HMAC_SECRET": "shared"}),
}
VOLATILE = ("/pause", "/resume", "/stop", "order-7/result")  # timing-dependent answers


def console_blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each ```console block as (command, expected output lines) pairs."""
    blocks = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
        blocks.append(steps)
    return blocks


def same_output(expected: list[str], actual: list[str]) -> bool:
    varying = ("date:", "x-trace-id:")  # they differ from run to run
    expected = [e for e in expected if not e.startswith(varying)]
    actual = [a for a in actual if not a.startswith(varying)]
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual, strict=True):
        if want.startswith("{"):
            if set(json.loads(want)) != set(json.loads(got)):
                return False
        elif want != got:
            return False
    return True


@pytest.fixture(scope="module")
def doc_servers() -> Iterator[dict[str, str]]:
    ports: dict[str, str] = {}
    processes = []
    try:
        for doc_port, (app, extra) in DOC_SERVERS.items():
            port = str(free_port())
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLOOM_")}
            process = subprocess.Popen(
                ["flowloom", "serve", app, "--port", port],
                cwd=DOCS.parent.parent,
                env={**env, **extra},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            processes.append(process)
            wait_until_up(f"http://127.0.0.1:{port}", process)
            ports[doc_port] = port
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_docs_curl_examples_work(doc_servers: dict[str, str]) -> None:
    blocks = console_blocks(DOCS.read_text())
    assert sum(len(b) for b in blocks) > 15
    separator = "@@@ next command @@@"
    for steps in blocks:
        steps = [(c, out) for c, out in steps if "flowloom serve" not in c]
        if not steps:
            continue
        script = ""
        for command, _ in steps:
            for doc_port, port in doc_servers.items():
                command = command.replace(f"localhost:{doc_port}", f"127.0.0.1:{port}")
            script += f"{command}\necho; echo '{separator}'\n"
        run = subprocess.run(
            ["bash", "-e", "-c", script], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, (script, run.stderr)
        outputs = run.stdout.split(separator + "\n")
        for (command, expected), output in zip(steps, outputs, strict=False):
            actual = output.replace("\r\n", "\n").rstrip("\n").split("\n")
            actual = [] if actual == [""] else actual
            if any(v in command for v in VOLATILE):
                continue
            assert same_output(expected, actual), (command, expected, actual)


async def test_output_of_one_vertex_instance(fs: FlowService) -> None:
    def define(workflow: object, context: object) -> None:
        assert isinstance(workflow, Workflow)
        each = workflow.dag.foreach_branch(
            "each",
            lambda data: {"a/b": b"1", "c": b"2"},
            aggregator=lambda r: b"+".join(sorted(r.values())),
        )
        each.node("double", lambda data, options: data * 2)

    fs.register("outputs", define)
    async with client_for(fs) as http:
        answer = await http.post("/flow/outputs", content=b"")
        assert answer.status_code == 200
        request_id = answer.headers["x-request-id"]
        base = f"/flow/outputs/requests/{request_id}/output"
        got = await http.get(base, params={"vertex": "each[a%2Fb]/double"})
        assert (got.status_code, got.content) == (200, b"11")
        got = await http.get(base, params={"vertex": "each"})
        assert (got.status_code, got.content) == (200, b"11+22")
        assert (await http.get(base, params={"vertex": "each[zz]/double"})).status_code == 404
        assert (await http.get(base)).status_code == 400
        assert (await http.get(base, params={"vertex": "each", "x": "1"})).status_code == 400
        missing = "/flow/outputs/requests/nope/output"
        assert (await http.get(missing, params={"vertex": "each"})).status_code == 404
