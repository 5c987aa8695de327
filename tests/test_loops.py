"""``the_running_loop``: a loop known to run in this thread is returned without asking
asyncio; any other is never mistaken for the running one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flowloom.loops import the_running_loop


def test_the_known_loop_running_in_this_thread() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert the_running_loop(loop, threading.get_ident()) is loop
        assert the_running_loop(None, 0) is loop

    asyncio.run(main())


def test_a_loop_that_ran_here_before_is_not_the_running_one() -> None:
    old = asyncio.new_event_loop()
    old.run_until_complete(asyncio.sleep(0))  # ran here; it runs no more

    async def main() -> None:
        assert the_running_loop(old, threading.get_ident()) is asyncio.get_running_loop()

    try:
        asyncio.run(main())
    finally:
        old.close()


def test_a_loop_running_in_another_thread_is_not_the_running_one() -> None:
    other = asyncio.new_event_loop()
    started = threading.Event()
    other.call_soon(started.set)
    thread = threading.Thread(target=other.run_forever)
    thread.start()
    try:
        assert started.wait(5)
        ident = thread.ident
        assert ident is not None

        async def main() -> None:
            assert the_running_loop(other, ident) is asyncio.get_running_loop()

        asyncio.run(main())
        with pytest.raises(RuntimeError):  # none runs in this thread
            the_running_loop(other, ident)
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(5)
        other.close()
