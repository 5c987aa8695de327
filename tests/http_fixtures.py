"""Flows, services and helpers shared by the HTTP tests (test_http*.py)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from flowloom import FlowService

REDIS_URL = os.environ.get("FLOWLOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


class Gate:
    """A handler that blocks until opened."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, data: bytes, options: dict[str, list[str]]) -> bytes:
        self.entered.release()
        assert self.opened.wait(20), "gate never opened"
        return data + b"|gate"


def do_something(data: bytes, options: dict[str, list[str]]) -> bytes:
    return b'you said "%s"' % data


def show_options(data: bytes, options: dict[str, list[str]]) -> bytes:
    return json.dumps(options, sort_keys=True).encode()


def boom(data: bytes, options: dict[str, list[str]]) -> bytes:
    raise ValueError("boom: " + data.decode(errors="replace"))


def register_flows(fs: FlowService, gate: Gate) -> None:
    """``myflow`` (GoFlow's first flow), ``options``, ``boom`` and ``gated`` (a chain
    whose first node waits for ``gate``)."""
    fs.register("myflow", lambda wf, ctx: wf.dag.node("test", do_something))
    fs.register("options", lambda wf, ctx: wf.dag.node("show", show_options))
    fs.register("boom", lambda wf, ctx: wf.dag.node("explode", boom))

    def gated(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("wait", gate).node("after", lambda d, o: d + b"|after")
        wf.dag.edge("wait", "after")

    fs.register("gated", gated)


def redis_available() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping()
    except Exception:
        return False
    try:
        import flowloom.backends.redis  # noqa: F401
    except Exception:  # not there yet, or half-written
        return False
    return True


BACKENDS = [
    "embedded",
    pytest.param(
        "redis",
        marks=[
            pytest.mark.redis,
            pytest.mark.skipif(not redis_available(), reason="no Redis backend or server"),
        ],
    ),
]


@contextlib.contextmanager
def make_service(kind: str, **options: object) -> Iterator[FlowService]:
    """A FlowService on ``kind`` ("embedded" or "redis", with a unique key prefix and a
    worker in this process)."""
    if kind == "embedded":
        with FlowService(worker_concurrency=4, **options) as fs:  # type: ignore[arg-type]
            yield fs
        return
    from flowloom.backends.redis import RedisBackend

    prefix = f"flowloom-test-http-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    try:
        with FlowService(redis_url=REDIS_URL, backend=backend, **options) as fs:  # type: ignore[arg-type]
            fs._ensure_worker()
            yield fs
    finally:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A small HTTP server on loopback that records the POSTs it gets (callbacks)."""

    def __init__(self, answer: int = 200) -> None:
        self.received: queue.Queue[Delivery] = queue.Queue()
        received, code = self.received, answer

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                received.put(
                    Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- a real server in a process of its own -------------------------------------------------------
SERVER_SCRIPT = """
import json, sys
from flowloom import FlowService
from flowloom.http import serve

port, service_options, serve_options = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
fs = FlowService(port=port, **service_options)
fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: b'you said "%s"' % d))
fs._ensure_worker()
try:
    serve(fs, host="127.0.0.1", port=port, **serve_options)
finally:
    fs.close()
print("served", flush=True)
"""


class ServerProcess:
    """``flowloom.http.serve`` with GoFlow's ``myflow`` in a process of its own, on a
    free loopback port; ``stop()`` sends SIGTERM and returns (seconds taken, stdout,
    stderr)."""

    def __init__(self, service: dict[str, object] | None = None, **serve: object) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        serve.setdefault("log_level", "warning")
        serve.setdefault("access_log", False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLOOM_")}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVER_SCRIPT,
                str(self.port),
                json.dumps(service or {}),
                json.dumps(serve),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )

    def __enter__(self) -> ServerProcess:
        import time

        import httpx

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.process.kill()
        raise AssertionError("server did not start")

    def stop(self, timeout: float = 30) -> tuple[float, str, str]:
        import signal
        import time

        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=timeout)
        return time.monotonic() - started, out, err

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


class SilentReceiver:
    """A loopback TCP server that accepts connections and then, per ``mode``, never
    answers (``"silent"``) or trickles an answer's header lines one a second for ever
    (``"trickle"``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.accepted = 0
        self.stopping = threading.Event()
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.connections.append(conn)
            if self.mode == "trickle":
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            n = 0
            while not self.stopping.wait(1.0):
                conn.sendall(b"X-Slow-%d: y\r\n" % n)
                n += 1
        except OSError:
            pass

    def __enter__(self) -> SilentReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.connections:
            conn.close()
        self.sock.close()


class AppClient(httpx.AsyncClient):
    """An httpx client of an ASGI app in this process. On leaving it cancels the app's
    callbacks still pending, as the server's shutdown does (ASGITransport runs no
    lifespan), so that none outlives its test's event loop with a socket open."""

    def __init__(self, app: Starlette, **options: Any) -> None:
        options.setdefault("base_url", "http://flowloom")
        super().__init__(transport=httpx.ASGITransport(app=app), **options)
        self.app = app

    async def __aexit__(self, *exc: Any) -> None:
        await self.app.state.flowloom.callbacks.close()
        self.app.state.flowloom.waiter.stop()
        await super().__aexit__(*exc)
