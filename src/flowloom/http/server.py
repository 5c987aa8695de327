"""``serve``: the app on uvicorn, returning on SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from .app import create_app

if TYPE_CHECKING:
    from ..service import FlowService

__all__ = ["serve"]


def serve(
    service: FlowService,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    log_level: str = "info",
    access_log: bool = True,
    ready: Callable[[], None] | None = None,
    **options: Any,
) -> None:
    """Serve ``service`` on ``host:port`` until SIGINT or SIGTERM (blocking); then return.

    ``options`` go to ``create_app``. Sync ``POST /flow/{name}`` calls still waiting answer
    202 with their request id at once when the server is asked to stop. ``ready`` is
    called once the server listens (for tests and tools).
    """
    app = create_app(service, **options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _Server(config, on_exit=app.state.flowloom.waiter.close, ready=ready)
    server.run()


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
