"""The worker: threads that claim tasks, run their step, and report back to the backend."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid

from . import checks, context, engine, logs
from .backends import HOOKS, Backend, MemoryBackend, RequestRecord, Task
from .errors import BackendUnavailable
from .execute import (
    Caller,
    NodeFailed,
    Outcome,
    check_size,
    error_info,
    internal_error,
    run_step,
    to_bytes,
    user_traceback,
)
from .observe import Attempt, Observers, RequestInfo
from .plan import SCOPE_INPUT, Plan, Step, StepKind
from .registry import Registry
from .types import ErrorInfo, Options, Status

__all__ = ["MAX_CONCURRENCY", "Worker"]

MAX_CONCURRENCY = 10_000  # threads one worker may run
# A task of a definition this worker lacks, which another live worker has, goes back for
# that one after this long; the live workers' definitions are read again at most this often
DEFER_SECONDS = 0.5
SERVED_SECONDS = 2.0

log = logging.getLogger("flowloom.worker")


class Worker:
    """``concurrency`` threads, each running one task at a time.

    Sync handlers run on the worker's threads (never on an event loop); ``async def``
    handlers run on a loop kept per thread. ``observers`` (tracing, metrics) are told of
    every attempt and of every request this worker ends.
    """

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        concurrency: int = 5,
        observers: Observers | None = None,
    ) -> None:
        checks.count("worker concurrency", concurrency, 1, MAX_CONCURRENCY)
        self.backend = backend
        self.registry = registry
        self.concurrency = concurrency
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.observers = observers or Observers()
        self._observed = bool(self.observers)  # off: the hot path skips every hook
        self._call = Caller(self.observers.call_span)
        self._known: dict[str, tuple[Options, RequestInfo]] = {}  # request id -> recent ones
        self._outage = _Outage()
        # (flow, version) pairs other live workers serve, and when to read them again
        self._served: frozenset[tuple[str, str]] = frozenset()
        self._served_due = 0.0
        self._deferrals: dict[tuple[str, str], float] = {}  # when each was last logged

    def start(self) -> None:
        if self._threads:
            return
        flows = ", ".join(
            f"{name}@{self.registry.latest(name).version}" for name in self.registry.names()
        )
        log.info(
            "worker %s starting: backend %s, concurrency %d, flows %s",
            self.name,
            backend_name(self.backend),
            self.concurrency,
            flows or "(none)",
        )
        self.backend.value_limit()  # the backend reads (and checks) its settings now
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"flowloom-worker-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop claiming; let running tasks finish: all of them within ``timeout`` seconds
        in total (``None``: wait for ever). A task still running then is left to its
        thread (a daemon), and another worker takes it over after the visibility timeout."""
        self._stopping.set()
        if not self._threads:
            return
        log.info("worker %s stopping: letting running tasks finish", self.name)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        left = sum(thread.is_alive() for thread in self._threads)
        if left:
            log.warning(
                "worker %s stopped with %d task(s) still running after %gs",
                self.name,
                left,
                timeout,
            )
        else:
            log.info("worker %s stopped", self.name)

    def _loop(self) -> None:
        """Claim and run tasks until stopped. A failing backend never ends the thread: it
        is logged once per outage, and the loop backs off and carries on."""
        backoff = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    task = self.backend.claim(self.name, 0.2)
                except Exception as exc:
                    self._outage.failed(exc)
                    backoff = min(2.0, max(0.05, backoff * 2))
                    self._stopping.wait(backoff)
                    continue
                backoff = 0.0
                if self._outage.since is not None:
                    self._outage.succeeded()
                if task is not None:
                    self.execute(task)
        finally:
            try:
                self.backend.flush()
            except BackendUnavailable as exc:
                log.warning(
                    "flowloom: could not send the last completion (%s); its task is taken "
                    "over after the visibility timeout",
                    exc,
                )
            except Exception:
                log.exception("flowloom: sending the last completion failed")
            self._call.close()

    def execute(self, task: Task) -> None:
        """Run one task; whatever user code does, report it and keep going."""
        try:
            plan = self.registry.version(task.flow, task.version)
            if plan is None and self._served_elsewhere(task):
                self._defer(task)
                return
            if task.step == HOOKS:
                self._run_hooks(plan, task)
                return
            if plan is None:
                self._fail_unknown_plan(task)
                return
            if task.step == engine.START:  # queued by a client: the first steps, from the plan
                body = task.inputs.get(SCOPE_INPUT) or b""
                self.backend.complete(task, engine.START, "", None, engine.start(plan, body))
                return
            self._run(plan, plan.steps[task.step], task)
        except BackendUnavailable as exc:
            log.warning(
                "request %s: %s not reported (%s); the backend hands the task on",
                task.request_id,
                task.step,
                exc,
            )
        except Exception as exc:
            log.exception("flowloom: internal error running %s of %s", task.step, task.request_id)
            self._fail_internal(task, exc)

    def _fail_internal(self, task: Task, exc: Exception) -> None:
        """Fail the request of a task flowloom itself could not run (a bug), rather than
        leave it waiting for ever."""
        if task.step == HOOKS:
            return  # acknowledged already; the request has ended
        plan = self.registry.version(task.flow, task.version)
        step = plan.steps.get(task.step) if plan is not None else None
        instance, address = step.names(task.keys) if step is not None else ("", task.step)
        try:
            self.backend.fail(task, instance, address, internal_error(address, exc))
        except Exception:
            log.exception("flowloom: could not fail request %s either", task.request_id)

    def _run(self, plan: Plan, step: Step, task: Task) -> None:
        instance, address = step.names(task.keys)
        if task.redelivered:
            self.observers.task_redelivered(task)
        if not self.backend.begin(task, instance, address):
            return
        options, request = self._request(task)
        attempt = None
        if self._observed:
            # ``_value_``: the enum's value without a property call (the hot path)
            attempt = Attempt(task, request, step.kind._value_, address, self.name)
            self.observers.attempt_started(attempt)
        token = context.enter(
            context.RequestScope(task.request_id, task.flow, options, self.backend, attempt)
        )
        try:
            outcome: Outcome | None = None
            failure: BaseException | None = None
            try:
                outcome = check_size(
                    run_step(step, task.inputs, options, self._call), self.backend.value_limit()
                )
            except BaseException as exc:  # user code's: a SystemExit fails the request too
                failure = exc
            if failure is not None:  # outside the except: an on_failure error is not chained
                outcome = self._recover(step, task, instance, address, failure, attempt)
            if outcome is None:
                return
            if outcome.branches is not None:
                transition = engine.after_split(
                    plan, step, task.keys, outcome.output, outcome.branches
                )
                self.backend.complete(task, instance, address, None, transition)
            else:
                transition = engine.after_output(plan, step, task.keys, outcome.output)
                self.backend.complete(task, instance, address, outcome.output, transition)
            if attempt is not None:
                attempt.outcome = "completed"
                if transition.finished:
                    attempt.ended = (Status.COMPLETED, None)
        finally:
            context.leave(token)
            if attempt is not None:
                attempt.finished = time.perf_counter()
                self.observers.attempt_ended(attempt)
                if attempt.ended is not None:
                    self.observers.request_ended(request, *attempt.ended)
                    # a retry gives it a new root span: read its record again then
                    self._known.pop(task.request_id, None)

    def _recover(
        self,
        step: Step,
        task: Task,
        instance: str,
        address: str,
        exc: BaseException,
        attempt: Attempt | None = None,
    ) -> Outcome | None:
        """After a failed attempt: retry, fall back to the node's failure handler, or fail."""
        data, stack = b"", ""
        if isinstance(exc, NodeFailed) and exc.__cause__ is not None:
            data, stack, exc = exc.data, exc.stack, exc.__cause__
        if attempt is not None:
            attempt.error = exc
        error = error_info(address, exc, stack)
        if step.kind is StepKind.RUN and task.attempt <= step.retries:
            delay = engine.retry_delay(task.attempt, step.backoff)
            _log_failure(task, step, error, f"retrying in {delay:g}s", logging.WARNING)
            self.backend.retry(task, instance, address, delay, error)
            if attempt is not None:
                attempt.outcome = "retried"
            return None
        if step.on_failure is not None:
            _log_failure(task, step, error, "running its on_failure handler", logging.WARNING)
            try:
                fallback = self._call(step.on_failure, exc, data, kind="on_failure")
                return check_size(
                    Outcome(to_bytes(fallback, "on_failure")), self.backend.value_limit()
                )
            except BaseException as fallback_exc:
                error = error_info(address, fallback_exc)
                _log_failure(
                    task, step, error, "on_failure raised: the request fails", logging.ERROR
                )
        else:
            _log_failure(task, step, error, "the request fails", logging.ERROR)
        self.backend.fail(task, instance, address, error)
        if attempt is not None:
            attempt.ended = (Status.FAILED, error)
        return None

    def forget(self, request_id: str) -> None:
        """Read the request's record again at its next task (it was retried)."""
        self._known.pop(request_id, None)

    def _options(self, task: Task) -> Options:
        return self._request(task)[0]

    def _request(self, task: Task) -> tuple[Options, RequestInfo]:
        """The request's handler options and what observers need of it, cached."""
        known = self._known.get(task.request_id)
        if known is None:
            record = self.backend.record_to_run(task)
            if record is None:
                known = ({}, RequestInfo(task.request_id, task.flow, 0.0, None))
            else:
                known = self._known_of(record)
            self._remember(task.request_id, known)
        return known

    def submitted(self, record: RequestRecord) -> None:
        """Keep what ``_request`` reads of a request this process submits: its tasks run
        here need no read of its record (on Redis, a round trip per one-node request).
        Not on a backend whose reads cost no I/O: a burst of submits would only push out
        of the cache the requests that are running."""
        if not self.backend.nonblocking:
            self._remember(record.request_id, self._known_of(record))

    def _known_of(self, record: RequestRecord) -> tuple[Options, RequestInfo]:
        options = {k: list(v) for k, v in record.query.items()}
        if self.observers.reads_traces:
            return options, RequestInfo.of(record)
        # nobody reads its trace: not decoded (its creation time only if observed)
        created = record.created if self._observed else 0.0
        return options, RequestInfo(record.request_id, record.flow, created, None)

    def _remember(self, request_id: str, known: tuple[Options, RequestInfo]) -> None:
        if len(self._known) >= 4096:
            with contextlib.suppress(RuntimeError, StopIteration):  # another thread trimmed
                self._known.pop(next(iter(self._known)), None)
        self._known[request_id] = known

    def _run_hooks(self, plan: Plan | None, task: Task) -> None:
        try:
            if plan is None:
                return
            status = Status((task.inputs.get("status") or b"completed").decode())
            state = self.backend.state(task.request_id)
            scope = context.RequestScope(
                task.request_id, task.flow, self._options(task), self.backend
            )
            token = context.enter(scope)
            try:
                if status is Status.FAILED and state is not None and state.error is not None:
                    for failure_hook in plan.failure_hooks:
                        self._hook(task, failure_hook, state.error)
                for finally_hook in plan.finally_hooks:
                    self._hook(task, finally_hook, status)
            finally:
                context.leave(token)
        finally:
            self.backend.ack(task)

    def _hook(self, task: Task, hook: object, arg: object) -> None:
        try:
            self._call(hook, arg, kind="hook")  # type: ignore[arg-type]
        except BaseException as exc:  # user code's: a SystemExit must not end the thread
            name = getattr(hook, "__qualname__", repr(hook))
            log.warning(
                "request %s (flow %s): hook %s raised %s: %s; ignored",
                task.request_id,
                task.flow,
                name,
                type(exc).__name__,
                exc,
            )
            log.debug(
                "request %s: traceback of hook %s:\n%s", task.request_id, name, user_traceback(exc)
            )

    def _served_elsewhere(self, task: Task) -> bool:
        """Whether another live worker serves the definition ``task``'s request runs on,
        which this one lacks (a rolling deploy: some workers run the new code, some the
        old). The workers' list is read at most every ``SERVED_SECONDS``."""
        now = time.monotonic()
        if now >= self._served_due:
            served: set[tuple[str, str]] = set()
            try:
                workers = self.backend.workers()
            except Exception:  # not known: the task fails as it would have
                workers = []
            for worker in workers:
                versions = worker.get("versions")
                if worker.get("name") != self.name and isinstance(versions, dict):
                    served.update((str(f), str(v)) for f, v in versions.items())
            self._served, self._served_due = frozenset(served), now + SERVED_SECONDS
        return (task.flow, task.version) in self._served

    def _defer(self, task: Task) -> None:
        """Give ``task`` back for a worker that has its definition; said once a minute
        for each flow version."""
        self.backend.defer(task, DEFER_SECONDS)
        key = (task.flow, task.version)
        now = time.monotonic()
        if now - self._deferrals.get(key, -math.inf) >= 60:
            self._deferrals[key] = now
            log.warning(
                "worker %s lacks flow %r version %s, which another live worker serves: its "
                "tasks are left to such a worker (a deploy under way?)",
                self.name,
                task.flow,
                task.version,
            )

    def _fail_unknown_plan(self, task: Task) -> None:
        why = (
            f"flow {task.flow!r} was re-registered with another definition while the request "
            "ran (no live worker has the request's)"
            if task.flow in self.registry.names()
            else f"flow {task.flow!r} is not registered on worker, nor on any live worker"
        )
        log.error("request %s: %s", task.request_id, why)
        error = ErrorInfo(task.step, "FlowNotFound", why)
        self.backend.fail(task, "", task.step, error)
        if self.observers:
            self.observers.request_ended(self._request(task)[1], Status.FAILED, error)


