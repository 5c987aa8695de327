"""Prometheus metrics of one process, with prometheus-client (the ``otel`` extra).

Each process counts what happens in it, in a registry of its own: the HTTP server
counts the requests it starts and the HTTP calls it answers, each worker process
the tasks it runs and the requests it ends. Prometheus scrapes every process and
sums (``sum by (flow) (...)``). Label values are bounded: flow names, step ids
(vertex paths without item keys: ``users[]/verify``, ``users:split``), outcomes,
route templates; never a request id or a foreach item key. Every metric is listed
in docs/observability.md.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .backends import Backend, RequestRecord, Task
from .observe import Attempt, Observer, RequestInfo
from .types import ErrorInfo, Status

__all__ = ["CONTENT_TYPE", "Metrics"]

log = logging.getLogger("flowloom.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
_TASK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_REQUEST_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class Metrics(Observer):
    """The process's metrics. ``backend``: also report its queue depth and live workers,
    read from it at each scrape."""

    def __init__(self, backend: Backend | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = _RequestStats()
        registry.register(self.requests)
        self.tasks = _TaskStats(lambda: len(self.running))
        registry.register(self.tasks)
        self.callbacks = Counter(
            "flowloom_callbacks", "X-Callback-Url calls, by outcome.", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.http_requests = Counter(
            "flowloom_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "flowloom_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route", "method"],
            registry=registry,
        )
        if backend is not None:
            registry.register(_BackendCollector(backend))

    def count_dropped_spans(self, dropped: Callable[[], int]) -> None:
        """Expose ``flowloom_spans_dropped``: spans the tracing dropped, its exporter
        lagging (``dropped()`` reads its count at scrape time)."""
        self.registry.register(_Dropped(dropped))

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve ``/metrics`` (and every other path) on ``host:port`` from a daemon thread."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    # -- hooks -------------------------------------------------------------------------------
    def request_started(self, record: RequestRecord) -> None:
        self.requests.started(record.flow)

    def request_ended(self, request: RequestInfo, status: Status, error: ErrorInfo | None) -> None:
        self.requests.ended(request.flow, status._value_, request.created)

    count_end = request_ended

    def count_from(self, recorder: Any) -> None:
        """Count the attempts and request ends the tracing records from its records:
        the ``VertexRecord`` and ``RootRecord`` tuples of ``recorder`` (a
        ``spans.Recorder``), in bulk as its thread takes them off its queue, and at each
        scrape those still waiting, so that a scrape sees every attempt and request
        ended before it. ``attempt_ended`` and ``request_ended`` are then no hooks: the
        tracing calls ``count_attempt`` and ``count_end`` for the ones it records
        otherwise (``Tracing.count_for``)."""
        self.ends_elsewhere = True
        self.tasks.source = self.requests.source = recorder
        recorder.tap = self._count_records

    def _count_records(self, records: list[Any]) -> None:
        _count_records(records, self.tasks.recorded, self.requests.recorded)

    # No ``attempt_started``: the running gauge is the size of ``Observers.running``.
    def attempt_ended(self, attempt: Attempt) -> None:
        task = attempt.task
        seconds = attempt.finished - attempt.started
        try:
            table = self.tasks.local.table
        except AttributeError:
            table = self.tasks.mine()
        row = table.get((task.flow, task.step))
        if row is None:
            row = table[(task.flow, task.step)] = [0.0] * _ROW
        # a completed attempt, the usual one, is counted by its bucket alone (see _TaskStats)
        if attempt.outcome != "completed":
            row[_SLOT[attempt.outcome]] += 1
        row[_SUM] += seconds
        # most tasks take less than the first bucket: no bisect call for them
        if seconds <= _FIRST_BOUND:
            row[_FIRST_BUCKET] += 1
        else:
            row[_FIRST_BUCKET + bisect.bisect_left(_TASK_BUCKETS, seconds)] += 1

    count_attempt = attempt_ended

    def task_redelivered(self, task: Task) -> None:
        self.tasks.redelivered(task.flow, task.step)

    def callback_sent(self, outcome: str) -> None:
        self.callbacks.labels(outcome).inc()

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route, method).observe(seconds)


class _BackendCollector(Collector):
    """Queue depth and live workers, asked of the backend at scrape time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("flowloom_backend_up", "1 if the backend answered this scrape.")
        try:
            depth = self.backend.depth()
            workers = len(self.backend.workers())
        except Exception as exc:
            log.warning("flowloom: metrics could not read the backend: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        queue = GaugeMetricFamily(
            "flowloom_queue_tasks",
            "Tasks waiting in the backend: ready to run, delayed (retries), held (paused).",
            labels=["state"],
        )
        for state in ("ready", "delayed", "held"):
            queue.add_metric([state], depth.get(state, 0))
        live = GaugeMetricFamily("flowloom_workers_live", "Live workers seen by the backend.")
        live.add_metric([], workers)
        return [up, queue, live]


