"""OTLP/HTTP for span records: the protobuf written by hand, and the POST that sends it.

The exporter process (``flowloom.span_export``) must keep up with every worker thread
of its parent. Building the SDK's span objects and then the generated protobuf
classes costs 20-45 µs a span; writing the few fields of an OTLP ``Span`` directly,
with the encoded attributes cached (flow names, request ids, vertex addresses repeat
from span to span), costs a few. The bytes are the ``ExportTraceServiceRequest`` the
OTLP exporter of the SDK would send for the same spans (tested field by field).

The POST honours the standard variables as the SDK's exporter does:
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``_HEADERS``, ``_TIMEOUT``, ``_COMPRESSION``
and ``_CERTIFICATE``.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import requests
from opentelemetry.trace import SpanKind

from .spans import AnyRecord, Record, RootRecord, VertexRecord

__all__ = ["Poster", "encode_request", "export_timeout"]

log = logging.getLogger("flowloom.tracing")

_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_SERVER = SpanKind.SERVER.value
_SCOPE = b"\x0a\x08flowloom"  # InstrumentationScope{name: "flowloom"}
_cache: dict[tuple[bytes, str, type, Any], bytes] = {}
_T = TypeVar("_T")


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    values = b"".join(_field(b"\x0a", _any_value(v)) for v in value)  # ArrayValue
    return _field(b"\x2a", values)


def _attribute(tag: bytes, key: str, value: Any) -> bytes:
    """A ``KeyValue`` as the repeated field ``tag`` of its message, cached."""
    cache_key = (tag, key, type(value), value)
    encoded = _cache.get(cache_key)
    if encoded is None:
        pair = _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))
        encoded = _field(tag, pair)
        if len(_cache) >= 65536:
            _cache.clear()
        _cache[cache_key] = encoded
    return encoded


def _attributes(tag: bytes, attributes: Mapping[str, Any]) -> list[bytes]:
    return [_attribute(tag, k, v) for k, v in attributes.items()]


def _span(record: Record) -> bytes:
    """A ``Span`` message (without its own tag and length)."""
    (
        name, kind, trace_id, span_id, parent_id, remote, start, end,
        attributes, events, code, text,
    ) = record  # fmt: skip
    parts = [
        b"\x0a\x10",
        trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        span_id.to_bytes(8, "big"),
    ]
    if parent_id:
        parts += (b"\x22\x08", parent_id.to_bytes(8, "big"))
    parts += (
        _field(b"\x2a", name.encode()),
        b"\x30",
        _varint(kind + 1),  # the API's SpanKind starts at 0, OTLP's at 1 (0: unspecified)
        b"\x39",
        _FIXED64.pack(start),
        b"\x41",
        _FIXED64.pack(end),
    )
    parts += _attributes(b"\x4a", attributes)
    for event_name, event_time, event_attributes in events:
        event = [b"\x09", _FIXED64.pack(event_time), _field(b"\x12", event_name.encode())]
        event += _attributes(b"\x1a", event_attributes)
        parts.append(_field(b"\x5a", b"".join(event)))
    status = (_field(b"\x12", text.encode()) if text else b"") + (
        b"\x18" + _varint(code) if code else b""
    )
    parts.append(_field(b"\x7a", status))
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent_id and remote else 0)
    parts += (b"\x85\x01", _FIXED32.pack(flags))
    return b"".join(parts)


# The fixed-size fields of a span, packed at once: the trace id (in two halves) and the
# span id, with (``_PARENTED``) or without the parent span id, each after its tag
# (big-endian: ids are bytes in OTLP); then the start and end times (fixed64, so
# little-endian), each after its tag.
_IDS = struct.Struct(">HQQHQ")
_PARENTED = struct.Struct(">HQQHQHQ")
_TIMES = struct.Struct("<BQBQ")
_HALF = (1 << 64) - 1
# the length prefixes of the usual span messages, made once
_LENGTHS = [_varint(n) for n in range(16384)]
# what repeats from span to span, encoded once: per vertex, step kind, attempt, worker,
# outcome and parent, its name and kind (before its times) and the attributes and fields
# after the request's; per flow and per request, their attribute
_vertices: dict[tuple[str, str, int, str, str, bool], tuple[bytes, bytes]] = {}
_flows: dict[str, bytes] = {}
_requests: dict[str, bytes] = {}
_REQUEST_KEY = _field(b"\x0a", b"flowloom.request_id")


def _vertex_span(record: VertexRecord) -> bytes:
    """The ``Span`` message of a vertex attempt, with its tag and length: the bytes of
    ``_field(b"\\x12", _span(expand(record)))``, with what repeats from attempt to
    attempt encoded once and the fixed-size fields packed by two ``struct`` calls (the
    exporter process encodes every span of its parent: its cost per span is what a
    busy machine feels)."""
    (
        trace_id, span_id, parent_id, offset, start, end,
        flow, request_id, address, kind, attempt, worker, outcome, _step,
    ) = record  # fmt: skip
    key = (address, kind, attempt, worker, outcome, parent_id != 0)
    vertex = _vertices.get(key)
    if vertex is None:
        vertex = _remember(_vertices, key, _vertex_parts(*key))
    flow_attribute = _flows.get(flow)
    if flow_attribute is None:
        flow_attribute = _remember(_flows, flow, _attribute(b"\x4a", "flowloom.flow", flow))
    request_attribute = _requests.get(request_id)
    if request_attribute is None:
        request_attribute = _remember(_requests, request_id, _request_attribute(request_id))
    if parent_id:
        ids = _PARENTED.pack(
            0x0A10, trace_id >> 64, trace_id & _HALF, 0x1208, span_id, 0x2208, parent_id
        )
    else:
        ids = _IDS.pack(0x0A10, trace_id >> 64, trace_id & _HALF, 0x1208, span_id)
    span = b"".join(
        (
            ids,
            vertex[0],
            _TIMES.pack(0x39, offset + int(start * 1e9), 0x41, offset + int(end * 1e9)),
            flow_attribute,
            request_attribute,
            vertex[1],
        )
    )
    size = len(span)
    return b"\x12" + (_LENGTHS[size] if size < 16384 else _varint(size)) + span


def _request_attribute(request_id: str) -> bytes:
    """``_attribute(b"\\x4a", "flowloom.request_id", request_id)``, not kept in its cache
    (each request's is kept in ``_requests`` alone)."""
    value = _field(b"\x0a", request_id.encode())  # AnyValue{string_value}
    return _field(b"\x4a", _REQUEST_KEY + _field(b"\x12", value))


def _vertex_parts(
    address: str, kind: str, attempt: int, worker: str, outcome: str, parented: bool
) -> tuple[bytes, bytes]:
    """A vertex span's name and kind (before its times), and what follows its request
    attribute: its vertex, step, attempt, worker and status attributes, the empty
    status, the flags."""
    name = f"{'vertex' if kind == 'run' else kind} {address}"
    attributes = (
        ("flowloom.vertex", address),
        ("flowloom.step", kind),
        ("flowloom.attempt", attempt),
        ("flowloom.worker", worker),
        ("flowloom.status", outcome),
    )
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parented else 0)
    return (
        _field(b"\x2a", name.encode()) + b"\x30\x01",
        b"".join(_attribute(b"\x4a", k, v) for k, v in attributes)
        + b"\x7a\x00\x85\x01"
        + _FIXED32.pack(flags),
    )


