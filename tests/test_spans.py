"""flowloom's own span path: records, the hand-written OTLP protobuf, the bounded queue,
and the exporter process, against a real OTLP/HTTP receiver."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from flowloom import FlowService
from flowloom.otlp import _SCOPE, _field, _span, _varint, encode_request
from flowloom.span_export import NICENESS, readable_spans
from flowloom.spans import Record, Recorder, RootRecord, VertexRecord, expand
from flowloom.tracing import BATCH, MAX_QUEUE
from otlp_receiver import OtlpReceiver

TRACE = 0x0AF7651916CD43DD8448EB211C80319C


def record(name: str = "vertex a", **changes: object) -> Record:
    fields: dict[str, object] = {
        "name": name,
        "kind": 0,
        "trace_id": TRACE,
        "span_id": 0xB7AD6B7169203331,
        "parent_id": 0x00F067AA0BA902B7,
        "remote": True,
        "start": 1_700_000_000_000_000_000,
        "end": 1_700_000_000_000_250_000,
        "attributes": {"flowloom.flow": "f", "flowloom.attempt": 2},
        "events": [],
        "code": 0,
        "text": "",
    }
    fields.update(changes)
    return tuple(fields.values())  # type: ignore[return-value]


def test_the_hand_written_protobuf_is_what_the_sdk_would_send():
    records = [
        record(),
        record(
            "flow f",
            kind=1,
            span_id=7,
            parent_id=0,
            remote=False,
            attributes={
                "s": "text é",
                "b": True,
                "i": -3,
                "big": 2**62,
                "d": 0.25,
                "raw": b"\x00\xff",
                "list": ("x", "y"),
                "ints": (1, 2),
            },
            events=[("exception", 5, {"exception.type": "ValueError", "n": 1})],
            code=2,
            text="a: ValueError: no",
        ),
        record("handler h", parent_id=0xB7AD6B7169203331, remote=False, span_id=9),
    ]
    resource = Resource.create({"process.pid": 42, "service.name": "shop"})
    ours = ExportTraceServiceRequest.FromString(encode_request(records, dict(resource.attributes)))
    sdk = encode_spans(readable_spans(records, resource))
    assert MessageToDict(ours) == MessageToDict(sdk)
    # the cache of encoded attributes keeps True and 1 apart
    again = ExportTraceServiceRequest.FromString(
        encode_request([record(attributes={"v": True}), record(attributes={"v": 1})], {})
    )
    values = [s.attributes[0].value for s in again.resource_spans[0].scope_spans[0].spans]
    assert values[0].WhichOneof("value") == "bool_value"
    assert values[1].WhichOneof("value") == "int_value"


class _StuckSink:
    """A sink whose first ``send`` waits until released: an exporter that lags."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.sent: list[Record] = []
        self.closed = False

    def send(self, records: list[Record]) -> bool:
        self.entered.set()
        self.release.wait(30)
        self.sent += records
        return True

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float) -> None:
        self.closed = True


def test_a_lagging_exporter_makes_spans_dropped_and_counted_never_waited_for():
    sink = _StuckSink()
    recorder = Recorder(sink, max_queue=10, batch=5, delay=30)
    for i in range(5):  # one full batch wakes the thread, which gets stuck sending it
        recorder.add(record(span_id=i + 1))
    assert sink.entered.wait(10)
    for i in range(5, 100):  # never blocks: the queue takes 10, the rest is dropped
        recorder.add(record(span_id=i + 1))
    assert recorder.dropped == 100 - 5 - 10
    sink.release.set()
    recorder.close()
    assert sink.closed
    assert len(sink.sent) == 15
    assert len({r[3] for r in sink.sent}) == 15


def test_a_lagging_exporter_drops_and_counts_the_spans_of_tasks_too():
    """A task's span, queued by the tracing itself (not through ``Recorder.add``), is
    dropped and counted the same way when the queue is full."""
    with FlowService(otlp_endpoint="http://127.0.0.1:9") as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("echo", lambda d, o: d))
        tracing = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        tracing.recorder.close(5)
        sink = _StuckSink()
        tracing.recorder = Recorder(sink, max_queue=10, batch=5, delay=30)
        for i in range(40):  # a vertex span and a root span each
            rid = fs.execute("echo", b"%d" % i)
            assert fs.result("echo", rid, timeout=10) == b"%d" % i
            if i == 2:  # 6 spans: the thread got a full batch and is stuck sending it
                assert sink.entered.wait(10)
        assert tracing.recorder.dropped == 80 - 5 - 10
        sink.release.set()
        tracing.recorder.close()
    assert len(sink.sent) == 15
    assert {len(r) for r in sink.sent} == {8, 14}  # roots and vertices kept while there is room


