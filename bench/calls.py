"""Python calls per task, a figure this machine's load cannot move: ``python -m bench.calls``.

Runs each workload once on ``FlowService()`` in this process (after a warm-up run)
under ``cProfile``, every worker thread and the client profiled, and prints the calls
(Python functions and the C ones they call) per task, for each ``--mode``:

- ``plain``: no observer;
- ``metrics``: ``enable_monitoring=True``;
- ``observed``: metrics and tracing, the spans handed to a sink that discards them (the
  exporter process's work is not this process's calls).

Fewer calls per task is what makes the hot path cheaper; throughput ratios
(``python -m bench --observability compare``) say how much, on a quiet machine.

``--hooks``: instead, the observers' hooks alone, in this thread, without a worker:
microseconds per attempt (``Attempt``, ``attempt_started``, ``attempt_ended``) and per
request end, best of 5 x 30,000, for each mode.

``--loop N``: the hooks of N attempts of the one mode given, untimed, for an instruction
counter (whatever the machine's load): the instructions of ``--loop 6000`` less those of
``--loop 1000``, over 5,000, are an attempt's, e.g. with ``valgrind --tool=callgrind
--callgrind-out-file=/dev/null`` (``PYTHONHASHSEED=0``; the tracing's spans discarded).
With ``--request``, N requests of the ``dags`` workload's shape instead, as their worker
observes them: the stored trace context read back from a record made as ``execute``
makes it, four attempts (the last calling an aggregator, traced), the request's end.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flowloom import FlowService, context
from flowloom.backends import Task
from flowloom.execute import Caller
from flowloom.observe import Attempt, Observers, RequestInfo
from flowloom.traceparent import TraceContext
from flowloom.types import Status
from flowloom.worker import Worker

from . import workloads
from .workloads import WORKLOADS, Sizes, Timing

__all__ = ["main"]

RUNS: dict[str, Callable[[FlowService, int, float], float]] = {
    "fanout": workloads.run_fanout,
    "chain": workloads.run_chain,
    "dags": workloads.run_dags,
}


class Discard:
    """A span sink that drops every batch: the tracing's own calls, without exporting."""

    def send(self, records: list[Any]) -> bool:
        return True

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float) -> None:
        pass


@contextmanager
def _profiled(profiles: list[cProfile.Profile]) -> Iterator[None]:
    """Profile every task a worker runs (a profiler per worker thread) while inside."""
    execute = Worker.execute
    local = threading.local()

    def profiled(self: Worker, task: Any) -> None:
        profile = getattr(local, "profile", None)
        if profile is None:
            profile = local.profile = cProfile.Profile()
            profiles.append(profile)
        profile.enable()
        try:
            execute(self, task)
        finally:
            profile.disable()

    Worker.execute = profiled  # type: ignore[method-assign]
    try:
        yield
    finally:
        Worker.execute = execute  # type: ignore[method-assign]


def calls_per_task(mode: str, sizes: Sizes) -> dict[str, float]:
    options: dict[str, Any] = {}
    if mode in ("metrics", "observed"):
        options["enable_monitoring"] = True
    if mode == "observed":
        options["otlp_endpoint"] = "http://127.0.0.1:9"  # never reached: spans discarded
    figures = {}
    with FlowService(**options) as fs:
        workloads.register(fs, sizes)
        for observer in fs.observers.all:
            recorder = getattr(observer, "recorder", None)
            if recorder is not None:  # the tracing: its spans discarded, not exported
                exporter, recorder.sink = recorder.sink, Discard()
                exporter.close(5.0)
        for workload in WORKLOADS:
            size = int(getattr(sizes, workload))
            RUNS[workload](fs, size, 60.0)  # warm-up
            profiles = [cProfile.Profile()]
            with _profiled(profiles):
                profiles[0].enable()
                RUNS[workload](fs, size, 60.0)
                profiles[0].disable()
            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                stats.add(profile)
            calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
            figures[workload] = calls / Timing(workload, size).tasks
    return figures


