"""The errors flowloom raises.

FlowloomError
├── DefinitionError        a workflow definition is invalid (names the vertex)
├── FlowNotFound           no flow is registered under that name
├── RequestNotFound        no request with that id (or it has expired)
├── InvalidRequest         a request id, flow name or body is not acceptable
├── DuplicateRequest       a request with that id exists already
├── NotRunning             control call on a request that has finished
├── NoOutput               no output for that vertex (unknown, or not completed)
├── BackendUnavailable     the backend cannot be reached or fails (after a bounded wait)
│   └── BackendRefused     it answers, but refuses what flowloom needs (its configuration)
├── Overloaded             the backend holds all the requests or bytes it may: try later
├── StepError              user code broke a rule (a bad return value, an unknown key...)
└── RequestError           a request did not produce a result
    ├── RequestFailed      a vertex failed; ``error`` holds what happened
    ├── RequestStopped     the request was stopped
    └── ResultTimeout      the request was not done in time
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .types import ErrorInfo

__all__ = [
    "BackendRefused",
    "BackendUnavailable",
    "DefinitionError",
    "DuplicateRequest",
    "FlowNotFound",
    "FlowloomError",
    "InvalidRequest",
    "NoOutput",
    "NotRunning",
    "Overloaded",
    "RequestError",
    "RequestFailed",
    "RequestNotFound",
    "RequestStopped",
    "ResultTimeout",
    "StepError",
]


class FlowloomError(Exception):
    """Base of every error flowloom raises."""


class DefinitionError(FlowloomError):
    """A workflow definition is invalid; ``vertex`` names the offending vertex."""

    def __init__(self, message: str, vertex: str | None = None) -> None:
        named = vertex is None or message.startswith(vertex + " ")
        super().__init__(message if named else f"vertex {vertex!r}: {message}")
        self.vertex = vertex


class FlowNotFound(FlowloomError):
    """No flow is registered under that name."""


class RequestNotFound(FlowloomError):
    """No request with that id exists (or it has expired)."""


class InvalidRequest(FlowloomError):
    """A request id, flow name, query or body is not acceptable."""


class DuplicateRequest(InvalidRequest):
    """A request with that id exists already."""


class NotRunning(FlowloomError):
    """A control call (pause, resume, stop) on a request that can no longer take it."""


class NoOutput(FlowloomError):
    """A vertex instance has no output: no such address, or it has not completed."""


class BackendUnavailable(FlowloomError):
    """The backend cannot be reached or fails; raised after a bounded wait.

    The message names the backend (its URL without any password) and the cause.
    """


class BackendRefused(BackendUnavailable):
    """The backend answers but refuses what flowloom needs: a Redis user lacking commands,
    keys or channels flowloom uses. Trying again does not help until it is reconfigured
    (the start-up check of ``flowloom worker`` and ``serve`` does not wait for it)."""


class Overloaded(FlowloomError):
    """The backend holds as many unfinished requests, or as many bytes, as it may (the
    embedded backend's ``max_queued`` and ``max_bytes``); try again later. HTTP: 429."""


class StepError(FlowloomError):
    """User code broke a rule flowloom enforces (a bad return value, an unknown key...)."""


class RequestError(FlowloomError):
    """A request did not produce a result."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestFailed(RequestError):
    """A vertex of the request failed for good; ``error`` tells which and why."""

    def __init__(self, request_id: str, error: ErrorInfo | None) -> None:
        detail = f"{error.vertex}: {error.type}: {error.message}" if error else "unknown error"
        super().__init__(f"request {request_id} failed at {detail}", request_id)
        self.error = error


class RequestStopped(RequestError):
    """The request was stopped before it finished."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} was stopped", request_id)


class ResultTimeout(RequestError):
    """The request was not done within the wait timeout."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__(f"request {request_id} not done within {timeout:g}s", request_id)
        self.timeout = timeout