def test_an_exporter_stalled_for_a_while_catches_up_without_dropping():
    """With flowloom's default sizes, tens of thousands of spans made while the exporter
    is stuck wait for it and are all exported once it moves again."""
    sink = _StuckSink()
    recorder = Recorder(sink, max_queue=MAX_QUEUE, batch=BATCH, delay=30)
    for i in range(BATCH):
        recorder.add(record(span_id=i + 1))
    assert sink.entered.wait(10)
    for i in range(BATCH, 60_000):
        recorder.add(record(span_id=i + 1))
    assert recorder.dropped == 0
    sink.release.set()
    recorder.close()
    assert len({r[3] for r in sink.sent}) == 60_000


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def test_a_vertex_record_expands_to_the_span_of_its_attempt():
    vertex: VertexRecord = (
        TRACE, 5, 6, 1_000_000, 0.25, 0.5, "shop", "r1", "each[k1]/pay", "run", 2, "w-1",
        "retried", "each[]/pay",
    )  # fmt: skip
    assert expand(vertex) == (
        "vertex each[k1]/pay", 0, TRACE, 5, 6, True, 251_000_000, 501_000_000,
        {
            "flowloom.flow": "shop",
            "flowloom.request_id": "r1",
            "flowloom.vertex": "each[k1]/pay",
            "flowloom.step": "run",
            "flowloom.attempt": 2,
            "flowloom.worker": "w-1",
            "flowloom.status": "retried",
        },
        (), 0, "",
    )  # fmt: skip
    assert expand((*vertex[:8], "s", "split", *vertex[10:]))[0] == "split s"
    plain = record()
    assert expand(plain) is plain
    # a batch mixes both kinds; each is encoded as its expanded record
    resource = Resource.create({"service.name": "shop"})
    both = encode_request([plain, vertex], dict(resource.attributes))
    assert both == encode_request([plain, expand(vertex)], dict(resource.attributes))


def test_a_root_record_expands_to_the_request_s_root_span():
    root: RootRecord = (TRACE, 5, 7, 1_000, 2_000, "shop", "r1", "completed")
    assert expand(root) == (
        "flow shop", trace.SpanKind.SERVER.value, TRACE, 5, 7, True, 1_000, 2_000,
        {"flowloom.flow": "shop", "flowloom.request_id": "r1", "flowloom.status": "completed"},
        (), 0, "",
    )  # fmt: skip
    # in a batch with the other kinds, it is encoded as its expanded record
    resource = dict(Resource.create({"service.name": "shop"}).attributes)
    vertex: VertexRecord = (
        TRACE, 6, 5, 0, 0.25, 0.5, "shop", "r1", "a", "run", 1, "w-1", "completed", "a",
    )  # fmt: skip
    mixed = encode_request([record(), root, vertex], resource)
    assert mixed == encode_request([record(), expand(root), expand(vertex)], resource)


def test_every_vertex_record_encodes_as_its_expanded_record():
    """The vertex encoder packs ids and times and reuses what repeats (names, the step's
    attributes, flows, request ids): the bytes stay those of the expanded record, for
    every step kind, with and without a parent, short and long (a length of 1, 2 and 3
    bytes), repeated or not."""
    records: list[VertexRecord] = []
    for i, (kind, parent, address) in enumerate(
        [
            ("run", 6, "a"),
            ("split", 6, "each"),
            ("join", 6, "each"),
            ("run", 0, "each[k1]/pay"),
            ("run", 6, "x" * 200),
            ("run", 6, "y" * 20_000),
            ("run", 6, "a"),  # again: from the caches
        ]
    ):
        records.append(
            (TRACE + i, 5 + i, parent, 1_000_000, 0.25 * i, 0.5 * i, "shop", f"r{i % 2}",
             address, kind, 1 + i % 2, "w-1", ("completed", "retried")[i % 2], address)
        )  # fmt: skip
    for vertex in records:
        assert encode_request([vertex], {}) == encode_request([expand(vertex)], {})
    assert encode_request(records, {"service.name": "shop"}) == encode_request(
        [expand(r) for r in records], {"service.name": "shop"}
    )


