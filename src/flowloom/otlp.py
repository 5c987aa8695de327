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
import os
import struct
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import requests

from .spans import AnyRecord, Record, VertexRecord

__all__ = ["Poster", "encode_request"]

log = logging.getLogger("flowloom.tracing")

_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_SCOPE = b"\x0a\x08flowloom"  # InstrumentationScope{name: "flowloom"}
_cache: dict[tuple[bytes, str, type, Any], bytes] = {}


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


_vertex_parts: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}


def _vertex_span(record: VertexRecord) -> bytes:
    """The ``Span`` message of a vertex attempt: the bytes of ``_span(expand(record))``,
    with what repeats from attempt to attempt (the name, the step's attributes, the
    status, the flags) encoded once."""
    (
        trace_id, span_id, parent_id, offset, start, end,
        flow, request_id, address, kind, attempt, worker, outcome,
    ) = record  # fmt: skip
    key = (address, kind, attempt, worker, outcome, bool(parent_id))
    cached = _vertex_parts.get(key)
    if cached is None:
        name = f"{'vertex' if kind == 'run' else kind} {address}"
        tail = (
            b"".join(
                _attribute(b"\x4a", k, v)
                for k, v in (
                    ("flowloom.step", kind),
                    ("flowloom.attempt", attempt),
                    ("flowloom.worker", worker),
                    ("flowloom.status", outcome),
                )
            )
            + b"\x7a\x00\x85\x01"
            + _FIXED32.pack(_HAS_IS_REMOTE | (_IS_REMOTE if parent_id else 0))
        )
        cached = (_field(b"\x2a", name.encode()) + b"\x30\x01", tail)
        if len(_vertex_parts) >= 65536:
            _vertex_parts.clear()
        _vertex_parts[key] = cached
    head, tail = cached
    return b"".join(
        (
            b"\x0a\x10",
            trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            span_id.to_bytes(8, "big"),
            b"\x22\x08" + parent_id.to_bytes(8, "big") if parent_id else b"",
            head,
            b"\x39",
            _FIXED64.pack(offset + int(start * 1e9)),
            b"\x41",
            _FIXED64.pack(offset + int(end * 1e9)),
            _attribute(b"\x4a", "flowloom.flow", flow),
            _attribute(b"\x4a", "flowloom.request_id", request_id),
            _attribute(b"\x4a", "flowloom.vertex", address),
            tail,
        )
    )


def encode_request(records: Iterable[AnyRecord], resource: Mapping[str, Any]) -> bytes:
    """The ``ExportTraceServiceRequest`` of ``records``, all from one process described
    by ``resource`` (its attributes) and of the instrumentation scope ``flowloom``."""
    spans = [
        _field(b"\x12", _span(record) if isinstance(record[0], str) else _vertex_span(record))
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
        self.timeout = float(_setting("TIMEOUT") or 10)
        self.compression = _setting("COMPRESSION").lower()
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
