"""Prometheus metrics, parsed with prometheus-client's own parser, on both backends.

Worker processes with their own ``--metrics-port`` and the HTTP server's ``GET /metrics``
are in test_metrics_processes.py and test_metrics_http.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps import observed_app
from flowloom import FlowService, RequestFailed
from flowloom.backends import Task
from flowloom.metrics import Metrics
from flowloom.observe import Attempt, Observers, RequestInfo
from flowloom.spans import Recorder
from flowloom.traceparent import TraceContext

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def wait_until(read: Callable[[], Samples], done: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + 20
    samples = read()
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = read()
    return samples


@pytest.fixture
def service(backend_kind: str, request: pytest.FixtureRequest) -> Iterator[FlowService]:
    if backend_kind == "memory":
        fs = FlowService(enable_monitoring=True)
    else:
        fs = FlowService(
            redis_url=request.getfixturevalue("redis_url"),
            redis_prefix=request.getfixturevalue("redis_prefix"),
            enable_monitoring=True,
        )
        fs._ensure_worker()  # a worker in this process, as `flowloom serve` runs one
    yield observed_app.register(fs)
    fs.close()


def scrape(fs: FlowService) -> Samples:
    assert fs.metrics is not None
    return parse(fs.metrics.exposition().decode())


def test_counters_move_by_exactly_the_expected_amounts(service):
    before = scrape(service)
    assert total(before, "flowloom_requests_started_total") == 0
    for body in (b"x", b"y"):
        assert service.run("diamond", body, timeout=20).startswith(b"L")
    service.run("fanout", b"3", timeout=20)
    service.run("flaky", b"ok", timeout=20)
    with pytest.raises(RequestFailed):
        service.run("broken", b"bad", timeout=20)

    samples = wait_until(
        lambda: scrape(service), lambda s: total(s, "flowloom_requests_ended_total") >= 5
    )
    started = "flowloom_requests_started_total"
    assert value(samples, started, flow="diamond") == 2
    assert value(samples, started, flow="fanout") == 1
    assert value(samples, started, flow="flaky") == 1
    assert value(samples, started, flow="broken") == 1
    ended = "flowloom_requests_ended_total"
    assert value(samples, ended, flow="diamond", status="completed") == 2
    assert value(samples, ended, flow="fanout", status="completed") == 1
    assert value(samples, ended, flow="flaky", status="completed") == 1
    assert value(samples, ended, flow="broken", status="failed") == 1
    assert total(samples, ended) == 5
    assert value(samples, "flowloom_request_duration_seconds_count", flow="diamond") == 2
    assert value(samples, "flowloom_request_duration_seconds_count", flow="broken") == 1

    attempts = "flowloom_task_attempts_total"
    for vertex in "abcd":
        assert value(samples, attempts, flow="diamond", vertex=vertex, outcome="completed") == 2
    assert total(samples, attempts, flow="diamond") == 8
    assert value(samples, attempts, flow="fanout", vertex="each:split", outcome="completed") == 1
    assert value(samples, attempts, flow="fanout", vertex="each[]/double", outcome="completed") == 3
    assert value(samples, attempts, flow="fanout", vertex="each:join", outcome="completed") == 1
    assert value(samples, attempts, flow="flaky", vertex="wobble", outcome="retried") == 1
    assert value(samples, attempts, flow="flaky", vertex="wobble", outcome="completed") == 1
    assert value(samples, attempts, flow="broken", vertex="explode", outcome="failed") == 1
    assert total(samples, attempts) == 8 + 5 + 2 + 1
    duration = "flowloom_task_duration_seconds_count"
    assert value(samples, duration, flow="fanout", vertex="each[]/double") == 3
    assert value(samples, duration, flow="flaky", vertex="wobble") == 2
    assert total(samples, "flowloom_task_duration_seconds_count") == 16
    assert value(samples, "flowloom_tasks_running") == 0
    assert value(samples, "flowloom_backend_up") == 1
    assert value(samples, "flowloom_workers_live") == 1
    for state in ("ready", "delayed", "held"):
        assert value(samples, "flowloom_queue_tasks", state=state) == 0

    # bounded label sets: no foreach item key, no request id
    label_values = {v for _, labels in samples for _, v in labels}
    assert not any("k0" in v or "[k" in v for v in label_values), label_values

    # the next request moves each counter by exactly one more
    service.run("diamond", b"z", timeout=20)
    after = wait_until(
        lambda: scrape(service),
        lambda s: value(s, ended, flow="diamond", status="completed") >= 3,
    )
    assert value(after, started, flow="diamond") == 3
    assert value(after, ended, flow="diamond", status="completed") == 3
    assert value(after, attempts, flow="diamond", vertex="a", outcome="completed") == 3
    assert total(after, attempts) == total(samples, attempts) + 4


def test_tasks_running_and_paused_requests_held(service):
    entered, release = threading.Event(), threading.Event()

    def wait(data, options):
        entered.set()
        release.wait(20)
        return data

    def define(wf, ctx):
        wf.dag.node("wait", wait).node("after", lambda d, o: d)
        wf.dag.edge("wait", "after")

    service.register("gated", define)
    rid = service.execute("gated", b"")
    assert entered.wait(20)
    running = scrape(service)
    assert value(running, "flowloom_tasks_running") == 1
    service.pause("gated", rid)
    release.set()
    held = wait_until(
        lambda: scrape(service),
        lambda s: (
            value(s, "flowloom_queue_tasks", state="held") == 1
            and value(s, "flowloom_tasks_running") == 0
        ),
    )
    assert value(held, "flowloom_queue_tasks", state="held") == 1
    assert value(held, "flowloom_tasks_running") == 0
    service.resume("gated", rid)
    service.result("gated", rid, timeout=20)
    done = wait_until(
        lambda: scrape(service),
        lambda s: value(s, "flowloom_requests_ended_total", flow="gated", status="completed"),
    )
    assert value(done, "flowloom_queue_tasks", state="held") == 0


def test_a_stopped_request_counts_as_stopped(service):
    release = threading.Event()

    def define(wf, ctx):
        wf.dag.node("wait", lambda d, o: release.wait(20) and d).node("after", lambda d, o: d)
        wf.dag.edge("wait", "after")

    service.register("slow", define)
    rid = service.execute("slow", b"")
    service.stop("slow", rid)
    release.set()
    samples = scrape(service)
    assert value(samples, "flowloom_requests_ended_total", flow="slow", status="stopped") == 1


def test_a_retried_request_starts_again_before_it_ends_again(service):
    """Every end has its start: a request retried after failing counts as started twice
    and ended twice (failed, then completed), so started minus ended is what runs."""
    fixed = threading.Event()

    def define(wf, ctx):
        def mend(data: bytes, options: object) -> bytes:
            if not fixed.is_set():
                raise ValueError("not yet")
            return data

        wf.dag.node("mend", mend)

    service.register("mend", define)
    rid = service.execute("mend", b"x")
    with pytest.raises(RequestFailed):
        service.result("mend", rid, timeout=20)
    fixed.set()
    service.retry("mend", rid)
    assert service.result("mend", rid, timeout=20) == b"x"
    samples = wait_until(
        lambda: scrape(service),
        lambda s: total(s, "flowloom_requests_ended_total", flow="mend") >= 2,
    )
    assert value(samples, "flowloom_requests_started_total", flow="mend") == 2
    ended = "flowloom_requests_ended_total"
    assert value(samples, ended, flow="mend", status="failed") == 1
    assert value(samples, ended, flow="mend", status="completed") == 1


def test_monitoring_is_off_by_default_for_the_library():
    with FlowService() as fs:
        observed_app.register(fs)
        assert fs.run("diamond", b"x", timeout=10)
        assert fs.metrics is None
        assert not fs.observers


def test_an_unreachable_backend_is_a_gauge_not_a_failed_scrape():
    from flowloom.metrics import Metrics

    with FlowService() as fs:
        broken = fs.backend

        def depth() -> dict[str, int]:
            raise ConnectionError("backend down")

        broken.depth = depth  # type: ignore[method-assign]
        samples = parse(Metrics(broken).exposition().decode())
    assert value(samples, "flowloom_backend_up") == 0
    assert ("flowloom_queue_tasks", frozenset({("state", "ready")})) not in samples


def test_task_durations_fall_in_their_buckets_and_running_follows_the_attempts():
    metrics = Metrics()
    observers = Observers([metrics])  # it keeps the attempts running
    task = Task("r1", "f", "1", "s", (), {})
    request = RequestInfo("r1", "f", time.time(), None)
    attempts = []
    for seconds, outcome in [
        (0.0002, "completed"), (0.001, "completed"), (0.0011, "retried"), (0.7, "failed"),
        (100.0, "completed"),
    ]:  # fmt: skip
        attempt = Attempt(task, request, "run", "s", "w", started=0.0)
        observers.attempt_started(attempt)
        attempt.outcome, attempt.finished = outcome, seconds
        attempts.append(attempt)
    assert value(parse(metrics.exposition().decode()), "flowloom_tasks_running") == 5
    for attempt in attempts:
        observers.attempt_ended(attempt)
    metrics.task_redelivered(task)  # not an attempt: the gauge does not move
    samples = parse(metrics.exposition().decode())
    assert value(samples, "flowloom_tasks_running") == 0
    counts = {
        le: value(samples, "flowloom_task_duration_seconds_bucket", flow="f", vertex="s", le=le)
        for le in ("0.001", "0.005", "0.5", "1.0", "60.0", "+Inf")
    }
    assert counts == {"0.001": 2, "0.005": 3, "0.5": 3, "1.0": 4, "60.0": 4, "+Inf": 5}
    outcomes = {
        outcome: value(
            samples, "flowloom_task_attempts_total", flow="f", vertex="s", outcome=outcome
        )
        for outcome in ("completed", "retried", "failed", "redelivered")
    }
    assert outcomes == {"completed": 3, "retried": 1, "failed": 1, "redelivered": 1}
    assert value(samples, "flowloom_task_duration_seconds_sum", flow="f", vertex="s") == (
        pytest.approx(100.7023)
    )


def test_metrics_alone_never_decode_a_trace_and_time_requests_from_their_creation(
    service, monkeypatch
):
    decoded: list[str] = []
    decode = TraceContext.decode.__func__  # type: ignore[attr-defined]

    def counting(cls: type[TraceContext], text: str) -> TraceContext | None:
        decoded.append(text)
        return decode(cls, text)

    monkeypatch.setattr(TraceContext, "decode", classmethod(counting))
    for body in (b"x", b"y", b"z"):
        assert service.run("diamond", body, timeout=20).startswith(b"L")
    samples = wait_until(
        lambda: scrape(service), lambda s: total(s, "flowloom_requests_ended_total") >= 3
    )
    assert decoded == []  # nobody reads the trace: the worker does not decode it
    duration = "flowloom_request_duration_seconds"
    assert value(samples, f"{duration}_count", flow="diamond") == 3
    assert value(samples, f"{duration}_bucket", flow="diamond", le="10.0") == 3


class _StuckSink:
    """A span sink whose first ``send`` waits until released: an exporter that lags."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.sent = 0

    def send(self, records: list[object]) -> bool:
        self.entered.set()
        self.release.wait(30)
        self.sent += len(records)
        return True

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float) -> None:
        pass


