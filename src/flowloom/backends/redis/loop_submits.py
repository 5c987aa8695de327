"""Submits made from an event loop, on a connection of the loop's own.

A server executing requests submits them from its event loop. Handing each submit to a
thread (and its answer back) costs more CPU than the submit itself, so here the loop
sends the ``submit`` script's EVALSHA itself, on one connection: the submits of one turn
of the loop go out in one write, and a ``hiredis.Reader`` hands the replies back in
order. Only the plain case is handled here: a submit that gets any other answer than
"created" (no connection, a lost one, no reply within the socket timeout, a script
Redis does not know, an error, a request id that exists) returns ``False``, and the
caller submits again the ordinary way, on a thread (which rides out outages, loads the
scripts, and tells a duplicate from its own request sent twice). TLS URLs always take
the ordinary way.

A submit may also claim the request's first tasks for this process's idle worker
threads (see ``lua/submit.lua``): the claimed tasks are handed over in the turn of the
loop that reads the reply, even if the caller has stopped waiting for it, so that none
is left pending here unheld (unkept alive) until its visibility timeout; a loop that
stops before it hands them over leaves them pending for this process's consumer, and
its graceful stop hands them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis

from ...loops import the_running_loop
from .loop_address import LoopAddress, running_loop
from .scripts import SOURCES

__all__ = ["LoopSubmits"]

log = logging.getLogger("flowloom.redis")

SUBMIT_SHA = hashlib.sha1(SOURCES["submit"].encode()).hexdigest()
PAUSE = 1.0  # seconds without the loop's connection after it failed


class _Replies(asyncio.Protocol):
    """One connection: commands written at the end of the loop's turn, replies in order.
    Cut when no reply came for ``timeout`` seconds while one was awaited."""

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._answered = 0  # replies so far
        self._watch: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        # the futures of the replies awaited, each with what to call with it first (if any)
        self._waiting: deque[tuple[asyncio.Future[Any], Callable[[Any], None] | None]] = deque()
        self._out: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        claims: list[tuple[Callable[[Any], None], Any]] = []
        while (reply := self._reader.gets()) is not False:
            self._answered += 1
            future, first = self._waiting.popleft()
            if first is not None:
                claims.append((first, reply))
            if not future.done():  # its caller gave up (cancelled, timed out)
                future.set_result(reply)
        if claims:
            # after the callers this wakes: see ``_hand_over``
            self._loop.call_soon(self._hand_over, claims)

    def _hand_over(self, claims: list[tuple[Callable[[Any], None], Any]]) -> None:
        """Call each reply's ``first`` once the callers the replies woke have taken their
        next step. A worker thread woken here needs the GIL, which the loop holds until its
        turn ends: woken in the middle of the turn, it waits for it, waking and sleeping
        again as the loop lets go of it and takes it back (on the benchmark machine, about
        40% more futex calls and context switches per request)."""
        for first, reply in claims:
            try:
                first(reply)
            except Exception:  # the others must be handed over all the same
                log.exception("flowloom: handing over the tasks a submit claimed failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._watch is not None:
            self._watch.cancel()
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError("connection to Redis lost"))

    def send(
        self, command: Sequence[Any], first: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """The future of ``command``'s reply (a ``hiredis.ReplyError`` for an error);
        ``first(reply)`` is called as it comes, whether the future is awaited still or not."""
        packed = hiredis.pack_command(tuple(command))  # TypeError for an odd argument
        if self.lost:
            raise ConnectionError("connection to Redis lost")
        future = self._loop.create_future()
        self._waiting.append((future, first))
        if not self._out:
            self._loop.call_soon(self._write)
        self._out.append(packed)
        if self._watch is None:
            self._watch = self._loop.call_later(self._timeout, self._check, self._answered)
        return future

    def _check(self, answered: int) -> None:
        self._watch = None
        if not self._waiting or self.lost:
            return
        if self._answered == answered:  # Redis hangs, or the network: fail the waiting
            if self._transport is not None:
                self._transport.abort()
            return
        self._watch = self._loop.call_later(self._timeout, self._check, self._answered)

    def _write(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self.lost:
            self._transport.write(b"".join(out))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class LoopSubmits:
    """The ``submit`` script sent from the running event loop, to Redis at ``url``."""

    def __init__(self, url: str, *, socket_timeout: float, connect_timeout: float) -> None:
        self._address = LoopAddress(url)
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._replies: _Replies | None = None
        self._opening: asyncio.Task[_Replies] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # the thread ``_loop`` runs in
        self._paused_until = 0.0

    async def submit(
        self,
        keys: Sequence[str],
        args: Sequence[Any],
        claimed: Callable[[Any], None] = lambda _: None,
    ) -> bool:
        """Whether the request was created; ``False``: submit it the ordinary way.
        ``claimed(reply)`` receives the tasks the script claimed, if any (``claim_tasks``)."""
        if not self._address.usable or time.monotonic() < self._paused_until:
            return False

        def first(reply: Any) -> None:
            if isinstance(reply, list):
                claimed(reply)

        try:
            replies = await self._connection()
            reply = replies.send(("EVALSHA", SUBMIT_SHA, len(keys), *keys, *args), first)
            answer = await reply
            return answer == 1 or isinstance(answer, list)
        except TypeError:  # an argument hiredis does not pack: redis-py's packer will
            return False
        except (OSError, TimeoutError, hiredis.HiredisError):
            self._failed()
            return False

    async def _connection(self) -> _Replies:
        loop = the_running_loop(self._loop, self._thread)
        if self._loop is not loop or self._replies is None or self._replies.lost:
            if self._loop is not loop:
                self.close()  # the connection of a loop that made its last submits
            if self._opening is None or self._loop is not loop:
                self._loop, self._thread = loop, threading.get_ident()
                self._opening = loop.create_task(self._open())
            opening = self._opening
            try:
                self._replies = await asyncio.shield(opening)
            finally:
                if opening.done() and self._opening is opening:
                    self._opening = None
        return self._replies

    async def _open(self) -> _Replies:
        def made() -> _Replies:
            return _Replies(self._socket_timeout)

        async with asyncio.timeout(self._connect_timeout):
            replies = await self._address.connect(made)
            try:
                hello = [replies.send(command) for command in self._address.hello(select=True)]
                for reply in hello:
                    if isinstance(await reply, hiredis.ReplyError):
                        raise ConnectionError(f"Redis refused the connection: {reply.result()}")
            except BaseException:
                replies.close()
                raise
        return replies

    def _failed(self) -> None:
        """Drop the connection, and take the ordinary way for ``PAUSE`` seconds."""
        self._paused_until = time.monotonic() + PAUSE
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()

    def close(self) -> None:
        """Drop the connection (from any thread)."""
        replies, loop = self._replies, self._loop
        self._replies = None
        if replies is None or loop is None:
            return
        if running_loop() is loop:
            replies.close()
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: so has the socket
            loop.call_soon_threadsafe(replies.close)
