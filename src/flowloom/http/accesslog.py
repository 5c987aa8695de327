"""The access log line of a call that names a request carries its id.

``RequestIdLog`` (ASGI middleware) notes the ``X-Request-Id`` of each answer in a
context variable just before the answer's head is sent, which is when uvicorn writes
its access log line; ``RequestIdFilter`` puts it on that line (``-`` for calls that
name no request). ``log_config`` is uvicorn's logging configuration with both.
"""

from __future__ import annotations

import contextvars
import copy
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestIdFilter", "RequestIdLog", "log_config", "note_request_id"]

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                note_request_id(message)
            await send(message)

        await self.app(scope, receive, noting)


def note_request_id(start: Message) -> None:
    """Notes the ``X-Request-Id`` of an answer's head (``http.response.start``) for the
    access log line (for middleware that wraps ``send`` anyway, in place of
    ``RequestIdLog``)."""
    found = "-"
    for name, value in start.get("headers", ()):
        if name.lower() == b"x-request-id":
            found = value.decode("latin-1")
    _request_id.set(found)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, its access lines ending with the request id."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["request_id"] = {"()": RequestIdFilter}
    access = config["formatters"]["access"]
    access["fmt"] = access["fmt"] + " request_id=%(request_id)s"
    config["handlers"]["access"].setdefault("filters", []).append("request_id")
    return config