# per flow, a root span's name and kind with its flow attribute (after its times); per
# status and parent, the root span's status attribute, empty status and flags
_roots: dict[str, tuple[bytes, bytes]] = {}
_root_tails: dict[tuple[str, bool], bytes] = {}


def _root_span(record: RootRecord) -> bytes:
    """The ``Span`` message of a request's root span, with its tag and length: the bytes
    of ``_field(b"\\x12", _span(expand(record)))``, made as ``_vertex_span`` makes a
    vertex's (the request attribute shared with its vertices')."""
    trace_id, span_id, parent_id, start, end, flow, request_id, status = record
    root = _roots.get(flow)
    if root is None:
        root = _remember(_roots, flow, _root_name(flow))
    tail = _root_tails.get((status, parent_id != 0))
    if tail is None:
        key = (status, parent_id != 0)
        tail = _remember(_root_tails, key, _root_tail(*key))
    request_attribute = _requests.get(request_id)
    if request_attribute is None:
        request_attribute = _remember(_requests, request_id, _request_attribute(request_id))
    if parent_id:
        ids = _PARENTED.pack(
            0x0A10, trace_id >> 64, trace_id & _HALF, 0x1208, span_id, 0x2208, parent_id
        )
    else:
        ids = _IDS.pack(0x0A10, trace_id >> 64, trace_id & _HALF, 0x1208, span_id)
    span = b"".join((ids, root[0], _TIMES.pack(0x39, start, 0x41, end), root[1],
                     request_attribute, tail))  # fmt: skip
    size = len(span)
    return b"\x12" + (_LENGTHS[size] if size < 16384 else _varint(size)) + span


