"""``FlowService``: register flows, execute and control requests, run workers and the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import checks, engine, logs
from .backends import Backend, MemoryBackend, RequestRecord, Summary, deadline
from .backends.memory import DEFAULT_MAX_BYTES, DEFAULT_MAX_QUEUED
from .errors import (
    BackendUnavailable,
    FlowloomError,
    FlowNotFound,
    InvalidRequest,
    NoOutput,
    RequestFailed,
    RequestNotFound,
    RequestStopped,
    ResultTimeout,
)
from .names import REQUEST_ID
from .observe import Observer, Observers, RequestInfo
from .registry import DefineWorkflow, Registry
from .traceparent import TraceContext, parse_traceparent, tracing_configured
from .types import Options, Request, RequestState, Status
from .worker import MAX_CONCURRENCY, Worker

if TYPE_CHECKING:
    from .engine import Transition
    from .metrics import Metrics

__all__ = ["FlowService"]

log = logging.getLogger("flowloom.service")


class FlowService:
    """Registers flows and runs their requests.

    Without ``redis_url`` everything runs in this process (the embedded backend):
    ``execute`` works at once, a worker of ``worker_concurrency`` threads starting
    with the first request. With ``redis_url``, requests go to Redis and any number
    of worker processes (``start_worker``) run them.

        with FlowService() as fs:
            fs.register("myflow", define_workflow)
            print(fs.run("myflow", b"hallo"))

    ``port``/``host``: where ``start``/``start_server`` serve HTTP. ``retention``:
    seconds a finished request is kept. ``redis_prefix``: the prefix of every Redis
    key. ``token``/``hmac_secret``: see the HTTP API. ``max_deliveries`` (Redis): a
    task delivered that many times, its worker dying each time, fails its request.
    A backend that cannot be reached raises ``BackendUnavailable`` after a bounded
    wait; ``result(timeout=)`` and ``run(timeout=)`` return by their deadline
    (give or take well under a second) whatever the backend does. ``callback_allow``: the
    addresses or networks (``"127.0.0.1"``, ``"10.0.0.0/8"``) HTTP callbacks may go to besides
    public ones (else ``FLOWLOOM_CALLBACK_ALLOW``, comma-separated). ``max_bytes`` and
    ``max_queued``: the embedded backend's caps on the bytes it keeps and on the
    requests not yet ended (``Overloaded`` past them; see ``MemoryBackend``).

    Observability (needs ``pip install 'flowloom[otel]'``; see docs/observability.md):
    ``otlp_endpoint="http://HOST:4318"`` exports one OpenTelemetry trace per request
    over OTLP/HTTP (the standard ``OTEL_EXPORTER_OTLP_*`` variables work too);
    ``enable_monitoring`` keeps Prometheus metrics (``None``, the default: off, but on
    under ``flowloom serve``/``worker``; an explicit ``False`` stays off there too unless
    ``--monitoring`` is given), served at ``GET /metrics`` and, with
    ``metrics_port``, on a port of their own (a worker process's only way to serve them).
    It also has the HTTP server serve the dashboard at ``/dashboard`` (no extra needed;
    docs/dashboard.md).
    """

    def __init__(
        self,
        port: int = 8080,
        redis_url: str | None = None,
        otlp_endpoint: str | None = None,
        worker_concurrency: int = 5,
        enable_monitoring: bool | None = None,
        *,
        host: str = "127.0.0.1",
        retention: float = 86400.0,
        redis_prefix: str = "flowloom",
        backend: Backend | None = None,
        token: str | None = None,
        hmac_secret: str | None = None,
        max_deliveries: int = 5,
        callback_allow: str | Iterable[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_queued: int = DEFAULT_MAX_QUEUED,
        metrics_port: int | None = None,
    ) -> None:
        checks.count("worker_concurrency", worker_concurrency, 1, MAX_CONCURRENCY)
        checks.seconds("retention", retention)
        checks.count("max_deliveries", max_deliveries, 1, 1_000_000)
        checks.count("max_bytes", max_bytes, 1, 2**62)
        checks.count("max_queued", max_queued, 1, 2**62)
        checks.count("port", port, 0, 65535)
        if metrics_port is not None:
            checks.count("metrics_port", metrics_port, 0, 65535)
        self.port = port
        self.host = host
        self.redis_url = redis_url
        self.otlp_endpoint = otlp_endpoint
        self.worker_concurrency = worker_concurrency
        self.enable_monitoring = enable_monitoring
        self.retention = retention
        self.redis_prefix = redis_prefix
        self.token = token  # HTTP bearer token (else FLOWLOOM_TOKEN); see docs/http.md
        self.hmac_secret = hmac_secret  # HTTP X-Hub-Signature secret (else FLOWLOOM_HMAC_SECRET)
        self.max_deliveries = max_deliveries  # Redis: deliveries of a task that kills its worker
        self.callback_allow = callback_allow
        self.max_bytes = max_bytes
        self.max_queued = max_queued
        self.metrics_port = metrics_port
        self._metrics: Metrics | None = None
        self._observers: Observers | None = None
        self._observers_lock = threading.Lock()
        self.registry = Registry()
        self.backend = backend or self._make_backend()
        self.embedded = isinstance(self.backend, MemoryBackend)
        self._worker: Worker | None = None
        self._worker_lock = threading.Lock()
        self._closed = False

    def _make_backend(self) -> Backend:
        if self.redis_url is None:
            return MemoryBackend(
                retention=self.retention, max_bytes=self.max_bytes, max_queued=self.max_queued
            )
        from .backends.redis import RedisBackend

        return RedisBackend(
            self.redis_url,
            prefix=self.redis_prefix,
            retention=self.retention,
            max_deliveries=self.max_deliveries,
        )

    # -- flows -----------------------------------------------------------------------------
    def register(self, name: str, define_workflow: DefineWorkflow) -> None:
        """Register (or replace) the flow ``name``; raises ``DefinitionError`` naming the
        vertex if its definition is invalid. Works before and after ``start``."""
        self.registry.register(name, define_workflow)

    def flows(self) -> list[str]:
        return self.registry.names()

    def definition(self, name: str) -> Mapping[str, object]:
        """A JSON-able description of the flow ``name`` (``FlowNotFound`` if unknown)."""
        return self.registry.latest(name).definition

    # -- requests ----------------------------------------------------------------------------
    def execute(self, name: str, request: Request | bytes | str | None = None) -> str:
        """Queue a request of flow ``name``; returns its id (the caller's, if given).

        On Redis a client that has not registered ``name`` may execute it too, as long as
        a live worker serves it: the request then starts with a task that such a worker
        expands from its plan (the version most live workers serve). ``FlowNotFound``
        names the flows served if none does.

        A W3C ``traceparent`` among the request's headers makes the request's trace a
        child of the caller's (``state(...).trace_id`` is then the caller's trace id)."""
        return self._submit(name, request).request_id

    def _submit(self, name: str, request: Request | bytes | str | None) -> RequestRecord:
        record, start = self._new_request(name, request)
        with self._submitting(record):
            self.backend.submit(record, start)
        return record

    def _new_request(
        self, name: str, request: Request | bytes | str | None
    ) -> tuple[RequestRecord, Transition]:
        """The record of a request of ``name`` and its first transition, to submit. Reads
        the backend only in client mode (the version the workers serve)."""
        plan = None if self._client_mode(name) else self.registry.latest(name)
        version = plan.version if plan is not None else self._served_version(name)
        request = _as_request(request)
        body = _body(request.body)
        request_id = uuid.uuid4().hex if request.request_id is None else request.request_id
        if not REQUEST_ID.fullmatch(request_id):
            raise InvalidRequest(
                "request id must be 1-128 letters, digits, '_', '.', ':' or '-', "
                f"got {request_id!r}"
            )
        trace = TraceContext.new(_caller_trace(request.headers))
        # traced here: kept decoded for this process's worker, which would parse it again
        keep = self._observers is not None and self._observers.reads_traces
        record = RequestRecord(
            request_id=request_id,
            flow=name,
            version=version,
            body=body,
            query=_options(request.query),
            headers=dict(request.headers),
            created=time.time(),
            has_hooks=True if plan is None else plan.has_hooks,  # a client cannot tell
            trace=trace.keep() if keep else trace.encode(),
        )
        if self.embedded:
            self._ensure_worker()
        start = engine.start_task(body) if plan is None else engine.start(plan, body)
        return record, start

    @contextlib.contextmanager
    def _submitting(self, record: RequestRecord) -> Iterator[None]:
        """Around the submit of ``record``. Before it, this process's worker learns the
        record, so that its tasks run here need not read it (a worker thread here may
        take the first task before the submit returns: a submit from the event loop even
        hands it over); forgotten if the submit fails. After it, observers are told."""
        worker = self._worker
        if worker is not None:
            worker.submitted(record)
        try:
            yield
        except BaseException:
            if worker is not None:  # not this record's request (a duplicate), or none
                worker.forget(record.request_id)
            raise
        observers = self.observers
        if observers:
            observers.request_started(record)

    def _client_mode(self, name: str) -> bool:
        """Whether ``name`` is to be executed without its definition: it is not registered
        here and the backend is shared with workers that may serve it."""
        return not self.embedded and name not in self.registry.names()

    def _served_version(self, name: str) -> str:
        """The version of ``name`` that most live workers serve, or ``FlowNotFound``."""
        served: Counter[str] = Counter()
        flows: set[str] = set()
        for worker in self.backend.workers():
            versions = worker.get("versions")
            if isinstance(versions, Mapping):
                flows.update(str(flow) for flow in versions)
                if isinstance(versions.get(name), str):
                    served[versions[name]] += 1
        if not served:
            known = ", ".join(map(repr, sorted(flows))) or "none"
            raise FlowNotFound(
                f"no flow named {name!r} is registered here, and no live worker serves it "
                f"(flows served: {known})"
            )
        return max(served, key=lambda version: (served[version], version))

    def state(self, name: str, request_id: str) -> RequestState:
        """Status, timings and per-vertex states of a request (``RequestNotFound`` if none)."""
        state = self.backend.state(request_id)
        if state is None or state.flow != name:
            raise RequestNotFound(f"no request {request_id!r} of flow {name!r}")
        return state

    def result(self, name: str, request_id: str, timeout: float | None = None) -> bytes:
        """Wait for the request's result; raises ``RequestFailed``, ``RequestStopped`` or
        ``ResultTimeout`` if it does not complete (``timeout=None``, or more than 1e9
        seconds, waits for ever; NaN is a ``ValueError``)."""
        timeout = checks.timeout(timeout)
        with deadline(timeout):  # a backend that cannot be reached gives up by then
            summary = self._summary(name, request_id)
            if not summary.status.finished:
                self.backend.wait(request_id, timeout)
                summary = self._summary(name, request_id)
        if summary.status is Status.COMPLETED:
            return summary.result or b""
        if summary.status is Status.FAILED:
            raise RequestFailed(request_id, summary.error)
        if summary.status is Status.STOPPED:
            raise RequestStopped(request_id)
        raise ResultTimeout(request_id, timeout if timeout is not None else 0.0)

    def output(self, name: str, request_id: str, address: str) -> bytes:
        """The output of one vertex instance of a request, by its address (as in
        ``state(...).vertices``): ``NoOutput`` if it has not completed. A conditional or
        foreach vertex's output is its aggregator's; a sub-DAG's is its last vertex's."""
        self._summary(name, request_id)
        output = self.backend.output(request_id, address)
        if output is None:
            raise NoOutput(f"request {request_id!r} has no output for vertex {address!r}")
        return output

    def _summary(self, name: str, request_id: str) -> Summary:
        summary = self.backend.summary(request_id)
        if summary is None or summary.flow != name:
            raise RequestNotFound(f"no request {request_id!r} of flow {name!r}")
        return summary

    def run(
        self, name: str, request: Request | bytes | str | None = None, timeout: float | None = None
    ) -> bytes:
        """Execute a request and wait for its result: ``execute`` then ``result``, the two
        within ``timeout`` seconds."""
        timeout = checks.timeout(timeout)
        if timeout is None:
            return self.result(name, self.execute(name, request))
        until = time.monotonic() + timeout
        with deadline(timeout):
            request_id = self.execute(name, request)
            return self.result(name, request_id, max(0.0, until - time.monotonic()))

    def pause(self, name: str, request_id: str) -> Status:
        """Hold the request once its running tasks finish; ``resume`` continues it."""
        self._summary(name, request_id)
        return self.backend.control(request_id, Status.PAUSED)

    def resume(self, name: str, request_id: str) -> Status:
        self._summary(name, request_id)
        return self.backend.control(request_id, Status.RUNNING)

    def stop(self, name: str, request_id: str) -> Status:
        """End the request: nothing more of it runs; its state records ``stopped``."""
        self._summary(name, request_id)
        status = self.backend.control(request_id, Status.STOPPED)
        observers = self.observers
        if observers:
            record = self.backend.record(request_id)
            if record is not None:
                observers.request_ended(RequestInfo.of(record), Status.STOPPED, None)
        return status

    def retry(self, name: str, request_id: str) -> Status:
        """Take a failed or stopped request back to ``running`` under the same id, going on
        from where it ended: vertex instances that completed keep their outputs and do not
        run again; the failed ones, and those queued or held when it ended, run again with
        fresh attempt counts; its hooks run again when it ends. ``state(...).retries`` holds
        the time of each retry.

        Raises ``RequestNotFound``; ``NotRunning`` if it is running, paused, queued or
        completed (of two concurrent retries one wins, the other gets ``NotRunning``);
        ``FlowNotFound`` if the flow's version the request runs is not registered in this
        process while it is (a retry runs the request's own version, never a newer one; on
        Redis a worker without that version fails it again, saying so).

            fs.retry("myflow", request_id)   # after what made it fail is fixed
        """
        self._summary(name, request_id)
        record = self.backend.record(request_id)
        registered = record is not None and name in self.registry.names()
        if registered and record and self.registry.version(name, record.version) is None:
            raise FlowNotFound(
                f"request {request_id!r} runs version {record.version} of flow {name!r}, "
                f"which is not registered any more (registered: version "
                f"{self.registry.latest(name).version}); it cannot be retried here"
            )
        if self.embedded:
            self._ensure_worker()
        first = TraceContext.decode(record.trace) if record is not None else None
        retry_trace = first.retried() if first is not None else None
        status = self.backend.rerun(request_id, retry_trace.encode() if retry_trace else "")
        if self._worker is not None:  # its tasks' spans parent on the retry's root span
            self._worker.forget(request_id)
        observers = self.observers
        if observers and record is not None:  # it starts again: it will end again
            observers.request_started(record)
        return status

    def requests(
        self,
        name: str | None = None,
        status: Status | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> list[RequestState]:
        """Requests, newest first, optionally of one flow and with one status."""
        return self.backend.list_requests(name, status, offset, limit)

    # -- async twins -------------------------------------------------------------------------
    async def aexecute(self, name: str, request: Request | bytes | str | None = None) -> str:
        return await asyncio.to_thread(self.execute, name, request)

    async def aresult(self, name: str, request_id: str, timeout: float | None = None) -> bytes:
        return await asyncio.to_thread(self.result, name, request_id, timeout)

    async def aretry(self, name: str, request_id: str) -> Status:
        return await asyncio.to_thread(self.retry, name, request_id)

    async def astate(self, name: str, request_id: str) -> RequestState:
        return await asyncio.to_thread(self.state, name, request_id)

    # -- running -----------------------------------------------------------------------------
    def _ensure_worker(self) -> Worker:
        with self._worker_lock:
            if self._closed:
                raise FlowloomError("the flow service is closed")
            if self._worker is None:
                self._worker = Worker(
                    self.backend, self.registry, self.worker_concurrency, self.observers
                )
                self._worker.start()
                self.backend.register_worker(self._worker.name, self._describe_worker)
            return self._worker

    def _describe_worker(self) -> dict[str, object]:
        worker = self._worker
        return {
            "name": worker.name if worker else "",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "flows": self.registry.names(),
            "versions": {name: self.registry.latest(name).version for name in self.flows()},
            "concurrency": self.worker_concurrency,
        }

    def workers(self) -> list[dict[str, object]]:
        """Live workers (of every process sharing the backend): each a dict with ``name``,
        ``host``, ``pid``, ``flows`` (and their ``versions``), ``concurrency``, ``last_seen``."""
        return self.backend.workers()

    # -- observability -----------------------------------------------------------------------
    @property
    def observers(self) -> Observers:
        """Tracing and metrics as configured, made on first use (in the process using them:
        after a fork, not before)."""
        observers = self._observers
        if observers is None:
            with self._observers_lock:
                if self._observers is None:
                    self._observers = Observers(self._make_observers())
                observers = self._observers
        return observers

    @property
    def metrics(self) -> Metrics | None:
        """This process's Prometheus metrics (``metrics.exposition()`` is the text format),
        or None when ``enable_monitoring`` is off or the otel extra is missing."""
        return self._metrics if self.observers else None

    def _make_observers(self) -> list[Observer]:
        made: list[Observer] = []
        if self.enable_monitoring:
            try:
                from .metrics import Metrics
            except ImportError as exc:
                log.warning(_MISSING, "enable_monitoring (Prometheus metrics)", exc.name)
            else:
                self._metrics = Metrics(self.backend)
                made.append(self._metrics)
        if tracing_configured(self.otlp_endpoint):
            try:
                from .tracing import Tracing
            except ImportError as exc:
                log.warning(_MISSING, "otlp_endpoint (OpenTelemetry tracing)", exc.name)
            else:
                tracing = Tracing(self.otlp_endpoint)
                made.append(tracing)
                if self._metrics is not None:
                    self._metrics.count_dropped_spans(lambda: tracing.dropped)
                    tracing.count_for(self._metrics)
        return made

    def _start_observing(self) -> None:
        """At start-up: make the observers (saying what is missing) and serve the metrics
        on ``metrics_port`` if asked."""
        observers = self.observers  # made now, so that a missing extra is told at start-up
        if observers and self.metrics_port is not None and self._metrics is not None:
            try:
                self._metrics.serve(self.host, self.metrics_port)
            except OSError as exc:  # the port is taken, or the host is not this machine's
                raise FlowloomError(
                    f"cannot serve metrics on {self.host}:{self.metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            log.info("flowloom: metrics on http://%s:%d/metrics", self.host, self.metrics_port)

    def start_worker(self) -> None:
        """Run a worker until SIGINT or SIGTERM (blocking)."""
        logs.configure()
        try:
            with _signals() as stopping:  # from the start: a SIGTERM during start-up stops it
                self._start_observing()
                self._ensure_worker()
                while not stopping.wait(0.5):
                    pass
        finally:
            self.close()

    def start_server(self, **http_options: Any) -> None:
        """Serve the HTTP API on ``host:port`` until interrupted (blocking); no worker
        runs here unless the backend is embedded. ``http_options`` go to
        ``flowloom.http.serve`` (connection limits, timeouts...)."""
        self._serve(self.embedded, http_options)

    def start(self, **http_options: Any) -> None:
        """Serve the HTTP API and run a worker in this process (blocking)."""
        self._serve(True, http_options)

    def _serve(self, with_worker: bool, http_options: dict[str, Any]) -> None:
        from .http import serve

        logs.configure()
        try:
            self._start_observing()
            if with_worker:
                self._ensure_worker()
            serve(self, host=self.host, port=self.port, **http_options)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker (letting running tasks finish) and release the backend."""
        with self._worker_lock:
            if self._closed:
                return
            self._closed = True
            worker, self._worker = self._worker, None
        try:
            if worker is not None:
                worker.stop()
                if isinstance(self.backend, MemoryBackend):
                    # hooks of finished requests would die with the process: run them now
                    for task in self.backend.take_hooks():
                        worker.execute(task)
                try:
                    self.backend.unregister_worker(worker.name)
                except BackendUnavailable as exc:  # a stop must not wait for the backend
                    log.warning(
                        "flowloom: could not unregister worker %s (%s); it leaves the list "
                        "of workers when its heartbeat expires",
                        worker.name,
                        exc,
                    )
        finally:
            if self._observers is not None:
                self._observers.close()
            self.backend.close()

    def __enter__(self) -> FlowService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _as_request(request: Request | bytes | str | None) -> Request:
    if request is None:
        return Request()
    if isinstance(request, Request):
        return request
    if isinstance(request, bytes | str):
        return Request(body=request)
    raise InvalidRequest(f"expected a Request, bytes or str, got {type(request).__name__}")


def _body(body: object) -> bytes:
    """A request body as bytes: ``str`` is encoded as UTF-8."""
    if isinstance(body, str):
        return body.encode()
    if not isinstance(body, bytes):
        raise InvalidRequest(f"request body must be bytes or str, got {type(body).__name__}")
    return body


def _options(query: object) -> Options:
    """A request's query as handler options; ``InvalidRequest`` unless it maps str keys
    to a str or a list (or tuple) of str."""
    if not isinstance(query, Mapping):
        raise InvalidRequest(
            f"query must be a mapping of str to str or list of str, got {type(query).__name__}"
        )
    options: Options = {}
    for key, value in query.items():
        if not isinstance(key, str):
            raise InvalidRequest(f"query keys must be str, got {key!r}")
        if isinstance(value, str):
            options[key] = [value]
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            options[key] = list(value)
        else:
            raise InvalidRequest(
                f"query value of {key!r} must be a str or a list of str, got {value!r}"
            )
    return options


_MISSING = (
    "flowloom: %s needs the otel extra (pip install 'flowloom[otel]'): %s is not "
    "installed, so it is OFF"
)


def _caller_trace(headers: Mapping[str, str]) -> tuple[int, int, bool] | None:
    for key, value in headers.items():
        if key.lower() == "traceparent":
            return parse_traceparent(value)
    return None


@contextlib.contextmanager
def _signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while in the block (the handlers then restored)."""
    done = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield done
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
