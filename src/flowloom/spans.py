"""flowloom's own spans, recorded as plain tuples and encoded off the hot path.

Making a span with the OpenTelemetry SDK costs more than running a small task: a span
object with its locks and limits, then encoding it to protobuf (about 50 µs), all under
the worker's GIL. flowloom's spans (request roots, vertex attempts, user-code calls) are
simple and known in advance, so they skip the SDK: ``LightSpan`` is a small recording
span (an OpenTelemetry ``Span``, so it can be the current span while a handler runs and
handlers' own SDK spans nest under it), and when it ends it becomes one tuple, a
``Record``, appended to a bounded ``Recorder``. A thread of the recorder hands batches
of records, marshalled, to a child process (``flowloom.span_export``) that builds the
OTLP protobuf and sends it: encoding runs on another core, outside this process's GIL.

When the exporter lags the recorder's queue fills up; further spans are dropped and
counted (``Recorder.dropped``, the ``flowloom_spans_dropped`` metric), never waited for.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import marshal
import math
import os
import random
import select
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

__all__ = [
    "CLOCK", "AnyRecord", "LightSpan", "Record", "Recorder", "RootRecord", "Sink", "VertexRecord",
    "child_sink", "expand", "vertex_span",
]  # fmt: skip

log = logging.getLogger("flowloom.tracing")

# (name, kind, trace id, span id, parent span id (0: none), parent is remote, start ns,
#  end ns, attributes, events [(name, time ns, attributes)], status code, status text)
Record = tuple[
    str, int, int, int, int, bool, int, int, dict[str, Any], Sequence[Any], int, str
]  # fmt: skip

# A vertex attempt's span as its worker records it, a tuple of what varies and nothing
# else (fewer objects to make, queue and marshal than a ``Record``): (trace id, span id,
# parent span id, ``CLOCK.offset``, start and end as ``time.perf_counter()`` read them,
# flow, request id, vertex address, step kind ("run", "split", "join"), attempt, worker,
# outcome, step id (the metrics' label: the address without item keys)). ``expand`` makes
# it a ``Record`` where it is exported (the times in wall-clock nanoseconds, the name and
# attributes of ``vertex_span``).
VertexRecord = tuple[int, int, int, int, float, float, str, str, str, str, int, str, str, str]
# A request's root span ended without error, as the process that ended it records it:
# (trace id, root span id, parent span id (0: none), start and end ns, flow, request id,
# status). ``expand`` makes it a ``Record`` (its name and attributes) where it is exported.
RootRecord = tuple[int, int, int, int, int, str, str, str]
AnyRecord = Record | VertexRecord | RootRecord

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SERVER = SpanKind.SERVER.value
_SCALARS = (str, bool, int, float, bytes)


class _Clock:
    """Wall-clock nanoseconds from ``time.perf_counter()`` readings: ``offset +
    int(perf * 1e9)``. A worker reads the clock once at each end of an attempt and
    every observer uses that reading (the metrics' duration, the span's times); the
    offset is set again by the recorder's thread at each wake-up, so that the spans
    follow the wall clock when it is adjusted."""

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0
        self.sync()

    def sync(self) -> None:
        self.offset = time.time_ns() - int(time.perf_counter() * 1e9)


CLOCK = _Clock()


def vertex_span(
    kind: str, address: str, flow: str, request_id: str, attempt: int, worker: str
) -> tuple[str, dict[str, Any]]:
    """The name and attributes of the span of an attempt at a vertex."""
    name = f"{'vertex' if kind == 'run' else kind} {address}"
    attributes: dict[str, Any] = {
        "flowloom.flow": flow,
        "flowloom.request_id": request_id,
        "flowloom.vertex": address,
        "flowloom.step": kind,
        "flowloom.attempt": attempt,
        "flowloom.worker": worker,
    }
    return name, attributes


def expand(record: AnyRecord) -> Record:
    """``record`` as a ``Record`` (a ``VertexRecord`` or a ``RootRecord`` expanded)."""
    if isinstance(record[0], str):
        return record
    if len(record) == 8:
        trace_id, span_id, parent_id, start_ns, end_ns, flow, request_id, status = record
        attributes = {
            "flowloom.flow": flow,
            "flowloom.request_id": request_id,
            "flowloom.status": status,
        }
        return (
            f"flow {flow}", _SERVER, trace_id, span_id, parent_id, True, start_ns, end_ns,
            attributes, (), 0, "",
        )  # fmt: skip
    (
        trace_id, span_id, parent_id, offset, start, end,
        flow, request_id, address, kind, attempt, worker, outcome, _step,
    ) = record  # fmt: skip
    name, attributes = vertex_span(kind, address, flow, request_id, attempt, worker)
    attributes["flowloom.status"] = outcome
    return (
        name, 0, trace_id, span_id, parent_id, True, offset + int(start * 1e9),
        offset + int(end * 1e9), attributes, (), 0, "",
    )  # fmt: skip


def new_span_id() -> int:
    """Ids must be unique, not secret: the ``random`` module's generator (re-seeded in a
    forked child), as the SDK's id generator; no system call."""
    return random.getrandbits(64) or 1


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


