"""The worker: threads that claim tasks, run their step, and report back to the backend."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid

from . import context, engine
from .backends import HOOKS, Backend, Task
from .execute import Caller, NodeFailed, Outcome, StepError, run_step, to_bytes
from .observe import Attempt, Observers, RequestInfo
from .plan import Plan, Step, StepKind
from .registry import Registry
from .types import ErrorInfo, Options, Status

__all__ = ["Worker"]

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
        if concurrency < 1:
            raise ValueError("worker concurrency must be >= 1")
        self.backend = backend
        self.registry = registry
        self.concurrency = concurrency
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.observers = observers or Observers()
        self._call = Caller(self.observers.call_span)
        self._known: dict[str, tuple[Options, RequestInfo]] = {}  # request id -> recent ones

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        if self._threads:
            return
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"flowloom-worker-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop claiming; let running tasks finish (up to ``timeout`` seconds)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                task = self.backend.claim(self.name, 0.2)
                if task is not None:
                    self.execute(task)
        finally:
            try:
                self.backend.flush()
            except Exception:
                log.exception("flowloom: sending the last completion failed")
            self._call.close()

    def execute(self, task: Task) -> None:
        """Run one task; whatever user code does, report it and keep going."""
        try:
            plan = self.registry.version(task.flow, task.version)
            if task.step == HOOKS:
                self._run_hooks(plan, task)
                return
            if plan is None:
                self._fail_unknown_plan(task)
                return
            self._run(plan, plan.steps[task.step], task)
        except Exception:
            log.exception("flowloom: internal error running %s of %s", task.step, task.request_id)

    def _run(self, plan: Plan, step: Step, task: Task) -> None:
        instance, address = step.names(task.keys)
        if task.redelivered:
            self.observers.task_redelivered(task)
        if not self.backend.begin(task, instance, address):
            return
        options, request = self._request(task)
        attempt = None
        if self.observers:
            attempt = Attempt(task, request, step.kind.value, address, self.name)
            self.observers.attempt_started(attempt)
        token = context.enter(
            context.RequestScope(task.request_id, task.flow, options, self.backend)
        )
        try:
            outcome: Outcome | None
            try:
                outcome = run_step(step, task.inputs, options, self._call)
            except Exception as exc:
                outcome = self._recover(step, task, address, exc, attempt)
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
                self.observers.attempt_ended(attempt)
                if attempt.ended is not None:
                    self.observers.request_ended(request, *attempt.ended)

    def _recover(
        self, step: Step, task: Task, address: str, exc: Exception, attempt: Attempt | None
    ) -> Outcome | None:
        """After a failed attempt: retry, fall back to the node's failure handler, or fail."""
        data = b""
        if isinstance(exc, NodeFailed) and isinstance(exc.__cause__, Exception):
            data, exc = exc.data, exc.__cause__
        if attempt is not None:
            attempt.error = exc
        error = _error_info(address, exc)
        if step.kind is StepKind.RUN and task.attempt <= step.retries:
            delay = engine.retry_delay(task.attempt, step.backoff)
            self.backend.retry(task, address, delay, error)
            if attempt is not None:
                attempt.outcome = "retried"
            return None
        if step.on_failure is not None:
            try:
                fallback = self._call(step.on_failure, exc, data, kind="on_failure")
                return Outcome(to_bytes(fallback, "on_failure"))
            except Exception as fallback_exc:
                error = _error_info(address, fallback_exc)
        self.backend.fail(task, address, error)
        if attempt is not None:
            attempt.ended = (Status.FAILED, error)
        return None

    def _options(self, task: Task) -> Options:
        return self._request(task)[0]

    def _request(self, task: Task) -> tuple[Options, RequestInfo]:
        """The request's handler options and what observers need of it, cached."""
        known = self._known.get(task.request_id)
        if known is None:
            record = self.backend.record(task.request_id)
            if record is None:
                known = ({}, RequestInfo(task.request_id, task.flow, 0.0, None))
            else:
                known = ({k: list(v) for k, v in record.query.items()}, RequestInfo.of(record))
            if len(self._known) >= 4096:
                with contextlib.suppress(RuntimeError, StopIteration):  # another thread trimmed
                    self._known.pop(next(iter(self._known)), None)
            self._known[task.request_id] = known
        return known

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
                        self._hook(failure_hook, state.error)
                for finally_hook in plan.finally_hooks:
                    self._hook(finally_hook, status)
            finally:
                context.leave(token)
        finally:
            self.backend.ack(task)

    def _hook(self, hook: object, arg: object) -> None:
        try:
            self._call(hook, arg, kind="hook")  # type: ignore[arg-type]
        except Exception:
            log.exception("flowloom: a workflow hook raised")

    def _fail_unknown_plan(self, task: Task) -> None:
        why = (
            f"flow {task.flow!r} was re-registered with another definition while the request ran"
            if task.flow in self.registry.names()
            else f"flow {task.flow!r} is not registered on worker"
        )
        error = ErrorInfo(task.step, "FlowNotFound", why)
        self.backend.fail(task, task.step, error)
        if self.observers:
            self.observers.request_ended(self._request(task)[1], Status.FAILED, error)


def _error_info(address: str, exc: BaseException) -> ErrorInfo:
    kind = "StepError" if isinstance(exc, StepError) else type(exc).__name__
    return ErrorInfo(address, kind, str(exc) or repr(exc))