def _run_the_mix(fs: FlowService) -> None:
    """Three diamonds, a fan-out of 3, a flaky and a broken request: 16 attempts."""
    for body in (b"x", b"y", b"z"):
        assert fs.run("diamond", body, timeout=20).startswith(b"L")
    fs.run("fanout", b"3", timeout=20)
    fs.run("flaky", b"ok", timeout=20)
    with pytest.raises(RequestFailed):
        fs.run("broken", b"bad", timeout=20)


def _assert_the_mix(samples: Samples) -> None:
    attempts = "flowloom_task_attempts_total"
    for vertex in "abcd":
        assert value(samples, attempts, flow="diamond", vertex=vertex, outcome="completed") == 3
    assert value(samples, attempts, flow="fanout", vertex="each[]/double", outcome="completed") == 3
    assert value(samples, attempts, flow="fanout", vertex="each:join", outcome="completed") == 1
    assert value(samples, attempts, flow="flaky", vertex="wobble", outcome="retried") == 1
    assert value(samples, attempts, flow="flaky", vertex="wobble", outcome="completed") == 1
    assert value(samples, attempts, flow="broken", vertex="explode", outcome="failed") == 1
    assert total(samples, attempts) == 12 + 5 + 2 + 1
    duration = "flowloom_task_duration_seconds"
    assert total(samples, f"{duration}_count") == 20
    assert value(samples, f"{duration}_count", flow="diamond", vertex="d") == 3
    assert value(samples, f"{duration}_bucket", flow="diamond", vertex="d", le="+Inf") == 3
    assert value(samples, f"{duration}_sum", flow="diamond", vertex="d") > 0
    ended = "flowloom_requests_ended_total"
    assert value(samples, ended, flow="diamond", status="completed") == 3
    assert value(samples, ended, flow="fanout", status="completed") == 1
    assert value(samples, ended, flow="flaky", status="completed") == 1
    assert value(samples, ended, flow="broken", status="failed") == 1
    assert total(samples, ended) == 6
    requests = "flowloom_request_duration_seconds"
    assert value(samples, f"{requests}_count", flow="diamond") == 3
    assert value(samples, f"{requests}_bucket", flow="diamond", le="+Inf") == 3
    assert value(samples, f"{requests}_sum", flow="diamond") > 0
    assert total(samples, f"{requests}_count") == 6