class _Dropped(Collector):
    def __init__(self, dropped: Callable[[], int]) -> None:
        self.dropped = dropped

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "flowloom_spans_dropped",
            "Spans not exported: the exporter lagged and its queue was full.",
        )
        family.add_metric([], self.dropped())
        return [family]


_OUTCOMES = ("completed", "failed", "retried", "redelivered")
_SUM = len(_OUTCOMES)  # the slot of the duration sum; the bucket counts follow it
_FIRST_BUCKET = _SUM + 1
_ROW = _FIRST_BUCKET + len(_TASK_BUCKETS) + 1
_SLOT = {outcome: i for i, outcome in enumerate(_OUTCOMES)}
_COMPLETED, _FAILED, _RETRIED = (_SLOT[outcome] for outcome in ("completed", "failed", "retried"))
_FIRST_BOUND = _TASK_BUCKETS[0]


class _TaskStats(Collector):
    """Task attempts, task durations and running tasks, counted without a lock.

    Every task passes here, so this is the hot path: each worker thread counts into a
    table of its own (one list per flow and step: a count per outcome, the duration sum,
    a count per histogram bucket), written by ``Metrics``' hooks directly, and the
    tables are added up at scrape time, when prometheus-client writes them out as a
    counter, a histogram and a gauge. Completed attempts have no count of their own in
    the tables (one update less per task): they are the attempts timed, the bucket
    counts, less the failed and retried ones. ``running()`` counts the attempts running
    (``Observer.running``).
    """

    def __init__(self, running: Callable[[], int]) -> None:
        self.local = threading.local()
        self.running = running
        self._tables: list[dict[tuple[str, str], list[float]]] = []
        # a ``spans.Recorder`` whose ``VertexRecord``s count here (``Metrics.count_from``),
        # and the table of those counted, written under its ``tap_lock``
        self.source: Any = None
        self.recorded: dict[tuple[str, str], list[float]] = {}

    def mine(self) -> dict[tuple[str, str], list[float]]:
        """This thread's table, made on its first task."""
        local = self.local
        try:
            table: dict[tuple[str, str], list[float]] = local.table
        except AttributeError:
            table = local.table = {}
            self._tables.append(table)  # list.append is atomic: no lock needed
        return table

    def _row(self, flow: str, step: str) -> list[float]:
        table = self.mine()
        row = table.get((flow, step))
        if row is None:
            row = table[(flow, step)] = [0.0] * _ROW
        return row

    def redelivered(self, flow: str, step: str) -> None:
        self._row(flow, step)[_SLOT["redelivered"]] += 1

    def _recorded_now(self) -> list[dict[tuple[str, str], list[float]]]:
        """The counts of ``source``'s records: those taken off its queue and those still
        in it, read at one moment (under its ``tap_lock``)."""
        source = self.source
        if source is None:
            return []
        waiting: dict[tuple[str, str], list[float]] = {}
        with source.tap_lock:
            _count_records(list(source.queue), waiting, None)
            recorded = {key: list(row) for key, row in self.recorded.items()}
        return [recorded, waiting]

    def collect(self) -> Iterable[Metric]:
        totals: dict[tuple[str, str], list[float]] = {}
        for table in [*self._recorded_now(), *self._tables]:
            for key, row in list(table.items()):
                total = totals.get(key)
                if total is None:
                    totals[key] = list(row)
                else:
                    for i, value in enumerate(row):
                        total[i] += value
        attempts = CounterMetricFamily(
            "flowloom_task_attempts",
            "Task attempts by outcome: completed, failed, retried, redelivered.",
            labels=["flow", "vertex", "outcome"],
        )
        seconds = HistogramMetricFamily(
            "flowloom_task_duration_seconds",
            "Time to run one task attempt (its user code and its report).",
            labels=["flow", "vertex"],
        )
        for (flow, step), row in sorted(totals.items()):
            row[_COMPLETED] = sum(row[_FIRST_BUCKET:]) - row[_FAILED] - row[_RETRIED]
            for i, outcome in enumerate(_OUTCOMES):
                if row[i]:
                    attempts.add_metric([flow, step, outcome], row[i])
            counts = row[_FIRST_BUCKET:]
            if sum(counts):
                cumulative = list(itertools.accumulate(counts))
                bounds = [*map(floatToGoString, _TASK_BUCKETS), "+Inf"]
                seconds.add_metric(
                    [flow, step], list(zip(bounds, cumulative, strict=True)), row[_SUM]
                )
        running = GaugeMetricFamily("flowloom_tasks_running", "Tasks running now in this process.")
        running.add_metric([], float(self.running()))
        return [attempts, seconds, running]


