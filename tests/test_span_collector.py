"""A collector that takes the connection and never answers: the exporter process gives
each post up after the export timeout, requests never wait for it, later spans arrive,
and the service still closes in bounded time. An exporter process that is frozen: it is
replaced, and neither requests nor the close wait for it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from flowloom import FlowService
from otlp_receiver import OtlpReceiver


@pytest.fixture
def silent_receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver(silent=1).start()
    yield server
    server.stop()


def test_a_collector_that_never_answers_costs_one_batch_and_nothing_else(
    silent_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds, read by the exporter
    with FlowService(otlp_endpoint=silent_receiver.endpoint) as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("echo", lambda d, o: d))
        tracing = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        lost = fs.execute("echo", b"a")
        assert fs.result("echo", lost, timeout=10) == b"a"
        assert tracing.flush(10)  # sent; the collector holds the post, the exporter gives up
        assert silent_receiver.unanswered == 1
        kept = [fs.execute("echo", b"%d" % n) for n in range(200)]
        for n, request_id in enumerate(kept):
            assert fs.result("echo", request_id, timeout=10) == b"%d" % n
        assert tracing.flush(10)
        assert tracing.dropped == 0  # the queue never filled: nothing dropped on this side
        traces = [fs.state("echo", request_id).trace_id for request_id in kept]
        lost_trace = fs.state("echo", lost).trace_id
        closing = time.monotonic()
    assert time.monotonic() - closing < 5
    for trace_id in traces:
        assert {s.name for s in silent_receiver.trace(trace_id)} == {"flow echo", "vertex echo"}
    assert silent_receiver.trace(lost_trace) == []
    assert silent_receiver.unanswered == 1


def test_a_frozen_exporter_process_is_replaced_and_holds_nothing_up() -> None:
    receiver = OtlpReceiver().start()
    try:
        with FlowService(otlp_endpoint=receiver.endpoint) as fs:
            fs.register("echo", lambda wf, ctx: wf.dag.node("echo", lambda d, o: d))
            tracing = next(o for o in fs.observers.all if hasattr(o, "recorder"))
            sink = tracing.recorder.sink
            sink.write_timeout = 0.5
            frozen = sink.process
            assert fs.run("echo", b"x", timeout=10) == b"x"
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                # more spans than the pipe holds: a write waits for the frozen child
                for n in range(3000):
                    assert fs.run("echo", b"%d" % n, timeout=10) == b"%d" % n
                deadline = time.monotonic() + 20
                while sink.process is frozen or frozen.poll() is None:  # killed, replaced
                    assert time.monotonic() < deadline, "the frozen exporter was kept"
                    fs.run("echo", b"more", timeout=10)
                    time.sleep(0.05)
            finally:
                if frozen.poll() is None:
                    os.kill(frozen.pid, signal.SIGCONT)
            assert tracing.dropped > 0  # what the frozen child held up is counted lost
            after = fs.execute("echo", b"after")
            assert fs.result("echo", after, timeout=10) == b"after"
            assert tracing.flush(10)  # the new child exports
            trace_id = fs.state("echo", after).trace_id
            closing = time.monotonic()
        assert time.monotonic() - closing < 5
        assert {s.name for s in receiver.trace(trace_id)} == {"flow echo", "vertex echo"}
    finally:
        receiver.stop()
