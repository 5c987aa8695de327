"""The event loop running in this thread, known without asking asyncio each time."""

from __future__ import annotations

import asyncio
import threading

__all__ = ["the_running_loop"]


def the_running_loop(
    known: asyncio.AbstractEventLoop | None, thread: int
) -> asyncio.AbstractEventLoop:
    """The event loop running in this thread: ``known`` if it runs in this thread
    (``thread``, where it was seen running: a thread runs one loop at a time), without
    asking asyncio, which checks the process id at each ask (a ``getpid`` system call
    in CPython 3.11); else asked of asyncio (``RuntimeError`` if none runs)."""
    if known is not None and thread == threading.get_ident() and known.is_running():
        return known
    return asyncio.get_running_loop()
