"""Waiting for requests to end without a thread per waiting caller.

A waiting call registers a future under its request id, and the backend's one
listener (``Backend.listen``) resolves the futures of a request when it ends. The
order makes the wait miss nothing: register first, then read the status once (or, for
an execute, submit), so an end that comes before the registration is seen by the read
and one that comes after it resolves the future. When the backend says it may have
missed ends (its subscription was cut), every waiting request's status is read again.
No thread waits and nothing polls; a backend that cannot tell of ends is polled, with a
growing pause, instead.

On a backend whose calls never block (the embedded one), the event loop makes them
itself: an execute costs no thread hop at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from ..backends import deadline
from ..errors import BackendUnavailable, RequestNotFound
from ..loops import the_running_loop
from ..types import Request, Status

if TYPE_CHECKING:
    from ..backends import Backend, RequestRecord
    from ..service import FlowService

__all__ = ["Waiter"]

T = TypeVar("T")

# a future's result: the request's status when it ended and its result if the backend
# sent it along, None when it has expired, or WOKEN when the server stops (the wait then
# answers with what it knows)
Ended = tuple[Status, bytes | None] | None | bool
WOKEN = False
LAST_READ = 1.0  # seconds the read of the status at a wait's deadline may take
ID_BYTES = 16  # random bytes in a request id made here (32 hex digits, as uuid4().hex)
ID_POOL = 4096  # bytes read from the system at once: one system call per 256 ids

_random_ids: list[bytes] = []
os.register_at_fork(after_in_child=_random_ids.clear)  # a child draws its own


def new_request_id() -> str:
    """A request id of ``ID_BYTES`` random bytes from the system's source (thread-safe:
    ``list.pop`` is atomic)."""
    try:
        return _random_ids.pop().hex()
    except IndexError:
        data = os.urandom(ID_POOL)
        _random_ids.extend(data[i : i + ID_BYTES] for i in range(0, ID_POOL, ID_BYTES))
        return new_request_id()


def _wake(future: asyncio.Future[Ended]) -> None:
    """A wait's deadline: it answers with the status then."""
    if not future.done():
        future.set_result(WOKEN)


