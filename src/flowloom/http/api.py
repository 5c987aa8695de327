"""``Api``: what every endpoint works with (the service, the settings, the waiter and
the callbacks), and the blocking service calls run off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import redis
from starlette.applications import Starlette
from starlette.responses import Response

from ..errors import (
    BackendUnavailable,
    DuplicateRequest,
    FlowNotFound,
    InvalidRequest,
    NoOutput,
    Overloaded,
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

__all__ = ["UNAVAILABLE", "Api", "call", "http_errors"]

T = TypeVar("T")

log = logging.getLogger("flowloom.http")

HEALTH_TIMEOUT = 1.0
# what a backend that cannot be reached raises (the Redis client's own errors included)
UNAVAILABLE = (BackendUnavailable, redis.ConnectionError, redis.TimeoutError)


class Api:
    def __init__(self, service: FlowService, settings: Settings, spec: bytes) -> None:
        self.service = service
        self.settings = settings
        self.spec = spec  # the OpenAPI document, encoded
        self.waiter = Waiter(service)
        self.callbacks = Callbacks(self)
        self._ping: asyncio.Future[None] | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.waiter.closing.clear()
        self.waiter.submits_on_loop = True
        try:
            yield
        finally:
            self.waiter.close()
            self.waiter.stop()
            await self.callbacks.close()

    async def ping(self) -> bool:
        """Whether the backend answers within ``HEALTH_TIMEOUT``. One ping at a time:
        callers while it runs share its answer, so a backend that hangs holds one thread,
        not one per health check."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(anyio.to_thread.run_sync(self.service.backend.ping))
            self._ping.add_done_callback(_log_ping)
        with anyio.move_on_after(HEALTH_TIMEOUT):
            try:
                await asyncio.shield(self._ping)
            except Exception:
                return False
            return True
        return False

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


def _log_ping(ping: asyncio.Future[None]) -> None:
    if not ping.cancelled() and ping.exception() is not None:
        exc = ping.exception()
        log.warning("health check failed: %s: %s", type(exc).__name__, exc)


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
    except Overloaded as exc:
        raise BadInput(429, str(exc), {"Retry-After": "1"}) from exc
    except UNAVAILABLE as exc:
        log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
        raise BadInput(503, "the backend is unavailable", {"Retry-After": "1"}) from exc
