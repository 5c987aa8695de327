"""The narrow interface between the worker/service and where requests live.

A backend holds the task queue and every request's state. It applies each
engine ``Transition`` atomically and idempotently: a step instance completes
once, and a step becomes ready (is queued) once, however often a task is
delivered. Two implementations: ``MemoryBackend`` (in-process, the default) and
``RedisBackend`` (many processes on many machines).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import ClassVar

import anyio.to_thread

from ..engine import Transition
from ..types import ErrorInfo, RequestState, Status

__all__ = [
    "HOOKS",
    "Backend",
    "RequestRecord",
    "Summary",
    "Task",
    "current_deadline",
    "deadline",
    "not_kept",
    "requeued",
]

HOOKS = "!hooks"  # the step id of the task that runs a flow's on_failure/finally hooks

_deadline: ContextVar[float | None] = ContextVar("flowloom_backend_deadline", default=None)


@contextmanager
def deadline(timeout: float | None) -> Iterator[None]:
    """Within this block, backend calls give up by ``timeout`` seconds from now: one that
    cannot reach its backend raises ``BackendUnavailable`` then rather than retry on.
    ``None`` sets no deadline; nested blocks keep the earlier one."""
    if timeout is None:
        yield
        return
    until = time.monotonic() + max(0.0, timeout)
    outer = _deadline.get()
    token = _deadline.set(until if outer is None else min(outer, until))
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> float | None:
    """The monotonic time by which the current ``deadline`` block ends, if any."""
    return _deadline.get()


@dataclass(frozen=True, slots=True)
class Task:
    """One step instance to run: ``inputs`` maps input slot -> data (None: ordering only)."""

    request_id: str
    flow: str
    version: str
    step: str
    keys: tuple[str, ...]
    inputs: Mapping[str, bytes | None]
    attempt: int = 1
    receipt: str = ""  # backend-specific handle for acknowledging the task
    redelivered: bool = False  # taken over from a worker that did not finish it


def not_kept(request_id: str, address: str) -> str:
    """What reading the output of a vertex instance whose output was dropped says."""
    return (
        f"request {request_id!r}: vertex {address!r} completed, but its output is not kept: "
        "its flow sets keep_outputs=False (only the body and the result are kept)"
    )


def requeued(tasks: Iterable[Task]) -> list[Task]:
    """What a retry of a request queues again, given the tasks it dropped when it ended
    (held, queued, failed): one task per step instance (the first one seen), each with a
    fresh attempt count. Completed instances never appear here: their tasks completed."""
    chosen: dict[tuple[str, tuple[str, ...]], Task] = {}
    for task in tasks:
        if task.step != HOOKS:
            chosen.setdefault(
                (task.step, task.keys),
                replace(task, attempt=1, receipt="", redelivered=False),
            )
    return list(chosen.values())


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    flow: str
    version: str
    body: bytes
    query: Mapping[str, list[str]]
    headers: Mapping[str, str] = field(default_factory=dict)
    created: float = 0.0
    has_hooks: bool = False
    trace: str = ""  # the request's TraceContext, encoded (see traceparent.py)


@dataclass(frozen=True, slots=True)
class Summary:
    """What a caller waiting for a request needs: whose it is, where it stands, its end."""

    flow: str
    status: Status
    result: bytes | None = None
    error: ErrorInfo | None = None


class Backend(abc.ABC):
    """Queue plus state. Every method is thread-safe and blocking.

    A backend that cannot be reached or fails raises ``BackendUnavailable`` after a
    bounded wait (bounded further by an enclosing ``deadline`` block).
    """

    #: whether every call returns at once (no I/O; a lock held only briefly), so that an
    #: event loop may make the calls that do not wait itself, without a thread
    nonblocking: ClassVar[bool] = False

    def value_limit(self) -> int | None:
        """The most bytes one output, foreach item or request body may hold here (None:
        no limit of the backend's own). A step that returns more fails (``StepError``)."""
        return None

    # -- requests --------------------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, record: RequestRecord, transition: Transition) -> None:
        """Create the request and apply its first transition; ``DuplicateRequest`` if it exists."""

    async def submit_async(self, record: RequestRecord, transition: Transition) -> None:
        """``submit`` from an event loop: on a thread (on the loop itself if the backend
        is ``nonblocking``). A backend may send it from the loop more cheaply."""
        if self.nonblocking:
            self.submit(record, transition)
            return
        await anyio.to_thread.run_sync(self.submit, record, transition)

    def leave_loop(self) -> None:  # noqa: B027 - optional
        """Called on an event loop that made ``submit_async`` calls once it makes no more
        (an HTTP server's shutdown): what the backend keeps for that loop goes."""

    @abc.abstractmethod
    def state(self, request_id: str) -> RequestState | None: ...

    @abc.abstractmethod
    def record(self, request_id: str) -> RequestRecord | None: ...

    def summary(self, request_id: str) -> Summary | None:
        """Flow, status, result and error of a request, without its vertices."""
        state = self.state(request_id)
        if state is None:
            return None
        return Summary(state.flow, state.status, self.result(request_id), state.error)

    @abc.abstractmethod
    def output(self, request_id: str, address: str) -> bytes | None:
        """The output of one completed vertex instance (by address), else None; raises
        ``NoOutput`` (``not_kept``) if it completed but its flow does not keep outputs."""

    @abc.abstractmethod
    def result(self, request_id: str) -> bytes | None:
        """The result of a completed request, else None."""

    @abc.abstractmethod
    def wait(self, request_id: str, timeout: float | None) -> Status | None:
        """Block until the request has finished or ``timeout`` passed; its status then."""

    @abc.abstractmethod
    def control(self, request_id: str, action: Status) -> Status:
        """Pause (``PAUSED``), resume (``RUNNING``) or stop (``STOPPED``) a request.

        Returns the new status; raises ``RequestNotFound`` or ``NotRunning``.
        """

    @abc.abstractmethod
    def rerun(self, request_id: str, trace: str = "") -> Status:
        """Take a failed or stopped request back to ``RUNNING`` under the same id, atomically:
        completed instances keep their outputs; the tasks it dropped when it ended (failed,
        queued, held) are queued again with fresh attempt counts; its ``retries`` gains the
        time; ``trace`` (when given) replaces its record's ``trace`` (the retry's root
        span). Raises ``RequestNotFound``, or ``NotRunning`` if it is running or completed
        (of two concurrent calls, one wins and the other gets ``NotRunning``).

        A request that ended failed or stopped keeps its bookkeeping (inputs waiting at
        fan-ins, which instances fired and completed) for this. Tasks that run on after it
        ended complete into its state (outputs recorded, nothing queued: what they make
        ready is set aside for a retry), fail or retry into the set-aside tasks."""

    @abc.abstractmethod
    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        """Requests, newest first, optionally of one flow and one status."""

    # -- the per-request key/value store -----------------------------------------------------
    @abc.abstractmethod
    def context_get(self, request_id: str, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def context_set(self, request_id: str, key: str, value: bytes) -> None: ...

    @abc.abstractmethod
    def context_delete(self, request_id: str, key: str) -> None: ...

    # -- the worker's side -------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, worker: str, timeout: float) -> Task | None:
        """Take the next ready task, waiting up to ``timeout`` seconds."""

    @abc.abstractmethod
    def begin(self, task: Task, instance: str, address: str) -> bool:
        """Mark the task running. False if it must not run: its request has ended or is
        paused (the task is then held until resumed), or the instance is done already."""

    def record_to_run(self, task: Task) -> RequestRecord | None:
        """The record of ``task``'s request, for its worker once ``begin`` said it may
        run; its ``body`` and ``headers`` may be left out. A backend may have it from the
        task's claim or begin already, without a read of its own."""
        return self.record(task.request_id)

    @abc.abstractmethod
    def complete(
        self, task: Task, instance: str, address: str, output: bytes | None, transition: Transition
    ) -> None:
        """The task succeeded: record ``output`` and apply ``transition``, once."""

    @abc.abstractmethod
    def retry(
        self, task: Task, instance: str, address: str, delay: float, error: ErrorInfo
    ) -> None:
        """The attempt failed; queue the next attempt after ``delay`` seconds. A no-op
        (the task is let go) if the instance is done already or the request has ended."""

    @abc.abstractmethod
    def fail(self, task: Task, instance: str, address: str, error: ErrorInfo) -> None:
        """The task failed for good: the request fails with ``error``. A no-op (the task
        is let go) if the instance is done already or the request has ended: a late
        failure after another worker took the task over and completed it changes nothing."""

    @abc.abstractmethod
    def ack(self, task: Task) -> None:
        """Done with a task that changes no state (a hooks task)."""

    @abc.abstractmethod
    def defer(self, task: Task, delay: float) -> None:
        """Give ``task`` back unrun, as it is (same attempt), for any worker to claim
        after ``delay`` seconds: this worker lacks the definition its request runs on,
        which another live worker has (a rolling deploy). Changes no request state."""

    # -- live workers (optional) -------------------------------------------------------------
    def register_worker(  # noqa: B027 - optional
        self, name: str, describe: Callable[[], Mapping[str, object]]
    ) -> None:
        """Announce a running worker until ``unregister_worker``; ``describe()`` says what
        it is (name, host, pid, flows, concurrency)."""

    def unregister_worker(self, name: str) -> None:  # noqa: B027 - optional
        """The worker ``name`` has stopped."""

    def workers(self) -> list[dict[str, object]]:
        """Live workers, each ``describe()`` plus ``last_seen`` (epoch seconds)."""
        return []

    def depth(self) -> Mapping[str, int]:
        """Tasks waiting: ``ready`` (queued, not yet claimed), ``delayed`` (retries waiting
        for their time) and ``held`` (of paused requests). Empty if the backend cannot tell."""
        return {}

    def listen(
        self,
        listener: Callable[[str, Status, bytes | None], None],
        lost: Callable[[], None] = lambda: None,
    ) -> Callable[[], None] | None:
        """Call ``listener(request_id, status, result)`` when a request ends, from a thread
        of the backend's (so it must be quick and must not call the backend); ``result``
        is a completed request's result when the backend has it at hand (on Redis, one
        up to 4 KiB), else None (read it then). A backend that
        may miss ends (a subscription that was cut) calls ``lost()`` once it hears them
        again: the caller then reads the statuses of what it waits for. Returns a
        function that stops the calls, or None if this backend cannot tell (callers then
        check the status themselves)."""
        return None

    @abc.abstractmethod
    def ping(self) -> None:
        """Check that the backend answers; ``BackendUnavailable`` (bounded wait) if not."""

    def flush(self) -> None:  # noqa: B027 - optional
        """Send what this thread has left to send. A backend may defer a completion until
        the same thread's next call (to send it with that call); every other method of
        the backend flushes first, and a worker thread calls this before it ends."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and threads."""