def _root_name(flow: str) -> tuple[bytes, bytes]:
    """A root span's name and kind (before its times), and its flow attribute."""
    return (
        _field(b"\x2a", f"flow {flow}".encode()) + b"\x30" + _varint(_SERVER + 1),
        _attribute(b"\x4a", "flowloom.flow", flow),
    )


def _root_tail(status: str, parented: bool) -> bytes:
    """The end of a root span's message: its status attribute, the empty status, the
    flags."""
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parented else 0)
    return (
        _attribute(b"\x4a", "flowloom.status", status) + b"\x7a\x00\x85\x01" + _FIXED32.pack(flags)
    )


# per name, kind and parent: a plain span's name and kind, and (after its times) its
# empty status and flags
_plain_spans: dict[tuple[str, int, bool], tuple[bytes, bytes]] = {}


def _plain_span(record: Record) -> bytes:
    """The ``Span`` message, with its tag and length, of a ``Record`` with no
    attribute, no event and no status (a user-code call's, as ``_CallScope`` records
    it): the bytes of ``_field(b"\\x12", _span(record))``."""
    name, kind, trace_id, span_id, parent_id, remote, start, end = record[:8]
    key = (name, kind, bool(parent_id and remote))
    plain = _plain_spans.get(key)
    if plain is None:
        plain = _remember(_plain_spans, key, _plain_parts(*key))
    if parent_id:
        ids = _PARENTED.pack(
            0x0A10, trace_id >> 64, trace_id & _HALF, 0x1208, span_id, 0x2208, parent_id
        )
    else:
        ids = _IDS.pack(0x0A10, trace_id >> 64, trace_id & _HALF, 0x1208, span_id)
    span = b"".join((ids, plain[0], _TIMES.pack(0x39, start, 0x41, end), plain[1]))
    size = len(span)
    return b"\x12" + (_LENGTHS[size] if size < 16384 else _varint(size)) + span


def _plain_parts(name: str, kind: int, remote_parent: bool) -> tuple[bytes, bytes]:
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if remote_parent else 0)
    return (
        _field(b"\x2a", name.encode()) + b"\x30" + _varint(kind + 1),
        b"\x7a\x00\x85\x01" + _FIXED32.pack(flags),
    )


def _encode(record: AnyRecord) -> bytes:
    """A record's ``Span`` message with its tag and length, by the encoder of its kind."""
    size = len(record)
    if size == 14:
        return _vertex_span(record)  # type: ignore[arg-type]
    if size == 8:
        return _root_span(record)  # type: ignore[arg-type]
    if not record[8] and not record[9] and not record[10] and not record[11]:  # type: ignore[misc]
        return _plain_span(record)  # type: ignore[arg-type]
    return _field(b"\x12", _span(record))  # type: ignore[arg-type]


