"""What the HTTP app tells of itself: ``GET /metrics`` (Prometheus text, behind the token
like every endpoint) and ``HttpMetrics``, which counts every HTTP call by route template,
method and status code."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..observe import Observers
from .accesslog import note_request_id
from .api import Api, call
from .endpoints import Answer, endpoint
from .settings import Settings

__all__ = ["HttpMetrics"]

UNMATCHED = "unmatched"  # the route label of a path no route serves (bounded, unlike paths)


def _monitoring(settings: Settings) -> bool:
    return settings.monitoring


@endpoint(
    "GET",
    "/metrics",
    "This process's Prometheus metrics (see docs/observability.md).",
    answers={200: Answer("The metrics in the Prometheus text format.", bytes)},
    when=_monitoring,
)
async def metrics(api: Api, request: HTTPRequest) -> Response:
    observed = api.service.metrics
    if observed is None:  # not reached: the endpoint is served only with monitoring on
        return Response(status_code=404)
    from ..metrics import CONTENT_TYPE

    return Response(await call(observed.exposition), media_type=CONTENT_TYPE)


class HttpMetrics:
    """ASGI middleware: each HTTP call, by the template of the route its path matches
    (a call refused before routing, a 401 say, is counted under its route too). It also
    notes each answer's request id for the access log, as ``RequestIdLog`` does: the
    two in one layer, one wrapped ``send`` per call."""

    def __init__(self, app: ASGIApp, observers: Observers, routes: Sequence[Route]) -> None:
        self.app = app
        self.observers = observers
        self.routes = routes
        # the router leaves the endpoint it called in the scope
        self.paths: dict[object, str] = {route.endpoint: route.path for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                note_request_id(message)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - began
            self.observers.http_request(self._route(scope), scope["method"], status, seconds)

    def _route(self, scope: Scope) -> str:
        path = self.paths.get(scope.get("endpoint"))
        if path is not None:
            return path
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return UNMATCHED
