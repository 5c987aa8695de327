"""The stack of a timed-out sync handler is read with ``sys._current_frames``, which on
CPython 3.11 deadlocks the process if a garbage collection starting inside it frees a
``threading.local`` (found hanging a worker in the test suite). flowloom reads it with
the collector off (``execute._frame_of``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HAMMER = textwrap.dedent(
    """
    import gc, sys, threading, time
    from flowloom.execute import _frame_of

    gc.set_threshold(5, 1, 1)  # a collection every few allocations
    stop = time.monotonic() + 3

    def garbage():  # cycles holding a threading.local, freed by the collector
        while time.monotonic() < stop:
            cycle = []
            local = threading.local()
            local.cycle = cycle
            cycle.append(local)

    threads = [threading.Thread(target=garbage) for _ in range(2)]
    for thread in threads:
        thread.start()
    reads = 0
    while time.monotonic() < stop:
        assert _frame_of(threads[0].ident) is not None or not threads[0].is_alive()
        reads += 1
        cycle = []
        local = threading.local()
        local.cycle = cycle
        cycle.append(local)
    for thread in threads:
        thread.join()
    assert gc.isenabled()
    print("reads", reads)
    """
)


def test_reading_a_threads_frame_never_deadlocks_with_the_collector() -> None:
    # with a bare sys._current_frames this hangs within a second on CPython 3.11
    done = subprocess.run(
        [sys.executable, "-c", HAMMER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[1]) > 1000


def test_the_collector_stays_off_if_it_was_off() -> None:
    import gc
    import threading

    from flowloom.execute import _frame_of

    gc.disable()
    try:
        assert _frame_of(threading.get_ident()) is not None
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert _frame_of(threading.get_ident()) is not None
    assert gc.isenabled()