def _aggregate(received: dict[str, bytes]) -> bytes:
    return b""


def request_loop(fs: FlowService, loop: int) -> None:
    """The observers' work of ``loop`` requests of the ``dags`` shape (see ``--request``)."""
    observers: Observers = fs.observers
    call = Caller(observers.call_span)
    fs._ensure_worker = lambda: None  # type: ignore[method-assign]  # no thread polling meanwhile
    for i in range(loop):
        record = fs._new_request(workloads.DAGS_FLOW, workloads.payload(i))[0]
        request = RequestInfo.of(record)
        for step in ("a", "b", "c", "d"):
            task = Task(record.request_id, record.flow, "1", step, (), {})
            attempt = Attempt(task, request, "run", step, "worker")
            observers.attempt_started(attempt)
            scope = context.RequestScope(task.request_id, task.flow, {}, fs.backend, attempt)
            token = context.enter(scope)
            if step == "d":
                call(_aggregate, {}, kind="aggregator")
            context.leave(token)
            attempt.outcome = "completed"
            attempt.finished = time.perf_counter()
            observers.attempt_ended(attempt)
        observers.request_ended(request, Status.COMPLETED, None)


def hooks_cost(mode: str, loop: int = 0, requests: bool = False) -> tuple[float, float]:
    """Microseconds per attempt and per request end of the hooks of ``mode`` (with
    ``loop``: only ``loop`` attempts, or ``requests``, untimed)."""
    options: dict[str, Any] = {}
    if mode in ("metrics", "observed"):
        options["enable_monitoring"] = True
    if mode == "observed":
        options["otlp_endpoint"] = "http://127.0.0.1:9"  # never reached: spans discarded
    with FlowService(**options) as fs:
        for observer in fs.observers.all:
            recorder = getattr(observer, "recorder", None)
            if recorder is not None:
                exporter, recorder.sink = recorder.sink, Discard()
                exporter.close(5.0)
        observers: Observers = fs.observers
        task = Task("r1", "flow", "1", "step", (), {})
        request = RequestInfo("r1", "flow", time.time(), TraceContext.new())

        def attempt() -> None:
            current = Attempt(task, request, "run", "step", "worker")
            observers.attempt_started(current)
            current.outcome = "completed"
            current.finished = time.perf_counter()
            observers.attempt_ended(current)

        def request_end() -> None:
            observers.request_ended(request, Status.COMPLETED, None)

        if loop and requests:
            workloads.register(fs, Sizes())
            request_loop(fs, loop)
            return 0.0, 0.0
        if loop:
            for _ in range(loop):
                attempt()
            return 0.0, 0.0
        figures = tuple(
            min(timeit.repeat(fn, number=30_000, repeat=5)) / 30_000 * 1e6
            for fn in (attempt, request_end)
        )
    return figures[0], figures[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__)
    parser.add_argument("--modes", default="plain,metrics,observed")
    parser.add_argument("--hooks", action="store_true", help="time the hooks alone")
    parser.add_argument("--loop", type=int, default=0, help="run N attempts' hooks, untimed")
    parser.add_argument("--request", action="store_true", help="with --loop: dags requests")
    args = parser.parse_args(argv)
    if args.loop:
        hooks_cost(args.modes, args.loop, args.request)
        return
    if args.hooks:
        print(f"{'mode':10s} {'attempt':>8s} {'request':>8s}   (µs, hooks alone)")
        for mode in args.modes.split(","):
            per_attempt, per_request = hooks_cost(mode)
            print(f"{mode:10s} {per_attempt:8.2f} {per_request:8.2f}")
        return
    print(f"{'mode':10s} " + " ".join(f"{w:>8s}" for w in WORKLOADS) + "   (calls per task)")
    for mode in args.modes.split(","):
        figures = calls_per_task(mode, Sizes())
        print(f"{mode:10s} " + " ".join(f"{figures[w]:8.1f}" for w in WORKLOADS))


if __name__ == "__main__":
    main()
