"""What bounds the server: the embedded backend's byte and queue caps, connection
limits and the header timeout, no 500 from any input, one short line for a client that
goes away, and the request id in the access log."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import anyio
import httpx
import pytest

from flowloom import FlowService, Overloaded
from flowloom.backends import MemoryBackend
from flowloom.http import create_app
from flowloom.http.inputs import BODY_RECEIVED
from http_fixtures import AppClient, Gate, ServerProcess, register_flows

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def client_for(fs: FlowService, **options: object) -> httpx.AsyncClient:
    return AppClient(create_app(fs, **options), timeout=60)  # type: ignore[arg-type]


# -- memory --------------------------------------------------------------------------------------
def recount(backend: MemoryBackend) -> int:
    """The bytes the backend holds, counted again from what it keeps."""
    with backend._lock:
        done = sum(len(blob) for _, _, blob in backend._done.values())
        live = sum(
            len(r.record.body) + sum(len(v.output or b"") for v in r.run.vertices.values())
            for r in backend._requests.values()
            if r.run is not None
        )
    return done + live


@pytest.mark.anyio
async def test_the_byte_cap_holds_while_50_requests_of_5_mib_run() -> None:
    """16 callers send 50 requests of 5 MiB (each keeps about 10 MiB: its body and its
    output) against a cap of 48 MiB: what does not fit is refused with 429 and sent
    again; every request runs, every caller gets its result, and the bytes kept never
    pass the cap."""
    cap = 48 * MiB
    with FlowService(worker_concurrency=4, max_bytes=cap) as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("echo", lambda d, o: d + b"!"))
        backend = fs.backend
        assert isinstance(backend, MemoryBackend)
        peak = 0
        sampling = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not sampling.is_set():
                peak = max(peak, backend.bytes_held())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        results: dict[int, bytes] = {}
        refused = 0
        try:
            async with client_for(fs, max_body=6 * MiB) as client:

                async def send(i: int) -> None:
                    nonlocal refused
                    body = b"%02d" % i + b"x" * (5 * MiB - 2)
                    while True:
                        response = await client.post("/flow/echo", content=body)
                        if response.status_code != 429:
                            break
                        refused += 1
                        await anyio.sleep(0.05)
                    assert response.status_code == 200, response.text
                    results[i] = response.content

                async def caller(first: int) -> None:
                    for i in range(first, 50, 16):
                        await send(i)

                async with anyio.create_task_group() as tg:
                    for first in range(16):
                        tg.start_soon(caller, first)
        finally:
            sampling.set()
            sampler.join()
        assert sorted(results) == list(range(50))
        assert all(r == b"%02d" % i + b"x" * (5 * MiB - 2) + b"!" for i, r in results.items())
        assert refused > 0  # the cap was reached, and held
        assert peak <= cap
        kept = fs.requests("echo", limit=100)
        assert 0 < len(kept) < 50  # finished requests past the cap were dropped, oldest first
        assert backend.bytes_held() == recount(backend)
        assert backend.bytes_held() >= len(kept) * 10 * MiB  # each kept request is counted


def test_the_byte_cap_refuses_a_body_that_cannot_fit(gate: Gate) -> None:
    with FlowService(worker_concurrency=1, max_bytes=16 * MiB) as fs:
        register_flows(fs, gate)
        first = fs.execute("gated", b"a" * (6 * MiB))  # holds the only worker
        # 6 MiB of body and 6 more set aside for its output: no room for another
        with pytest.raises(Overloaded, match="max_bytes"):
            fs.execute("gated", b"b" * (6 * MiB))
        assert [s.request_id for s in fs.requests("gated")] == [first]
        gate.opened.set()
        assert fs.result("gated", first, timeout=10).startswith(b"aaa")  # kept to be read
        deadline = time.monotonic() + 10
        while True:  # room again once the finished one may be dropped
            try:
                fs.execute("gated", b"c" * (6 * MiB))
                break
            except Overloaded:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert fs.backend.bytes_held() <= 16 * MiB  # type: ignore[attr-defined]
        with pytest.raises(Overloaded, match="max_bytes"):
            fs.execute("gated", b"d" * (9 * MiB))  # body and output could never fit


@pytest.mark.anyio
async def test_the_queue_cap_answers_429(gate: Gate) -> None:
    with FlowService(worker_concurrency=1, max_queued=3) as fs:
        register_flows(fs, gate)
        async with client_for(fs) as client:
            for _ in range(3):
                accepted = await client.post("/flow/gated", headers={"X-Async": "true"})
                assert accepted.status_code == 202
            for headers in [{"X-Async": "true"}, {}]:
                refused = await client.post("/flow/gated", headers=headers)
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                assert "max_queued" in refused.json()["error"]
            with pytest.raises(Overloaded):
                fs.execute("gated", b"")
            assert len(fs.requests("gated")) == 3
            gate.opened.set()
            ran = await client.post("/flow/myflow", content=b"later")
            for _ in range(100):
                if ran.status_code == 200:
                    break
                await anyio.sleep(0.05)
                ran = await client.post("/flow/myflow", content=b"later")
            assert ran.content == b'you said "later"'


# -- no 500 --------------------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [
        "offset=" + "9" * 5000,
        "limit=" + "1" * 4301,
        "offset=" + "0" * 5000 + "1",
        "limit=1e3",
        "offset=%EF%BC%91",  # a full-width digit
        "limit=" + "9" * 21,
    ],
)
async def test_huge_numbers_are_400(query: str) -> None:
    with FlowService() as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        async with client_for(fs) as client:
            response = await client.get(f"/flow/myflow/requests?{query}")
    assert response.status_code == 400, response.text


def post_scope(size: int) -> dict[str, Any]:
    """The ASGI scope of a ``POST /flow/myflow`` of a body of ``size`` bytes."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/flow/myflow",
        "raw_path": b"/flow/myflow",
        "query_string": b"",
        "headers": [(b"content-length", b"%d" % size)],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }


