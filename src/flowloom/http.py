"""The HTTP API: run, watch and control flows over HTTP (a Starlette app served by uvicorn).

    POST /flow/{name}                                run a flow (GoFlow's ``curl -d hallo``)
    GET  /flows                                      registered flows
    GET  /flow/{name}/definition                     a flow's definition
    GET  /flow/{name}/requests                       its requests, newest first (paged)
    GET  /flow/{name}/requests/{id}                  one request's state
    GET  /flow/{name}/requests/{id}/result           its result
    GET  /flow/{name}/requests/{id}/output?vertex=A  one vertex instance's output
    POST /flow/{name}/requests/{id}/pause|resume|stop
    GET  /workers, /health, /openapi.json

Every ``FlowService`` call blocks, so it runs on a worker thread, never on the event
loop; waiting for a result holds no thread for long (see ``_Waiter``). See docs/http.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import httpinput, openapi, progress
from .dag import NAME
from .dashboard import has_session, is_public
from .dashboard import routes as dashboard_routes
from .errors import (
    DuplicateRequest,
    FlowNotFound,
    InvalidRequest,
    NoOutput,
    NotRunning,
    RequestFailed,
    RequestNotFound,
    RequestStopped,
    ResultTimeout,
)
from .types import Request, RequestState, Status

if TYPE_CHECKING:
    from .service import FlowService

__all__ = ["create_app", "serve"]

log = logging.getLogger("flowloom.http")

T = TypeVar("T")

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_WAIT_TIMEOUT = 30.0
MAX_QUERY_FIELDS = 1000
MAX_LIMIT = 1000
PUBLIC_PATHS = frozenset({"/health"})
# Never stored with a request: they are credentials, not input.
PRIVATE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-hub-signature", "x-hub-signature-256"}
)


@dataclass(frozen=True)
class _Settings:
    token: str | None
    hmac_secret: bytes | None
    max_body: int
    wait_timeout: float
    callbacks: bool


def create_app(
    service: FlowService,
    *,
    token: str | None = None,
    hmac_secret: str | bytes | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    callbacks: bool = True,
    dashboard: bool | None = None,
    trace_url: str | None = None,
) -> Starlette:
    """The ASGI app serving ``service``.

    ``token``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer
    <token>`` (default: ``service.token``, else the ``FLOWLOOM_TOKEN`` environment variable).
    ``hmac_secret``: when set, ``POST /flow/{name}`` needs an ``X-Hub-Signature`` of the body
    (default: ``service.hmac_secret``, else ``FLOWLOOM_HMAC_SECRET``). ``max_body``: larger
    bodies get 413. ``wait_timeout``: how long ``POST /flow/{name}`` waits for the result
    before answering 202 (a caller may ask for less with ``X-Wait``). ``callbacks``: honour
    ``X-Callback-Url``.
    """
    if max_body < 0 or not (0 <= wait_timeout < math.inf):
        raise ValueError("max_body and wait_timeout must be >= 0 and finite")
    token = token or getattr(service, "token", None) or os.environ.get("FLOWLOOM_TOKEN") or None
    secret = (
        hmac_secret
        or getattr(service, "hmac_secret", None)
        or os.environ.get("FLOWLOOM_HMAC_SECRET")
        or None
    )
    settings = _Settings(
        token=token,
        hmac_secret=secret.encode() if isinstance(secret, str) else secret,
        max_body=max_body,
        wait_timeout=float(wait_timeout),
        callbacks=callbacks,
    )
    api = _Api(service, settings)
    spec = openapi.spec(
        auth=token is not None,
        hmac=settings.hmac_secret is not None,
        callbacks=callbacks,
        max_body=max_body,
        wait_timeout=settings.wait_timeout,
    )

    async def openapi_json(request: HTTPRequest) -> Response:
        return JSONResponse(spec)

    routes: list[BaseRoute] = [
        Route("/flow/{name}", api.execute, methods=["POST"]),
        Route("/flows", api.flows, methods=["GET"]),
        Route("/flow/{name}/definition", api.definition, methods=["GET"]),
        Route("/flow/{name}/requests", api.requests, methods=["GET"]),
        Route("/flow/{name}/requests/{request_id}", api.state, methods=["GET"]),
        Route("/flow/{name}/requests/{request_id}/result", api.result, methods=["GET"]),
        Route("/flow/{name}/requests/{request_id}/output", api.output, methods=["GET"]),
        Route("/flow/{name}/requests/{request_id}/pause", api.pause, methods=["POST"]),
        Route("/flow/{name}/requests/{request_id}/resume", api.resume, methods=["POST"]),
        Route("/flow/{name}/requests/{request_id}/stop", api.stop, methods=["POST"]),
        Route("/workers", api.workers, methods=["GET"]),
        Route("/queue", api.queue, methods=["GET"]),
        Route("/requests", api.all_requests, methods=["GET"]),
        Route("/flow/{name}/requests/{request_id}/steps", api.steps, methods=["GET"]),
        Route("/flow/{name}/requests/{request_id}/instances", api.instances, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    if service.enable_monitoring if dashboard is None else dashboard:
        trace_url = trace_url or os.environ.get("FLOWLOOM_TRACE_URL") or None
        routes.extend(dashboard_routes(token, trace_url))
    middleware = [Middleware(_BearerAuth, token=token)] if token else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            httpinput.BadInput: _bad_input,
            HTTPException: _http_exception,
            Exception: _server_error,
        },
        lifespan=api.lifespan,
    )
    app.state.flowloom = api
    return app


def serve(
    service: FlowService,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    log_level: str = "info",
    access_log: bool = True,
    ready: Callable[[], None] | None = None,
    **options: Any,
) -> None:
    """Serve ``service`` on ``host:port`` until SIGINT or SIGTERM (blocking); then return.

    ``options`` go to ``create_app``. Sync ``POST /flow/{name}`` calls still waiting answer
    202 with their request id at once when the server is asked to stop. ``ready`` is
    called once the server listens (for tests and tools).
    """
    app = create_app(service, **options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _Server(config, on_exit=app.state.flowloom.waiter.close, ready=ready)
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, but returning on SIGINT/SIGTERM (uvicorn re-raises the signal
    after shutting down) and ending result waits at once when asked to stop."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None],
        ready: Callable[[], None] | None,
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._ready = ready

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self._ready is not None and self.started:
            self._ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or is_public(path)


class _BearerAuth:
    """Refuses every request but those to ``PUBLIC_PATHS`` without the bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _public(scope["path"]):
            headers = Headers(scope=scope)
            scheme, _, credentials = headers.get("authorization", "").partition(" ")
            given = credentials.strip().encode("latin-1")
            bearer = scheme.lower() == "bearer" and hmac.compare_digest(given, self.token)
            if not bearer and not has_session(headers, self.token.decode()):
                response = _error(
                    401,
                    "missing or wrong bearer token",
                    {"WWW-Authenticate": 'Bearer realm="flowloom"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Waiter:
    """Waits for requests to finish without starving the server.

    Up to ``slots`` waits at a time block in a thread for at most ``slice`` seconds (so a
    quick request is answered the moment it ends); beyond that, waits poll the status with
    a growing pause. No wait holds a thread for longer than one slice, so a crowd of
    waiting callers never takes the threads that every other endpoint needs.
    """

    def __init__(self, service: FlowService, slots: int = 32, slice: float = 0.2) -> None:
        self.service = service
        self.limiter = anyio.CapacityLimiter(slots)
        self.slice = slice
        self.closing = threading.Event()

    def close(self) -> None:
        self.closing.set()

    def _blocking(self) -> bool:
        return self.limiter.available_tokens >= 1

    async def execute(
        self, name: str, request: Request, timeout: float
    ) -> tuple[str, Status, bytes | None]:
        """Execute, and wait for the request up to ``timeout``: its id, its status then,
        and its result if it completed within the first slice (one thread hop for a
        quick flow: execute, wait and read the result together)."""
        if timeout > 0 and self._blocking():
            first = min(timeout, self.slice)
            request_id, status, result = await anyio.to_thread.run_sync(
                self._execute_and_wait, name, request, first, limiter=self.limiter
            )
            if result is not None:
                return request_id, status, result
            return request_id, await self.wait(request_id, timeout - first, status), None
        request_id = await anyio.to_thread.run_sync(self.service.execute, name, request)
        return request_id, await self.wait(request_id, timeout, Status.QUEUED), None

    def _execute_and_wait(
        self, name: str, request: Request, timeout: float
    ) -> tuple[str, Status, bytes | None]:
        backend = self.service.backend
        request_id = self.service.execute(name, request)
        status = backend.wait(request_id, timeout) or Status.QUEUED
        result = backend.result(request_id) if status is Status.COMPLETED else None
        return request_id, status, result

    async def wait(
        self, request_id: str, timeout: float | None, status: Status = Status.QUEUED
    ) -> Status:
        """The request's status once it has finished, or when ``timeout`` (None: no limit)
        has passed, or the server is stopping."""
        backend = self.service.backend
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        pause = 0.002
        while not status.finished and not self.closing.is_set():
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            if self._blocking():
                found = await anyio.to_thread.run_sync(
                    backend.wait, request_id, min(remaining, self.slice), limiter=self.limiter
                )
            else:
                await anyio.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.25)
                found = await anyio.to_thread.run_sync(backend.wait, request_id, 0)
            if found is None:
                raise RequestNotFound(f"request {request_id!r} has expired")
            status = found
        return status


class _Api:
    def __init__(self, service: FlowService, settings: _Settings) -> None:
        self.service = service
        self.settings = settings
        self.waiter = _Waiter(service)
        self.callbacks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.waiter.closing.clear()
        try:
            yield
        finally:
            self.waiter.close()
            for task in list(self.callbacks):
                task.cancel()
            if self.callbacks:
                log.warning("%d callback(s) not sent: the server stopped", len(self.callbacks))
                await asyncio.gather(*self.callbacks, return_exceptions=True)

    # -- endpoints -------------------------------------------------------------------------
    async def execute(self, request: HTTPRequest) -> Response:
        name = httpinput.flow_name(request)
        headers = request.headers
        request_id = httpinput.optional_request_id(headers.get("x-request-id"))
        run_async = httpinput.flag(headers.get("x-async"), "X-Async")
        wait = httpinput.seconds(headers.get("x-wait"), "X-Wait", self.settings.wait_timeout)
        callback = self._callback_url(headers.get("x-callback-url"))
        query = httpinput.query_options(request.scope.get("query_string", b""))
        body = await httpinput.read_body(request, self.settings.max_body)
        if self.settings.hmac_secret is not None:
            httpinput.check_signature(headers, body, self.settings.hmac_secret)
        flow_request = Request(
            body=body,
            request_id=request_id,
            query=query,
            headers={k: v for k, v in headers.items() if k not in PRIVATE_HEADERS},
        )
        result: bytes | None = None
        if run_async or wait == 0:
            request_id = await _call(self.service.execute, name, flow_request)
            status = Status.QUEUED
        else:
            with _http_errors():
                request_id, status, result = await self.waiter.execute(name, flow_request, wait)
        if callback is not None:
            self._start_callback(name, request_id, callback)
        if result is not None:
            return _result(request_id, result)
        if run_async:
            return _accepted(name, request_id, status)
        return await self._answer(name, request_id, status)

    async def result(self, request: HTTPRequest) -> Response:
        name, request_id = httpinput.flow_name(request), httpinput.request_id(request)
        wait = httpinput.seconds(
            request.headers.get("x-wait"), "X-Wait", self.settings.wait_timeout, 0
        )
        state = await _call(self.service.state, name, request_id)
        with _http_errors():
            status = await self.waiter.wait(request_id, wait, state.status)
        return await self._answer(name, request_id, status)

    async def output(self, request: HTTPRequest) -> Response:
        name, request_id = httpinput.flow_name(request), httpinput.request_id(request)
        params = request.query_params
        unknown = set(params) - {"vertex"}
        if unknown or not params.get("vertex"):
            raise httpinput.BadInput(400, "give the vertex address as ?vertex=ADDRESS, only")
        address = params["vertex"]
        output = await _call(self.service.output, name, request_id, address)
        return Response(output, media_type="application/octet-stream")

    async def state(self, request: HTTPRequest) -> Response:
        name, request_id = httpinput.flow_name(request), httpinput.request_id(request)
        state = await _call(self.service.state, name, request_id)
        return _json(state.to_json(), request_id=request_id, status=state.status)

    async def pause(self, request: HTTPRequest) -> Response:
        return await self._control(request, self.service.pause)

    async def resume(self, request: HTTPRequest) -> Response:
        return await self._control(request, self.service.resume)

    async def stop(self, request: HTTPRequest) -> Response:
        return await self._control(request, self.service.stop)

    async def requests(self, request: HTTPRequest) -> Response:
        name = httpinput.flow_name(request)
        params = request.query_params
        unknown = set(params) - {"status", "offset", "limit"}
        if unknown:
            raise httpinput.BadInput(
                400, f"unknown query parameter(s): {', '.join(sorted(unknown))}"
            )
        status = httpinput.status_filter(params.get("status"))
        offset = httpinput.integer(params.get("offset"), "offset", 0, 0, 10**9)
        limit = httpinput.integer(params.get("limit"), "limit", 50, 1, MAX_LIMIT)
        await _call(self.service.definition, name)
        found = await _call(self.service.requests, name, status, offset, limit)
        return _json(
            {
                "flow": name,
                "status": status.value if status else None,
                "offset": offset,
                "limit": limit,
                "next_offset": offset + len(found) if len(found) == limit else None,
                "requests": [_summary(s) for s in found],
            }
        )

    async def flows(self, request: HTTPRequest) -> Response:
        return _json({"flows": await _call(self.service.flows)})

    async def definition(self, request: HTTPRequest) -> Response:
        name = httpinput.flow_name(request)
        return _json(dict(await _call(self.service.definition, name)))

    async def workers(self, request: HTTPRequest) -> Response:
        found = await _call(self.service.workers)
        return _json({"workers": [_jsonable(w) for w in found]})

    async def queue(self, request: HTTPRequest) -> Response:
        return _json(await _call(self.service.backend.queue_depth))

    async def all_requests(self, request: HTTPRequest) -> Response:
        params = request.query_params
        _only(params, {"flow", "status", "offset", "limit"})
        flow = params.get("flow")
        if flow is not None and not NAME.fullmatch(flow):
            raise httpinput.BadInput(400, f"invalid flow name {flow!r}")
        status = httpinput.status_filter(params.get("status"))
        offset = httpinput.integer(params.get("offset"), "offset", 0, 0, 10**9)
        limit = httpinput.integer(params.get("limit"), "limit", 50, 1, MAX_LIMIT)
        found = await _call(self.service.requests, flow, status, offset, limit)
        return _json(
            {
                "flow": flow,
                "status": status.value if status else None,
                "offset": offset,
                "limit": limit,
                "next_offset": offset + len(found) if len(found) == limit else None,
                "requests": [_summary(s) for s in found],
            }
        )

    async def steps(self, request: HTTPRequest) -> Response:
        name, request_id = httpinput.flow_name(request), httpinput.request_id(request)
        _only(request.query_params, set())
        state, foreach = await self._progress(name, request_id)
        body = _summary(state)
        body["steps"] = [p.to_json() for p in progress.progress(state, foreach)]
        return _json(body, request_id=request_id, status=state.status)

    async def instances(self, request: HTTPRequest) -> Response:
        name, request_id = httpinput.flow_name(request), httpinput.request_id(request)
        params = request.query_params
        _only(params, {"vertex", "status", "offset", "limit"})
        vertex = params.get("vertex")
        if not vertex or len(vertex) > 4096:
            raise httpinput.BadInput(400, "give the vertex path as ?vertex=PATH")
        status = httpinput.status_filter(params.get("status"))
        offset = httpinput.integer(params.get("offset"), "offset", 0, 0, 10**9)
        limit = httpinput.integer(params.get("limit"), "limit", 100, 1, MAX_LIMIT)
        state, foreach = await self._progress(name, request_id)
        found = progress.instances(state, foreach, vertex, status)
        page = found[offset : offset + limit]
        return _json(
            {
                "request_id": request_id,
                "vertex": vertex,
                "status": status.value if status else None,
                "offset": offset,
                "limit": limit,
                "total": len(found),
                "next_offset": offset + limit if offset + limit < len(found) else None,
                "instances": [v.to_json() for v in page],
            },
            request_id=request_id,
            status=state.status,
        )

    async def _progress(self, name: str, request_id: str) -> tuple[RequestState, frozenset[str]]:
        state = await _call(self.service.state, name, request_id)
        try:
            definition = await _call(self.service.definition, name)
        except httpinput.BadInput:  # a client that has not registered the flow
            return state, frozenset()
        return state, progress.foreach_paths(definition)

    async def health(self, request: HTTPRequest) -> Response:
        try:
            await _call(self.service.backend.ping)
        except Exception as exc:
            log.warning("health check failed: %s: %s", type(exc).__name__, exc)
            return _json({"status": "unavailable", "error": str(exc)}, code=503)
        return _json({"status": "ok", "backend": "embedded" if self.service.embedded else "redis"})

    # -- helpers -----------------------------------------------------------------------------
    async def _control(
        self, request: HTTPRequest, action: Callable[[str, str], Status]
    ) -> Response:
        name, request_id = httpinput.flow_name(request), httpinput.request_id(request)
        try:
            status = await _call(action, name, request_id)
        except NotRunning as exc:
            state = await _call(self.service.state, name, request_id)
            return _json(
                {"error": str(exc), "request_id": request_id, "status": state.status.value},
                code=409,
                request_id=request_id,
                status=state.status,
            )
        body = {"request_id": request_id, "flow": name, "status": status.value}
        return _json(body, request_id=request_id, status=status)

    async def _answer(self, name: str, request_id: str, status: Status) -> Response:
        """The response for a request in ``status``: its result if it completed."""
        if not status.finished:
            return _accepted(name, request_id, status)
        try:
            result = await _call(self.service.result, name, request_id, 0)
        except RequestFailed as exc:
            body = {
                "request_id": request_id,
                "flow": name,
                "status": Status.FAILED.value,
                "error": exc.error.to_json() if exc.error else None,
            }
            return _json(body, code=424, request_id=request_id, status=Status.FAILED)
        except RequestStopped:
            body = {"request_id": request_id, "flow": name, "status": Status.STOPPED.value}
            return _json(body, code=409, request_id=request_id, status=Status.STOPPED)
        except ResultTimeout:
            return _accepted(name, request_id, status)
        return _result(request_id, result)

    def _callback_url(self, value: str | None) -> str | None:
        if value is None:
            return None
        if not self.settings.callbacks:
            raise httpinput.BadInput(400, "X-Callback-Url: callbacks are disabled on this server")
        url = urllib.parse.urlsplit(value.strip())
        if url.scheme not in ("http", "https") or not url.hostname or len(value) > 2048:
            raise httpinput.BadInput(400, "X-Callback-Url must be an absolute http(s) URL")
        try:
            url.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise httpinput.BadInput(400, f"X-Callback-Url: {exc}") from exc
        return value.strip()

    def _start_callback(self, name: str, request_id: str, url: str) -> None:
        task = asyncio.get_running_loop().create_task(self._callback(name, request_id, url))
        self.callbacks.add(task)
        task.add_done_callback(self.callbacks.discard)

    async def _callback(self, name: str, request_id: str, url: str) -> None:
        """POST the final answer to ``url`` once the request ends: the body and status
        code that ``GET .../result`` would give, with ``X-Request-Id`` and
        ``X-Request-Status`` (and ``X-Hub-Signature-256`` when a secret is set)."""
        try:
            status = await self.waiter.wait(request_id, self.service.retention, Status.QUEUED)
            if not status.finished:
                return
            answer = await self._answer(name, request_id, status)
            headers = {
                "Content-Type": answer.headers["content-type"],
                "X-Request-Id": request_id,
                "X-Request-Status": status.value,
                "X-Flow": name,
            }
            if self.settings.hmac_secret is not None:
                digest = hmac.new(self.settings.hmac_secret, answer.body, hashlib.sha256)
                headers["X-Hub-Signature-256"] = "sha256=" + digest.hexdigest()
            for attempt in range(3):
                if await anyio.to_thread.run_sync(
                    httpinput.post_callback, url, bytes(answer.body), headers
                ):
                    return
                await asyncio.sleep(0.5 * 2**attempt)
            log.warning("callback for request %s to %s failed 3 times", request_id, url)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("callback for request %s to %s failed", request_id, url)


# -- output -----------------------------------------------------------------------------------
def _request_headers(request_id: str, status: Status) -> dict[str, str]:
    return {"X-Request-Id": request_id, "X-Request-Status": status.value}


def _json(
    body: object,
    *,
    code: int = 200,
    request_id: str | None = None,
    status: Status | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    extra = dict(headers or {})
    if request_id is not None and status is not None:
        extra.update(_request_headers(request_id, status))
    return JSONResponse(body, status_code=code, headers=extra)


def _result(request_id: str, result: bytes) -> Response:
    headers = _request_headers(request_id, Status.COMPLETED)
    return Response(result, media_type="application/octet-stream", headers=headers)


def _accepted(name: str, request_id: str, status: Status) -> Response:
    location = f"/flow/{name}/requests/{request_id}"
    body = {"request_id": request_id, "flow": name, "status": status.value, "state": location}
    return _json(
        body, code=202, request_id=request_id, status=status, headers={"Location": location}
    )


def _only(params: Mapping[str, str], known: set[str]) -> None:
    unknown = set(params) - known
    if unknown:
        raise httpinput.BadInput(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")


def _summary(state: RequestState) -> dict[str, Any]:
    summary = state.to_json()
    del summary["vertices"]
    return summary


def _jsonable(value: object) -> object:
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _error(code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=code, headers=dict(headers or {}))


async def _call(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking ``FlowService`` call on a worker thread, mapping its errors to HTTP."""
    with _http_errors():
        return await anyio.to_thread.run_sync(fn, *args)


@contextlib.contextmanager
def _http_errors() -> Iterator[None]:
    try:
        yield
    except (FlowNotFound, RequestNotFound, NoOutput) as exc:
        raise httpinput.BadInput(404, str(exc)) from exc
    except DuplicateRequest as exc:
        raise httpinput.BadInput(409, str(exc)) from exc
    except InvalidRequest as exc:
        raise httpinput.BadInput(400, str(exc)) from exc


async def _bad_input(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, httpinput.BadInput)
    return _error(exc.status, str(exc), exc.headers)


async def _http_exception(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail, exc.headers)


async def _server_error(request: HTTPRequest, exc: Exception) -> Response:
    if _unavailable(exc):
        log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
        return _error(503, f"the backend is unavailable: {exc}", {"Retry-After": "1"})
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal server error")


def _unavailable(exc: BaseException) -> bool:
    from redis.exceptions import ConnectionError, TimeoutError

    return isinstance(exc, ConnectionError | TimeoutError | OSError)
