"""Requests' ends, pushed: one subscription per backend, fanned out to its listeners.

Every script that ends a request (``finish`` in ``lua/request.lua``: completed, failed,
stopped) publishes ``"<id> <status>"`` on ``P:ended``, followed by ``" <result>"`` for a
completed request whose result is at most ``PUSHED_RESULT`` bytes: a server waiting to
answer with it then needs no read of its own. One thread per backend holds
its own connection subscribed to that channel and calls every registered listener for
each message, so that a server waiting for a thousand requests holds one connection and
one thread, not one per wait. When the first listener listens from an event loop, that
loop holds the subscription instead of a thread (``loop_ends.py``): it hears ends with no
thread hop, and listeners are then called on it; once no listener is left it stops, and
the next first listener chooses again.

A subscription hears only what is published while it is connected: an end published
while Redis was restarting, or before the first subscription took effect, is missed.
So after every (re)subscription each listener's ``lost()`` is called: its owner reads
again the statuses of what it waits for. The connection is opened again with a growing
pause (10 ms doubling to 0.5 s) from the first listener on until the backend closes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from itertools import count

import redis

from ...types import Status
from .connection import Health, make_client
from .loop_address import running_loop
from .loop_ends import LoopSubscription

__all__ = ["Ends", "Listener", "parse"]

log = logging.getLogger("flowloom.redis")

Listener = Callable[[str, Status, bytes | None], None]

PUSHED_RESULT = 4096  # bytes; the same bound as in lua/request.lua

POLL = 0.25  # seconds between two looks at whether the thread is to stop


def parse(data: bytes) -> tuple[str, Status, bytes | None] | None:
    """The request id, status and (if sent along) result of one message, or None if it
    is not one."""
    request_id, _, rest = data.partition(b" ")
    status, space, result = rest.partition(b" ")
    try:
        return request_id.decode(), Status(status.decode()), result if space else None
    except (UnicodeDecodeError, ValueError):
        return None


class Ends:
    """The subscription to ``channel`` on ``url``, open while anyone listens."""

    def __init__(
        self,
        url: str,
        channel: str,
        health: Health,
        *,
        socket_timeout: float,
        connect_timeout: float,
    ) -> None:
        self.channel = channel
        self._health = health
        self._client = make_client(
            url, socket_timeout=socket_timeout, connect_timeout=connect_timeout
        )
        self._lock = threading.Lock()
        self._ids = count()
        self._listeners: dict[int, tuple[Listener, Callable[[], None]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._on_loop = LoopSubscription(
            url,
            channel,
            health,
            connect_timeout=connect_timeout,
            deliver=lambda data: self._deliver(data),  # looked up per call: tests wrap it
            subscribed=lambda: self._each(lambda _listener, lost: lost()),
        )

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def listen(self, listener: Listener, lost: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener(id, status, result)`` on every end, and ``lost()`` once the
        subscription is (re)established; returns the function that stops both."""
        key = next(self._ids)
        with self._lock:
            self._listeners[key] = (listener, lost)
            if not self._stop.is_set():
                self._subscribe()

        def stop() -> None:
            with self._lock:
                self._listeners.pop(key, None)
                if not self._listeners:
                    self._on_loop.stop()

        return stop

    def _subscribe(self) -> None:
        """Start the subscription if none runs: on the running loop, else on a thread."""
        if self._thread is not None or self._on_loop.running:
            return
        if self._on_loop.usable and running_loop() is not None:
            self._on_loop.start()
            return
        self._thread = threading.Thread(target=self._run, name="flowloom-ends", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (within ``POLL`` seconds) and drop the connection."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
            self._on_loop.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2 * POLL)
        self._client.close()

    def _run(self) -> None:
        delay = 0.01
        while not self._stop.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=POLL)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._health.succeeded()
                        delay = 0.01
                        self._each(lambda _listener, lost: lost())
                    elif message["type"] == "message":
                        self._deliver(message["data"])
            except (redis.RedisError, OSError) as exc:
                self._health.failed(exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 0.5)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):  # gone already
                    pubsub.close()

    def _deliver(self, data: bytes) -> None:
        parsed = parse(data)
        if parsed is None:
            log.warning("flowloom: ignored a malformed end message on %s", self.channel)
            return
        request_id, status, result = parsed
        self._each(lambda listener, _lost: listener(request_id, status, result))

    def _each(self, call: Callable[[Listener, Callable[[], None]], None]) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        for listener, lost in listeners:
            try:
                call(listener, lost)
            except Exception:  # one listener's bug must not end the others' wake-ups
                log.exception("flowloom: a listener of request ends failed")
