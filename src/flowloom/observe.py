"""The named points where tracing and metrics hook into flowloom.

An ``Observer`` has a no-op method per point; ``tracing.Tracing`` and
``metrics.Metrics`` override the ones they need. The worker, the service and the
HTTP app call them through ``Observers``, which runs each observer inside
``try``/``except``: an observability failure is logged, never a task's or a
request's failure. With no observer (tracing and monitoring off) every call is a
loop over an empty tuple.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

from .backends import RequestRecord, Task
from .traceparent import TraceContext
from .types import ErrorInfo, Status

__all__ = ["Attempt", "CallSpan", "Observer", "Observers", "RequestInfo"]

log = logging.getLogger("flowloom.observe")

# Wraps one call of user code (``kind`` is "handler", "aggregator", ...; ``fn`` the callee).
CallSpan = Callable[[str, Callable[..., Any]], AbstractContextManager[None]]


class RequestInfo(NamedTuple):
    """What an observer needs to know of a request: whose it is, when it began, its trace.

    A named tuple rather than a frozen dataclass: made for every request a worker runs,
    and a tuple is made at a fraction of the cost (no ``object.__setattr__`` a field)."""

    request_id: str
    flow: str
    created: float
    trace: TraceContext | None

    @classmethod
    def of(cls, record: RequestRecord) -> RequestInfo:
        return cls(
            record.request_id, record.flow, record.created, TraceContext.decode(record.trace)
        )


class Attempt:
    """One attempt at one task, from ``attempt_started`` to ``attempt_ended``.

    ``task.step`` names the step without item keys (``each[]/double``, ``each:split``:
    a bounded metric label); ``address`` the vertex instance's (``each[k1]/double``).
    The worker sets ``outcome`` ("completed", "failed" or "retried"), ``error``,
    ``ended`` and ``finished`` before ``attempt_ended``; ``started`` and ``finished``
    (``time.perf_counter()``) are the attempt's only clock readings, shared by every
    observer. ``tracer``, ``span``, ``span_id``, ``own_id``, ``call`` and ``scope`` belong
    to the tracing observer.

    A plain slotted class, not a dataclass: one is made for every task run while
    observed, and an ``__init__`` written out costs less than the generated one (its
    default factory and the arguments it never receives). Compared by identity.
    """

    __slots__ = (
        "address", "call", "ended", "error", "finished", "kind", "outcome", "own_id", "request",
        "scope", "span", "span_id", "started", "task", "tracer", "worker",
    )  # fmt: skip

    def __init__(
        self,
        task: Task,
        request: RequestInfo,
        kind: str,  # "run", "split" or "join"
        address: str,
        worker: str,
        started: float | None = None,
    ) -> None:
        self.task = task
        self.request = request
        self.kind = kind
        self.address = address
        self.worker = worker
        self.outcome = "failed"
        self.error: BaseException | None = None
        self.started = _now() if started is None else started
        # (status, error) when the request ended with this attempt
        self.ended: tuple[Status, ErrorInfo | None] | None = None
        self.finished = 0.0
        self.tracer: Any = None
        self.span: Any = None
        self.span_id = 0
        self.own_id = 0
        self.call: Any = None
        self.scope: Any = None

    def __repr__(self) -> str:
        return f"Attempt({self.task!r}, {self.address!r}, {self.outcome!r})"


_now = time.perf_counter


class Observer:
    """No-op hooks; override the ones you need. Each is called inside try/except.

    ``reads_traces``: the observer reads ``RequestInfo.trace`` (else the worker need not
    decode the request's stored trace context, about as costly as a task's hooks)."""

    reads_traces = False
    # the attempts in progress in this process (told to ``attempt_started``, not yet to
    # ``attempt_ended``), kept by ``Observers`` and given to each of its observers
    running: Collection[Attempt] = ()
    # the observer's spans are current in the attempt's user code, made only if it asks:
    # not called at ``attempt_started``, it is the attempt's ``tracer`` instead
    lazy_spans = False
    # another observer tells this one of the attempts and requests that end
    # (``Tracing.count_for``): its ``attempt_ended`` and ``request_ended`` are not called
    # by ``Observers``
    ends_elsewhere = False

    def request_started(self, record: RequestRecord) -> None:
        """``execute`` has queued the request (in the process that called it)."""

    def request_ended(self, request: RequestInfo, status: Status, error: ErrorInfo | None) -> None:
        """The request ended (in the process that ended it: the worker that ran its last
        or failing task, or the one that stopped it)."""

    def attempt_started(self, attempt: Attempt) -> None:
        """A worker thread is about to run the user code of a task (same thread as
        ``attempt_ended``)."""

    def attempt_ended(self, attempt: Attempt) -> None: ...

    def task_redelivered(self, task: Task) -> None:
        """A task was taken over from a worker that did not finish it."""

    def callback_sent(self, outcome: str) -> None:
        """An ``X-Callback-Url`` call ended: "delivered" or "failed"."""

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def call_span(self) -> CallSpan | None:
        """A wrapper for each call of user code (to trace it), or None."""
        return None

    def http_span(self, name: str, traceparent: str | None) -> AbstractContextManager[str] | None:
        """A span around an HTTP call that executes a flow, child of the caller's
        ``traceparent``; it yields the traceparent that names it (the request's parent).
        None: this observer does not trace."""
        return None

    def close(self) -> None:
        """Flush and release what the observer holds (exporters, threads)."""


class Observers:
    """Every configured observer, each called inside try/except: at each point, only
    those that override its hook (a no-op costs nothing)."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.all = tuple(observers)
        # set.add and set.discard are atomic: exact without a lock, and no hook to call
        self.running: set[Attempt] = set()
        for observer in self.all:
            observer.running = self.running
        self.reads_traces = any(observer.reads_traces for observer in self.all)
        self.call_span = next((s for o in self.all if (s := o.call_span()) is not None), None)
        self.tracer = next((o for o in self.all if o.lazy_spans), None)
        self._request_started = _hooks(self.all, "request_started")
        told = [o for o in self.all if not o.ends_elsewhere]
        self._request_ended = _hooks(told, "request_ended")
        self._attempt_started = _hooks([o for o in self.all if not o.lazy_spans], "attempt_started")
        self._attempt_ended = _hooks(told[::-1], "attempt_ended")
        self._task_redelivered = _hooks(self.all, "task_redelivered")
        self._callback_sent = _hooks(self.all, "callback_sent")
        self._http_request = _hooks(self.all, "http_request")

    def __bool__(self) -> bool:
        return bool(self.all)

    def http_span(self, name: str, traceparent: str | None) -> AbstractContextManager[str | None]:
        for observer in self.all:
            try:
                span = observer.http_span(name, traceparent)
            except Exception:
                _failed(observer, "http_span")
                continue
            if span is not None:
                return span
        return nullcontext(None)

    def request_started(self, record: RequestRecord) -> None:
        for hook in self._request_started:
            try:
                hook(record)
            except Exception:
                _failed(hook, "request_started")

    def request_ended(self, request: RequestInfo, status: Status, error: ErrorInfo | None) -> None:
        for hook in self._request_ended:
            try:
                hook(request, status, error)
            except Exception:
                _failed(hook, "request_ended")

    def attempt_started(self, attempt: Attempt) -> None:
        attempt.tracer = self.tracer
        self.running.add(attempt)
        for hook in self._attempt_started:
            try:
                hook(attempt)
            except Exception:
                _failed(hook, "attempt_started")

    def attempt_ended(self, attempt: Attempt) -> None:
        self.running.discard(attempt)
        for hook in self._attempt_ended:
            try:
                hook(attempt)
            except Exception:
                _failed(hook, "attempt_ended")

    def task_redelivered(self, task: Task) -> None:
        for hook in self._task_redelivered:
            try:
                hook(task)
            except Exception:
                _failed(hook, "task_redelivered")

    def callback_sent(self, outcome: str) -> None:
        for hook in self._callback_sent:
            try:
                hook(outcome)
            except Exception:
                _failed(hook, "callback_sent")

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        for hook in self._http_request:
            try:
                hook(route, method, status, seconds)
            except Exception:
                _failed(hook, "http_request")

    def close(self) -> None:
        for observer in self.all:
            try:
                observer.close()
            except Exception:
                _failed(observer, "close")


def _hooks(observers: Sequence[Observer], point: str) -> tuple[Callable[..., None], ...]:
    """The bound methods of ``observers`` that override ``point``'s no-op."""
    default = getattr(Observer, point)
    return tuple(
        getattr(observer, point)
        for observer in observers
        if getattr(type(observer), point, default) is not default
    )


def _failed(observer: object, point: str) -> None:
    """Log a failing hook (``observer``, or one of its bound methods) and carry on."""
    owner = getattr(observer, "__self__", observer)
    log.exception("flowloom: %s.%s failed (ignored)", type(owner).__name__, point)
