"""``create_app``: the Starlette app serving a ``FlowService``, its routes built from the
endpoint table."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import dashboard as dashboard_page
from . import responses, routes, spec, watching  # noqa: F401 - they add their endpoints
from .api import Api
from .auth import BearerAuth
from .endpoints import ENDPOINTS
from .inputs import BadInput
from .settings import DEFAULT_MAX_BODY, DEFAULT_WAIT_TIMEOUT, Settings
from .shapes import encode

if TYPE_CHECKING:
    from ..service import FlowService

__all__ = ["create_app"]

log = logging.getLogger("flowloom.http")


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
    ``X-Callback-Url``. ``dashboard``: serve the dashboard at ``/dashboard`` (default: when
    ``service.enable_monitoring`` is on); ``trace_url``: a trace UI's URL with ``{trace_id}``
    for the dashboard to link to (default: ``FLOWLOOM_TRACE_URL``).
    """
    settings = Settings.resolve(
        service,
        token=token,
        hmac_secret=hmac_secret,
        max_body=max_body,
        wait_timeout=wait_timeout,
        callbacks=callbacks,
        dashboard=dashboard,
        trace_url=trace_url,
    )
    served = [e for e in ENDPOINTS if e.when(settings)]
    api = Api(service, settings, spec=encode(spec.document(served, settings)))
    app_routes: list[BaseRoute] = [
        Route(e.path, functools.partial(e.handler, api), methods=[e.method]) for e in served
    ]
    admit = None
    if settings.dashboard:
        app_routes += dashboard_page.routes(settings.token, settings.trace_url)
        if settings.token:
            admit = functools.partial(dashboard_page.admits, token=settings.token)
    middleware = []
    if settings.token:
        public = [e.path for e in served if e.public]
        middleware.append(Middleware(BearerAuth, token=settings.token, public=public, admit=admit))
    app = Starlette(
        routes=app_routes,
        middleware=middleware,
        exception_handlers={
            BadInput: _bad_input,
            HTTPException: _http_exception,
            Exception: _server_error,
        },
        lifespan=api.lifespan,
    )
    app.state.flowloom = api
    return app


async def _bad_input(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, BadInput)
    return responses.error(exc.status, str(exc), exc.headers)


async def _http_exception(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return responses.error(exc.status_code, exc.detail, exc.headers)


async def _server_error(request: HTTPRequest, exc: Exception) -> Response:
    if _unavailable(exc):
        log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
        return responses.error(503, f"the backend is unavailable: {exc}", {"Retry-After": "1"})
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return responses.error(500, "internal server error")


def _unavailable(exc: BaseException) -> bool:
    from redis.exceptions import ConnectionError, TimeoutError

    return isinstance(exc, ConnectionError | TimeoutError | OSError)
