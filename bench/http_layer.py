"""The HTTP layer's own CPU time per sync ``POST /flow/myflow``, in this process.

    python bench/http_layer.py                 # no observers, no token
    python bench/http_layer.py --observed      # metrics on and a bearer token

Calls ``create_app``'s ASGI app directly (no socket, no uvicorn), each call's body
whole and marked so as ``serve`` marks it, with the backend's execute replaced by an
instant answer: what is timed is Starlette's middleware and routing, flowloom's
middleware, the endpoint (headers, body, query, trace context) and the answer. The
figure is the event loop thread's CPU time per call (``time.thread_time``), which
another process's load disturbs far less than wall time; ``--runs`` runs of
``--calls`` calls, sorted, and their median.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import uvloop

from flowloom import FlowService
from flowloom.http import create_app
from flowloom.http.waiting import Waiter
from flowloom.types import Request, Status

TOKEN = "s3cret"
TRACE = "0af7651916cd43dd8448eb211c80319c" + "b7ad6b7169203331"
RESULT = b'you said "hallo"'


class _Record:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.trace = TRACE


async def _instant(
    self: Waiter, name: str, request: Request, timeout: float
) -> tuple[Any, Status, bytes]:
    assert request.request_id is not None
    return _Record(request.request_id), Status.COMPLETED, RESULT


async def _measure(app: Any, headers: list[tuple[bytes, bytes]], calls: int, runs: int) -> None:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"hallo", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/flow/myflow",
            "raw_path": b"/flow/myflow",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "state": {},
            "flowloom.body_received": True,  # as serve marks a body that came whole
        }

    for _ in range(500):  # warm-up
        await app(scope(), receive, send)
    if sent[-2]["status"] != 200 or sent[-1]["body"] != RESULT:
        raise SystemExit(f"unexpected answer: {sent[-2:]}")
    figures = []
    for _ in range(runs):
        sent.clear()
        began = time.thread_time()
        for _ in range(calls):
            await app(scope(), receive, send)
        figures.append((time.thread_time() - began) / calls * 1e6)
    figures.sort()
    shown = " ".join(f"{f:.1f}" for f in figures)
    print(f"{statistics.median(figures):5.1f} us a call (median; runs: {shown})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--observed", action="store_true", help="metrics on, a bearer token")
    parser.add_argument("--calls", type=int, default=5000, help="calls per run (default 5000)")
    parser.add_argument("--runs", type=int, default=7, help="runs (default 7)")
    args = parser.parse_args()
    Waiter.execute = _instant  # type: ignore[method-assign]
    headers = [(b"host", b"127.0.0.1:8080"), (b"content-length", b"5"), (b"user-agent", b"wrk")]
    if args.observed:
        fs = FlowService(enable_monitoring=True, token=TOKEN)
        headers.append((b"authorization", b"Bearer " + TOKEN.encode()))
    else:
        fs = FlowService()
    fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: RESULT))
    with fs:
        app = create_app(fs)
        gc.collect()
        gc.freeze()  # as serve does
        gc.set_threshold(10_000, *gc.get_threshold()[1:])
        uvloop.run(_measure(app, headers, args.calls, args.runs))


if __name__ == "__main__":
    main()
