"""The answers the endpoints give, built from the shapes of ``shapes``."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from ..types import Status
from .shapes import Accepted, Error, encode

__all__ = ["accepted", "error", "json", "request_headers", "result"]

JSON = "application/json"
BYTES = "application/octet-stream"


def request_headers(request_id: str, status: Status) -> dict[str, str]:
    return {"X-Request-Id": request_id, "X-Request-Status": status.value}


def json(
    body: object,
    *,
    code: int = 200,
    request_id: str | None = None,
    status: Status | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    extra = dict(headers or {})
    if request_id is not None and status is not None:
        extra.update(request_headers(request_id, status))
    return Response(encode(body), status_code=code, headers=extra, media_type=JSON)


def result(request_id: str, result: bytes, trace: str = "") -> Response:
    """A completed request's result; ``trace``: its trace id, for ``X-Trace-Id``."""
    headers = request_headers(request_id, Status.COMPLETED)
    if trace:
        headers["X-Trace-Id"] = trace
    return Response(result, media_type=BYTES, headers=headers)


def accepted(name: str, request_id: str, status: Status) -> Response:
    location = f"/flow/{name}/requests/{request_id}"
    body = Accepted(request_id=request_id, flow=name, status=status, state=location)
    return json(
        body, code=202, request_id=request_id, status=status, headers={"Location": location}
    )


def error(code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return json(Error(message), code=code, headers=headers)
