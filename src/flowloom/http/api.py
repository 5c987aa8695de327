"""``Api``: what every endpoint works with (the service, the settings, the waiter and
the callbacks), and the blocking service calls run off the event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
from starlette.applications import Starlette
from starlette.responses import Response

from ..errors import (
    DuplicateRequest,
    FlowNotFound,
    InvalidRequest,
    NoOutput,
    RequestFailed,
    RequestNotFound,
    RequestStopped,
    ResultTimeout,
)
from ..types import Status
from . import responses
from .callbacks import Callbacks
from .inputs import BadInput
from .settings import Settings
from .shapes import Outcome
from .waiting import Waiter

if TYPE_CHECKING:
    from ..service import FlowService

__all__ = ["Api", "call", "http_errors"]

T = TypeVar("T")


class Api:
    def __init__(self, service: FlowService, settings: Settings, spec: bytes) -> None:
        self.service = service
        self.settings = settings
        self.spec = spec  # the OpenAPI document, encoded
        self.waiter = Waiter(service)
        self.callbacks = Callbacks(self)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.waiter.closing.clear()
        try:
            yield
        finally:
            self.waiter.close()
            await self.callbacks.close()

    async def answer(self, name: str, request_id: str, status: Status) -> Response:
        """The response for a request in ``status``: its result if it completed."""
        if not status.finished:
            return responses.accepted(name, request_id, status)
        try:
            result = await call(self.service.result, name, request_id, 0)
        except RequestFailed as exc:
            body = Outcome(request_id, name, Status.FAILED, exc.error)
            return responses.json(body, code=424, request_id=request_id, status=Status.FAILED)
        except RequestStopped:
            body = Outcome(request_id, name, Status.STOPPED)
            return responses.json(body, code=409, request_id=request_id, status=Status.STOPPED)
        except ResultTimeout:
            return responses.accepted(name, request_id, status)
        return responses.result(request_id, result)


async def call(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking ``FlowService`` call on a worker thread, mapping its errors to HTTP."""
    with http_errors():
        return await anyio.to_thread.run_sync(fn, *args)


@contextlib.contextmanager
def http_errors() -> Iterator[None]:
    try:
        yield
    except (FlowNotFound, RequestNotFound, NoOutput) as exc:
        raise BadInput(404, str(exc)) from exc
    except DuplicateRequest as exc:
        raise BadInput(409, str(exc)) from exc
    except InvalidRequest as exc:
        raise BadInput(400, str(exc)) from exc
