"""The worker itself: its log lines and its shutdown deadline."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from flowloom import FlowService, RequestFailed
from flowloom.backends import MemoryBackend
from flowloom.registry import Registry
from flowloom.worker import Worker


def test_stop_waits_for_every_running_task_against_one_deadline():
    release = threading.Event()
    running = threading.Semaphore(0)

    def block(data, options):
        running.release()
        release.wait(30)
        return data

    with FlowService(worker_concurrency=5) as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", block))
        for _ in range(5):
            fs.execute("flow", b"")
        for _ in range(5):
            assert running.acquire(timeout=10)
        worker = fs._worker
        assert worker is not None
        started = time.monotonic()
        worker.stop(timeout=1.0)
        took = time.monotonic() - started
        release.set()
    assert 0.9 < took < 1.0 + 1.0  # one deadline for the five threads, not five in a row


def test_stop_returns_as_soon_as_the_tasks_are_done():
    with FlowService(worker_concurrency=5) as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: time.sleep(0.3)))
        fs.execute("flow", b"")
        time.sleep(0.1)
        worker = fs._worker
        assert worker is not None
        started = time.monotonic()
        worker.stop(timeout=20)
        assert time.monotonic() - started < 5


def test_start_failure_and_stop_lines(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="flowloom")
    calls: list[int] = []

    def flaky(data, options):
        calls.append(1)
        raise ConnectionError(f"attempt {len(calls)}")

    def fallback(error, data):
        return b"fallback"

    with FlowService(worker_concurrency=2) as fs:
        fs.register("retried", lambda wf, ctx: wf.dag.node("n", flaky, retries=1, backoff=0))
        fs.register("saved", lambda wf, ctx: wf.dag.node("m", flaky, on_failure=fallback))
        rid = fs.execute("retried", b"")
        with pytest.raises(RequestFailed):
            fs.result("retried", rid, timeout=10)
        saved = fs.execute("saved", b"")
        assert fs.result("saved", saved, timeout=10) == b"fallback"
        worker = fs._worker
        assert worker is not None
        name = worker.name
        versions = {n: fs.registry.latest(n).version for n in ("retried", "saved")}
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "flowloom.worker"]
    assert lines[0] == (
        "INFO",
        f"worker {name} starting: backend embedded (this process only), concurrency 2, "
        f"flows retried@{versions['retried']}, saved@{versions['saved']}",
    )
    failures = [(level, text) for level, text in lines if " failed" in text]
    assert failures == [
        (
            "WARNING",
            f"request {rid} (flow retried): n failed (attempt 1 of 2): ConnectionError: "
            "attempt 1; retrying in 0s",
        ),
        (
            "ERROR",
            f"request {rid} (flow retried): n failed (attempt 2 of 2): ConnectionError: "
            "attempt 2; the request fails",
        ),
        (
            "WARNING",
            f"request {saved} (flow saved): m failed: ConnectionError: attempt 3; "
            "running its on_failure handler",
        ),
    ]
    tracebacks = [text for level, text in lines if level == "DEBUG"]
    assert len(tracebacks) == 3
    assert all("in flaky" in text and "ConnectionError" in text for text in tracebacks)
    assert lines[-2:] == [
        ("INFO", f"worker {name} stopping: letting running tasks finish"),
        ("INFO", f"worker {name} stopped"),
    ]


def test_a_huge_error_message_is_cut_in_the_log_line(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="flowloom")

    def huge(data, options):
        raise ValueError("x" * 1_000_000)

    with FlowService() as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", huge))
        with pytest.raises(RequestFailed) as info:
            fs.run("flow", b"", timeout=10)
    assert info.value.error is not None
    assert len(info.value.error.message) > 60_000  # the state keeps much more of it
    line = next(r.getMessage() for r in caplog.records if " failed" in r.getMessage())
    assert len(line) < 1000


def test_worker_without_flows_says_so(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="flowloom")
    worker = Worker(MemoryBackend(), Registry(), concurrency=1)
    worker.start()
    worker.stop(timeout=5)
    assert "concurrency 1, flows (none)" in caplog.text


def test_an_internal_error_fails_its_request_instead_of_leaving_it_waiting(
    make_backend, monkeypatch: pytest.MonkeyPatch
):
    from flowloom import engine

    real = engine.after_output

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in flowloom")

    with FlowService(backend=make_backend(), worker_concurrency=1) as fs:
        fs._ensure_worker()
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        monkeypatch.setattr(engine, "after_output", broken)
        rid = fs.execute("flow", b"x")
        with pytest.raises(RequestFailed) as info:
            fs.result("flow", rid, timeout=20)
        error = info.value.error
        assert error is not None
        assert (error.vertex, error.type) == ("n", "InternalError")
        assert error.message == "flowloom could not run this step: RuntimeError: a bug in flowloom"
        assert "worker.py" in error.traceback  # flowloom's own frames: they are the point
        monkeypatch.setattr(engine, "after_output", real)
        assert fs.run("flow", b"the worker goes on", timeout=20) == b"the worker goes on"


@pytest.mark.redis
def test_a_request_runs_without_a_read_of_its_record(make_redis_backend, redis_url):
    """The worker of the process that submitted a request knows its options already; of
    a request submitted elsewhere, they come with its task's begin: no read either."""
    from flowloom import Request

    backend = make_redis_backend()
    read: list[str] = []
    record = backend.record

    def counted(request_id):
        read.append(request_id)
        return record(request_id)

    backend.record = counted
    other = FlowService(redis_url=redis_url, backend=make_redis_backend())  # no worker
    with FlowService(redis_url=redis_url, backend=backend) as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: ",".join(o["who"])))
        other.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: ",".join(o["who"])))
        fs._ensure_worker()
        assert fs.run("flow", Request(query={"who": ["me", "you"]}), timeout=10) == b"me,you"
        assert read == []
        elsewhere = other.execute("flow", Request(query={"who": "them"}))
        assert fs.result("flow", elsewhere, timeout=10) == b"them"
        assert read == []
