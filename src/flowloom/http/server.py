"""``serve``: the app on uvicorn, with bounded connections, returning on SIGINT or
SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the faster parser, when installed (flowloom depends on it; a slim install may not)
    from uvicorn.protocols.http import httptools_impl
except ImportError:  # pragma: no cover
    httptools_impl = None  # type: ignore[assignment]

from .. import logs
from .accesslog import log_config
from .app import create_app
from .inputs import BODY_RECEIVED

if TYPE_CHECKING:
    from ..service import FlowService

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_KEEP_ALIVE",
    "DEFAULT_LIMIT_CONCURRENCY",
    "SHUTDOWN_TIMEOUT",
    "serve",
]

log = logging.getLogger("flowloom.http")

DEFAULT_LIMIT_CONCURRENCY = 512  # open connections (or running calls) before 503s
DEFAULT_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds a client has to send a request's whole head
SHUTDOWN_TIMEOUT = 10  # seconds running calls get to finish once asked to stop
YOUNG_COLLECTION = 10_000  # allocations between two collections of young objects


def serve(
    service: FlowService,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    log_level: str = "info",
    access_log: bool = True,
    ready: Callable[[], None] | None = None,
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY,
    keep_alive: int = DEFAULT_KEEP_ALIVE,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    forwarded_allow_ips: Sequence[str] = (),
    http: str = "auto",
    **options: Any,
) -> None:
    """Serve ``service`` on ``host:port`` until SIGINT or SIGTERM (blocking); then return.

    ``options`` go to ``create_app``. Sync ``POST /flow/{name}`` calls still waiting answer
    202 with their request id at once when the server is asked to stop. ``ready`` is
    called once the server listens (for tests and tools).

    ``limit_concurrency``: past this many open connections or running calls, new calls
    get 503. ``keep_alive``: seconds an idle connection stays open. ``header_timeout``:
    a connection that has not sent a whole request head this many seconds after it
    opened (or after the previous answer) is closed. ``forwarded_allow_ips``: the proxy
    addresses whose ``X-Forwarded-For``/``X-Forwarded-Proto`` are trusted (none by
    default; ``*`` trusts every peer). ``http``: the HTTP parser, ``"httptools"``
    (the fast one), ``"h11"`` (pure Python) or ``"auto"`` (httptools when installed).
    """
    if limit_concurrency < 1 or keep_alive < 1 or not header_timeout > 0:
        raise ValueError("limit_concurrency, keep_alive and header_timeout must be positive")
    if http not in ("auto", "h11", "httptools") or (http == "httptools" and not httptools_impl):
        raise ValueError(f"http must be auto, h11 or httptools (if installed), not {http!r}")
    logs.configure()  # a program of its own: flowloom's records reach stderr unless set up
    app = create_app(service, **options)
    _raise_open_file_limit(limit_concurrency)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_header_timeout_protocol(header_timeout, fast=http != "h11"),
        log_level=log_level,
        log_config=log_config(),
        access_log=access_log,
        lifespan="on",
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=keep_alive,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
        proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=list(forwarded_allow_ips) or None,
    )
    server = _Server(config, on_exit=app.state.flowloom.waiter.close, ready=ready)
    with collecting_for_calls():
        server.run()


@contextlib.contextmanager
def collecting_for_calls() -> Iterator[None]:
    """The garbage collector tuned for serving, then as it was. What exists at start-up
    (modules, the app, the flows) lasts as long as the server: it is frozen, so that
    collections no longer walk it. A call allocates a few hundred objects that reference
    counting frees; collecting the young ones every ``YOUNG_COLLECTION`` allocations
    instead of Python's 700 spares most collections (and their pauses) under load."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _raise_open_file_limit(connections: int) -> None:
    """Raise the soft limit on open files towards the hard one: every connection takes
    a file, and the callbacks, the backend and the log take more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    wanted = max(soft, ceiling)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if connections + 64 > wanted:
        log.warning(
            "limit_concurrency %d is close to the open-file limit %d: raise the limit",
            connections,
            wanted,
        )


def _header_timeout_protocol(timeout: float, fast: bool = True) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a deadline on request heads: the httptools one (a C
    parser, much cheaper per request) when ``fast`` and httptools is installed, else the
    h11 one."""
    base: type[asyncio.Protocol] = (
        _HttpToolsHeaderTimeout if fast and httptools_impl else _HeaderTimeout
    )

    class HeaderTimeout(base):  # type: ignore[valid-type,misc]
        header_timeout = timeout

    return HeaderTimeout


class _HeadDeadline:
    """Closes a connection whose request head does not arrive within ``header_timeout``
    (uvicorn bounds only idle keep-alive connections, and a client trickling a header
    byte now and then keeps one open for ever). Mixed into a uvicorn protocol, which
    arms it when a connection opens and after each answer, and disarms it once a whole
    head has arrived."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None
    _head_due: float | None = None  # the loop's time the awaited head is due by
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _head_pending(self) -> bool:
        """Whether the connection waits for a request head (nothing is being served)."""
        raise NotImplementedError

    def _arm(self) -> None:
        # one timer per connection, not one per call: a timer that fires before the
        # current deadline (armed again since) sets itself again for it
        self._head_due = self.loop.time() + self.header_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_due, self._expired)

    def _disarm(self) -> None:
        self._head_due = None

    def _drop_timer(self) -> None:
        self._head_due = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        due = self._head_due
        if due is None:
            return
        if due > self.loop.time():
            self._head_timer = self.loop.call_at(due, self._expired)
            return
        if self._head_pending() and not self.transport.is_closing():
            log.info("closed a connection: no request head within %g s", self.header_timeout)
            self.transport.close()


class _HeaderTimeout(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the head deadline."""

    def _head_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the whole head has arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()


class _TurnWrites:
    """A connection's transport as a response sees it: what it writes during one turn
    of the loop goes out in one write at the end of that turn. uvicorn writes an
    answer's head and its body apart, and each write to an idle socket is a system call
    of its own (with loopback, the reader's side of TCP runs in it as well). A whole
    answer is written when it completes (``on_response_complete``); a streamed body's
    chunks go out in the turn they are written."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._out: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self.flush)
        self._out.append(data)

    def flush(self) -> None:
        out, self._out = self._out, []
        if out and not self._transport.is_closing():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


if httptools_impl is not None:

    class _HttpToolsHeaderTimeout(_HeadDeadline, httptools_impl.HttpToolsProtocol):
        """uvicorn's httptools protocol with the head deadline, each answer written in
        one write (``_TurnWrites``), and a call's scope marked once its whole body has
        arrived (``BODY_RECEIVED``)."""

        _writes: _TurnWrites

        def _head_pending(self) -> bool:
            return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._writes = _TurnWrites(transport, self.loop)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._drop_timer()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            if self.cycle is not None:  # None: an upgrade, refused
                self.cycle.transport = self._writes  # type: ignore[assignment]

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self.cycle is not None and not self.cycle.more_body:
                # the app reads the body without a deadline (mostly the whole call
                # came in one packet: nothing is left to wait for)
                self.cycle.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]

        def on_response_complete(self) -> None:
            self._writes.flush()  # the whole answer at once, before anything else is sent
            super().on_response_complete()
            if not self.pipeline and not self.transport.is_closing():
                self._arm()


class _Server(uvicorn.Server):
    """uvicorn's server, but returning on SIGINT/SIGTERM (uvicorn re-raises the signal
    after shutting down) and ending result waits at once when asked to stop."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None],
        ready: Callable[[], None] | None,
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._ready = ready

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self._ready is not None and self.started:
            self._ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
