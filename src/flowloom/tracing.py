"""Tracing with OpenTelemetry: one trace per request, across every process.

Needs the ``otel`` extra. The span tree of a request (see docs/observability.md):

    flow NAME                       root span, from execute to the request's end
    ├── vertex ADDRESS              one per attempt of a node instance
    │   ├── handler FN              one per handler of a piped node (2 handlers or more)
    │   ├── forwarder FN | aggregator FN | on_failure FN
    │   └── (the handlers' own spans, made with the ordinary OpenTelemetry API, under
    │        the handler's span, or the vertex span for a node of one handler)
    ├── split ADDRESS               a conditional or foreach vertex choosing its branches
    │   └── condition FN | foreach FN
    └── join ADDRESS                the same vertex combining its branches
        └── aggregator FN

A span cannot be ended by another process, so the root span is not opened at
``execute``: its ids are chosen there and stored with the request
(``RequestRecord.trace``), every vertex span names it as parent, and the process
that ends the request emits it, with the request's creation time as its start,
under the id chosen at first.

flowloom's own spans skip the SDK (``flowloom.spans``): recorded as plain tuples,
batched, and encoded and sent (OTLP over HTTP, protobuf) by an exporter process. The
SDK's provider is still made, for the sampler, the HTTP server's span and the
handlers' own spans (exported by its ``BatchSpanProcessor``).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace import Status as SpanStatus
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.util.types import Attributes, AttributeValue

from .context import _current as _REQUEST_SCOPE
from .observe import Attempt, CallSpan, Observer, RequestInfo
from .otlp import export_timeout
from .span_export import InProcessSink
from .spans import (
    CLOCK,
    LightSpan,
    Recorder,
    Sink,
    bsp_setting,
    child_sink,
    new_trace_id,
    vertex_span,
)
from .traceparent import TraceContext, parse_traceparent, traces_url
from .types import ErrorInfo, Status

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["Tracing"]

log = logging.getLogger("flowloom.tracing")

_SERVER = SpanKind.SERVER.value
# the default sampler (and ``always_on``): every root is sampled, no need to ask
_ALWAYS_ON_ROOT = frozenset(
    {"AlwaysOnSampler", ParentBased(ALWAYS_ON).get_description()}  # type: ignore[no-untyped-call]
)
_EMPTY = otel_context.Context()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _context_var() -> ContextVar[otel_context.Context] | None:
    """The variable holding OpenTelemetry's current context, when it is the default
    contextvars one: a vertex span is made current by setting it directly (a few C
    calls instead of a dozen Python ones). None: through ``attach``, as any code does."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if isinstance(variable, ContextVar) and isinstance(_SPAN_KEY, str):
        return variable
    return None


_CONTEXT = _context_var()
_MAKING = threading.Lock()  # an attempt's span is made by one thread at a time (rare)
# the variable's value in a thread where nothing was attached: a worker thread's
_DEFAULT = None if _CONTEXT is None else contextvars.Context().run(_CONTEXT.get)


class _LazyRuntime(ContextVarsRuntimeContext):
    """OpenTelemetry's runtime context, over the same variable, that makes the span of
    the attempt running now current without anyone setting it.

    Asked for the current context while a worker runs an attempt (``RequestScope.attempt``,
    which ``contextvars.copy_context()`` carries into asyncio tasks and threads) and
    finding nothing attached since, it answers the attempt's context, made at that
    first question (``Tracing._attempt_context``). Most attempts never ask: they make
    no span object and no context, and set no variable. What user code attaches is
    current as usual, until it detaches it."""

    def __init__(self, variable: ContextVar[otel_context.Context]) -> None:
        self._current_context = variable

    def get_current(self) -> otel_context.Context:
        current = self._current_context.get()
        if current is _DEFAULT:
            scope = _REQUEST_SCOPE.get()
            attempt = None if scope is None else scope.attempt
            if attempt is not None and attempt.tracer is not None:
                context: otel_context.Context = attempt.tracer._attempt_context(attempt)
                return context
        return current