@pytest.mark.anyio
async def test_a_client_that_disconnects_during_upload_is_one_short_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with FlowService() as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        app = create_app(fs)
        messages = [
            {"type": "http.request", "body": b"part", "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = post_scope(1000)
        await app(scope, receive, send)  # raises nothing
        assert fs.requests("myflow") == []
    assert sent[0]["status"] == 400
    lines = [r for r in caplog.records if r.name.startswith(("flowloom", "uvicorn"))]
    assert len(lines) == 1
    assert lines[0].exc_info is None
    assert lines[0].getMessage() == "POST /flow/myflow: client disconnected during upload"


async def _post_in_parts(
    parts: list[tuple[float, bytes]], body_timeout: float, marked: bool = False
) -> tuple[int, bytes]:
    """POST /flow/myflow straight to the app, each part of the body sent after its pause
    (``marked``: as flowloom's server marks a body that came whole with the head)."""
    with FlowService() as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        app = create_app(fs, body_timeout=body_timeout)
        pending = list(parts)
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            if not pending:
                await anyio.sleep(60)  # nothing more: the client went quiet
            pause, chunk = pending.pop(0)
            await anyio.sleep(pause)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        size = sum(len(chunk) for _, chunk in parts)
        scope = post_scope(size)
        if marked:
            scope[BODY_RECEIVED] = True
        await app(scope, receive, send)
    status = sent[0]["status"]
    body = sent[1]["body"]
    assert isinstance(status, int)
    assert isinstance(body, bytes)
    return status, body


@pytest.mark.anyio
async def test_each_part_of_a_body_starts_the_deadline_again() -> None:
    parts = [(0.0, b"ab"), (0.3, b"cd"), (0.3, b"ef"), (0.3, b"g")]
    assert await _post_in_parts(parts, body_timeout=0.5) == (200, b"abcdefg")
    status, body = await _post_in_parts([(0.0, b"ab"), (0.3, b"cd"), (0.8, b"e")], 0.5)
    assert status == 408, body
    assert b"no byte for 0.5 s" in body


@pytest.mark.anyio
async def test_a_body_marked_whole_is_read_without_a_deadline() -> None:
    """The server marks a body that arrived with the head: reading it cannot wait, so
    it gets no deadline (the pause here stands for a receive that is slow to return)."""
    assert await _post_in_parts([(0.3, b"hallo")], 0.1, marked=True) == (200, b"hallo")
    assert (await _post_in_parts([(0.3, b"hallo")], 0.1))[0] == 408


# -- connections ---------------------------------------------------------------------------------
@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_slow_header_client_is_disconnected(http: str) -> None:
    with ServerProcess(header_timeout=1.0, http=http) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"POST /flow/myflow HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            closed_after = None
            slow.settimeout(0.2)
            while time.monotonic() - started < 8:
                try:
                    slow.sendall(b"X-Drip: 1\r\n")
                    if slow.recv(1024) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed_after = time.monotonic() - started
                    break
        assert closed_after is not None, "the server kept the trickling connection open"
        assert 0.5 < closed_after < 4
        # an idle connection that never sends a byte goes too
        with socket.create_connection(("127.0.0.1", server.port)) as idle:
            idle.settimeout(5)
            started = time.monotonic()
            assert idle.recv(1024) == b""
            assert time.monotonic() - started < 4
        # a connection answered just before its first deadline gets a whole new one for
        # its next head: it is closed a deadline after the answer, not at the first one
        with socket.create_connection(("127.0.0.1", server.port)) as late:
            late.settimeout(5)
            time.sleep(0.8)
            late.sendall(b"POST /flow/myflow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            answer = b""
            while b'you said "hi"' not in answer:  # the head and body may come apart
                chunk = late.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            answered = time.monotonic()
            assert late.recv(1024) == b""
            assert 0.5 < time.monotonic() - answered < 4
        # and a client that sends its head in time is served on a kept-alive connection
        with httpx.Client(base_url=server.base) as client:
            for _ in range(2):
                assert client.post("/flow/myflow", content=b"hi").text == 'you said "hi"'
                time.sleep(0.2)
        server.stop()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_body_that_stops_arriving_gets_408(http: str) -> None:
    """A client that sends its head and part of its body, then nothing: 408 once the
    body has gone ``body_timeout`` seconds without a byte, each byte starting the wait
    again; the server goes on serving."""
    with ServerProcess(body_timeout=1.0, http=http) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.settimeout(10)
            stalled.sendall(b"POST /flow/myflow HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
            started = time.monotonic()
            for byte in b"abc":  # a byte every 0.6 s keeps it going
                time.sleep(0.6)
                stalled.sendall(bytes([byte]))
            answer = stalled.recv(65536)
            took = time.monotonic() - started
            while b"\r\n\r\n{" not in answer:  # h11 writes the head and body apart
                chunk = stalled.recv(65536)
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"no byte for 1 s" in answer, answer
        assert 2.5 < took < 6, took  # 1 s after the last byte, not after the first
        with httpx.Client(base_url=server.base) as client:
            assert client.post("/flow/myflow", content=b"hi").text == 'you said "hi"'
        server.stop()


def test_past_the_concurrency_limit_calls_get_503() -> None:
    with ServerProcess(limit_concurrency=3, header_timeout=30.0) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            response = httpx.get(server.base + "/flows", timeout=5)
            assert response.status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(server.base + "/flows", timeout=5).status_code == 200
        server.stop()


def test_the_access_log_names_the_request_and_trusts_no_forwarded_for_by_default() -> None:
    with ServerProcess(access_log=True, log_level="info") as server:
        headers = {"X-Request-Id": "logged-1", "X-Forwarded-For": "203.0.113.9"}
        response = httpx.post(server.base + "/flow/myflow", content=b"x", headers=headers)
        assert response.status_code == 200
        httpx.get(server.base + "/flows")
        _, out, err = server.stop()
    lines = [line for line in out.splitlines() if '"POST /flow/myflow' in line]
    assert len(lines) == 1
    assert lines[0].endswith("request_id=logged-1")
    assert "127.0.0.1" in lines[0]
    assert "203.0.113.9" not in out + err
    flows = [line for line in out.splitlines() if '"GET /flows' in line]
    assert flows[0].endswith("request_id=-")


def test_the_access_log_names_the_request_with_metrics_on_too() -> None:
    """With monitoring on, the metrics' middleware notes the request id instead."""
    with ServerProcess({"enable_monitoring": True}, access_log=True, log_level="info") as server:
        headers = {"X-Request-Id": "logged-2"}
        response = httpx.post(server.base + "/flow/myflow", content=b"x", headers=headers)
        assert response.status_code == 200
        assert httpx.get(server.base + "/flows").status_code == 200
        _, out, _ = server.stop()
    run = next(line for line in out.splitlines() if '"POST /flow/myflow' in line)
    assert run.endswith("request_id=logged-2")
    flows = next(line for line in out.splitlines() if '"GET /flows' in line)
    assert flows.endswith("request_id=-")


def test_forwarded_for_is_trusted_from_named_proxies() -> None:
    with ServerProcess(
        access_log=True, log_level="info", forwarded_allow_ips=["127.0.0.1"]
    ) as server:
        httpx.get(server.base + "/flows", headers={"X-Forwarded-For": "203.0.113.9"})
        _, out, _ = server.stop()
    assert "203.0.113.9" in next(line for line in out.splitlines() if '"GET /flows' in line)
