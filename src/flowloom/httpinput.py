"""What HTTP callers send, checked: flow names, request ids, headers, query, body,
signatures, callback URLs; and the POST that delivers a callback.

Every check raises ``BadInput`` with the HTTP status and a message for the caller.
"""

from __future__ import annotations

import hmac
import logging
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request as HTTPRequest

from .dag import NAME
from .service import REQUEST_ID
from .types import Status

__all__ = [
    "BadInput",
    "check_signature",
    "flag",
    "flow_name",
    "integer",
    "optional_request_id",
    "post_callback",
    "query_options",
    "read_body",
    "request_id",
    "seconds",
    "status_filter",
]

log = logging.getLogger("flowloom.http")

MAX_QUERY_FIELDS = 1000


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
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
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


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_signature(headers: Headers, body: bytes, secret: bytes) -> None:
    """GoFlow's ``X-Hub-Signature: sha1=<hex>`` (or ``sha256=``, or the
    ``X-Hub-Signature-256`` header GitHub sends): an HMAC of the body with the secret."""
    given = headers.get("x-hub-signature-256") or headers.get("x-hub-signature")
    if not given:
        raise BadInput(401, "X-Hub-Signature is required")
    algorithm, _, signature = given.strip().partition("=")
    if algorithm not in ("sha1", "sha256"):
        raise BadInput(400, "X-Hub-Signature must be sha1=<hex> or sha256=<hex>")
    expected = hmac.new(secret, body, algorithm).hexdigest()
    if not hmac.compare_digest(signature.strip().lower().encode("latin-1"), expected.encode()):
        raise BadInput(401, "X-Hub-Signature does not match the body")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post_callback(url: str, body: bytes, headers: Mapping[str, str]) -> bool:
    """POST a callback (blocking, 10 s timeout); True once the receiver took it (2xx)."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _opener.open(request, timeout=10) as response:
            code: int = response.status
            return 200 <= code < 300
    except urllib.error.HTTPError as exc:
        log.warning("callback to %s answered %s", url, exc.code)
        return exc.code < 500 and exc.code != 429  # a 4xx will not get better
    except (OSError, ValueError) as exc:
        log.warning("callback to %s failed: %s", url, exc)
        return False