def _install_lazy_runtime() -> bool:
    """Make OpenTelemetry's runtime context a ``_LazyRuntime`` (once a process), if it is
    the default contextvars one; False: another, set by the application (then each
    attempt's span is made and attached when the attempt starts)."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is _LazyRuntime:
        return True
    if _CONTEXT is None or type(runtime) is not ContextVarsRuntimeContext:
        return False
    otel_context._RUNTIME_CONTEXT = _LazyRuntime(_CONTEXT)
    return True


# Spans waiting for the exporter, and spans per batch, unless the OTEL_BSP_* variables
# say otherwise: far above the SDK's 2048 and 512, so that a few seconds of a busy
# machine (the exporter process lagging) cost memory (about 0.5 kB a span), not spans.
MAX_QUEUE = 100_000
BATCH = 2048


class Tracing(Observer):
    """Spans of requests, vertex attempts and user-code calls, exported over OTLP/HTTP.

    ``endpoint``: the collector's base URL (``http://HOST:4318``; ``/v1/traces`` is
    added), else the standard ``OTEL_EXPORTER_OTLP_*`` variables; flowloom's spans are
    encoded and sent by an exporter process. ``exporter``: another span exporter, run in
    this process instead (tests). The provider is made the global one unless the
    application has set its own, so that handlers' spans made with
    ``trace.get_tracer(...)`` are exported too (under the vertex span either way).
    """

    reads_traces = True

    def __init__(self, endpoint: str | None = None, exporter: SpanExporter | None = None) -> None:
        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        attributes: dict[str, str | int] = {"process.pid": os.getpid()}
        if not named:
            attributes["service.name"] = "flowloom"
        resource = Resource.create(attributes)
        sdk_exporter = exporter
        if sdk_exporter is None:
            url = traces_url(endpoint) if endpoint else None
            # the timeout given, not read by the SDK: it takes NaN, and then sends nothing
            sdk_exporter = OTLPSpanExporter(endpoint=url, timeout=export_timeout())
        max_queue = int(bsp_setting("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE))
        batch = min(int(bsp_setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", BATCH)), max_queue)
        delay = bsp_setting("OTEL_BSP_SCHEDULE_DELAY", 500)
        self.provider = TracerProvider(resource=resource)
        # the handlers' own spans, batched alike (given, not read again from the variables:
        # the SDK refuses a batch over its default queue of 2048, flowloom takes 100,000)
        self.provider.add_span_processor(
            BatchSpanProcessor(
                sdk_exporter,
                max_queue_size=max_queue,
                schedule_delay_millis=delay,
                max_export_batch_size=batch,
            )
        )
        self.tracer = self.provider.get_tracer("flowloom")
        sink: Sink | None = None
        if exporter is None:
            try:
                sink = child_sink(endpoint, attributes)
            except OSError as exc:
                log.warning("flowloom: no span exporter process (%s); exporting in-process", exc)
        self.recorder = Recorder(
            sink or InProcessSink(sdk_exporter, resource),
            max_queue=max_queue,
            batch=batch,
            delay=delay / 1000,
        )
        # a service never closed still exports its last spans, as the SDK's provider does
        atexit.register(self.recorder.close)
        self._decisions: dict[int, bool] = {}  # trace id -> sampled, for recent requests
        self._always = self.provider.sampler.get_description() in _ALWAYS_ON_ROOT
        self._lazy = self.lazy_spans = _install_lazy_runtime()
        _CURRENT.install(self.provider)
        # the metrics' counts of an ended attempt and request, when they count the others
        # from the records (``count_for``): called for each one ended without a
        # ``VertexRecord`` or a ``RootRecord``
        self._count: Callable[[Attempt], None] | None = None
        self._count_end: Callable[[RequestInfo, Status, ErrorInfo | None], None] | None = None

    def count_for(self, metrics: Metrics) -> None:
        """Have ``metrics`` count the attempts and request ends this observer records
        from their records (``VertexRecord``, ``RootRecord``), in bulk as they leave the
        queue, instead of in hooks of its own; the others are counted here, as they end.
        Call before the observers are put together (``Observers``)."""
        metrics.count_from(self.recorder)
        self._count = metrics.count_attempt
        self._count_end = metrics.count_end

    @property
    def dropped(self) -> int:
        """Spans dropped because the exporter lagged (its queue was full)."""
        return self.recorder.dropped

    # -- the request's root span ---------------------------------------------------------------
    def request_ended(self, request: RequestInfo, status: Status, error: ErrorInfo | None) -> None:
        ids = request.trace
        if ids is None or not ((self._always and not ids.parent_id) or self._sampled(ids)):
            if self._count_end is not None:
                self._count_end(request, status, error)
            return
        start = int(request.created * 1e9)
        if error is None:  # the usual case: a ``RootRecord``, no name, no attributes
            queued = self.recorder.add(
                (
                    ids.trace_id, ids.span_id, ids.parent_id, start, time.time_ns(), request.flow,
                    request.request_id, status._value_,  # the value without a property call
                )
            )  # fmt: skip
            if not queued and self._count_end is not None:  # dropped: counted here
                self._count_end(request, status, error)
            return
        if self._count_end is not None:  # a span, not a ``RootRecord``: not counted from it
            self._count_end(request, status, error)
        attributes = {
            "flowloom.flow": request.flow,
            "flowloom.request_id": request.request_id,
            "flowloom.status": status._value_,
        }
        span = LightSpan(
            self.recorder,
            f"flow {request.flow}",
            ids.trace_id,
            ids.parent_id,
            True,
            attributes,
            kind=_SERVER,
            start_ns=start,
            span_id=ids.span_id,
        )
        span.add_event(
            "exception",
            {
                "exception.type": error.type,
                "exception.message": error.message,
                "exception.stacktrace": error.traceback,
                "flowloom.vertex": error.vertex,
            },
        )
        span.set_status(StatusCode.ERROR, f"{error.vertex}: {error.type}: {error.message}")
        span.end()

    # -- one span per attempt, current while the user code runs ------------------------------
    def attempt_started(self, attempt: Attempt) -> None:
        """Called only if the runtime context is not a ``_LazyRuntime`` (``lazy_spans``
        false): the attempt's span made now and attached while its user code runs."""
        attempt.tracer = self
        span = self._attempt_span(attempt)
        if span is None:  # a dropped request: its root, unsampled, current
            context = _under_root(attempt.request.trace, False)
        else:  # the worker thread's context holds nothing else: no need to copy it
            context = trace.set_span_in_context(span, _EMPTY)
        attempt.scope = otel_context.attach(context)

    def attempt_ended(self, attempt: Attempt) -> None:
        if not self._lazy:
            if attempt.scope is not None:
                otel_context.detach(attempt.scope)
        elif _CONTEXT.get() is not _DEFAULT:  # type: ignore[union-attr]
            _CONTEXT.set(_DEFAULT)  # type: ignore[union-attr, arg-type]  # user code left one attached
        span: _AttemptSpan | None = attempt.span
        if span is None:
            ids = attempt.request.trace
            # ``_sampled_attempt``, inlined for the usual case (a call less per task)
            if not (ids is None or (self._always and not ids.parent_id) or self._sampled(ids)):
                if self._count is not None:
                    self._count(attempt)
                return
            if attempt.error is None:  # the usual case: nobody asked for the span, no object
                # the record written below for a span left untouched, and ``Recorder.add``,
                # inlined: a call more here costs every task about a tenth of its tracing
                # hooks
                task = attempt.task
                span_id = attempt.span_id = attempt.own_id or random.getrandbits(64) or 1
                recorder = self.recorder
                queue = recorder.queue
                waiting = len(queue)
                if waiting >= recorder.max_queue:
                    recorder.dropped += 1
                    if self._count is not None:
                        self._count(attempt)
                    return
                queue.append(
                    (
                        new_trace_id() if ids is None else ids.trace_id, span_id,
                        0 if ids is None else ids.span_id, CLOCK.offset, attempt.started,
                        attempt.finished, task.flow, task.request_id, attempt.address,
                        attempt.kind, task.attempt, attempt.worker, attempt.outcome, task.step,
                    )
                )  # fmt: skip
                if waiting + 1 == recorder.batch:
                    recorder.wake.set()
                return
            span = self._attempt_span(attempt)
            assert span is not None  # sampled
        self._end_span(attempt, span)

    def _end_span(self, attempt: Attempt, span: _AttemptSpan) -> None:
        """End the span of ``attempt``, made because user code asked for it or the
        attempt failed: a ``VertexRecord`` if left untouched, else its ``LightSpan``."""
        span.ended = True
        # the span and the attempt refer to each other: a cycle only the garbage collector
        # would free (with the task and the context it holds), once per task
        span.attempt = None
        if span.light is None and attempt.error is None:  # asked for, left untouched
            task = attempt.task
            queued = self.recorder.add(
                (
                    span.trace_id, span.span_id, span.parent_id, CLOCK.offset, attempt.started,
                    attempt.finished, task.flow, task.request_id, attempt.address, attempt.kind,
                    task.attempt, attempt.worker, attempt.outcome, task.step,
                )
            )  # fmt: skip
            if not queued and self._count is not None:  # dropped: counted here
                self._count(attempt)
            return
        if self._count is not None:  # a span, not a ``VertexRecord``: not counted from it
            self._count(attempt)
        light = span.materialize(attempt)
        light.attributes["flowloom.status"] = attempt.outcome
        if attempt.error is not None:
            light.record_exception(attempt.error)
            light.set_status(StatusCode.ERROR, f"{type(attempt.error).__name__}: {attempt.error}")
        light.end(CLOCK.offset + int(attempt.finished * 1e9))

    def _sampled_attempt(self, ids: TraceContext | None) -> bool:
        return ids is None or (self._always and not ids.parent_id) or self._sampled(ids)

    def _attempt_span(self, attempt: Attempt) -> _AttemptSpan | None:
        """The attempt's span, made at the first question; None: its request is not
        sampled (no span is recorded).

        The question may come from another thread than the worker's (a thread the
        handler started), even as the attempt ends: spans are made one at a time, and
        one made as the attempt ended unasked (its record written with ``span_id``)
        takes that id, ended, so that every span of the attempt is the one exported."""
        span: _AttemptSpan | None = attempt.span
        if span is None and self._sampled_attempt(attempt.request.trace):
            with _MAKING:
                span = attempt.span
                if span is None:
                    span = attempt.span = _AttemptSpan(self.recorder, attempt)
                    recorded = attempt.span_id  # ``attempt_ended`` sets it after its check
                    if recorded and span.span_id != recorded:
                        span.span_id, span.ended, span.attempt = recorded, True, None
        return span

    def _attempt_context(self, attempt: Attempt) -> otel_context.Context:
        """The OpenTelemetry context of the attempt's user code: its span current (or,
        for a request not sampled, the request's root, not sampled, so that the handlers'
        own spans are dropped with it). Made once, at the first question."""
        call: _CallScope | None = attempt.call
        if call is not None:  # in a call of user code: its span
            return call.context()
        context: otel_context.Context | None = attempt.scope
        if context is None:
            span = self._attempt_span(attempt)
            if span is None:
                context = _under_root(attempt.request.trace, False)
            else:
                context = otel_context.Context({_SPAN_KEY: span})
            attempt.scope = context
        return context

    def _sampled(self, ids: TraceContext) -> bool:
        """Whether the request's spans are recorded: the caller's decision, else the
        sampler's for a root span of this trace id. The standard samplers decide a root
        by its trace id alone (``traceidratio``), so every process decides alike."""
        if ids.parent_id and not ids.sampler:
            return ids.sampled
        if self._always:
            return True
        decisions = self._decisions
        sampled = decisions.get(ids.trace_id)
        if sampled is None:
            # a root of its own: not the current context, which may be this attempt's (unsampled)
            result = self.provider.sampler.should_sample(_EMPTY, ids.trace_id, "flow")
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            if len(decisions) >= 4096:
                decisions.clear()
            decisions[ids.trace_id] = sampled
        return sampled

    def call_span(self) -> CallSpan:
        return self._call

    @contextlib.contextmanager
    def http_span(self, name: str, traceparent: str | None) -> Iterator[str]:
        caller = parse_traceparent(traceparent)
        parent = otel_context.Context()
        if caller is not None:
            remote = SpanContext(caller[0], caller[1], True, TraceFlags(1 if caller[2] else 0))
            parent = trace.set_span_in_context(NonRecordingSpan(remote), parent)
        with self.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, record_exception=False
        ) as span:
            ids = span.get_span_context()
            yield f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{int(ids.trace_flags):02x}"

    def _call(self, kind: str, fn: Callable[..., Any]) -> AbstractContextManager[None]:
        # the usual case: under a vertex span, read from the context variable directly
        current: Any = None
        if _CONTEXT is not None:
            context = _CONTEXT.get()
            current = context.get(_SPAN_KEY)
            if context is _DEFAULT and self._lazy:  # in an attempt: its span, made now
                scope = _REQUEST_SCOPE.get()
                attempt = None if scope is None else scope.attempt
                if attempt is not None and attempt.tracer is self:
                    if attempt.call is not None:  # a call in a call (not flowloom's own)
                        current = attempt.call.materialize()
                    elif attempt.span is None and kind != "handler":
                        lazy: AbstractContextManager[None] = self._lazy_call(attempt, kind, fn)
                        return lazy
                    else:
                        current = self._attempt_span(attempt)
                    if current is None:  # a dropped request
                        return contextlib.nullcontext()
        if type(current) is _AttemptSpan or type(current) is LightSpan:
            trace_id, parent_id = current.trace_id, current.span_id
        else:
            ids = trace.get_current_span().get_span_context()
            if ids.is_valid and not ids.trace_flags.sampled:  # a dropped request
                return contextlib.nullcontext()
            # outside any request's span (a hook): a trace of its own
            trace_id, parent_id = (ids.trace_id, ids.span_id) if ids.is_valid else (0, 0)
        return _Scope(
            LightSpan(
                self.recorder,
                _call_name(kind, fn),
                trace_id or new_trace_id(),
                parent_id,
                False,
                {},
            )
        )

    def _lazy_call(
        self, attempt: Attempt, kind: str, fn: Callable[..., Any]
    ) -> AbstractContextManager[None]:
        """A call of user code in an attempt whose span nobody asked for: no span object,
        no context set, unless the call asks for its span (``_CallScope``). Its parent is
        the attempt's span, whose id is chosen now (``own_id``). Not for a handler: a
        handler's thread may outlive its call (a time-out), still under the handler's
        span."""
        ids = attempt.request.trace
        if ids is None:  # no stored trace: the attempt's span makes the trace id
            span = self._attempt_span(attempt)
            assert span is not None
            return _Scope(LightSpan(self.recorder, _call_name(kind, fn), span.trace_id,
                                    span.span_id, False, {}))  # fmt: skip
        if not self._sampled_attempt(ids):
            return contextlib.nullcontext()
        with _MAKING:  # as ``_attempt_span``, which may make the attempt's span meanwhile
            parent = attempt.own_id
            if not parent:
                parent = attempt.own_id = random.getrandbits(64) or 1
        return _CallScope(self.recorder, attempt, _call_name(kind, fn), ids.trace_id, parent)

    def flush(self, timeout: float = 10.0) -> bool:
        ours = self.recorder.flush(timeout)
        return self.provider.force_flush(int(timeout * 1000)) and ours

    def close(self) -> None:
        _CURRENT.remove(self.provider)
        atexit.unregister(self.recorder.close)
        self.recorder.close()
        self.provider.shutdown()


