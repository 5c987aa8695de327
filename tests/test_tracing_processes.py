"""One trace per request across processes, and each process's own metrics.

On Redis: the HTTP server in one process (``flowloom serve --no-worker``), two workers in
two others (``flowloom worker``), each exporting spans to a real OTLP/HTTP receiver in
this test (``OTEL_EXPORTER_OTLP_ENDPOINT``) and serving its metrics on its own
``--metrics-port``. A diamond flow (with the caller's ``traceparent``), a foreach flow
and a failing flow run through them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from http_fixtures import free_port
from otlp_receiver import OtlpReceiver, ReceivedSpan
from test_metrics import Samples, parse, total, value

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "tests" / "apps" / "observed_app.py")
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@dataclass
class System:
    receiver: OtlpReceiver
    http: str  # the server's base URL
    server_metrics: int
    worker_metrics: list[int]
    processes: list[subprocess.Popen[bytes]]
    prefix: str

    def stop(self) -> None:
        """SIGTERM every process: each flushes its spans as it closes."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return parse(answer.read().decode())


def wait_for(check, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def system(redis_url: str, tmp_path: Path) -> Iterator[System]:
    receiver = OtlpReceiver().start()
    prefix = f"fltest-obs-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLOWLOOM_"))}
    env.update(
        FLOWLOOM_OBS_REDIS_URL=redis_url,
        FLOWLOOM_OBS_PREFIX=prefix,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    port, server_metrics = free_port(), free_port()
    worker_metrics = [free_port(), free_port()]
    cli = [sys.executable, "-m", "flowloom.cli"]
    commands = [
        [
            *cli,
            "serve",
            APP,
            "--no-worker",
            "--port",
            str(port),
            "--metrics-port",
            str(server_metrics),
        ],
        *([*cli, "worker", APP, "--metrics-port", str(m)] for m in worker_metrics),
    ]
    processes = []
    for n, command in enumerate(commands):
        with (tmp_path / f"process-{n}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    found = System(
        receiver, f"http://127.0.0.1:{port}", server_metrics, worker_metrics, processes, prefix
    )
    try:
        wait_for(
            lambda: len(httpx.get(f"{found.http}/workers", timeout=2).json()["workers"]) == 2,
            "the server and two workers",
        )
        for metrics_port in [server_metrics, *worker_metrics]:
            wait_for(lambda p=metrics_port: scrape(p) is not None, f"metrics on {metrics_port}")
        yield found
    finally:
        found.stop()
        receiver.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        for n in range(len(commands)):
            print(f"--- process {n}:\n" + (tmp_path / f"process-{n}.log").read_text()[-3000:])


def names(spans: list[ReceivedSpan]) -> list[str]:
    return sorted(s.name for s in spans)


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, (name, names(spans))
    return named[0]


def test_one_trace_per_request_across_processes_and_each_process_metrics(system):
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    diamond = httpx.post(
        f"{system.http}/flow/diamond", content=b"hi", headers={"traceparent": traceparent}
    )
    assert diamond.status_code == 200
    assert diamond.content == b"LHI!+RHI!!"
    assert diamond.headers["x-trace-id"] == CALLER_TRACE
    fanout = httpx.post(f"{system.http}/flow/fanout", content=b"4", timeout=30)
    assert fanout.status_code == 200
    broken = httpx.post(f"{system.http}/flow/broken", content=b"bad", timeout=30)
    assert broken.status_code == 424
    fanout_trace, broken_trace = fanout.headers["x-trace-id"], broken.headers["x-trace-id"]
    assert len({CALLER_TRACE, fanout_trace, broken_trace}) == 3

    # -- metrics: each process its own, moved by exactly what these requests did ------------
    server = scrape(system.server_metrics)
    assert value(server, "flowloom_requests_started_total", flow="diamond") == 1
    assert value(server, "flowloom_requests_started_total", flow="fanout") == 1
    assert value(server, "flowloom_requests_started_total", flow="broken") == 1
    run = {"route": "/flow/{name}", "method": "POST"}
    assert value(server, "flowloom_http_requests_total", **run, status="200") == 2
    assert value(server, "flowloom_http_requests_total", **run, status="424") == 1
    assert total(server, "flowloom_task_attempts_total") == 0  # no worker in the server
    assert value(server, "flowloom_workers_live") == 2

    def workers_total(name: str, **labels: str) -> float:
        return sum(total(scrape(p), name, **labels) for p in system.worker_metrics)

    wait_for(lambda: workers_total("flowloom_requests_ended_total") == 3, "3 ended requests")
    per_worker = [scrape(p) for p in system.worker_metrics]
    ended = "flowloom_requests_ended_total"
    attempts = "flowloom_task_attempts_total"

    def both(name: str, **labels: str) -> float:
        return sum(value(samples, name, **labels) for samples in per_worker)

    assert both(ended, flow="diamond", status="completed") == 1
    assert both(ended, flow="fanout", status="completed") == 1
    assert both(ended, flow="broken", status="failed") == 1
    for vertex in "abcd":
        assert both(attempts, flow="diamond", vertex=vertex, outcome="completed") == 1
    assert both(attempts, flow="fanout", vertex="each:split", outcome="completed") == 1
    assert both(attempts, flow="fanout", vertex="each[]/double", outcome="completed") == 4
    assert both(attempts, flow="fanout", vertex="each:join", outcome="completed") == 1
    assert both(attempts, flow="broken", vertex="explode", outcome="failed") == 1
    assert sum(total(s, attempts) for s in per_worker) == 4 + 6 + 1
    assert sum(total(s, "flowloom_task_duration_seconds_count") for s in per_worker) == 11
    assert all(value(s, "flowloom_tasks_running") == 0 for s in per_worker)
    assert all(total(s, "flowloom_requests_started_total") == 0 for s in per_worker)

    # -- traces: every span arrives once the processes have flushed them ---------------------
    system.stop()
    assert [p.returncode for p in system.processes] == [0, 0, 0]
    pids = {str(p.pid) for p in system.processes}
    spans = system.receiver.trace(CALLER_TRACE)
    assert names(spans) == sorted(
        [
            "POST /flow/diamond",
            "flow diamond",
            "vertex a",
            "handler upper",
            "handler exclaim",
            "vertex b",
            "user-work",
            "vertex c",
            "vertex d",
            "aggregator join",
        ]
    )
    assert {s.pid for s in spans} <= pids
    server_span = one(spans, "POST /flow/diamond")
    assert server_span.parent_id == CALLER_SPAN  # the caller's traceparent honoured
    assert server_span.pid == str(system.processes[0].pid)
    root = one(spans, "flow diamond")
    assert root.parent_id == server_span.span_id
    assert root.pid in {str(p.pid) for p in system.processes[1:]}  # ended by a worker
    for vertex in "abcd":
        assert one(spans, f"vertex {vertex}").parent_id == root.span_id
    assert one(spans, "handler upper").parent_id == one(spans, "vertex a").span_id
    assert one(spans, "handler exclaim").parent_id == one(spans, "vertex a").span_id
    assert one(spans, "user-work").parent_id == one(spans, "vertex b").span_id
    assert one(spans, "aggregator join").parent_id == one(spans, "vertex d").span_id
    assert len({s.span_id for s in spans}) == len(spans)

    spans = system.receiver.trace(fanout_trace)
    items = [f"vertex each[k{n}]/double" for n in range(4)]
    assert names(spans) == sorted(
        [
            *("POST /flow/fanout", "flow fanout", "split each", "foreach items", "join each"),
            *("aggregator collect", *items),
        ]
    )
    root = one(spans, "flow fanout")
    assert root.parent_id == one(spans, "POST /flow/fanout").span_id
    assert one(spans, "POST /flow/fanout").parent_id == ""  # no caller: a trace of its own
    for name in ["split each", "join each", *items]:
        assert one(spans, name).parent_id == root.span_id
    assert one(spans, "foreach items").parent_id == one(spans, "split each").span_id
    assert one(spans, "aggregator collect").parent_id == one(spans, "join each").span_id

    spans = system.receiver.trace(broken_trace)
    assert names(spans) == ["POST /flow/broken", "flow broken", "vertex explode"]
    vertex = one(spans, "vertex explode")
    assert vertex.status == 2
    [(event, attributes)] = vertex.events
    assert event == "exception"
    assert attributes["exception.type"] == "ValueError"
    assert attributes["exception.message"] == "explode: bad"
    root = one(spans, "flow broken")
    assert root.status == 2
    assert root.attributes["flowloom.status"] == "failed"

    # nothing else arrived: every span belongs to one of the three requests
    assert {s.trace_id for s in system.receiver.spans} == {
        CALLER_TRACE,
        fanout_trace,
        broken_trace,
    }
