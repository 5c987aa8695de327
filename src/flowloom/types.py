"""The vocabulary shared by every module: callables users write and records users read."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

Options: TypeAlias = dict[str, list[str]]
HandlerResult: TypeAlias = bytes | str | None
Handler: TypeAlias = Callable[[bytes, Options], HandlerResult | Awaitable[HandlerResult]]
Aggregator: TypeAlias = Callable[[dict[str, bytes]], HandlerResult | Awaitable[HandlerResult]]
Condition: TypeAlias = Callable[[bytes], list[str] | Awaitable[list[str]]]
ForEach: TypeAlias = Callable[[bytes], dict[str, bytes] | Awaitable[dict[str, bytes]]]
Forwarder: TypeAlias = Callable[[bytes], HandlerResult | Awaitable[HandlerResult]]
FailureHandler: TypeAlias = Callable[
    [BaseException, bytes], HandlerResult | Awaitable[HandlerResult]
]
FailureHook: TypeAlias = Callable[["ErrorInfo"], Any]
FinallyHook: TypeAlias = Callable[["Status"], Any]

__all__ = [
    "Aggregator",
    "Condition",
    "ErrorInfo",
    "FailureHandler",
    "FailureHook",
    "FinallyHook",
    "ForEach",
    "Forwarder",
    "Handler",
    "HandlerResult",
    "Options",
    "Request",
    "RequestState",
    "Status",
    "VertexState",
]


class Status(enum.StrEnum):
    """Where a request, or one vertex instance of it, stands."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.STOPPED)


@dataclass(frozen=True)
class Request:
    """One execution of a flow: the input ``body`` (``str`` is encoded as UTF-8), the
    handlers' ``query`` options (each a ``str`` or a list of them), and optionally a
    caller-chosen ``request_id``."""

    body: bytes | str = b""
    request_id: str | None = None
    query: Mapping[str, list[str] | str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInfo:
    """What went wrong, where: the vertex instance address, exception type and message,
    and the formatted traceback of the user code that raised (empty for rule errors)."""

    vertex: str
    type: str
    message: str
    traceback: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "vertex": self.vertex,
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
        }


@dataclass(frozen=True)
class VertexState:
    """One vertex instance of a request, e.g. ``for-each-user-verify[u42]/verify-image``."""

    address: str
    status: Status
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    error: ErrorInfo | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "status": self.status.value,
            "started": self.started,
            "ended": self.ended,
            "attempts": self.attempts,
            "error": self.error.to_json() if self.error else None,
        }


@dataclass(frozen=True)
class RequestState:
    """A request's status, timings, error and per-vertex states (keyed by address), and
    when it was retried (``retries``: one epoch time per ``FlowService.retry``)."""

    request_id: str
    flow: str
    status: Status
    created: float
    ended: float | None = None
    error: ErrorInfo | None = None
    vertices: Mapping[str, VertexState] = field(default_factory=dict)
    trace_id: str | None = None  # the request's OpenTelemetry trace id (hex), when traced
    retries: tuple[float, ...] = ()  # when the request was retried (epoch seconds), oldest first

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "flow": self.flow,
            "status": self.status.value,
            "created": self.created,
            "ended": self.ended,
            "error": self.error.to_json() if self.error else None,
            "vertices": {a: v.to_json() for a, v in self.vertices.items()},
            "trace_id": self.trace_id,
            "retries": list(self.retries),
        }
