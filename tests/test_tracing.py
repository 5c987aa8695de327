"""Tracing on the embedded backend, exported over real OTLP/HTTP to a receiver in the test.

The cross-process test (HTTP server and two workers on Redis) is test_tracing_processes.py.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps import observed_app
from flowloom import FlowService, Request, RequestFailed, Status
from flowloom.observe import Observer, Observers
from flowloom.traceparent import TraceContext, parse_traceparent, traces_url, tracing_configured
from otlp_receiver import OtlpReceiver, ReceivedSpan

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def traced(receiver: OtlpReceiver) -> Iterator[FlowService]:
    fs = observed_app.register(FlowService(otlp_endpoint=receiver.endpoint))
    yield fs
    fs.close()


def by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    found: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, (name, [s.name for s in spans])
    return named[0]


# -- the pure part -------------------------------------------------------------------------------
def test_traceparent_parsing_follows_w3c():
    assert parse_traceparent(TRACEPARENT) == (int(CALLER_TRACE, 16), int(CALLER_SPAN, 16), True)
    assert parse_traceparent(TRACEPARENT[:-2] + "00")[2] is False
    assert parse_traceparent(" " + TRACEPARENT.upper() + " ") is not None
    # a later version may carry more fields; version 00 may not
    assert parse_traceparent(f"01-{CALLER_TRACE}-{CALLER_SPAN}-01-extra") is not None
    for bad in [
        None,
        "",
        f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",
        f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",
        f"00-{'0' * 32}-{CALLER_SPAN}-01",
        f"00-{CALLER_TRACE}-{'0' * 16}-01",
        f"00-{CALLER_TRACE[:-1]}-{CALLER_SPAN}-01",
        f"00-{CALLER_TRACE}-{CALLER_SPAN}",
        "9" * 5000,
        f"00-{CALLER_TRACE}-{CALLER_SPAN}-0g",
    ]:
        assert parse_traceparent(bad) is None, bad


def test_trace_context_round_trips_and_rejects_garbage():
    fresh = TraceContext.new()
    assert fresh.parent_id == 0
    assert fresh.sampled
    assert TraceContext.decode(fresh.encode()) == fresh
    child = TraceContext.new((5, 7, False))
    assert (child.trace_id, child.parent_id, child.sampled) == (5, 7, False)
    assert child.span_id not in (0, 7)
    assert TraceContext.decode(child.encode()) == child
    assert child.traceparent() == f"00-{5:032x}-{child.span_id:016x}-00"
    for bad in ["", "x", fresh.encode() + "0", fresh.encode().upper()]:
        assert TraceContext.decode(bad) is None


def test_a_kept_context_is_read_back_once_without_parsing():
    """``keep`` (a traced process's ``execute``) hands the context itself to the first
    ``decode`` of its text in this process; later ones parse it, to an equal one."""
    fresh = TraceContext.new()
    text = fresh.keep()
    assert text == fresh.encode()
    assert TraceContext.decode(text) is fresh
    again = TraceContext.decode(text)
    assert again == fresh
    assert again is not fresh


def test_a_retry_context_is_a_child_root_sampled_as_the_first():
    own = TraceContext.new()
    retry = own.retried()
    assert (retry.trace_id, retry.parent_id) == (own.trace_id, own.span_id)
    assert retry.span_id not in (0, own.span_id)
    assert retry.sampler  # no caller: the sampler decides again, by the trace id
    assert TraceContext.decode(retry.encode()) == retry
    assert retry.traceparent().endswith("-01")
    again = retry.retried()
    assert again.sampler
    assert again.parent_id == retry.span_id
    called = TraceContext.new((5, 7, False)).retried()
    assert not called.sampler  # the caller's flag decides, as for the first run
    assert not called.sampled
    assert TraceContext.decode(called.encode()) == called


def test_endpoint_and_environment(monkeypatch):
    for name in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert traces_url("http://h:4318/") == "http://h:4318/v1/traces"
    assert traces_url("http://h:4318/v1/traces") == "http://h:4318/v1/traces"
    assert not tracing_configured(None)
    assert tracing_configured("http://h:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318")
    assert tracing_configured(None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing_configured("http://h:4318")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing_configured("http://h:4318")


# -- one trace per request -----------------------------------------------------------------------
def test_diamond_is_one_trace_with_correct_parents(traced, receiver):
    rid = traced.execute("diamond", Request(b"hi", headers={"traceparent": TRACEPARENT}))
    assert traced.result("diamond", rid, timeout=10) == b"LHI!+RHI!!"
    assert traced.state("diamond", rid).trace_id == CALLER_TRACE
    traced.close()  # flushes the exporter
    spans = receiver.trace(CALLER_TRACE)
    assert len(spans) == len(receiver.spans)
    names = sorted(s.name for s in spans)
    assert names == sorted(
        [
            "flow diamond",
            "vertex a",
            "vertex b",
            "vertex c",
            "vertex d",
            "handler upper",  # a node of two handlers: a span for each
            "handler exclaim",
            "aggregator join",
            "user-work",
        ]
    )
    root = one(spans, "flow diamond")
    assert root.parent_id == CALLER_SPAN  # the caller's traceparent honoured
    assert root.attributes == {
        "flowloom.flow": "diamond",
        "flowloom.request_id": rid,
        "flowloom.status": "completed",
    }
    assert root.service == "flowloom"
    assert root.pid == str(os.getpid())
    for vertex in "abcd":
        span = one(spans, f"vertex {vertex}")
        assert span.parent_id == root.span_id
        assert span.attributes["flowloom.vertex"] == vertex
        assert span.attributes["flowloom.attempt"] == 1
        assert span.attributes["flowloom.status"] == "completed"
        assert span.attributes["flowloom.request_id"] == rid
        assert span.attributes["flowloom.worker"]
        assert root.start_ns <= span.start_ns <= span.end_ns <= root.end_ns
    vertex_a = one(spans, "vertex a")
    assert one(spans, "handler upper").parent_id == vertex_a.span_id
    assert one(spans, "aggregator join").parent_id == one(spans, "vertex d").span_id
    user = one(spans, "user-work")  # made by `left`, the one handler of node b
    assert user.parent_id == one(spans, "vertex b").span_id
    assert user.attributes == {"app.size": 3}
    assert user.scope == "observed-app"
    assert len({s.span_id for s in spans}) == len(spans)


def test_each_request_has_its_own_trace(traced, receiver):
    first = traced.execute("diamond", b"x")
    second = traced.execute("diamond", b"y")
    for rid in (first, second):
        traced.result("diamond", rid, timeout=10)
    states = [traced.state("diamond", rid) for rid in (first, second)]
    traced.close()
    assert states[0].trace_id != states[1].trace_id
    for state in states:
        spans = receiver.trace(state.trace_id)
        root = one(spans, "flow diamond")
        assert root.parent_id == ""  # no caller: the request starts its own trace
        assert root.attributes["flowloom.request_id"] == state.request_id
        assert {s.attributes.get("flowloom.request_id") for s in spans if "vertex" in s.name} == {
            state.request_id
        }


def test_foreach_and_conditional_spans(traced, receiver):
    rid = traced.execute("fanout", b"3")
    assert json.loads(traced.result("fanout", rid, timeout=10)) == {"k0": "0", "k1": "2", "k2": "4"}
    pick = traced.execute("picky", b"p")
    traced.result("picky", pick, timeout=10)
    trace_id = traced.state("fanout", rid).trace_id
    pick_trace = traced.state("picky", pick).trace_id
    traced.close()
    spans = receiver.trace(trace_id)
    root = one(spans, "flow fanout")
    split, join = one(spans, "split each"), one(spans, "join each")
    assert split.parent_id == join.parent_id == root.span_id
    assert one(spans, "foreach items").parent_id == split.span_id
    assert one(spans, "aggregator collect").parent_id == join.span_id
    items = sorted(s.name for s in spans if s.name.startswith("vertex "))
    assert items == ["vertex each[k0]/double", "vertex each[k1]/double", "vertex each[k2]/double"]
    assert all(s.parent_id == root.span_id for s in spans if s.name.startswith("vertex "))
    picked = receiver.trace(pick_trace)
    assert one(picked, "condition <lambda>").parent_id == one(picked, "split pick").span_id
    assert one(picked, "vertex pick[yes]/agree").parent_id == one(picked, "flow picky").span_id


def test_failing_vertex_span_carries_the_exception(traced, receiver):
    rid = traced.execute("broken", b"bad input")
    with pytest.raises(RequestFailed):
        traced.result("broken", rid, timeout=10)
    trace_id = traced.state("broken", rid).trace_id
    traced.close()
    spans = receiver.trace(trace_id)
    vertex = one(spans, "vertex explode")
    assert vertex.status == 2
    assert "ValueError: explode: bad input" in vertex.status_message
    assert vertex.attributes["flowloom.status"] == "failed"
    [(event, attributes)] = vertex.events
    assert event == "exception"
    assert attributes["exception.type"] == "ValueError"
    assert attributes["exception.message"] == "explode: bad input"
    assert ", in explode\n" in attributes["exception.stacktrace"]
    root = one(spans, "flow broken")
    assert root.status == 2
    assert root.attributes["flowloom.status"] == "failed"
    assert root.events[0][1]["exception.type"] == "ValueError"


def test_a_retried_vertex_has_a_span_per_attempt(traced, receiver):
    rid = traced.execute("flaky", b"ok")
    assert traced.result("flaky", rid, timeout=10) == b"ok"
    trace_id = traced.state("flaky", rid).trace_id
    traced.close()
    spans = sorted(
        (s for s in receiver.trace(trace_id) if s.name == "vertex wobble"),
        key=lambda s: s.attributes["flowloom.attempt"],
    )
    assert [(s.attributes["flowloom.attempt"], s.attributes["flowloom.status"]) for s in spans] == [
        (1, "retried"),
        (2, "completed"),
    ]
    assert spans[0].status == 2
    assert spans[0].events[0][1]["exception.type"] == "ConnectionError"
    assert spans[1].status == 0
    assert one(receiver.trace(trace_id), "flow flaky").attributes["flowloom.status"] == "completed"


def test_a_retried_request_gets_a_new_root_span_under_the_first(receiver, make_backend):
    """A request that failed and is retried ends twice: each end emits its own root span,
    the retry's a child of the first one, in the same trace; the retry's vertices parent
    on the retry's root. No span id is emitted twice. On both backends."""
    fixed = threading.Event()

    def second(data, options):
        if not fixed.is_set():
            raise ValueError("not yet")
        return data

    with FlowService(backend=make_backend(), otlp_endpoint=receiver.endpoint) as fs:
        fs.register(
            "mend", lambda wf, ctx: wf.dag.node("first", lambda d, o: d).node("second", second)
            .edge("first", "second")
        )  # fmt: skip
        fs._ensure_worker()  # a Redis backend too: a worker in this process
        rid = fs.execute("mend", b"x")
        with pytest.raises(RequestFailed):
            fs.result("mend", rid, timeout=10)
        fixed.set()
        fs.retry("mend", rid)
        assert fs.result("mend", rid, timeout=10) == b"x"
        trace_id = fs.state("mend", rid).trace_id
    spans = receiver.trace(trace_id)
    assert len({s.span_id for s in spans}) == len(spans)
    # the first root is emitted when its end is observed: the retry may end before that
    first_root, retry_root = sorted(
        (s for s in spans if s.name == "flow mend"), key=lambda s: s.parent_id != ""
    )
    assert first_root.parent_id == ""
    assert first_root.attributes["flowloom.status"] == "failed"
    assert retry_root.parent_id == first_root.span_id
    assert retry_root.attributes["flowloom.status"] == "completed"
    assert one(spans, "vertex first").parent_id == first_root.span_id
    failed, passed = sorted(by_name(spans)["vertex second"], key=lambda s: s.start_ns)
    assert failed.parent_id == first_root.span_id
    assert failed.attributes["flowloom.status"] == "failed"
    assert passed.parent_id == retry_root.span_id
    assert passed.attributes["flowloom.status"] == "completed"


def test_a_stopped_request_ends_its_root_span(receiver):
    gate = threading.Event()

    def wait(data, options):
        gate.wait(10)
        return data

    fs = FlowService(otlp_endpoint=receiver.endpoint)

    def define(wf, ctx):
        wf.dag.node("wait", wait).node("never", wait)
        wf.dag.edge("wait", "never")

    fs.register("slow", define)
    try:
        rid = fs.execute("slow", b"")
        assert fs.stop("slow", rid) is Status.STOPPED
        gate.set()
        trace_id = fs.state("slow", rid).trace_id
    finally:
        fs.close()
    root = one(receiver.trace(trace_id), "flow slow")
    assert root.attributes["flowloom.status"] == "stopped"


def test_unsampled_caller_means_no_spans(traced, receiver):
    rid = traced.execute("diamond", Request(b"x", headers={"traceparent": TRACEPARENT[:-2] + "00"}))
    traced.result("diamond", rid, timeout=10)
    assert traced.state("diamond", rid).trace_id == CALLER_TRACE
    traced.close()
    assert receiver.spans == []


def test_an_observed_task_leaves_no_garbage_cycle(receiver):
    """Every object an observed attempt makes is freed when the attempt ends, by its
    reference count: none is left for the garbage collector, whose passes over
    thousands of tasks' leftovers cost the embedded backend more than the hooks."""
    with FlowService(otlp_endpoint=receiver.endpoint, enable_monitoring=True) as fs:
        observed_app.register(fs)
        fs.run("diamond", b"warm", timeout=10)
        while gc.collect():  # what earlier tests left (a finalizer may free more)
            pass
        gc.disable()
        try:
            for i in range(20):
                assert fs.run("diamond", b"x%d" % i, timeout=10) == b"LX%d!+RX%d!!" % (i, i)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted({type(o).__name__ for o in gc.garbage})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []


def test_a_failing_observer_never_fails_a_task(caplog):
    class Broken(Observer):
        def boom(self, *args: object) -> None:
            raise RuntimeError("observer down")

        request_started = request_ended = attempt_started = attempt_ended = boom  # type: ignore[assignment]

    with FlowService() as fs:
        fs._observers = Observers([Broken()])
        observed_app.register(fs)
        assert fs.run("diamond", b"ok", timeout=10) == b"LOK!+ROK!!"
        with pytest.raises(RequestFailed):
            fs.run("broken", b"", timeout=10)
    assert "Broken.attempt_started failed (ignored)" in caplog.text
    assert "Broken.request_ended failed (ignored)" in caplog.text


# -- nothing when off ----------------------------------------------------------------------------
def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ["PYTHONPATH"] = str(ROOT / "tests")
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_an_endpoint_no_exporter_thread_and_no_span_objects():
    done = _python(
        """
        import sys, threading
        from flowloom import FlowService
        from apps import observed_app
        with FlowService(enable_monitoring=True) as fs:
            observed_app.register(fs)
            assert fs.run("diamond", b"x", timeout=10) == b"LX!+RX!!"
            threads = [t.name for t in threading.enumerate()]
            otel = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
            print(fs.state("diamond", fs.execute("diamond", b"y")).trace_id)
        print(threads)
        print(otel)
        """
    )
    assert done.returncode == 0, done.stderr
    trace_id, threads, otel = done.stdout.splitlines()
    assert len(trace_id) == 32  # the trace id is chosen all the same
    assert "OtelBatchSpan" not in threads
    # the app tries to import the OpenTelemetry API; the SDK (spans, exporters) never loads
    assert "opentelemetry.sdk" not in otel
    assert "opentelemetry.sdk.trace" not in otel
    assert "opentelemetry.exporter" not in otel


def test_with_the_environment_variable_tracing_is_on(receiver):
    done = _python(
        """
        import threading
        from flowloom import FlowService
        from apps import observed_app
        with FlowService() as fs:
            observed_app.register(fs)
            rid = fs.execute("diamond", b"x")
            fs.result("diamond", rid, timeout=10)
            print(fs.state("diamond", rid).trace_id)
            print(any(t.name.startswith("OtelBatchSpan") for t in threading.enumerate()))
        """,
        {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "shop"},
    )
    assert done.returncode == 0, done.stderr
    trace_id, thread = done.stdout.split()
    assert thread == "True"
    spans = receiver.trace(trace_id)
    assert one(spans, "flow diamond").service == "shop"
    assert len(spans) == 9


def test_a_service_never_closed_still_exports_its_spans_at_exit(receiver):
    done = _python(
        """
        from flowloom import FlowService
        from apps import observed_app
        fs = observed_app.register(FlowService())
        rid = fs.execute("diamond", b"x")
        fs.result("diamond", rid, timeout=10)
        print(fs.state("diamond", rid).trace_id)
        """,  # no close: the process just ends
        {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
    )
    assert done.returncode == 0, done.stderr
    assert len(receiver.trace(done.stdout.strip())) == 9


def test_missing_extra_is_said_at_start_up():
    done = _python(
        """
        import logging, sys
        logging.basicConfig()  # a library logs where the application says
        sys.modules["opentelemetry"] = None
        sys.modules["prometheus_client"] = None
        from flowloom import FlowService
        with FlowService(otlp_endpoint="http://127.0.0.1:9", enable_monitoring=True) as fs:
            fs.register("f", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
            print(fs.run("f", b"still works", timeout=10).decode())
            print(fs.metrics)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["still works", "None"]
    assert "enable_monitoring (Prometheus metrics) needs the otel extra" in done.stderr
    assert "otlp_endpoint (OpenTelemetry tracing) needs the otel extra" in done.stderr
    assert "pip install 'flowloom[otel]'" in done.stderr


def test_a_ratio_sampler_keeps_or_drops_whole_requests(receiver):
    done = _python(
        """
        from flowloom import FlowService
        from apps import observed_app
        with FlowService() as fs:
            observed_app.register(fs)
            ids = [fs.execute("diamond", b"s") for _ in range(40)]
            traces = [fs.state("diamond", i).trace_id for i in ids if fs.result("diamond", i, 10)]
        print(" ".join(traces))
        """,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.5",
        },
    )
    assert done.returncode == 0, done.stderr
    traces = done.stdout.split()
    assert len(traces) == 40
    kept = [t for t in traces if receiver.trace(t)]
    assert 0 < len(kept) < 40  # some of each, at this ratio (40 requests: 1e-12 odds otherwise)
    for trace_id in kept:  # a kept request is whole: its root and every vertex span
        assert sorted(
            s.name for s in receiver.trace(trace_id) if "flow" in s.name or "vertex" in s.name
        ) == [
            "flow diamond",
            "vertex a",
            "vertex b",
            "vertex c",
            "vertex d",
        ]
    assert {s.trace_id for s in receiver.spans} == set(kept)


def test_handler_spans_follow_the_open_service(receiver):
    """The global provider is set once per process; a service opened after another was
    closed still gets its handlers' spans."""
    second = OtlpReceiver().start()
    try:
        for endpoint in (receiver.endpoint, second.endpoint):
            with FlowService(otlp_endpoint=endpoint) as fs:
                observed_app.register(fs)
                rid = fs.execute("diamond", b"x")
                fs.result("diamond", rid, timeout=10)
                trace_id = fs.state("diamond", rid).trace_id
        spans = second.trace(trace_id)
    finally:
        second.stop()
    assert one(spans, "user-work").parent_id == one(spans, "vertex b").span_id
    assert all(s.trace_id != trace_id for s in receiver.spans)