def test_with_tracing_on_a_scrape_counts_every_attempt_ended_before_it():
    """With tracing on, the attempts and request ends the tracing records are counted
    from its records as they leave its queue: a scrape counts those still waiting, those
    taken, and those dropped (the queue full) alike, each once, retried and failed ones
    too."""
    with FlowService(enable_monitoring=True, otlp_endpoint="http://127.0.0.1:9") as fs:
        observed_app.register(fs)
        tracing: Any = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        tracing.recorder.close(5)
        sink = _StuckSink()
        # the thread takes a batch of 5, gets stuck sending it; 10 wait, the rest dropped
        tracing.recorder = Recorder(sink, max_queue=10, batch=5, delay=30)
        assert fs.metrics is not None
        fs.metrics.count_from(tracing.recorder)
        _run_the_mix(fs)
        assert sink.entered.wait(10)
        ended = "flowloom_requests_ended_total"
        stuck = wait_until(lambda: scrape(fs), lambda s: total(s, ended) >= 6)
        assert tracing.recorder.dropped > 0
        assert len(tracing.recorder.queue) == 10
        _assert_the_mix(stuck)
        sink.release.set()
        tracing.recorder.close()
        assert sink.sent == 15  # every record that was not dropped, each tapped once
        after = scrape(fs)
        _assert_the_mix(after)
        dropped = ("flowloom_spans_dropped_total", frozenset())
        assert {**after, dropped: 0} == {**stuck, dropped: 0}


