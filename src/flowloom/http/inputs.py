"""What HTTP callers send, checked: flow names, request ids, headers, query, body.

Every check raises ``BadInput`` with the HTTP status and a message for the caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import urllib.parse
from collections.abc import Mapping

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.types import Receive

from ..names import NAME, REQUEST_ID
from ..types import Status
from .settings import Settings

__all__ = [
    "BODY_RECEIVED",
    "BadInput",
    "flag",
    "flow_name",
    "integer",
    "optional_request_id",
    "query_options",
    "read_body",
    "request_id",
    "seconds",
    "status_filter",
]

log = logging.getLogger("flowloom.http")

MAX_QUERY_FIELDS = 1000
# set in a call's scope by flowloom's server once the call's whole body has arrived
BODY_RECEIVED = "flowloom.body_received"


class BadInput(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


# -- input ------------------------------------------------------------------------------------
def flow_name(request: HTTPRequest) -> str:
    name: str = request.path_params["name"]
    if not NAME.fullmatch(name):
        raise BadInput(400, f"invalid flow name {name!r}")
    return name


def request_id(request: HTTPRequest) -> str:
    request_id: str = request.path_params["request_id"]
    if not REQUEST_ID.fullmatch(request_id):
        raise BadInput(400, f"invalid request id {request_id!r}")
    return request_id


def optional_request_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not REQUEST_ID.fullmatch(value):
        raise BadInput(400, "X-Request-Id must be 1-128 letters, digits, '_', '.', ':' or '-'")
    return value


def flag(value: str | None, header: str) -> bool:
    if value is None or value in ("false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise BadInput(400, f"{header} must be true, false, 1 or 0, got {value!r}")


def seconds(value: str | None, header: str, limit: float, default: float | None = None) -> float:
    if value is None:
        return limit if default is None else min(default, limit)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= limit:
        raise BadInput(400, f"{header} must be a number of seconds from 0 to {limit:g}")
    return seconds


def integer(value: str | None, what: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    digits = len(str(high))  # int() of thousands of digits is slow, or refused outright
    if not (value.isascii() and value.isdigit() and len(value) <= digits) or not (
        low <= int(value) <= high
    ):
        raise BadInput(400, f"{what} must be an integer from {low} to {high}")
    return int(value)


def status_filter(value: str | None) -> Status | None:
    if value is None:
        return None
    try:
        return Status(value)
    except ValueError:
        choices = ", ".join(s.value for s in Status)
        raise BadInput(400, f"status must be one of {choices}") from None


def query_options(raw: bytes) -> dict[str, list[str]]:
    """The query string as handler options; 400 if it is not valid UTF-8 or too long."""
    try:
        pairs = urllib.parse.parse_qsl(
            raw.decode("ascii"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise BadInput(400, "the query string is not valid UTF-8") from exc
    except ValueError as exc:
        raise BadInput(400, f"at most {MAX_QUERY_FIELDS} query fields") from exc
    options: dict[str, list[str]] = {}
    for key, value in pairs:
        options.setdefault(key, []).append(value)
    return options


async def read_body(request: HTTPRequest, settings: Settings) -> bytes:
    """The request's body: 413 past ``settings.max_body`` bytes, 408 when it goes
    ``settings.body_timeout`` seconds without a byte arriving, 400 when the client goes.

    Read once, from the ASGI messages (not Starlette's stream). A body that flowloom's
    server says came whole with the head (``BODY_RECEIVED``) is read without a
    deadline, as it cannot keep the call waiting; any other body under one deadline,
    pushed back as each part arrives."""
    limit = settings.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the body is over the limit of {limit} bytes")
    try:
        if request.scope.get(BODY_RECEIVED):
            return await _receive_body(request.receive, limit, None, 0.0)
        async with asyncio.timeout(settings.body_timeout) as deadline:
            return await _receive_body(request.receive, limit, deadline, settings.body_timeout)
    except ClientDisconnect:
        log.info("%s %s: client disconnected during upload", request.method, request.scope["path"])
        raise BadInput(400, "the client disconnected during the upload") from None
    except TimeoutError:
        log.info(
            "%s %s: no body bytes for %g s", request.method, request.scope["path"],
            settings.body_timeout,
        )  # fmt: skip
        raise BadInput(
            408, f"the body stopped arriving: no byte for {settings.body_timeout:g} s"
        ) from None


async def _receive_body(
    receive: Receive, limit: int, deadline: asyncio.Timeout | None, timeout: float
) -> bytes:
    """The body's parts up to the last one, ``deadline`` pushed back ``timeout`` seconds
    after each part that is not the last."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if deadline is not None:
            deadline.reschedule(asyncio.get_running_loop().time() + timeout)