def _count_records(
    records: list[Any],
    tasks: dict[tuple[str, str], list[float]] | None,
    requests: dict[str, list[float]] | None,
) -> None:
    """Count the attempts of the ``VertexRecord``s among ``records`` into ``tasks``, as
    ``Metrics.attempt_ended`` counts one, and the request ends of the ``RootRecord``s
    into ``requests``, as ``Metrics.request_ended`` does (None: not counted; the other
    records are skipped)."""
    for record in records:
        size = len(record)
        if size == _VERTEX_FIELDS:
            if tasks is None:
                continue
            key = (record[6], record[13])  # flow, step
            row = tasks.get(key)
            if row is None:
                row = tasks[key] = [0.0] * _ROW
            outcome = record[12]
            if outcome != "completed":
                row[_SLOT[outcome]] += 1
            seconds = record[5] - record[4]
            row[_SUM] += seconds
            if seconds <= _FIRST_BOUND:
                row[_FIRST_BUCKET] += 1
            else:
                row[_FIRST_BUCKET + bisect.bisect_left(_TASK_BUCKETS, seconds)] += 1
        elif size == _ROOT_FIELDS and requests is not None:
            flow = record[5]
            row = requests.get(flow)
            if row is None:
                row = requests[flow] = [0.0] * _R_ROW
            seconds = max(0.0, (record[4] - record[3]) / 1e9)  # end and start, in ns
            row[_ENDED[record[7]]] += 1
            row[_R_SUM] += seconds
            row[_R_FIRST_BUCKET + bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1


# a ``spans.VertexRecord``'s and a ``spans.RootRecord``'s (not imported: the tracing's
# extra)
_VERTEX_FIELDS = 14
_ROOT_FIELDS = 8

_STATUSES = tuple(status.value for status in Status)
_ENDED = {status: i for i, status in enumerate(_STATUSES)}
_R_STARTED = len(_STATUSES)  # after a count per final status: requests started, the sum
_R_SUM = _R_STARTED + 1
_R_FIRST_BUCKET = _R_SUM + 1
_R_ROW = _R_FIRST_BUCKET + len(_REQUEST_BUCKETS) + 1


class _RequestStats(Collector):
    """Requests started and ended, and their durations, by flow: counted as the tasks
    are (``_TaskStats``), in a table per thread added up at scrape time."""

    def __init__(self) -> None:
        self.local = threading.local()
        self._tables: list[dict[str, list[float]]] = []
        # as ``_TaskStats``': the ``RootRecord``s of ``source``, counted in ``recorded``
        self.source: Any = None
        self.recorded: dict[str, list[float]] = {}

    def _row(self, flow: str) -> list[float]:
        local = self.local
        try:
            table: dict[str, list[float]] = local.table
        except AttributeError:
            table = local.table = {}
            self._tables.append(table)  # list.append is atomic: no lock needed
        row = table.get(flow)
        if row is None:
            row = table[flow] = [0.0] * _R_ROW
        return row

    def started(self, flow: str) -> None:
        self._row(flow)[_R_STARTED] += 1

    def ended(self, flow: str, status: str, created: float) -> None:
        seconds = max(0.0, time.time() - created)
        row = self._row(flow)
        row[_ENDED[status]] += 1
        row[_R_SUM] += seconds
        row[_R_FIRST_BUCKET + bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1

    def _recorded_now(self) -> list[dict[str, list[float]]]:
        source = self.source
        if source is None:
            return []
        waiting: dict[str, list[float]] = {}
        with source.tap_lock:
            _count_records(list(source.queue), None, waiting)
            recorded = {flow: list(row) for flow, row in self.recorded.items()}
        return [recorded, waiting]

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, list[float]] = {}
        for table in [*self._recorded_now(), *self._tables]:
            for flow, row in list(table.items()):
                total = totals.setdefault(flow, [0.0] * _R_ROW)
                for i, value in enumerate(row):
                    total[i] += value
        started = CounterMetricFamily(
            "flowloom_requests_started", "Requests executed (by this process).", labels=["flow"]
        )
        ended = CounterMetricFamily(
            "flowloom_requests_ended",
            "Requests ended (by this process), by final status.",
            labels=["flow", "status"],
        )
        seconds = HistogramMetricFamily(
            "flowloom_request_duration_seconds",
            "From execute to the request's end.",
            labels=["flow"],
        )
        bounds = [*map(floatToGoString, _REQUEST_BUCKETS), "+Inf"]
        for flow, row in sorted(totals.items()):
            if row[_R_STARTED]:
                started.add_metric([flow], row[_R_STARTED])
            for status, i in _ENDED.items():
                if row[i]:
                    ended.add_metric([flow, status], row[i])
            counts = row[_R_FIRST_BUCKET:]
            if sum(counts):
                cumulative = list(itertools.accumulate(counts))
                seconds.add_metric([flow], list(zip(bounds, cumulative, strict=True)), row[_R_SUM])
        return [started, ended, seconds]
