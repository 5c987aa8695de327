"""The embedded backend: queue and state in this process, guarded by one lock."""

from __future__ import annotations

import heapq
import itertools
import marshal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from .. import checks
from ..engine import Transition
from ..errors import DuplicateRequest, NoOutput, NotRunning, Overloaded, RequestNotFound
from ..types import ErrorInfo, RequestState, Status, VertexState
from .base import HOOKS, Backend, RequestRecord, Summary, Task, not_kept, requeued

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_QUEUED", "MemoryBackend"]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_QUEUED = 10_000
RESULT_GRACE = 1.0  # seconds a finished request is kept whatever the bytes


@dataclass(slots=True)
class _Vertex:
    status: Status = Status.QUEUED
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    error: ErrorInfo | None = None
    output: bytes | None = None


@dataclass(slots=True)
class _Run:
    """What a request needs only while it runs."""

    vertices: dict[str, _Vertex] = field(default_factory=dict)
    slots: dict[str, dict[str, bytes | None]] = field(default_factory=dict)
    needed: dict[str, int] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    held: list[Task] = field(default_factory=list)
    lost: list[Task] = field(default_factory=list)  # set aside once it ended, for a retry
    stale: set[str] = field(default_factory=set)  # addresses running when it was retried


# A finished vertex: (address, status, started, ended, attempts, (vertex, type, message) | None,
# output | None).
_Frozen = tuple[
    str, str, float | None, float | None, int, tuple[str, str, str] | None, bytes | None
]


@dataclass(slots=True)
class _Request:
    record: RequestRecord
    status: Status = Status.QUEUED
    ended: float | None = None
    result: bytes | None = None
    error: ErrorInfo | None = None
    context: dict[str, bytes] = field(default_factory=dict)
    retries: tuple[float, ...] = ()
    run: _Run | None = field(default_factory=_Run)
    frozen: tuple[_Frozen, ...] = ()
    size: int = 0  # the bytes counted for it: body and outputs, or its packed form
    reserve: int = 0  # room still set aside for its outputs

    def vertex(self, address: str) -> _Vertex:
        assert self.run is not None
        vertex = self.run.vertices.get(address)
        if vertex is None:
            vertex = self.run.vertices[address] = _Vertex()
        return vertex

    def pack(self) -> tuple[str, str, bytes]:
        """The finished request as (flow, status, blob): plain values only, which the
        garbage collector does not track, so thousands of kept requests cost no GC time."""
        r = self.record
        vertices = self.frozen if self.run is None else tuple(
            (a, v.status.value, v.started, v.ended, v.attempts,
             _plain(v.error), v.output)
            for a, v in self.run.vertices.items()
        )  # fmt: skip
        error = _plain(self.error)
        blob = marshal.dumps((
            r.request_id, r.flow, r.version, r.body, dict(r.query), dict(r.headers), r.created,
            r.has_hooks, self.status.value, self.ended, self.result, error, vertices,
            self.context, r.trace, self.retries,
        ))  # fmt: skip
        return r.flow, self.status.value, blob

    @classmethod
    def unpack(cls, blob: bytes) -> _Request:
        (rid, flow, version, body, query, headers, created, hooks, status, ended, result,
         error, vertices, context, trace, retries) = marshal.loads(blob)  # fmt: skip
        record = RequestRecord(rid, flow, version, body, query, headers, created, hooks, trace)
        return cls(
            record, Status(status), ended, result, ErrorInfo(*error) if error else None,
            context, retries, None, vertices,
        )  # fmt: skip

    def vertex_states(self) -> dict[str, VertexState]:
        if self.run is not None:
            return {
                a: VertexState(a, v.status, v.started, v.ended, v.attempts, v.error)
                for a, v in self.run.vertices.items()
            }
        return {
            a: VertexState(a, Status(s), b, e, n, ErrorInfo(*x) if x else None)
            for a, s, b, e, n, x, _ in self.frozen
        }

    def output(self, address: str) -> bytes | None:
        """The output of a completed vertex instance; ``NoOutput`` saying so if it was not
        kept (``keep_outputs=False``)."""
        if self.run is not None:
            vertex = self.run.vertices.get(address)
            status, output = (None, None) if vertex is None else (vertex.status, vertex.output)
        else:
            status, output = next(
                ((Status(s), out) for a, s, *_, out in self.frozen if a == address), (None, None)
            )
        if output is None and status is Status.COMPLETED:
            raise NoOutput(not_kept(self.record.request_id, address))
        return output


