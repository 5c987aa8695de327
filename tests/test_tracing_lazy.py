"""The vertex span made only when user code asks for it (``tracing._LazyRuntime``).

An attempt's span is current for its user code without anything being set: OpenTelemetry's
runtime context answers it when asked, from the attempt the worker is running. These tests
check that it is the span exported, wherever user code asks from (a copied context, an
asyncio handler, a thread, after the attempt), and that nothing is made when nobody asks.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from flowloom import FlowService, RequestFailed, tracing
from otlp_receiver import OtlpReceiver, ReceivedSpan


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def _hex(span: trace.Span) -> str:
    return f"{span.get_span_context().span_id:016x}"


def _spans(receiver: OtlpReceiver, trace_id: str) -> dict[str, ReceivedSpan]:
    """The spans of a trace, once its service is closed (every span exported)."""
    spans = receiver.trace(trace_id)
    names = [s.name for s in spans]
    assert len(set(names)) == len(names), names  # each span once
    return {s.name: s for s in spans}


def test_an_attempt_nobody_asks_makes_no_span_object(receiver, monkeypatch):
    made: list[object] = []
    init = tracing._AttemptSpan.__init__

    def counted(self: tracing._AttemptSpan, *args: object) -> None:
        made.append(self)
        init(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(tracing._AttemptSpan, "__init__", counted)
    seen: dict[str, str] = {}

    def plain(data: bytes, options: object) -> bytes:
        return data

    def reads(data: bytes, options: object) -> bytes:
        seen["b"] = _hex(trace.get_current_span())
        return data

    def define(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("a", plain)
        wf.dag.node("b", reads)
        wf.dag.node("c", plain)
        wf.dag.edge("a", "b")
        wf.dag.edge("b", "c")

    with FlowService(otlp_endpoint=receiver.endpoint, worker_concurrency=1) as fs:
        fs.register("line", define)
        rid = fs.execute("line", b"x")
        assert fs.result("line", rid, timeout=10) == b"x"
        trace_id = fs.state("line", rid).trace_id
    spans = _spans(receiver, trace_id)
    assert len(made) == 1  # b's: a and c made none
    root = spans["flow line"]
    for name in ("vertex a", "vertex b", "vertex c"):
        assert spans[name].parent_id == root.span_id
        assert spans[name].attributes["flowloom.status"] == "completed"
    assert spans["vertex b"].span_id == seen["b"]
    assert len({spans[n].span_id for n in ("vertex a", "vertex b", "vertex c")}) == 3


def test_copied_contexts_threads_and_async_handlers_see_the_vertex_span(receiver):
    """Also after the attempt: a context kept past it still names its vertex span
    (ended: a late child span is parented on it, the span itself no longer changes)."""
    seen: dict[str, str] = {}
    kept: list[contextvars.Context] = []
    tracer = trace.get_tracer("app")

    def spawns(data: bytes, options: object) -> bytes:
        seen["a"] = _hex(trace.get_current_span())
        copied = contextvars.copy_context()
        thread = threading.Thread(
            target=copied.run, args=(lambda: seen.update(thread=_hex(trace.get_current_span())),)
        )
        thread.start()
        thread.join()
        kept.append(contextvars.copy_context())
        return data

    async def waits(data: bytes, options: object) -> bytes:
        seen["b"] = _hex(trace.get_current_span())
        with tracer.start_as_current_span("inner b"):
            pass
        return data

    def define(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("a", spawns)
        wf.dag.node("b", waits)
        wf.dag.edge("a", "b")

    with FlowService(otlp_endpoint=receiver.endpoint) as fs:
        fs.register("kept", define)
        rid = fs.execute("kept", b"x")
        assert fs.result("kept", rid, timeout=10) == b"x"

        def late() -> None:
            span = trace.get_current_span()
            assert not span.is_recording()
            span.set_attribute("late", 1)  # ignored: recorded already
            with tracer.start_as_current_span("late child"):
                pass

        [context] = kept
        context.run(late)
        trace_id = fs.state("kept", rid).trace_id
    spans = _spans(receiver, trace_id)
    a, b = spans["vertex a"], spans["vertex b"]
    assert seen == {"a": a.span_id, "thread": a.span_id, "b": b.span_id}
    assert spans["inner b"].parent_id == b.span_id
    assert spans["late child"].parent_id == a.span_id
    assert "late" not in a.attributes


def test_a_context_left_attached_does_not_follow_into_the_next_attempt(receiver):
    """A handler that attaches a context and never detaches it: the next attempt on that
    worker thread still has its own vertex span current."""
    stray = NonRecordingSpan(SpanContext(0x1234, 0x5678, False, TraceFlags(1)))
    seen: dict[str, str] = {}

    def leaks(data: bytes, options: object) -> bytes:
        otel_context.attach(trace.set_span_in_context(stray))
        return data

    def reads(data: bytes, options: object) -> bytes:
        seen["b"] = _hex(trace.get_current_span())
        return data

    def define(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("a", leaks)
        wf.dag.node("b", reads)
        wf.dag.edge("a", "b")

    with FlowService(otlp_endpoint=receiver.endpoint, worker_concurrency=1) as fs:
        fs.register("leak", define)
        rid = fs.execute("leak", b"x")
        assert fs.result("leak", rid, timeout=10) == b"x"
        trace_id = fs.state("leak", rid).trace_id
    spans = _spans(receiver, trace_id)
    assert seen["b"] == spans["vertex b"].span_id


def test_under_another_runtime_context_each_span_is_attached_as_it_starts(receiver, monkeypatch):
    """An application's own runtime context (``OTEL_PYTHON_CONTEXT``) is left alone: the
    attempt's span is then made and attached when the attempt starts."""

    class Own(ContextVarsRuntimeContext):
        pass

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", Own())
    seen: dict[str, str] = {}

    def reads(data: bytes, options: object) -> bytes:
        seen["a"] = _hex(trace.get_current_span())
        with trace.get_tracer("app").start_as_current_span("inner"):
            pass
        return data

    def both(outputs: dict[str, bytes]) -> bytes:
        return b"".join(outputs.values())

    def define(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("a", reads)
        wf.dag.node("b", lambda data, options: data)
        wf.dag.node("c", lambda data, options: data, aggregator=both)
        wf.dag.edge("a", "c")
        wf.dag.edge("b", "c")

    with FlowService(otlp_endpoint=receiver.endpoint) as fs:
        [traced] = [o for o in fs.observers.all if isinstance(o, tracing.Tracing)]
        assert not traced._lazy
        fs.register("own", define)
        rid = fs.execute("own", b"x")
        assert fs.result("own", rid, timeout=10) == b"xx"
        trace_id = fs.state("own", rid).trace_id
    spans = _spans(receiver, trace_id)
    assert type(otel_context._RUNTIME_CONTEXT) is Own
    assert seen["a"] == spans["vertex a"].span_id
    assert spans["inner"].parent_id == spans["vertex a"].span_id
    assert spans["aggregator both"].parent_id == spans["vertex c"].span_id


def _aggregating(aggregate: object) -> object:
    """A flow a -> (b, c) -> d, d with ``aggregate`` as its aggregator."""

    def define(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("a", lambda data, options: data)
        wf.dag.node("b", lambda data, options: data)
        wf.dag.node("c", lambda data, options: data)
        wf.dag.node("d", lambda data, options: data, aggregator=aggregate)
        for parent, child in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
            wf.dag.edge(parent, child)

    return define


def test_an_aggregator_nobody_asks_makes_no_span_object(receiver, monkeypatch):
    """Its call span is recorded under the vertex span, with neither the attempt's span
    object nor one of its own made (nor any context set)."""
    made: list[object] = []
    for kind in (tracing._AttemptSpan, tracing.LightSpan):
        init = kind.__init__

        def counted(self: object, *args: object, _init: object = init, **kw: object) -> None:
            made.append(self)
            _init(self, *args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(kind, "__init__", counted)

    def join(received: dict[str, bytes]) -> bytes:
        return b"+".join(received[k] for k in sorted(received))

    with FlowService(otlp_endpoint=receiver.endpoint, worker_concurrency=1) as fs:
        fs.register("agg", _aggregating(join))
        rid = fs.execute("agg", b"x")
        assert fs.result("agg", rid, timeout=10) == b"x+x"
        trace_id = fs.state("agg", rid).trace_id
    spans = _spans(receiver, trace_id)
    assert made == []
    call = spans["aggregator join"]
    assert call.parent_id == spans["vertex d"].span_id
    assert call.trace_id == trace_id
    assert spans["vertex d"].start_ns <= call.start_ns <= call.end_ns <= spans["vertex d"].end_ns


def test_an_aggregator_that_asks_gets_its_own_span(receiver):
    """Current while it runs (spans made there are its children), then the vertex span
    again; one that fails has the exception on its span."""
    seen: dict[str, str] = {}
    tracer = trace.get_tracer("app")

    def join(received: dict[str, bytes]) -> bytes:
        seen["join"] = _hex(trace.get_current_span())
        trace.get_current_span().set_attribute("app.inputs", len(received))
        with tracer.start_as_current_span("inside join"):
            pass
        return b"joined"

    def broken(received: dict[str, bytes]) -> bytes:
        raise ValueError("no join")

    with FlowService(otlp_endpoint=receiver.endpoint, worker_concurrency=1) as fs:
        fs.register("asks", _aggregating(join))
        fs.register("fails", _aggregating(broken))
        rid = fs.execute("asks", b"x")
        assert fs.result("asks", rid, timeout=10) == b"joined"
        failed = fs.execute("fails", b"x")
        with pytest.raises(RequestFailed):
            fs.result("fails", failed, timeout=10)
        trace_id = fs.state("asks", rid).trace_id
        failed_trace = fs.state("fails", failed).trace_id
    spans = _spans(receiver, trace_id)
    call, vertex = spans["aggregator join"], spans["vertex d"]
    assert seen["join"] == call.span_id
    assert call.parent_id == vertex.span_id
    assert call.attributes == {"app.inputs": 2}
    assert spans["inside join"].parent_id == call.span_id
    spans = _spans(receiver, failed_trace)
    call, vertex = spans["aggregator broken"], spans["vertex d"]
    assert call.parent_id == vertex.span_id
    assert call.status == 2
    assert call.status_message == "ValueError: no join"
    assert [name for name, _ in call.events] == ["exception"]
    assert vertex.status == 2
