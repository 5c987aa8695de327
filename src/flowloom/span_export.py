"""The span exporter process: ``python -m flowloom.span_export SETTINGS``.

Started by ``flowloom.spans.ChildSink``, one per traced process. It reads batches of
``Record`` tuples from its standard input (each a 4-byte length and a ``marshal``
payload: ``("spans", [record, ...])`` or ``("flush", token)``), encodes each batch as
one OTLP request (``flowloom.otlp``) and POSTs it. A flush is answered with its token
on a line of standard output, once every batch before it is sent. At the end of its
input it exits.

``SETTINGS`` is JSON: ``{"endpoint": URL or null, "resource": {attribute: value}}``;
the resource gets the SDK's usual additions (``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_SERVICE_NAME``, ``telemetry.sdk.*``).

``readable_spans`` and ``InProcessSink`` are the other way, for an exporter object
given in code: records made into the SDK's spans and exported in this process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import queue
import signal
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .otlp import Poster, encode_request
from .spans import AnyRecord, expand
from .traceparent import traces_url

__all__ = ["InProcessSink", "main", "readable_spans"]

log = logging.getLogger("flowloom.tracing")

_HEADER = struct.Struct("!I")
# Exporting is background work: on a busy machine the tasks get the CPU first, and this
# process catches up when they leave some (its parent queues up to 100k spans meanwhile).
# It runs in its parent's session, so that the niceness counts (see ``ChildSink``).
NICENESS = 10
_SCOPE = InstrumentationScope("flowloom")
_KINDS = {kind.value: kind for kind in SpanKind}
_CODES = {code.value: code for code in StatusCode}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def readable_spans(records: Iterable[AnyRecord], resource: Resource) -> list[ReadableSpan]:
    """The SDK's finished spans for ``records``, ready for any ``SpanExporter``."""
    spans = []
    for (
        name, kind, trace_id, span_id, parent_id, remote, start, end,
        attributes, events, code, text,
    ) in map(expand, records):  # fmt: skip
        parent = SpanContext(trace_id, parent_id, remote, _SAMPLED) if parent_id else None
        status = Status(_CODES[code], text or None) if code == StatusCode.ERROR.value else Status()
        spans.append(
            ReadableSpan(
                name,
                context=SpanContext(trace_id, span_id, False, _SAMPLED),
                parent=parent,
                resource=resource,
                attributes=attributes,
                events=[Event(n, a, timestamp=t) for n, t, a in events],
                kind=_KINDS[kind],
                status=status,
                start_time=start,
                end_time=end,
                instrumentation_scope=_SCOPE,
            )
        )
    return spans


def _messages(stream: BinaryIO) -> Iterable[Any]:
    while header := stream.read(_HEADER.size):
        if len(header) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(header)
        data = stream.read(size)
        if len(data) < size:
            return
        yield marshal.loads(data)


def export(stream: BinaryIO, answer: BinaryIO, poster: Poster, resource: Mapping[str, Any]) -> None:
    """Send every batch read from ``stream``, answering flushes on ``answer``. A thread
    posts while the next batch is read and encoded."""
    posts: queue.Queue[bytes | None] = queue.Queue(maxsize=4)

    def post() -> None:
        while (data := posts.get()) is not None:
            try:
                poster.post(data)
            finally:
                posts.task_done()
        posts.task_done()

    sender = threading.Thread(target=post, name="flowloom-span-post", daemon=True)
    sender.start()
    try:
        for kind, payload in _messages(stream):
            if kind == "spans":
                try:
                    posts.put(encode_request(payload, resource))
                except Exception:
                    log.exception("flowloom: encoding %d spans failed (dropped)", len(payload))
            elif kind == "flush":
                posts.join()
                answer.write(b"%d\n" % payload)
                answer.flush()
    finally:
        posts.put(None)
        sender.join()


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    logging.basicConfig(format="%(name)s: %(message)s")
    settings = json.loads((argv or sys.argv[1:])[0])
    endpoint = settings.get("endpoint")
    poster = Poster(traces_url(endpoint) if endpoint else None)
    resource = dict(Resource.create(settings.get("resource") or {}).attributes)
    try:
        export(sys.stdin.buffer, sys.stdout.buffer, poster, resource)
    finally:
        poster.close()


class InProcessSink:
    """Batches exported in this process, by the recorder's thread, to ``exporter``: for
    an exporter given in code, or when no exporter process can be started."""

    def __init__(self, exporter: SpanExporter, resource: Resource) -> None:
        self.exporter = exporter
        self.resource = resource

    def send(self, records: list[AnyRecord]) -> bool:
        self.exporter.export(readable_spans(records, self.resource))
        return True

    def flush(self, timeout: float) -> bool:
        return self.exporter.force_flush(int(timeout * 1000))

    def close(self, timeout: float) -> None:
        self.exporter.shutdown()


if __name__ == "__main__":
    main()
