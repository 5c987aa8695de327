"""Where the event loop's own connections to Redis go (``loop_submits``, ``loop_ends``):
the URL's address and login, read once, and the connection opened from the loop.
TLS URLs are not handled (``usable`` is false): their callers take redis-py's way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from redis.connection import parse_url

__all__ = ["LoopAddress", "running_loop"]

P = TypeVar("P", bound=asyncio.Protocol)


class LoopAddress:
    """Redis at ``url``, for connections an event loop opens itself."""

    def __init__(self, url: str) -> None:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.usable = "connection_class" not in options or "path" in options  # no TLS
        self._options = options

    def hello(self, *, select: bool) -> list[tuple[Any, ...]]:
        """The commands a new connection sends first: ``AUTH`` if the URL has a password,
        ``SELECT`` of its db if ``select`` (a subscription needs none)."""
        options = self._options
        commands: list[tuple[Any, ...]] = []
        if options.get("password") is not None:
            user = [options["username"]] if options.get("username") else []
            commands.append(("AUTH", *user, options["password"]))
        if select and int(options.get("db") or 0):
            commands.append(("SELECT", int(options["db"])))
        return commands

    async def connect(self, made: Callable[[], P]) -> P:
        """A connection from the running loop, its protocol made by ``made``."""
        loop = asyncio.get_running_loop()
        options = self._options
        if "path" in options:
            _, protocol = await loop.create_unix_connection(made, options["path"])
        else:
            host, port = options.get("host", "localhost"), int(options.get("port", 6379))
            _, protocol = await loop.create_connection(made, host, port)
        return protocol


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
