"""The embedded backend: queue and state in this process, guarded by one lock."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from ..engine import Transition
from ..errors import DuplicateRequest, NotRunning, RequestNotFound
from ..types import ErrorInfo, RequestState, Status, VertexState
from .base import HOOKS, Backend, RequestRecord, Summary, Task

__all__ = ["MemoryBackend"]


@dataclass
class _Vertex:
    status: Status = Status.QUEUED
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    error: ErrorInfo | None = None


@dataclass
class _Request:
    record: RequestRecord
    status: Status = Status.QUEUED
    ended: float | None = None
    result: bytes | None = None
    error: ErrorInfo | None = None
    vertices: dict[str, _Vertex] = field(default_factory=dict)
    slots: dict[str, dict[str, bytes | None]] = field(default_factory=dict)
    needed: dict[str, int] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    held: list[Task] = field(default_factory=list)
    context: dict[str, bytes] = field(default_factory=dict)
    finished: threading.Event = field(default_factory=threading.Event)

    def vertex(self, address: str) -> _Vertex:
        vertex = self.vertices.get(address)
        if vertex is None:
            vertex = self.vertices[address] = _Vertex()
        return vertex


class MemoryBackend(Backend):
    """Everything in dictionaries; finished requests are dropped ``retention`` seconds
    after they end."""

    def __init__(self, retention: float = 86400.0) -> None:
        self.retention = retention
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: deque[Task] = deque()
        self._delayed: list[tuple[float, int, Task]] = []
        self._seq = itertools.count()
        self._requests: dict[str, _Request] = {}
        self._expiry: deque[tuple[float, str]] = deque()
        self._workers: dict[str, Callable[[], Mapping[str, object]]] = {}

    # -- requests --------------------------------------------------------------------------
    def submit(self, record: RequestRecord, transition: Transition) -> None:
        with self._lock:
            self._expire()
            if record.request_id in self._requests:
                raise DuplicateRequest(f"request {record.request_id!r} exists already")
            request = self._requests[record.request_id] = _Request(record)
            self._apply(request, transition)

    def state(self, request_id: str) -> RequestState | None:
        with self._lock:
            request = self._requests.get(request_id)
            return None if request is None else self._snapshot(request)

    def record(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            request = self._requests.get(request_id)
            return None if request is None else request.record

    def summary(self, request_id: str) -> Summary | None:
        with self._lock:
            r = self._requests.get(request_id)
            return None if r is None else Summary(r.record.flow, r.status, r.result, r.error)

    def result(self, request_id: str) -> bytes | None:
        with self._lock:
            request = self._requests.get(request_id)
            return None if request is None else request.result

    def wait(self, request_id: str, timeout: float | None) -> Status | None:
        with self._lock:
            request = self._requests.get(request_id)
        if request is None:
            return None
        request.finished.wait(timeout)
        return request.status

    def control(self, request_id: str, action: Status) -> Status:
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                raise RequestNotFound(f"no request {request_id!r}")
            if request.status.finished:
                raise NotRunning(f"request {request_id!r} has ended: {request.status.value}")
            if action is Status.PAUSED:
                request.status = Status.PAUSED
            elif action is Status.RUNNING:
                if request.status is Status.PAUSED:
                    request.status = Status.RUNNING
                    self._queue.extend(request.held)
                    request.held.clear()
                    self._ready.notify_all()
            elif action is Status.STOPPED:
                self._finish(request, Status.STOPPED)
            else:
                raise ValueError(f"not a control action: {action}")
            return request.status

    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        with self._lock:
            self._expire()
            chosen = [
                r
                for r in reversed(self._requests.values())
                if (flow is None or r.record.flow == flow)
                and (status is None or r.status is status)
            ]
            return [self._snapshot(r) for r in chosen[offset : offset + limit]]

    # -- context -----------------------------------------------------------------------------
    def context_get(self, request_id: str, key: str) -> bytes | None:
        with self._lock:
            return self._request(request_id).context.get(key)

    def context_set(self, request_id: str, key: str, value: bytes) -> None:
        with self._lock:
            self._request(request_id).context[key] = value

    def context_delete(self, request_id: str, key: str) -> None:
        with self._lock:
            self._request(request_id).context.pop(key, None)

    # -- worker side -------------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Task | None:
        deadline = time.monotonic() + timeout
        with self._ready:
            while True:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._queue.append(heapq.heappop(self._delayed)[2])
                if self._queue:
                    return self._queue.popleft()
                if now >= deadline:
                    return None
                wake = deadline if not self._delayed else min(deadline, self._delayed[0][0])
                self._ready.wait(wake - now)

    def begin(self, task: Task, instance: str, address: str) -> bool:
        with self._lock:
            request = self._requests.get(task.request_id)
            if request is None or request.status.finished or instance in request.done:
                return False
            if request.status is Status.PAUSED:
                request.held.append(task)
                return False
            request.status = Status.RUNNING
            vertex = request.vertex(address)
            vertex.status = Status.RUNNING
            vertex.attempts = task.attempt
            if vertex.started is None:
                vertex.started = time.time()
            return True

    def complete(
        self, task: Task, instance: str, address: str, output: bytes | None, transition: Transition
    ) -> None:
        with self._lock:
            request = self._requests.get(task.request_id)
            if request is None or request.status.finished or instance in request.done:
                return
            request.done.add(instance)
            if output is not None:
                vertex = request.vertex(address)
                vertex.status = Status.COMPLETED
                vertex.ended = time.time()
                vertex.error = None
            self._apply(request, transition)
            if transition.finished:
                self._finish(request, Status.COMPLETED, result=transition.result)

    def retry(self, task: Task, address: str, delay: float, error: ErrorInfo) -> None:
        with self._lock:
            request = self._requests.get(task.request_id)
            if request is None or request.status.finished:
                return
            vertex = request.vertex(address)
            vertex.status, vertex.error = Status.QUEUED, error
            due = time.monotonic() + delay
            heapq.heappush(
                self._delayed, (due, next(self._seq), replace(task, attempt=task.attempt + 1))
            )
            self._ready.notify()

    def fail(self, task: Task, address: str, error: ErrorInfo) -> None:
        with self._lock:
            request = self._requests.get(task.request_id)
            if request is None or request.status.finished:
                return
            vertex = request.vertex(address)
            vertex.status, vertex.error, vertex.ended = Status.FAILED, error, time.time()
            self._finish(request, Status.FAILED, error=error)

    def ack(self, task: Task) -> None:
        return None

    def take_hooks(self) -> list[Task]:
        """Remove and return the queued hooks tasks (to run them before the process ends)."""
        with self._lock:
            hooks = [t for t in self._queue if t.step == HOOKS]
            self._queue = deque(t for t in self._queue if t.step != HOOKS)
            return hooks

    def register_worker(self, name: str, describe: Callable[[], Mapping[str, object]]) -> None:
        with self._lock:
            self._workers[name] = describe

    def unregister_worker(self, name: str) -> None:
        with self._lock:
            self._workers.pop(name, None)

    def workers(self) -> list[dict[str, object]]:
        with self._lock:
            describers = list(self._workers.values())
        return [{**describe(), "last_seen": time.time()} for describe in describers]

    # -- internals (lock held) ---------------------------------------------------------------
    def _request(self, request_id: str) -> _Request:
        request = self._requests.get(request_id)
        if request is None:
            raise RequestNotFound(f"no request {request_id!r}")
        return request

    def _apply(self, request: _Request, transition: Transition) -> None:
        record = request.record
        for d in transition.deliveries:
            if d.instance in request.fired:
                continue
            slots = request.slots.get(d.instance)
            if slots is None:
                slots = request.slots[d.instance] = {}
            elif d.slot in slots:
                continue
            slots[d.slot] = d.data
            needed = d.needed if d.needed >= 0 else request.needed.get(d.instance, -1)
            if needed < 0 or len(slots) < needed:
                if d.needed >= 0:
                    request.needed[d.instance] = needed
            else:
                request.fired.add(d.instance)
                del request.slots[d.instance]
                request.needed.pop(d.instance, None)
                task = Task(record.request_id, record.flow, record.version, d.step, d.keys, slots)
                if request.status is Status.PAUSED:
                    request.held.append(task)
                else:
                    self._queue.append(task)
                    self._ready.notify()

    def _finish(
        self,
        request: _Request,
        status: Status,
        result: bytes | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        request.status, request.result, request.error = status, result, error
        request.ended = time.time()
        request.slots.clear()
        request.needed.clear()
        request.held.clear()
        self._expiry.append((time.monotonic() + self.retention, request.record.request_id))
        record = request.record
        if record.has_hooks:
            hooks = Task(
                record.request_id,
                record.flow,
                record.version,
                HOOKS,
                (),
                {"status": status.value.encode()},
            )
            self._queue.append(hooks)
            self._ready.notify()
        request.finished.set()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            self._requests.pop(self._expiry.popleft()[1], None)

    @staticmethod
    def _snapshot(request: _Request) -> RequestState:
        return RequestState(
            request_id=request.record.request_id,
            flow=request.record.flow,
            status=request.status,
            created=request.record.created,
            ended=request.ended,
            error=request.error,
            vertices={
                address: VertexState(address, v.status, v.started, v.ended, v.attempts, v.error)
                for address, v in request.vertices.items()
            },
        )