class _Outage:
    """The worker's view of its backend: a WARNING when claiming starts to fail, an INFO
    when it works again; nothing in between, however many threads retry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None  # when claiming began to fail

    def failed(self, exc: Exception) -> None:
        with self._lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        log.warning(
            "flowloom: worker cannot claim tasks (%s: %s); backing off", type(exc).__name__, exc
        )

    def succeeded(self) -> None:
        if self.since is None:
            return
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            log.info("flowloom: worker reconnected after %.1fs", time.monotonic() - since)


def _log_failure(task: Task, step: Step, error: ErrorInfo, then: str, level: int) -> None:
    """One line per failed attempt (a warning while the request goes on, an error when it
    fails), and the traceback at DEBUG."""
    message = error.message if len(error.message) <= 500 else error.message[:500] + "..."
    attempts = f" (attempt {task.attempt} of {step.retries + 1})" if step.retries else ""
    log.log(
        level,
        "request %s (flow %s): %s failed%s: %s: %s; %s",
        task.request_id,
        task.flow,
        error.vertex,
        attempts,
        error.type,
        message,
        then,
    )
    if error.traceback:
        log.debug(
            "request %s: traceback of %s:\n%s", task.request_id, error.vertex, error.traceback
        )


def backend_name(backend: Backend) -> str:
    """What to call ``backend`` in a log line: its URL without any password, or its kind."""
    if isinstance(backend, MemoryBackend):
        return "embedded (this process only)"
    url = getattr(backend, "url", None)
    if not isinstance(url, str):
        return type(backend).__name__
    return logs.safe_url(url)