def test_root_and_plain_records_encode_as_the_sdk_would_send_them():
    """Root records and plain records (a user-code call's: no attribute, no event, no
    status) have encoders of their own, reusing what repeats: the bytes stay those of
    the general encoder, and the message what the SDK would send, with and without a
    parent, short and long, repeated or not; a record with attributes, events or a
    status goes the general way."""
    roots: list[RootRecord] = [
        (TRACE, 5, 7, 1_000, 2_000, "shop", "r1", "completed"),
        (TRACE + 1, 6, 0, 1_000, 3_000, "shop", "r2", "failed"),
        (TRACE + 2, 7, 9, 1_000, 4_000, "x" * 300, "r" * 128, "stopped"),
        (TRACE, 5, 7, 1_000, 2_000, "shop", "r1", "completed"),  # again: from the caches
    ]
    calls = [
        record("aggregator join", attributes={}, remote=False),
        record("aggregator join", attributes={}, remote=False, parent_id=0),
        record("handler h", kind=2, attributes={}, remote=True),
        record("y" * 20_000, attributes={}),
        record("aggregator join", attributes={}, remote=False),  # again
        record("with an event", attributes={}, events=[("e", 5, {"n": 1})]),
        record("with a status", attributes={}, code=2, text="no"),
        record("with attributes"),
    ]
    for one in [*roots, *calls]:
        expanded = expand(one)
        assert encode_request([one], {}) == b"".join(
            (b"\x0a", _varint(len(body := _scope_spans(expanded))), body)
        ), one
    resource = Resource.create({"service.name": "shop"})
    ours = ExportTraceServiceRequest.FromString(
        encode_request([*roots, *calls], dict(resource.attributes))
    )
    sdk = encode_spans(readable_spans([*roots, *calls], resource))
    assert MessageToDict(ours) == MessageToDict(sdk)


def _scope_spans(one: Record) -> bytes:
    """A request of ``one`` span, from the general encoder: its resource spans' body."""
    scope_spans = _field(b"\x0a", _SCOPE) + _field(b"\x12", _span(one))
    return _field(b"\x0a", b"") + _field(b"\x12", scope_spans)


def test_a_handler_reading_its_span_sees_the_exported_ids(receiver):
    """A handler that only reads the current span (its ids, a child span) changes
    nothing: the vertex span is exported as a record of its attempt, under those ids."""
    seen = {}

    kept: list[trace.Span] = []

    def read(data: bytes, options: object) -> bytes:
        span = trace.get_current_span()
        assert span.is_recording()
        kept.append(span)
        seen["span_id"] = f"{span.get_span_context().span_id:016x}"
        with trace.get_tracer("app").start_as_current_span("inner"):
            pass
        return data

    with FlowService(otlp_endpoint=receiver.endpoint) as fs:
        fs.register("peek", lambda wf, ctx: wf.dag.node("read", read))
        rid = fs.execute("peek", b"x")
        assert fs.result("peek", rid, timeout=10) == b"x"
        trace_id = fs.state("peek", rid).trace_id
        # the span kept past its attempt is ended with it: changing or ending it is ignored
        [span] = kept
        deadline = time.monotonic() + 10  # the attempt ends just after its result is stored
        while span.is_recording() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not span.is_recording()
        span.set_attribute("late", 1)
        span.end()
    spans = {s.name: s for s in receiver.trace(trace_id)}
    assert [s.name for s in receiver.trace(trace_id)].count("vertex read") == 1
    vertex = spans["vertex read"]
    assert vertex.span_id == seen["span_id"]
    assert spans["inner"].parent_id == vertex.span_id
    assert vertex.parent_id == spans["flow peek"].span_id
    assert vertex.attributes["flowloom.vertex"] == "read"
    assert vertex.attributes["flowloom.status"] == "completed"
    assert vertex.attributes["flowloom.attempt"] == 1
    assert "late" not in vertex.attributes


