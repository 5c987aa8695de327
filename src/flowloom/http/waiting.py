"""Waiting for requests to finish without starving the server."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ..errors import RequestNotFound
from ..types import Request, Status

if TYPE_CHECKING:
    from ..backends import RequestRecord
    from ..service import FlowService

__all__ = ["Waiter"]


class Waiter:
    """Waits for requests to finish without starving the server.

    Up to ``slots`` waits at a time block in a thread for at most ``slice`` seconds (so a
    quick request is answered the moment it ends); beyond that, waits poll the status with
    a growing pause. No wait holds a thread for longer than one slice, so a crowd of
    waiting callers never takes the threads that every other endpoint needs.
    """

    def __init__(self, service: FlowService, slots: int = 32, slice: float = 0.2) -> None:
        self.service = service
        self.limiter = anyio.CapacityLimiter(slots)
        self.slice = slice
        self.closing = threading.Event()

    def close(self) -> None:
        self.closing.set()

    def _blocking(self) -> bool:
        return self.limiter.available_tokens >= 1

    async def execute(
        self, name: str, request: Request, timeout: float
    ) -> tuple[RequestRecord, Status, bytes | None]:
        """Execute, and wait for the request up to ``timeout``: its record (id, trace),
        its status then, and its result if it completed within the first slice (one
        thread hop for a quick flow: execute, wait and read the result together)."""
        if timeout > 0 and self._blocking():
            first = min(timeout, self.slice)
            record, status, result = await anyio.to_thread.run_sync(
                self._execute_and_wait, name, request, first, limiter=self.limiter
            )
            if result is not None:
                return record, status, result
            return record, await self.wait(record.request_id, timeout - first, status), None
        record = await anyio.to_thread.run_sync(self.service._submit, name, request)
        return record, await self.wait(record.request_id, timeout, Status.QUEUED), None

    def _execute_and_wait(
        self, name: str, request: Request, timeout: float
    ) -> tuple[RequestRecord, Status, bytes | None]:
        backend = self.service.backend
        record = self.service._submit(name, request)
        status = backend.wait(record.request_id, timeout) or Status.QUEUED
        result = backend.result(record.request_id) if status is Status.COMPLETED else None
        return record, status, result

    async def wait(
        self, request_id: str, timeout: float | None, status: Status = Status.QUEUED
    ) -> Status:
        """The request's status once it has finished, or when ``timeout`` (None: no limit)
        has passed, or the server is stopping."""
        backend = self.service.backend
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        pause = 0.002
        while not status.finished and not self.closing.is_set():
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            if self._blocking():
                found = await anyio.to_thread.run_sync(
                    backend.wait, request_id, min(remaining, self.slice), limiter=self.limiter
                )
            else:
                await anyio.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.25)
                found = await anyio.to_thread.run_sync(backend.wait, request_id, 0)
            if found is None:
                raise RequestNotFound(f"request {request_id!r} has expired")
            status = found
        return status
