"""The per-request context: id, query, and a key/value store shared by the request's nodes."""

from __future__ import annotations

import json
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import FlowloomError
from .types import Options

if TYPE_CHECKING:
    from .backends import Backend

__all__ = ["Context"]


@dataclass(slots=True)
class RequestScope:
    """What a handler's ``Context`` reads: made for every task, so not frozen (a frozen
    dataclass sets each field through ``object.__setattr__``: three times the cost)."""

    request_id: str
    flow: str
    query: Options
    backend: Backend
    # the observed attempt running in this scope (``observe.Attempt``), for the tracing:
    # its span is made current only if user code asks for it (``tracing._LazyRuntime``)
    attempt: Any = None


_current: ContextVar[RequestScope | None] = ContextVar("flowloom_request", default=None)


def enter(scope: RequestScope) -> Token[RequestScope | None]:
    return _current.set(scope)


def leave(token: Token[RequestScope | None]) -> None:
    _current.reset(token)


def _scope() -> RequestScope:
    scope = _current.get()
    if scope is None:
        raise FlowloomError("no request is running: the context is only usable inside a handler")
    return scope


class Context:
    """The request a handler runs for.

    ``define_workflow(workflow, context)`` receives one; handlers that close over it
    always see the request they are running for, however many run at once. Values
    stored with ``set`` are visible to every vertex of that request (on any worker)
    and to no other request: ``bytes`` are stored as they are, anything else as JSON.
    """

    @property
    def request_id(self) -> str:
        return _scope().request_id

    @property
    def flow(self) -> str:
        return _scope().flow

    @property
    def query(self) -> Options:
        return _scope().query

    def set(self, key: str, value: Any) -> None:
        scope = _scope()
        if isinstance(value, bytes):
            encoded = b"b" + value
        else:
            try:
                encoded = b"j" + json.dumps(value).encode()
            except TypeError as exc:
                raise FlowloomError(
                    f"context value for {key!r} is not bytes nor JSON: {exc}"
                ) from exc
        scope.backend.context_set(scope.request_id, key, encoded)

    def get(self, key: str, default: Any = None) -> Any:
        scope = _scope()
        encoded = scope.backend.context_get(scope.request_id, key)
        if encoded is None:
            return default
        return encoded[1:] if encoded[:1] == b"b" else json.loads(encoded[1:])

    def delete(self, key: str) -> None:
        scope = _scope()
        scope.backend.context_delete(scope.request_id, key)

    def __repr__(self) -> str:
        scope = _current.get()
        return f"<Context request_id={scope.request_id!r}>" if scope else "<Context (no request)>"