class Waiter:
    """Waits for requests to end, for the endpoints that answer when they do."""

    def __init__(self, service: FlowService) -> None:
        self.service = service
        self.waiting: dict[str, list[asyncio.Future[Ended]]] = {}
        self.submitting: set[str] = set()  # ids of executes' requests being submitted
        self.closing = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # the thread ``_loop`` runs in
        self._unlisten: Callable[[], None] | None = None
        self._listening: bool | None = None  # None: not asked yet
        self.submits_on_loop = False  # set by the app's lifespan

    @property
    def backend(self) -> Backend:
        return self.service.backend

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on the loop if the backend never blocks, else on a thread."""
        if self.backend.nonblocking:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args)

    async def submit(self, name: str, request: Request) -> RequestRecord:
        """``FlowService._submit``; within the app's lifespan by the backend's
        ``submit_async`` (on Redis sent by the loop itself: what the backend keeps for
        the loop goes by the lifespan's end)."""
        service = self.service
        if not self.submits_on_loop or service._client_mode(name):  # the latter reads
            return await self.run(service._submit, name, request)  # the workers' versions
        record, start = service._new_request(name, request)
        with service._submitting(record):
            await self.backend.submit_async(record, start)
        return record

    # -- the backend's listener ---------------------------------------------------------------
    def _listen(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Listen to the backend (once per event loop: the running ``loop``); whether it
        tells of ends."""
        if self._loop is not loop:
            self._unlisten_backend()
        if self._listening is None:
            self._loop = loop
            self._loop_thread = loop_thread = threading.get_ident()

            def ended(request_id: str, status: Status, result: bytes | None) -> None:
                # called on the loop, or on the backend's thread: a dict lookup is safe
                # there, and spares the loop a wake-up for the ends nobody waits for here
                if request_id not in self.waiting:
                    return
                if threading.get_ident() == loop_thread:
                    self._resolve(request_id, (status, result))
                    return
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self._resolve, request_id, (status, result))

            def lost() -> None:
                if threading.get_ident() == loop_thread:
                    self._recheck()
                    return
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._recheck)

            self._unlisten = self.backend.listen(ended, lost)
            self._listening = self._unlisten is not None
        return self._listening

    def _resolve(self, request_id: str, status: Ended) -> None:
        for future in self.waiting.get(request_id, ()):
            if not future.done():
                future.set_result(status)

    def _recheck(self) -> None:
        """Read again the status of every waiting request (ends may have been missed)."""
        if self.waiting:
            asyncio.get_running_loop().create_task(self._read_all(list(self.waiting)))

    async def _read_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            # not found while its execute submits it: created after this read, so after
            # the subscription, whose push will tell of its end; it has not expired
            submitting = request_id in self.submitting
            try:
                status = await self.run(self.backend.wait, request_id, 0)
            except Exception:  # unreachable again: the next re-subscription reads again
                return
            if status is None and submitting:
                continue
            if status is None or status.finished:
                self._resolve(request_id, None if status is None else (status, None))

    def close(self) -> None:
        """End every wait at once (the server is stopping). Safe from a signal handler."""
        self.closing.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for request_id in list(self.waiting):
            self._resolve(request_id, WOKEN)

    def stop(self) -> None:
        """Stop listening to the backend (the app is shutting down, on its loop)."""
        if self.submits_on_loop:
            self.submits_on_loop = False
            self.backend.leave_loop()
        self._unlisten_backend()

    def _unlisten_backend(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
        self._unlisten, self._listening, self._loop = None, None, None

    @contextlib.contextmanager
    def _registered(
        self, request_id: str, loop: asyncio.AbstractEventLoop
    ) -> Iterator[asyncio.Future[Ended]]:
        future: asyncio.Future[Ended] = loop.create_future()
        self.waiting.setdefault(request_id, []).append(future)
        try:
            yield future
        finally:
            futures = self.waiting.get(request_id)
            if futures is not None:
                futures.remove(future)
                if not futures:
                    del self.waiting[request_id]

    # -- the waits ---------------------------------------------------------------------------
    async def execute(
        self, name: str, request: Request, timeout: float
    ) -> tuple[RequestRecord, Status, bytes | None]:
        """Execute, and wait for the request up to ``timeout``: its record (id, trace),
        its status then, and its result if it completed."""
        loop = the_running_loop(self._loop, self._loop_thread)
        if self.closing.is_set() or not self._listen(loop):
            record = await self.submit(name, request)
            status = await self._poll(record.request_id, timeout, Status.QUEUED)
            return record, status, None
        if request.request_id is None:  # known before the submit, to register first
            request = replace(request, request_id=new_request_id())
        assert request.request_id is not None
        with self._registered(request.request_id, loop) as future:
            self.submitting.add(request.request_id)
            try:
                record = await self.submit(name, request)
            finally:
                self.submitting.discard(request.request_id)
            status, result = await self._until(
                loop, future, record.request_id, timeout, Status.QUEUED
            )
        if status is Status.COMPLETED and result is None:
            result = await self.run(self.backend.result, record.request_id)
        return record, status, result

    async def wait(
        self, request_id: str, timeout: float | None, status: Status = Status.QUEUED
    ) -> Status:
        """The request's status once it has ended, or when ``timeout`` (None: no limit)
        has passed, or the server is stopping. ``RequestNotFound`` if it has expired."""
        if status.finished or self.closing.is_set():
            return status
        loop = the_running_loop(self._loop, self._loop_thread)
        if not self._listen(loop):
            return await self._poll(request_id, timeout, status)
        with self._registered(request_id, loop) as future:
            found = await self.run(self.backend.wait, request_id, 0)
            if found is None:
                raise RequestNotFound(f"request {request_id!r} has expired")
            if found.finished:
                return found
            status, _ = await self._until(loop, future, request_id, timeout, found)
            return status

    async def _until(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Ended],
        request_id: str,
        timeout: float | None,
        status: Status,
    ) -> tuple[Status, bytes | None]:
        """The end ``future`` brings (status, and result if sent along), within
        ``timeout``; else the status then."""
        if self.closing.is_set():
            return status, None
        # the deadline wakes the future itself: a timer of the loop's, cheaper than
        # asyncio's timeout (which cancels the task) or an anyio cancel scope
        timer = None
        if timeout is not None and timeout != math.inf:
            timer = loop.call_later(timeout, _wake, future)
        try:
            ended = await future
        finally:
            if timer is not None:
                timer.cancel()
        if ended is None:
            raise RequestNotFound(f"request {request_id!r} has expired")
        if isinstance(ended, tuple):
            return ended
        return await self.run(self._status_now, request_id, status), None

    def _status_now(self, request_id: str, known: Status) -> Status:
        """The request's status, or ``known`` if the backend does not answer soon: a wait
        that has reached its deadline answers by then, even while the backend is down."""
        try:
            with deadline(LAST_READ):
                found = self.backend.wait(request_id, 0)
        except BackendUnavailable:
            return known
        if found is None:
            raise RequestNotFound(f"request {request_id!r} has expired")
        return found

    async def _poll(self, request_id: str, timeout: float | None, status: Status) -> Status:
        """For a backend that cannot tell of ends: read the status with a growing pause."""
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        pause = 0.002
        while not status.finished and not self.closing.is_set():
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            await anyio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.25)
            found = await self.run(self.backend.wait, request_id, 0)
            if found is None:
                raise RequestNotFound(f"request {request_id!r} has expired")
            status = found
        return status
