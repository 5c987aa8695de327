"""Several worker processes on one machine: ``flowloom worker APP --processes K``.

The parent loads the app once, forks ``K`` children that each run
``FlowService.start_worker()``, restarts a child that dies, and on SIGTERM or SIGINT
passes SIGTERM on and waits for every child to finish its running tasks. POSIX only
(it forks); the backend must be shared (``redis_url``): embedded workers in separate
processes would not see each other's requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from types import FrameType
from typing import Any

from .apps import check_port
from .errors import FlowloomError
from .service import FlowService

__all__ = ["run_worker_processes"]

log = logging.getLogger("flowloom.processes")


def run_worker_processes(service: FlowService, processes: int, *, restart: bool = True) -> None:
    """Run ``processes`` worker processes of ``service`` until SIGTERM or SIGINT (blocking).

    Call it before the service has started anything (no worker, no request): the
    children are forked from this process. A child that exits on its own is started
    again after a second when ``restart`` is true (longer, doubling up to a minute,
    while its slot's children keep ending within 10 s of their start).
    """
    if processes < 1:
        raise ValueError("processes must be >= 1")
    if service.embedded:
        raise FlowloomError("several worker processes need a shared backend: give a redis_url")
    if processes == 1:
        service.start_worker()
        return
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    if service.metrics_port:  # one port a process: say now if one is taken
        for slot in range(processes):
            check_port(service.host, service.metrics_port + slot, "serve metrics")
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: dict[int, int] = {}  # pid -> slot
    try:
        for slot in range(processes):
            children[_fork(service, previous, slot)] = slot
        _supervise(service, children, stopping, restart, previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fork(service: FlowService, handlers: Mapping[signal.Signals, Any], slot: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if service.metrics_port:  # each process serves its own metrics: PORT + slot
            service.metrics_port += slot
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        service.start_worker()
    except FlowloomError as exc:  # a setting or the backend: no traceback to show
        log.error("flowloom: worker process failed: %s", exc)
        code = 1
    except BaseException:
        log.exception("flowloom: worker process failed")
        code = 1
    finally:
        os._exit(code)


RESTART_DELAY = 1.0  # seconds before a child that ended is started again
MAX_RESTART_DELAY = 60.0  # ... doubling while children keep ending young, up to this
YOUNG = 10.0  # seconds: a child that ends sooner after its start doubles the delay


def _supervise(
    service: FlowService,
    children: dict[int, int],
    stopping: threading.Event,
    restart: bool,
    handlers: Mapping[signal.Signals, Any],
) -> None:
    """Wait for the children; start again one that ends on its own (``restart``), after
    ``RESTART_DELAY``, doubled each time the slot's process ends within ``YOUNG``
    seconds of its start (a crash loop), so that a child failing at start-up is not
    forked every second for ever. SIGTERM reaches the children at once, whatever waits."""
    born = {slot: time.monotonic() for slot in children.values()}
    delay = dict.fromkeys(children.values(), RESTART_DELAY)
    due: dict[int, float] = {}  # slot -> when it starts again
    signalled = False
    while children or (due and not stopping.is_set()):
        if stopping.is_set() and not signalled:
            signalled = True
            for pid in children:
                _signal(pid, signal.SIGTERM)
        now = time.monotonic()
        for slot, when in list(due.items()):
            if when <= now and not stopping.is_set():
                del due[slot]
                children[_fork(service, handlers, slot)] = slot
                born[slot] = time.monotonic()
        pid, status = os.waitpid(-1, os.WNOHANG) if children else (0, 0)
        if pid == 0:
            stopping.wait(0.2)
            continue
        ended = children.pop(pid, None)
        if ended is None or stopping.is_set() or not restart:
            continue
        if time.monotonic() - born[ended] < YOUNG:  # again and again: wait longer each time
            wait = delay[ended]
            delay[ended] = min(wait * 2, MAX_RESTART_DELAY)
        else:
            wait = delay[ended] = RESTART_DELAY
        log.warning(
            "flowloom: worker process %d ended (exit code %d); starting another in %gs",
            pid, os.waitstatus_to_exitcode(status), wait,
        )  # fmt: skip
        due[ended] = time.monotonic() + wait


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