def _plain(error: ErrorInfo | None) -> tuple[str, str, str, str] | None:
    return None if error is None else (error.vertex, error.type, error.message, error.traceback)


class MemoryBackend(Backend):
    """Everything in dictionaries. Finished requests are dropped ``retention`` seconds
    after they end, or sooner, oldest first, when more than ``max_finished`` are kept
    or the bytes kept (bodies, outputs and results of every request, running or
    finished) pass ``max_bytes`` (a request that ended less than ``RESULT_GRACE`` ago is
    kept, for its caller to read). A failed or stopped request also keeps its bookkeeping
    (for ``rerun``) until it is dropped. A request is refused with ``Overloaded`` when
    ``max_queued`` requests have not ended yet, or when its body and as many bytes again
    for its outputs would not fit under ``max_bytes`` even after dropping what may be
    dropped. Outputs are never refused: a request whose outputs are larger than its body
    can take the total past the cap until it ends."""

    nonblocking = True

    def __init__(
        self,
        retention: float = 86400.0,
        max_finished: int = 100_000,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.retention = checks.seconds("retention", retention)
        self.max_finished = checks.count("max_finished", max_finished, 1, 2**62)
        checks.count("max_bytes", max_bytes, 1, 2**62)
        checks.count("max_queued", max_queued, 1, 2**62)
        self.max_bytes = max_bytes
        self.max_queued = max_queued
        self._live_bytes = 0  # bodies and outputs of the requests not yet ended
        self._reserved = 0  # room set aside for their outputs still to come
        self._done_bytes = 0  # the packed finished requests
        self._listeners: list[Callable[[str, Status, bytes | None], None]] = []
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._ended = threading.Condition(self._lock)
        self._queue: deque[Task] = deque()
        self._delayed: list[tuple[float, int, Task]] = []
        self._seq = itertools.count()
        self._requests: dict[str, _Request] = {}  # running, paused or queued
        self._halted: dict[str, _Request] = {}  # failed or stopped, kept whole for a retry
        self._stale: dict[str, int] = {}  # expiry entries of requests retried since
        self._done: dict[str, tuple[str, str, bytes]] = {}  # finished: (flow, status, blob)
        self._order: dict[str, None] = {}  # every request id, oldest first
        self._expiry: deque[tuple[float, str]] = deque()
        self._workers: dict[str, Callable[[], Mapping[str, object]]] = {}

    # -- requests --------------------------------------------------------------------------
    def submit(self, record: RequestRecord, transition: Transition) -> None:
        with self._lock:
            self._expire()
            if record.request_id in self._order:
                raise DuplicateRequest(f"request {record.request_id!r} exists already")
            size = len(record.body)
            self._admit(size)
            request = self._requests[record.request_id] = _Request(record, size=size, reserve=size)
            self._live_bytes += size
            self._reserved += size
            self._order[record.request_id] = None
            self._apply(request, transition)

    def state(self, request_id: str) -> RequestState | None:
        with self._lock:
            request = self._get(request_id)
            return None if request is None else self._snapshot(request)

    def record(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            request = self._get(request_id)
            return None if request is None else request.record

    def summary(self, request_id: str) -> Summary | None:
        with self._lock:
            r = self._get(request_id)
            return None if r is None else Summary(r.record.flow, r.status, r.result, r.error)

    def output(self, request_id: str, address: str) -> bytes | None:
        with self._lock:
            request = self._get(request_id)
            return None if request is None else request.output(address)

    def result(self, request_id: str) -> bytes | None:
        with self._lock:
            request = self._get(request_id)
            return None if request is None else request.result

    def wait(self, request_id: str, timeout: float | None) -> Status | None:
        with self._ended:
            if request_id not in self._order:
                return None
            self._ended.wait_for(lambda: request_id not in self._requests, timeout)
            running = self._requests.get(request_id)
            if running is not None:
                return running.status
            done = self._done.get(request_id)
            return None if done is None else Status(done[1])

    def control(self, request_id: str, action: Status) -> Status:
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                done = self._done.get(request_id)
                if done is None:
                    raise RequestNotFound(f"no request {request_id!r}")
                raise NotRunning(f"request {request_id!r} has ended: {done[1]}")
            assert request.run is not None
            if action is Status.PAUSED:
                request.status = Status.PAUSED
            elif action is Status.RUNNING:
                if request.status is Status.PAUSED:
                    request.status = Status.RUNNING
                    self._queue.extend(request.run.held)
                    request.run.held.clear()
                    self._ready.notify_all()
            elif action is Status.STOPPED:
                self._finish(request, Status.STOPPED)
            else:
                raise ValueError(f"not a control action: {action}")
            return request.status

    def rerun(self, request_id: str, trace: str = "") -> Status:
        with self._lock:
            running = self._requests.get(request_id)
            if running is not None:
                raise NotRunning(
                    f"request {request_id!r} is {running.status.value}: "
                    "only a failed or stopped request can be retried"
                )
            request = self._halted.pop(request_id, None)
            if request is None or request.run is None:
                done = self._done.get(request_id)
                if done is None:
                    raise RequestNotFound(f"no request {request_id!r}")
                raise NotRunning(
                    f"request {request_id!r} has {done[1]}: "
                    "only a failed or stopped request can be retried"
                )
            run = request.run
            packed = self._done.pop(request_id)
            self._done_bytes -= len(packed[2])
            self._stale[request_id] = self._stale.get(request_id, 0) + 1
            self._requests[request_id] = request
            self._live_bytes += request.size
            request.status, request.ended, request.error = Status.RUNNING, None, None
            request.retries = (*request.retries, time.time())
            if trace:
                request.record = replace(request.record, trace=trace)
            for address, vertex in run.vertices.items():
                if vertex.status is Status.RUNNING:  # an attempt begun before the retry
                    run.stale.add(address)
                if vertex.status in (Status.FAILED, Status.RUNNING):  # its last error goes
                    vertex.status, vertex.error = Status.QUEUED, None
            tasks, run.lost = requeued(run.lost), []
            self._queue.extend(tasks)
            if tasks:
                self._ready.notify_all()
            return request.status

    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        with self._lock:
            self._expire()
            chosen: list[str] = []
            for request_id in reversed(self._order):
                running = self._requests.get(request_id)
                if running is not None:
                    flow_of, status_of = running.record.flow, running.status.value
                else:
                    flow_of, status_of, _ = self._done[request_id]
                if (flow is None or flow_of == flow) and (status is None or status_of == status):
                    chosen.append(request_id)
                    if len(chosen) >= offset + limit:
                        break
            return [self._snapshot(self._must(r)) for r in chosen[offset:]]

    # -- context -----------------------------------------------------------------------------
    def context_get(self, request_id: str, key: str) -> bytes | None:
        with self._lock:
            return self._must(request_id).context.get(key)

    def context_set(self, request_id: str, key: str, value: bytes) -> None:
        with self._lock:
            request = self._must(request_id)
            request.context[key] = value
            self._repack(request)

    def context_delete(self, request_id: str, key: str) -> None:
        with self._lock:
            request = self._must(request_id)
            request.context.pop(key, None)
            self._repack(request)

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
            if request is None:
                self._set_aside(task, instance)
                return False
            if request.run is None or instance in request.run.done:
                return False
            if request.status is Status.PAUSED:
                request.run.held.append(task)
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
            halted = request is None
            if request is None:  # ended meanwhile: completes into its state, for a retry
                request = self._halted.get(task.request_id)
            if request is None or request.run is None or instance in request.run.done:
                return
            request.run.done.add(instance)
            if output is not None:
                vertex = request.vertex(address)
                vertex.status = Status.COMPLETED
                vertex.ended = time.time()
                vertex.error = None
                if transition.keep_output:
                    vertex.output = output
                # kept: the output, or the result (the same bytes) of a flow that keeps none
                kept = len(output) if transition.keep_output or transition.finished else 0
                request.size += kept
                if not halted:
                    self._live_bytes += kept
                    used = min(request.reserve, kept)
                    request.reserve -= used
                    self._reserved -= used
            self._apply(request, transition)
            if halted:
                self._repack(request)
            elif transition.finished:
                self._finish(request, Status.COMPLETED, result=transition.result)

    def retry(
        self, task: Task, instance: str, address: str, delay: float, error: ErrorInfo
    ) -> None:
        with self._lock:
            request = self._requests.get(task.request_id)
            if request is None:
                self._set_aside(replace(task, attempt=task.attempt + 1), instance)
                return
            if request.run is None or instance in request.run.done:
                return
            vertex = request.vertex(address)
            vertex.status, vertex.error = Status.QUEUED, error
            due = time.monotonic() + delay
            heapq.heappush(
                self._delayed, (due, next(self._seq), replace(task, attempt=task.attempt + 1))
            )
            self._ready.notify()

    def fail(self, task: Task, instance: str, address: str, error: ErrorInfo) -> None:
        with self._lock:
            request = self._requests.get(task.request_id)
            if request is None:  # ended meanwhile: the task is kept for a retry
                halted = self._halted.get(task.request_id)
                run = None if halted is None else halted.run
                if halted is not None and run is not None and instance not in run.done:
                    run.lost.append(task)
                    vertex = halted.vertex(address)
                    vertex.status, vertex.error, vertex.ended = Status.FAILED, error, time.time()
                    self._repack(halted)
                return
            if request.run is None or instance in request.run.done:
                return
            if address in request.run.stale:  # begun before a retry: runs again instead
                request.run.stale.discard(address)
                self._queue.append(replace(task, attempt=1, receipt="", redelivered=False))
                self._ready.notify()
                return
            vertex = request.vertex(address)
            vertex.status, vertex.error, vertex.ended = Status.FAILED, error, time.time()
            request.run.lost.append(task)
            self._finish(request, Status.FAILED, error=error)

    def ack(self, task: Task) -> None:
        return None

    def defer(self, task: Task, delay: float) -> None:
        with self._lock:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), task))
            self._ready.notify()

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

    def depth(self) -> Mapping[str, int]:
        with self._lock:
            held = sum(len(r.run.held) for r in self._requests.values() if r.run is not None)
            return {"ready": len(self._queue), "delayed": len(self._delayed), "held": held}

    def ping(self) -> None:
        """Always answers: the embedded backend lives in this process."""

    def listen(
        self,
        listener: Callable[[str, Status, bytes | None], None],
        lost: Callable[[], None] = lambda: None,
    ) -> Callable[[], None]:
        """Calls ``listener`` from the thread that ends the request; never misses one."""
        with self._lock:
            self._listeners.append(listener)

        def stop() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return stop

    def workers(self) -> list[dict[str, object]]:
        with self._lock:
            describers = list(self._workers.values())
        return [{**describe(), "last_seen": time.time()} for describe in describers]

    # -- internals (lock held) ---------------------------------------------------------------
    def _set_aside(self, task: Task, instance: str) -> None:
        """A task of a request that ended failed or stopped, not run: kept for a retry."""
        request = self._halted.get(task.request_id)
        if request is not None and request.run is not None and instance not in request.run.done:
            request.run.lost.append(task)

    def _get(self, request_id: str) -> _Request | None:
        request = self._requests.get(request_id) or self._halted.get(request_id)
        if request is None:
            done = self._done.get(request_id)
            if done is not None:
                request = _Request.unpack(done[2])
        return request

    def _must(self, request_id: str) -> _Request:
        request = self._get(request_id)
        if request is None:
            raise RequestNotFound(f"no request {request_id!r}")
        return request

    def _repack(self, request: _Request) -> None:
        """Store a change to a finished request (its context, from a hook; a late output)."""
        if request.record.request_id not in self._requests:
            rid = request.record.request_id
            old = self._done.get(rid)
            packed = self._done[rid] = request.pack()
            self._done_bytes += len(packed[2]) - (len(old[2]) if old else 0)

    def _apply(self, request: _Request, transition: Transition) -> None:
        record, run = request.record, request.run
        assert run is not None
        for d in transition.deliveries:
            if d.instance in run.fired:
                continue
            slots = run.slots.get(d.instance)
            if slots is None:
                slots = run.slots[d.instance] = {}
            elif d.slot in slots:
                continue
            slots[d.slot] = d.data
            needed = d.needed if d.needed >= 0 else run.needed.get(d.instance, -1)
            if needed < 0 or len(slots) < needed:
                if d.needed >= 0:
                    run.needed[d.instance] = needed
            else:
                run.fired.add(d.instance)
                del run.slots[d.instance]
                run.needed.pop(d.instance, None)
                task = Task(record.request_id, record.flow, record.version, d.step, d.keys, slots)
                if request.status in (Status.FAILED, Status.STOPPED):
                    run.lost.append(task)
                elif request.status is Status.PAUSED:
                    run.held.append(task)
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
        rid = request.record.request_id
        if status is not Status.COMPLETED and request.run is not None:
            request.run.lost.extend(request.run.held)
            request.run.held.clear()
            self._halted[rid] = request
        packed = self._done[rid] = request.pack()
        del self._requests[rid]
        self._live_bytes -= request.size
        self._reserved -= request.reserve
        request.reserve = 0
        self._done_bytes += len(packed[2])
        self._expiry.append((time.monotonic() + self.retention, rid))
        self._expire()
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
        self._ended.notify_all()
        for listener in self._listeners:
            listener(rid, status, result)

    def _expire(self, room: int = 0) -> None:
        """Drop finished requests past their retention, and the oldest past
        ``max_finished`` or while the bytes kept and ``room`` pass ``max_bytes`` (but not
        one that ended less than ``RESULT_GRACE`` ago: its caller is reading it)."""
        now = time.monotonic()
        expiry = self._expiry
        grace = self.retention - RESULT_GRACE  # dropped for bytes only once read, likely
        while expiry and (
            expiry[0][0] <= now
            or len(expiry) > self.max_finished
            or (
                self._live_bytes + self._reserved + self._done_bytes + room > self.max_bytes
                and expiry[0][0] - now <= grace
            )
        ):
            request_id = expiry.popleft()[1]
            stale = self._stale.pop(request_id, 0)
            if stale:  # retried since: this entry is not its expiry any more
                if stale > 1:
                    self._stale[request_id] = stale - 1
                continue
            self._halted.pop(request_id, None)
            done = self._done.pop(request_id, None)
            if done is not None:
                self._done_bytes -= len(done[2])
            self._order.pop(request_id, None)

    def _admit(self, size: int) -> None:
        """Make room for a new request of ``size`` body bytes and as many for its outputs,
        or ``Overloaded``."""
        if len(self._requests) >= self.max_queued:
            raise Overloaded(
                f"{len(self._requests)} requests have not ended yet (max_queued): try again later"
            )
        self._expire(room=2 * size)
        held = self._live_bytes + self._reserved + self._done_bytes
        if held + 2 * size > self.max_bytes:
            raise Overloaded(
                f"the requests kept hold (or may soon hold) {held} bytes; a body of {size} "
                f"bytes and its output would pass max_bytes ({self.max_bytes}): "
                "try again later"
            )

    def bytes_held(self) -> int:
        """The bytes of bodies, outputs and results kept now (what ``max_bytes`` caps)."""
        with self._lock:
            return self._live_bytes + self._done_bytes

    @staticmethod
    def _snapshot(request: _Request) -> RequestState:
        return RequestState(
            request_id=request.record.request_id,
            flow=request.record.flow,
            status=request.status,
            created=request.record.created,
            ended=request.ended,
            error=request.error,
            vertices=request.vertex_states(),
            trace_id=request.record.trace[:32] or None,
            retries=request.retries,
        )
