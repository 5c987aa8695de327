"""Each endpoint described once: its method and path, its handler, and what the
OpenAPI document says about it. ``create_app`` builds the routes from this table and
``spec`` builds the document's paths from the same table.

A module adds an endpoint by decorating its handler::

    @endpoint("GET", "/flows", "The registered flows.", answers={200: Answer("...", Flows)})
    async def flows(api: Api, request: HTTPRequest) -> Response: ...

and is imported by ``flowloom.http.app`` (``when`` enables it for some settings only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from .settings import Settings

if TYPE_CHECKING:
    from .api import Api

__all__ = ["ENDPOINTS", "Answer", "Endpoint", "Handler", "Param", "endpoint"]

Handler = Callable[["Api", HTTPRequest], Awaitable[Response]]
Schema = Mapping[str, Any]


def always(settings: Settings) -> bool:
    return True


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter; ``schema`` may depend on the settings."""

    name: str
    location: Literal["path", "query", "header"]
    description: str
    schema: Schema | Callable[[Settings], Schema]
    required: bool = False
    example: str | None = None
    when: Callable[[Settings], bool] = always


@dataclass(frozen=True)
class Answer:
    """One status code's answer: ``body`` is a shape (a type of ``shapes``), a tuple of
    shapes (any of them), ``bytes``, or None; ``headers`` name the response headers
    (``X-Request-Id``, ``X-Request-Status``, ``Location``). ``description`` may name a
    setting as ``{max_body}``."""

    description: str
    body: Any = None
    headers: tuple[str, ...] = ()
    when: Callable[[Settings], bool] = always


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    summary: str
    handler: Handler
    params: tuple[Param, ...] = ()
    answers: Mapping[int, Answer] = field(default_factory=dict)
    body: Callable[[Settings], Schema] | None = None  # the request body's schema
    public: bool = False  # served without the bearer token or a signature
    checks_signature: bool = False  # the handler checks the signatures itself
    when: Callable[[Settings], bool] = always

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


ENDPOINTS: list[Endpoint] = []


def endpoint(
    method: str,
    path: str,
    summary: str,
    *,
    params: tuple[Param, ...] = (),
    answers: Mapping[int, Answer],
    body: Callable[[Settings], Schema] | None = None,
    public: bool = False,
    checks_signature: bool = False,
    when: Callable[[Settings], bool] = always,
) -> Callable[[Handler], Handler]:
    """Add the decorated handler to ``ENDPOINTS``."""

    def add(handler: Handler) -> Handler:
        ENDPOINTS.append(
            Endpoint(
                method,
                path,
                summary,
                handler,
                params,
                answers,
                body,
                public,
                checks_signature,
                when,
            )
        )
        return handler

    return add
