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

import logging
import time
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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
        self.requests_started = Counter(
            "flowloom_requests_started", "Requests executed (by this process).", ["flow"],
            registry=registry,
        )  # fmt: skip
        self.requests_ended = Counter(
            "flowloom_requests_ended",
            "Requests ended (by this process), by final status.",
            ["flow", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "flowloom_request_duration_seconds",
            "From execute to the request's end.",
            ["flow"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.task_attempts = Counter(
            "flowloom_task_attempts",
            "Task attempts by outcome: completed, failed, retried, redelivered.",
            ["flow", "vertex", "outcome"],
            registry=registry,
        )
        self.task_seconds = Histogram(
            "flowloom_task_duration_seconds",
            "Time to run one task attempt (its user code and its report).",
            ["flow", "vertex"],
            buckets=_TASK_BUCKETS,
            registry=registry,
        )
        self.tasks_running = Gauge(
            "flowloom_tasks_running", "Tasks running now in this process.", registry=registry
        )
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

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve ``/metrics`` (and every other path) on ``host:port`` from a daemon thread."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    # -- hooks -------------------------------------------------------------------------------
    def request_started(self, record: RequestRecord) -> None:
        self.requests_started.labels(record.flow).inc()

    def request_ended(self, request: RequestInfo, status: Status, error: ErrorInfo | None) -> None:
        self.requests_ended.labels(request.flow, status.value).inc()
        self.request_seconds.labels(request.flow).observe(max(0.0, time.time() - request.created))

    def attempt_started(self, attempt: Attempt) -> None:
        self.tasks_running.inc()

    def attempt_ended(self, attempt: Attempt) -> None:
        self.tasks_running.dec()
        task = attempt.task
        self.task_attempts.labels(task.flow, task.step, attempt.outcome).inc()
        self.task_seconds.labels(task.flow, task.step).observe(
            time.perf_counter() - attempt.started
        )

    def task_redelivered(self, task: Task) -> None:
        self.task_attempts.labels(task.flow, task.step, "redelivered").inc()

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