def test_handlers_use_the_vertex_span_as_any_current_span(receiver, monkeypatch):
    """The vertex span is a light one, but to a handler it is the current span: its
    attributes, events and status land on the exported vertex span, and a span the
    handler makes with the SDK is its child. Sent gzipped, as the variable asks."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")

    def annotate(data: bytes, options: object) -> bytes:
        span = trace.get_current_span()
        assert span.is_recording()
        span.set_attribute("app.size", len(data))
        span.set_attributes({"app.kind": "note", "app.bad": object()})  # type: ignore[dict-item]
        span.add_event("checked", {"app.ok": True})
        with trace.get_tracer("app").start_as_current_span("inner"):
            pass
        return data

    with FlowService(otlp_endpoint=receiver.endpoint) as fs:
        fs.register("note", lambda wf, ctx: wf.dag.node("annotate", annotate))
        rid = fs.execute("note", b"hello")
        assert fs.result("note", rid, timeout=10) == b"hello"
        trace_id = fs.state("note", rid).trace_id
    spans = {s.name: s for s in receiver.trace(trace_id)}
    vertex = spans["vertex annotate"]
    assert vertex.attributes["app.size"] == 5
    assert vertex.attributes["app.kind"] == "note"
    assert "app.bad" not in vertex.attributes  # not an attribute value: dropped
    assert vertex.attributes["flowloom.status"] == "completed"
    assert vertex.events == (("checked", {"app.ok": True}),)
    assert spans["inner"].parent_id == vertex.span_id
    assert vertex.parent_id == spans["flow note"].span_id
    assert receiver.gzipped


def test_dropped_spans_are_a_metric(receiver):
    from prometheus_client.parser import text_string_to_metric_families

    with FlowService(otlp_endpoint=receiver.endpoint, enable_monitoring=True) as fs:
        tracing = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        tracing.recorder.dropped = 3  # as a lagging exporter would leave it
        assert fs.metrics is not None
        text = fs.metrics.exposition().decode()
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "flowloom_spans_dropped"
    ]
    assert family.samples[0].value == 3


def test_a_dead_exporter_process_is_restarted_and_later_spans_arrive(receiver, caplog):
    """Killing the exporter process costs the spans sent while it is down (counted as
    dropped), never a request; after its back-off a new one exports the later spans."""
    with FlowService(otlp_endpoint=receiver.endpoint) as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("echo", lambda d, o: d))
        tracing = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        sink = tracing.recorder.sink
        first = sink.process
        first.kill()
        first.wait(10)
        lost = fs.execute("echo", b"a")
        assert fs.result("echo", lost, timeout=10) == b"a"
        assert not tracing.flush(5)  # the batch meets a dead child: dropped
        assert tracing.dropped == 2  # a vertex span and a root span
        time.sleep(sink.restart_delay + 0.1)
        kept = fs.execute("echo", b"b")
        assert fs.result("echo", kept, timeout=10) == b"b"
        assert tracing.flush(10)
        assert sink.process is not first
        assert sink.process.poll() is None
        assert sink.restarts == 1
        trace_id = fs.state("echo", kept).trace_id
        lost_trace = fs.state("echo", lost).trace_id
    assert {s.name for s in receiver.trace(trace_id)} == {"flow echo", "vertex echo"}
    assert receiver.trace(lost_trace) == []
    assert caplog.text.count("the span exporter process exited") == 1
    assert "span exporter process restarted" in caplog.text


def test_the_exporter_process_is_nice_in_this_session_and_out_of_its_process_group(receiver):
    """The exporter runs niced in a process group of its own (a Ctrl-C to the terminal
    is not for it) but in this session: with Linux's autogroup, a session of its own
    would share the CPU with the whole worker as an equal, and its niceness would not
    count against the worker's threads."""
    with FlowService(otlp_endpoint=receiver.endpoint) as fs:
        tracing = next(o for o in fs.observers.all if hasattr(o, "recorder"))
        child = tracing.recorder.sink.process.pid
        assert os.getsid(child) == os.getsid(0)
        assert os.getpgid(child) == child != os.getpgid(0)
        deadline = time.monotonic() + 10
        niced = min(os.nice(0) + NICENESS, 19)  # Linux caps niceness at 19
        while os.getpriority(os.PRIO_PROCESS, child) != niced:
            assert time.monotonic() < deadline, "the exporter process never niced itself"
            time.sleep(0.01)