def test_with_tracing_on_and_nothing_sampled_every_attempt_is_counted(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    with FlowService(enable_monitoring=True, otlp_endpoint="http://127.0.0.1:9") as fs:
        observed_app.register(fs)
        _run_the_mix(fs)
        ended = "flowloom_requests_ended_total"
        _assert_the_mix(wait_until(lambda: scrape(fs), lambda s: total(s, ended) >= 6))


def test_with_tracing_on_records_taken_off_the_queue_are_counted_once():
    """Scrapes while the recorder's thread takes batches: each attempt counted once."""
    with FlowService(enable_monitoring=True, otlp_endpoint="http://127.0.0.1:9") as fs:
        observed_app.register(fs)
        tracing: Any = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        tracing.recorder.close(5)
        sink = _StuckSink()
        sink.release.set()
        tracing.recorder = Recorder(sink, batch=3, delay=0.001)
        assert fs.metrics is not None
        fs.metrics.count_from(tracing.recorder)
        attempts = "flowloom_task_attempts_total"
        ended = "flowloom_requests_ended_total"
        for i in range(1, 31):
            assert fs.run("diamond", b"%d" % i, timeout=20).startswith(b"L")
            # the request's end is told after its result is stored: wait for it, then
            # every count is exact (none counted twice as batches leave the queue)
            samples = wait_until(lambda: scrape(fs), lambda s, i=i: total(s, ended) >= i)
            assert total(samples, ended) == i
            assert total(samples, attempts, flow="diamond") == 4 * i
            assert total(samples, "flowloom_task_duration_seconds_count") == 4 * i
            assert value(samples, "flowloom_request_duration_seconds_count", flow="diamond") == i
        assert sink.sent > 0