def _remember(cache: dict[Any, _T], key: Any, value: _T) -> _T:
    """``value`` kept in ``cache`` (emptied first when it is full)."""
    if len(cache) >= 65536:
        cache.clear()
    cache[key] = value
    return value


def encode_request(records: Iterable[AnyRecord], resource: Mapping[str, Any]) -> bytes:
    """The ``ExportTraceServiceRequest`` of ``records``, all from one process described
    by ``resource`` (its attributes) and of the instrumentation scope ``flowloom``."""
    spans = [
        _vertex_span(record) if len(record) == 14 else _encode(record)  # type: ignore[arg-type]
        for record in records
    ]
    scope_spans = _field(b"\x0a", _SCOPE) + b"".join(spans)
    resource_spans = _field(b"\x0a", b"".join(_attributes(b"\x0a", resource))) + _field(
        b"\x12", scope_spans
    )
    return _field(b"\x0a", resource_spans)


def _setting(name: str) -> str:
    """``OTEL_EXPORTER_OTLP_TRACES_NAME``, else ``OTEL_EXPORTER_OTLP_NAME``, else ""."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}")
        or ""
    ).strip()


def export_timeout() -> float:
    """The export timeout in seconds (the OpenTelemetry SDK's unit here): a positive
    number; 10 when unset, and, with a warning, when not one (a word, NaN, zero, a
    negative or an endless number: a NaN deadline would retry a failing export for
    ever)."""
    name = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    if not os.environ.get(name, "").strip():
        name = "OTEL_EXPORTER_OTLP_TIMEOUT"
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 10.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if 0 < seconds < math.inf:
        return seconds
    log.warning("flowloom: %s=%.40r is not a number of seconds; using 10", name, raw)
    return 10.0


def _headers(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (values URL-encoded), as the OTLP exporter specification says."""
    headers = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[urllib.parse.unquote(key.strip()).lower()] = urllib.parse.unquote(value.strip())
    return headers


class Poster:
    """POSTs encoded requests to ``url`` (None: from the standard variables), retrying
    a refused or failed one with backoff for up to the export timeout."""

    def __init__(self, url: str | None) -> None:
        if url is None:
            traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
            base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            url = traces or (base or "http://localhost:4318").rstrip("/") + "/v1/traces"
        self.url = url
        self.timeout = export_timeout()
        self.compression = _setting("COMPRESSION").lower()
        if self.compression not in ("", "none", "gzip", "deflate"):
            log.warning(
                "flowloom: OTEL_EXPORTER_OTLP_COMPRESSION=%.40r is not gzip, deflate or "
                "none; spans are sent uncompressed",
                self.compression,
            )
        self.session = requests.Session()
        self.session.headers.update(
            {"content-type": "application/x-protobuf", **_headers(_setting("HEADERS"))}
        )
        if self.compression in ("gzip", "deflate"):
            self.session.headers["content-encoding"] = self.compression
        certificate = _setting("CERTIFICATE")
        if certificate:
            self.session.verify = certificate

    def post(self, data: bytes) -> bool:
        if self.compression == "gzip":
            data = gzip.compress(data)
        elif self.compression == "deflate":
            data = zlib.compress(data)
        deadline = time.monotonic() + self.timeout
        delay = 0.5
        while True:
            left = deadline - time.monotonic()
            try:
                answer = self.session.post(self.url, data=data, timeout=max(0.1, left))
                if answer.ok:
                    return True
                retry = answer.status_code in (429, 502, 503, 504)
                why = f"HTTP {answer.status_code}"
            except requests.RequestException as exc:
                retry, why = True, str(exc)
            if not retry or time.monotonic() + delay >= deadline:
                log.warning("flowloom: exporting spans to %s failed: %s (dropped)", self.url, why)
                return False
            time.sleep(delay)
            delay *= 2

    def close(self) -> None:
        self.session.close()