class LightSpan(trace.Span):
    """A recording span that becomes a ``Record`` when it ends (once). Its ids are plain
    ints (``trace_id``, ``span_id``); the API's ``SpanContext`` is made only if asked."""

    __slots__ = (
        "_context", "_ended", "_events", "_kind", "_name", "_parent_id", "_recorder",
        "_remote_parent", "_start", "_status", "attributes", "span_id", "trace_id",
    )  # fmt: skip

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        trace_id: int,
        parent_id: int,
        remote_parent: bool,
        attributes: dict[str, Any],
        kind: int = 0,  # SpanKind.INTERNAL
        start_ns: int = 0,
        span_id: int = 0,
    ) -> None:
        self._recorder = recorder
        self._name = name
        self._kind = kind
        self.trace_id = trace_id
        self.span_id = span_id or random.getrandbits(64) or 1
        self._context: SpanContext | None = None
        self._parent_id = parent_id
        self._remote_parent = remote_parent
        self.attributes = attributes
        self._events: tuple[Any, ...] = ()  # a tuple: one object fewer for the GC to track
        self._status = (0, "")
        self._start = start_ns or time.time_ns()
        self._ended = False

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(self.trace_id, self.span_id, False, _SAMPLED)
        return context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._ended:
            return
        plain = _plain(value)
        if plain is not None:
            self.attributes[key] = plain

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._ended:
            return
        plain = {k: p for k, v in (attributes or {}).items() if (p := _plain(v)) is not None}
        event = (name, time.time_ns() if timestamp is None else timestamp, plain)
        self._events = (*self._events, event)

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if self._status[0] != StatusCode.OK.value:  # OK is final, as in the SDK
            self._status = (code.value, description or "")

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        stack = "".join(traceback.format_exception(exception))
        event = {
            "exception.type": type(exception).__qualname__,
            "exception.message": _message(exception),
            "exception.stacktrace": stack,
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**event, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._recorder.add(
            (
                self._name,
                self._kind,
                self.trace_id,
                self.span_id,
                self._parent_id,
                self._remote_parent,
                self._start,
                end_time or time.time_ns(),
                self.attributes,
                self._events,
                self._status[0],
                self._status[1],
            )
        )


def _plain(value: object) -> Any:
    """An attribute value as OpenTelemetry allows it (marshallable), or None to drop it."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(value)
    return None


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() raised>"


class Sink(Protocol):
    """Where batches of records go: ``send`` them, ``flush`` (True once every batch sent
    before has been exported), ``close`` (exporting what is left)."""

    def send(self, records: list[AnyRecord]) -> bool:
        """Hand ``records`` on; False if they are lost (the exporter is gone)."""
        ...

    def flush(self, timeout: float) -> bool: ...

    def close(self, timeout: float) -> None: ...


class Recorder:
    """A bounded queue of records, drained in batches by a thread of its own into ``sink``.

    ``add`` is the hot path: a ``deque.append`` (atomic, no lock). The thread wakes every
    ``delay`` seconds, or as soon as a batch is full. Past ``max_queue`` records waiting,
    ``add`` drops the record and counts it in ``dropped``. (``Tracing.attempt_ended``
    does what ``add`` does itself, on ``queue`` and ``wake``, to save a call per task.)

    ``tap``: called with each batch as it leaves the queue, before it is sent, under
    ``tap_lock`` (the metrics count ended attempts and requests from their records: see
    ``metrics.Metrics.count_from``). Whoever holds ``tap_lock`` sees every record either
    still in ``queue`` or already tapped, none in between.
    """

    def __init__(
        self,
        sink: Sink,
        max_queue: int = 2048,
        batch: int = 512,
        delay: float = 0.5,
    ) -> None:
        self.sink = sink
        self.max_queue = max_queue
        self.batch = max(1, min(batch, max_queue))
        self.delay = delay
        self.dropped = 0
        self.queue: collections.deque[AnyRecord] = collections.deque()
        self.tap: Callable[[list[AnyRecord]], None] | None = None
        self.tap_lock = threading.Lock()
        self.wake = threading.Event()
        self._lock = threading.Lock()  # one drainer at a time: the thread, or a flush
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="flowloom-spans", daemon=True)
        self._thread.start()

    def add(self, record: AnyRecord) -> bool:
        """Queue ``record``; False if it was dropped (the queue is full)."""
        queue = self.queue
        waiting = len(queue)
        if waiting >= self.max_queue:
            self.dropped += 1  # a lost increment under a race undercounts by one, no more
            return False
        queue.append(record)
        if waiting + 1 == self.batch:
            self.wake.set()
        return True

    def _run(self) -> None:
        while not self._closing:
            self.wake.wait(self.delay)
            self.wake.clear()
            CLOCK.sync()
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            queue = self.queue
            while queue:
                count = min(len(queue), self.batch)
                tap = self.tap
                if tap is None:
                    records = [queue.popleft() for _ in range(count)]
                else:
                    with self.tap_lock:
                        records = [queue.popleft() for _ in range(count)]
                        try:
                            tap(records)
                        except Exception:
                            log.exception("flowloom: counting %d records failed", count)
                try:
                    sent = self.sink.send(records)
                except Exception:
                    log.exception("flowloom: exporting %d spans failed (dropped)", count)
                    sent = False
                if not sent:
                    self.dropped += count

    def flush(self, timeout: float) -> bool:
        self._drain()
        return self.sink.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._closing:
            return
        self._closing = True
        self.wake.set()
        self._thread.join(timeout)
        self._drain()
        self.sink.close(timeout)


_HEADER = struct.Struct("!I")


class ChildSink:
    """Batches piped, marshalled, to ``python -m flowloom.span_export`` (see there).

    The child runs in a process group of its own (a Ctrl-C to the terminal reaches
    flowloom, which flushes and closes it, not the child directly) but in this process's
    session: where the kernel groups processes by session to share the CPU (Linux's
    autogroup, on by default), a child in a session of its own would share it with this
    whole process as an equal, whatever its niceness; here its niceness counts against
    the worker's threads. It exits when its input ends, also when this process dies
    without closing it. A child that dies is started again,
    with a warning, at the first batch after a back-off (``restart_delay`` seconds,
    doubling while children keep dying young, up to ``max_restart_delay``); batches that
    come while it is down are lost (counted as dropped). A child that takes nothing of a
    batch for ``write_timeout`` seconds (frozen, or wedged) is killed and replaced the
    same way: no write to it waits longer, so neither the recorder's thread nor a close
    hangs on it.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        write_timeout: float = 5.0,
    ) -> None:
        self.settings = settings
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.write_timeout = write_timeout
        self.restarts = 0
        self._backoff = restart_delay
        self._down_until: float | None = None  # the child died: restart from this time
        self._lock = threading.Lock()  # one writer at a time; a flush waits for its answer
        self._flushes = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self._born = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "flowloom.span_export", json.dumps(self.settings)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            process_group=0,
            close_fds=True,
            # flowloom importable there as here, however this process found it
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        assert process.stdin is not None
        os.set_blocking(process.stdin.fileno(), False)  # written with a deadline: _write
        return process

    def _write(self, message: Any) -> None:
        """Write one message to the child, waiting at most ``write_timeout`` seconds for
        it to take each part; raises ``TimeoutError`` (an ``OSError``) if it does not."""
        data = marshal.dumps(message)
        stdin = self.process.stdin
        assert stdin is not None
        fd = stdin.fileno()
        left = memoryview(_HEADER.pack(len(data)) + data)
        while left:
            try:
                left = left[os.write(fd, left) :]
            except BlockingIOError:
                if not select.select([], [fd], [], self.write_timeout)[1]:
                    raise TimeoutError(
                        f"the span exporter process took nothing for {self.write_timeout:g}s"
                    ) from None

    def _alive(self) -> bool:
        """Whether a child is there to write to: restarted if it died and its back-off is
        over. Called with the lock held."""
        if self._down_until is None:
            if self.process.poll() is None:
                return True
            self._died()
        assert self._down_until is not None
        if time.monotonic() < self._down_until:
            return False
        self._reap()
        try:
            self.process = self._start()
        except OSError as exc:
            log.warning("flowloom: the span exporter process could not restart: %s", exc)
            self._down_until = time.monotonic() + self._backoff
            return False
        self._down_until = None
        self.restarts += 1
        log.warning("flowloom: span exporter process restarted (restart %d)", self.restarts)
        return True

    def _gone(self, exc: OSError) -> None:
        """A write failed: the child died, or takes nothing (then it is killed)."""
        if isinstance(exc, TimeoutError) and self.process.poll() is None:
            log.warning("flowloom: %s; killing it", exc)
            with contextlib.suppress(OSError):
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        self._died()

    def _died(self) -> None:
        """The child is gone: say so, and wait before starting another (longer each time
        a child dies within a minute of its start)."""
        lived = time.monotonic() - self._born
        self._backoff = (
            self.restart_delay if lived > 60 else min(self._backoff * 2, self.max_restart_delay)
        )
        delay = self.restart_delay if self.restarts == 0 else self._backoff
        self._down_until = time.monotonic() + delay
        log.warning(
            "flowloom: the span exporter process exited (code %s); restarting it in %gs",
            self.process.poll(),
            delay,
        )

    def _reap(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(1)

    def send(self, records: list[AnyRecord]) -> bool:
        with self._lock:
            if not self._alive():
                return False
            try:
                self._write(("spans", records))
                return True
            except OSError as exc:  # it died or hangs: these records are lost
                self._gone(exc)
                return False

    def flush(self, timeout: float) -> bool:
        """Ask the child to export what it has, and wait for its answer."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._alive():
                return False
            self._flushes += 1
            token = self._flushes
            try:
                self._write(("flush", token))
            except OSError as exc:
                self._gone(exc)
                return False
            stdout = self.process.stdout
            assert stdout is not None
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([stdout], [], [], left)[0]:
                    return False
                line = stdout.readline()
                if not line:
                    return False
                if int(line) == token:
                    return True

    def close(self, timeout: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + 1e9  # no restart from now on
            stdin = self.process.stdin
            try:
                if stdin is not None:
                    stdin.close()  # the child exports what is left and exits
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                log.warning("flowloom: the span exporter did not finish in %gs; killed", timeout)
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()


def child_sink(endpoint: str | None, resource: dict[str, Any]) -> Sink:
    """The exporter process for ``endpoint`` (None: the ``OTEL_EXPORTER_OTLP_*``
    variables), for spans of a process described by ``resource``."""
    return ChildSink({"endpoint": endpoint, "resource": resource})


def bsp_setting(name: str, default: float) -> float:
    """A standard ``OTEL_BSP_*`` batching variable: a number from 1 to 2**31 - 1, as
    its unit counts (spans, milliseconds). Unset: ``default``; anything else (a word,
    NaN, zero, a negative or an endless number) is ignored with a warning, as the
    OpenTelemetry specification asks of an invalid setting, and ``default`` used."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if 1 <= value <= _MOST:
        return value
    log.warning(
        "flowloom: %s=%.40r is not a number from 1 to %d; using %g", name, raw, _MOST, default
    )
    return default


_MOST = 2**31 - 1  # what the SDK's own batching and a thread's wait take
