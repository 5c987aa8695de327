"""The subscription to requests' ends, run by an event loop instead of a thread.

A server waiting for requests hears of their ends on its event loop. A thread holding
the subscription would hand each end to the loop (a wake-up of the thread, then one of
the loop, per request); here the loop reads the subscription's connection itself and
calls the listeners as the messages come. What ``Ends`` guarantees holds the same: after
every (re)subscription the listeners' ``lost()`` is called, and a cut connection is
opened again with a growing pause (10 ms doubling to 0.5 s) until the subscription is
stopped. Every ``HEALTH_CHECK`` seconds the connection is sent a ``PING``; when nothing
came back by the next check it is cut and opened again. TLS URLs are not handled
here (``usable`` is false): ``Ends`` then runs its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

import hiredis

from .connection import Health
from .loop_address import LoopAddress

__all__ = ["LoopSubscription"]

HEALTH_CHECK = 30.0  # seconds


def _pack(*command: Any) -> bytes:
    packed: bytes = hiredis.pack_command(command)
    return packed


class _Protocol(asyncio.Protocol):
    """One subscribed connection: messages handed to ``deliver``, ``subscribed()`` once
    Redis confirms the subscription."""

    def __init__(
        self, hello: list[bytes], deliver: Callable[[bytes], None], subscribed: Callable[[], None]
    ) -> None:
        self._hello = hello
        self._deliver = deliver
        self._subscribed = subscribed
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self.received = 0  # replies so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(b"".join(self._hello))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self.received += 1
            if isinstance(reply, hiredis.ReplyError):  # AUTH refused
                self._cut(ConnectionError(f"Redis refused the subscription: {reply}"))
                return
            if isinstance(reply, list) and reply:
                if reply[0] == b"message":
                    self._deliver(reply[2])
                elif reply[0] == b"subscribe":
                    self._subscribed()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc or ConnectionError("the subscription was cut"))

    def ping(self) -> None:
        if self._transport is not None:
            self._transport.write(_pack("PING"))

    def _cut(self, exc: Exception) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if self._transport is not None:
            self._transport.abort()

    def cut(self) -> None:
        self._cut(ConnectionError("no answer to a health check"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class LoopSubscription:
    """The subscription to ``channel`` on ``url``, held by the running loop's task from
    ``start()`` until ``stop()``: ``deliver(data)`` on every message, ``subscribed()``
    each time it is (re)established."""

    def __init__(
        self,
        url: str,
        channel: str,
        health: Health,
        *,
        connect_timeout: float,
        deliver: Callable[[bytes], None],
        subscribed: Callable[[], None],
    ) -> None:
        self._address = LoopAddress(url)
        self.usable = self._address.usable
        self._channel = channel
        self._health = health
        self._connect_timeout = connect_timeout
        self._deliver = deliver
        self._subscribed = subscribed
        self._delay = 0.01
        self._task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        task, loop = self._task, self.loop
        return task is not None and not task.done() and loop is not None and not loop.is_closed()

    def start(self) -> None:
        """Subscribe from the running loop (at once, then again after every cut)."""
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._run())

    def stop(self) -> None:
        """End the subscription (from any thread)."""
        task, loop = self._task, self.loop
        self._task = None
        if task is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: so has the socket
            loop.call_soon_threadsafe(task.cancel)

    def _hello(self) -> list[bytes]:
        commands = [*self._address.hello(select=False), ("SUBSCRIBE", self._channel)]
        return [_pack(*command) for command in commands]

    def _on_subscribed(self) -> None:
        self._health.succeeded()
        self._delay = 0.01
        self._subscribed()

    async def _run(self) -> None:
        while True:
            protocol: _Protocol | None = None
            try:

                def made() -> _Protocol:
                    return _Protocol(self._hello(), self._deliver, self._on_subscribed)

                async with asyncio.timeout(self._connect_timeout):
                    protocol = await self._address.connect(made)
                failure: BaseException = await self._watch(protocol)
            except (OSError, TimeoutError) as exc:
                failure = exc
            finally:
                if protocol is not None:
                    protocol.close()
            self._health.failed(failure)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, 0.5)

    async def _watch(self, protocol: _Protocol) -> Exception:
        """Until the connection is cut: its cause."""
        pinged_at: int | None = None
        while True:
            done, _ = await asyncio.wait([protocol.closed], timeout=HEALTH_CHECK)
            if done:
                return protocol.closed.result()
            if pinged_at is not None and protocol.received == pinged_at:
                protocol.cut()
                continue
            pinged_at = protocol.received
            protocol.ping()
