"""``create_app``: the Starlette app serving a ``FlowService``, its routes built from the
endpoint table."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from .. import dashboard as dashboard_page
from . import inputs, observability, responses, routes, spec, watching
from .accesslog import RequestIdLog
from .api import UNAVAILABLE, Api
from .auth import BearerAuth
from .endpoints import ENDPOINTS, Endpoint
from .inputs import BadInput
from .observability import HttpMetrics
from .settings import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY, DEFAULT_WAIT_TIMEOUT, Settings
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
    callback_allow: str | Iterable[str] | None = None,
    dashboard: bool | None = None,
    trace_url: str | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Starlette:
    """The ASGI app serving ``service``.

    ``token``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer
    <token>`` (default: ``service.token``, else the ``FLOWLOOM_TOKEN`` environment variable).
    ``hmac_secret``: when set, ``POST /flow/{name}`` needs a signature (``X-Flowloom-
    Signature`` of the whole call, or GoFlow's ``X-Hub-Signature`` of the body), and,
    when no token is set, every other endpoint but ``/health`` needs an
    ``X-Flowloom-Signature`` (default: ``service.hmac_secret``, else
    ``FLOWLOOM_HMAC_SECRET``). ``max_body``: larger bodies get 413. ``wait_timeout``: how
    long ``POST /flow/{name}`` waits for the result before answering 202 (a caller may
    ask for less with ``X-Wait``). ``callbacks``: honour ``X-Callback-Url``;
    ``callback_allow``: the addresses or networks callbacks may go to besides public
    ones (default: ``service.callback_allow``, else ``FLOWLOOM_CALLBACK_ALLOW``).
    ``dashboard``: serve the dashboard at ``/dashboard`` (default: when
    ``service.enable_monitoring`` is on; not with an HMAC secret but no token, as the
    page cannot sign its calls); ``trace_url``: a trace UI's URL with ``{trace_id}`` for
    the dashboard to link to (default: ``FLOWLOOM_TRACE_URL``). ``body_timeout``: a
    request whose body goes this many seconds without a byte arriving gets 408 (a client
    that stops half-way would otherwise hold its connection for ever).
    """
    settings = Settings.resolve(
        service,
        token=token,
        hmac_secret=hmac_secret,
        max_body=max_body,
        wait_timeout=wait_timeout,
        callbacks=callbacks,
        callback_allow=callback_allow,
        dashboard=dashboard,
        trace_url=trace_url,
        body_timeout=body_timeout,
    )
    assert routes.__name__  # imported for the endpoints it adds
    assert watching.__name__  # and this one
    assert observability.__name__  # likewise
    served = [e for e in ENDPOINTS if e.when(settings)]
    api = Api(service, settings, spec=encode(spec.document(served, settings)))
    served_routes = [Route(e.path, _Handler(api, e), methods=[e.method]) for e in served]
    app_routes: list[BaseRoute] = list(served_routes)
    admit = None
    if settings.dashboard and settings.hmac_secret and not settings.token:
        log.warning("no dashboard: with an HMAC secret it needs a token too (FLOWLOOM_TOKEN)")
    elif settings.dashboard:
        app_routes += dashboard_page.routes(settings.token, settings.trace_url)
        if settings.token:
            admit = functools.partial(dashboard_page.admits, token=settings.token)
    if service.observers:  # it notes the request ids too
        middleware = [Middleware(HttpMetrics, observers=service.observers, routes=served_routes)]
    else:
        middleware = [Middleware(RequestIdLog)]
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


class _Handler:
    """An endpoint's ASGI app: ``handler(api, request)`` and its answer. An ASGI app and
    not a request function, which Starlette would wrap in one more layer catching
    exceptions (and its own ``send``): what the handler raises goes to the same
    exception handlers, in the app's ``ExceptionMiddleware``. With only an HMAC secret
    set (no token), the call's ``X-Flowloom-Signature`` is checked first."""

    def __init__(self, api: Api, served: Endpoint) -> None:
        self.api = api
        self.handler = served.handler
        secret = api.settings.hmac_secret
        self.signed = not (
            secret is None or api.settings.token or served.public or served.checks_signature
        )
        self.__name__ = served.operation_id  # the route's name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = HTTPRequest(scope, receive, send)
        if self.signed:
            body = await inputs.read_body(request, self.api.settings)
            await routes.check_signature(self.api, request, body)
        response = await self.handler(self.api, request)
        await response(scope, receive, send)


async def _bad_input(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, BadInput)
    return responses.error(exc.status, str(exc), exc.headers)


async def _http_exception(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return responses.error(exc.status_code, exc.detail, exc.headers)


async def _server_error(request: HTTPRequest, exc: Exception) -> Response:
    """A bug: a 500 (Starlette then raises ``exc`` again for the server to log)."""
    if isinstance(exc, UNAVAILABLE):  # from a call outside ``api.call``
        return responses.error(503, "the backend is unavailable", {"Retry-After": "1"})
    return responses.error(500, "internal server error")