class _AttemptSpan(trace.Span):
    """The span of one attempt, current while its user code runs: its ids, and the
    attempt it reads the rest from. When the attempt ends it is recorded as a
    ``VertexRecord``, a tuple of the attempt's fields; only if user code changes it (an
    attribute, an event, its status, its end) or the attempt fails is a ``LightSpan``
    made, with the same ids, to carry the change. Most tasks never touch their span:
    their worker makes no attribute dictionary, no name, no span with a dozen fields."""

    __slots__ = (
        "_context", "attempt", "ended", "light", "parent_id", "recorder", "span_id", "trace_id",
    )  # fmt: skip

    def __init__(self, recorder: Recorder, attempt: Attempt) -> None:
        ids = attempt.request.trace
        self.recorder = recorder
        # recorded already (``span_id`` set: asked for from a context kept past its end)
        self.ended = attempt.span_id != 0  # then what user code does with it is ignored
        self.attempt: Attempt | None = None if self.ended else attempt  # until it ends
        self.trace_id = new_trace_id() if ids is None else ids.trace_id
        self.parent_id = 0 if ids is None else ids.span_id
        self.span_id = attempt.span_id or attempt.own_id or random.getrandbits(64) or 1
        attempt.own_id = self.span_id  # a later call of the attempt's user code parents on it
        self.light: LightSpan | None = None
        self._context: SpanContext | None = None

    def materialize(self, attempt: Attempt | None = None) -> LightSpan:
        """The recording span behind this one, made at the first change (before the
        attempt ends, or as it ends: ``attempt``)."""
        light = self.light
        if light is None:
            attempt = attempt or self.attempt
            assert attempt is not None
            task = attempt.task
            name, attributes = vertex_span(
                attempt.kind, attempt.address, task.flow, task.request_id, task.attempt,
                attempt.worker,
            )  # fmt: skip
            light = self.light = LightSpan(
                self.recorder, name, self.trace_id, self.parent_id, True, attributes,
                start_ns=CLOCK.offset + int(attempt.started * 1e9), span_id=self.span_id,
            )  # fmt: skip
        return light

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(self.trace_id, self.span_id, False, _SAMPLED)
        return context

    def is_recording(self) -> bool:
        return not self.ended and (self.light is None or self.light.is_recording())

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self.ended:
            self.materialize().set_attributes(attributes)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if not self.ended:
            self.materialize().set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if not self.ended:
            self.materialize().add_event(name, attributes, timestamp)

    def update_name(self, name: str) -> None:
        if not self.ended:
            self.materialize().update_name(name)

    def set_status(self, status: SpanStatus | StatusCode, description: str | None = None) -> None:
        if not self.ended:
            self.materialize().set_status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        if not self.ended:
            self.materialize().record_exception(exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        if not self.ended:
            self.materialize().end(end_time)


class _Scope:
    """``span`` made current while user code runs, ended after it (the exception it
    raised recorded on it)."""

    __slots__ = ("span", "token")

    def __init__(self, span: LightSpan) -> None:
        self.span = span
        self.token: Any = None

    def __enter__(self) -> None:
        if _CONTEXT is None:
            self.token = otel_context.attach(trace.set_span_in_context(self.span))
        else:
            self.token = _CONTEXT.set(
                otel_context.Context({**_CONTEXT.get(), _SPAN_KEY: self.span})
            )

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        span = self.span
        if _CONTEXT is None:
            otel_context.detach(self.token)
        else:
            _CONTEXT.reset(self.token)
        if exc is not None:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        span.end()


def _call_name(kind: str, fn: Callable[..., Any]) -> str:
    return f"{kind} {getattr(fn, '__name__', '')}".rstrip()


class _CallScope:
    """A call of user code in an attempt nobody asked the span of, traced lazily: it is
    the attempt's ``call`` while it runs, so that OpenTelemetry's runtime context answers
    its span (``Tracing._attempt_context``), made at the first question. Left untouched
    and not failing, it is recorded as one ``Record`` tuple at its end: no span object,
    no context, no context variable set."""

    __slots__ = ("_context", "attempt", "light", "name", "parent_id", "recorder", "start",
                 "trace_id")  # fmt: skip

    def __init__(
        self, recorder: Recorder, attempt: Attempt, name: str, trace_id: int, parent_id: int
    ) -> None:
        self.recorder = recorder
        self.attempt = attempt
        self.name = name
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.light: LightSpan | None = None
        self._context: otel_context.Context | None = None
        self.start = 0

    def materialize(self) -> LightSpan:
        """The call's recording span, made at the first question or as it fails."""
        with _MAKING:
            light = self.light
            if light is None:
                light = self.light = LightSpan(
                    self.recorder, self.name, self.trace_id, self.parent_id, False, {},
                    start_ns=self.start,
                )  # fmt: skip
        return light

    def context(self) -> otel_context.Context:
        context = self._context
        if context is None:
            context = self._context = otel_context.Context({_SPAN_KEY: self.materialize()})
        return context

    def __enter__(self) -> None:
        self.attempt.call = self
        self.start = time.time_ns()

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.attempt.call = None  # and the cycle between the two undone
        light = self.light
        if light is None and exc is None:  # the usual case: the record alone
            self.recorder.add(
                (
                    self.name, 0, self.trace_id, random.getrandbits(64) or 1, self.parent_id,
                    False, self.start, time.time_ns(), {}, (), 0, "",
                )
            )  # fmt: skip
            return
        if light is None:
            light = self.materialize()
        if exc is not None:
            light.record_exception(exc)
            light.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        light.end()


class _Providers(trace.TracerProvider):
    """The global tracer provider flowloom installs, unless the application set one: the
    handlers' spans go to the provider of the service opened last and still open (the
    global provider can be set only once in a process, and services come and go)."""

    def __init__(self) -> None:
        self.providers: list[TracerProvider] = []
        self._lock = threading.Lock()
        self._installed = False

    def install(self, provider: TracerProvider) -> None:
        with self._lock:
            if not self._installed:
                if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                    return  # the application's own provider gets the handlers' spans
                trace.set_tracer_provider(self)
                self._installed = True
            self.providers.append(provider)

    def remove(self, provider: TracerProvider) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self.providers.remove(provider)

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        return _CurrentTracer(
            self, instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )


class _CurrentTracer(trace.Tracer):
    """A tracer of the current provider, looked up at each span."""

    def __init__(self, owner: _Providers, *scope: Any) -> None:
        self.owner = owner
        self.scope = scope

    def _tracer(self) -> trace.Tracer:
        providers = self.owner.providers
        if not providers:
            return trace.NoOpTracer()
        return providers[-1].get_tracer(*self.scope)

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._tracer().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_as_current_span(*args, **kwargs)


_CURRENT = _Providers()


def _under_root(ids: TraceContext | None, sampled: bool) -> otel_context.Context:
    """A context whose current span is the request's root span (not yet emitted)."""
    if ids is None:
        return otel_context.Context()
    root = SpanContext(ids.trace_id, ids.span_id, True, TraceFlags(1 if sampled else 0))
    return trace.set_span_in_context(NonRecordingSpan(root), otel_context.Context())
