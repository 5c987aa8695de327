"""A request's place in a distributed trace, and the W3C ``traceparent`` header.

Every request gets a ``TraceContext`` when it is executed: the trace it belongs
to, the id its root span will have, and the caller's span (when an incoming
``traceparent`` made the request a child of another trace). It is stored with
the request, so any process that runs a task of the request can parent its spans
on the root span, and the process that ends the request can emit the root span
under the id the others already used. Pure code: no OpenTelemetry needed here.
"""

from __future__ import annotations

import os
import random
import re
from typing import NamedTuple

__all__ = ["TraceContext", "parse_traceparent", "traces_url", "tracing_configured"]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_STORED = re.compile(r"([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{2})")
# ids from the system's generator: its call lets other threads run, which a caller
# executing thousands of requests in a loop needs (the embedded workers starve without it:
# dags of 5,000 requests ran at half the speed with the random module's generator)
_random = random.SystemRandom()
# contexts ``keep`` encoded in this process, by their stored form, until ``decode`` reads
# them back: a worker of the process that executed a request takes its context without
# parsing it (each is taken once; the few never read are cleared past the bound)
_KEPT: dict[str, TraceContext] = {}
_KEEP_AT_MOST = 4096
_SPAN_BITS = (1 << 64) - 1


class TraceContext(NamedTuple):
    """``trace_id`` (128 bits), the root span's ``span_id`` (64 bits), the caller's span
    ``parent_id`` (0 when the request starts its own trace) and the ``sampled`` flag.

    ``sampler``: the sampler decides, by the trace id, as for a request that starts its
    own trace, though ``parent_id`` is set: a retry of such a request, whose root is a
    child of the first root (``retried``). Stored as bit 1 of the flags.

    A named tuple rather than a frozen dataclass: a worker decodes one for every request
    it runs, and a tuple is made at a fraction of the cost."""

    trace_id: int
    span_id: int
    parent_id: int = 0
    sampled: bool = True
    sampler: bool = False

    @classmethod
    def new(cls, parent: tuple[int, int, bool] | None = None) -> TraceContext:
        """A fresh root span id, in a new trace or under ``parent`` (trace id, span id,
        sampled), as ``parse_traceparent`` returns it."""
        bits = _random.getrandbits(192)  # both ids from one system call
        span_id = (bits & _SPAN_BITS) or 1
        if parent is not None:
            return cls(parent[0], span_id, parent[1], parent[2])
        return cls((bits >> 64) or 1, span_id)

    def retried(self) -> TraceContext:
        """The context of a retry of the request: a new root span in the same trace, child
        of this root span (already emitted when the request ended), and sampled alike:
        by the caller's flag if it had a caller, else by the sampler again."""
        by_sampler = self.sampler or not self.parent_id
        span_id = _random.getrandbits(64) or 1
        return TraceContext(self.trace_id, span_id, self.span_id, self.sampled, by_sampler)

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def encode(self) -> str:
        """As stored with the request: ``TRACE-ROOTSPAN-PARENTSPAN-FLAGS`` in hex."""
        return f"{self.trace_id:032x}-{self.span_id:016x}-{self.parent_id:016x}-{self.flags:02x}"

    def keep(self) -> str:
        """``encode()``, and this context kept for the first ``decode`` of that text in
        this process (dict operations, atomic under the GIL: no lock)."""
        text = self.encode()
        if len(_KEPT) >= _KEEP_AT_MOST:
            _KEPT.clear()
        _KEPT[text] = self
        return text

    @classmethod
    def decode(cls, text: str) -> TraceContext | None:
        """The stored form back; None for an empty or malformed one."""
        kept = _KEPT.pop(text, None)
        if kept is not None:
            return kept
        match = _STORED.fullmatch(text)
        if match is None:
            return None
        trace, span, parent, flags = match.groups()
        bits = int(flags, 16)
        return cls(int(trace, 16), int(span, 16), int(parent, 16), bool(bits & 1), bool(bits & 2))

    @property
    def flags(self) -> int:
        return (1 if self.sampled else 0) | (2 if self.sampler else 0)

    def traceparent(self) -> str:
        """The W3C header naming the request's root span (to hand on to a callee)."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{1 if self.sampled else 0:02x}"


def parse_traceparent(header: str | None) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) of a W3C ``traceparent`` header, or None when it is
    missing or invalid (an invalid one is ignored, as the W3C spec asks)."""
    if not header:
        return None
    match = _TRACEPARENT.fullmatch(header.strip().lower())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_configured(endpoint: str | None) -> bool:
    """Whether tracing is asked for: an endpoint given, or set in the standard
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` variables (``OTEL_SDK_DISABLED=true`` and
    ``OTEL_TRACES_EXPORTER=none`` turn it off). Importable without the extra."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(endpoint) or any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)


def traces_url(endpoint: str) -> str:
    """``http://HOST:4318`` -> ``http://HOST:4318/v1/traces`` (a full URL is kept)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"
