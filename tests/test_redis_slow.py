"""A Redis that answers slowly, not frozen: every answer late, for longer than any retry
window, through a delaying proxy (``tests/slow_proxy.py``) in front of the test Redis.

Slower than usual but within ``socket_timeout``: runs slow down, nothing else changes.
Slower than ``socket_timeout`` for longer than ``retry_for``: calls time out after Redis
did what they asked (a completion applied, tasks claimed for a reply that never
arrives); once Redis is quick again every request completes, each transition applied
once, and every worker thread is still there to take new work.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from flowloom import Context, FlowService, Status, Workflow
from flowloom.backends.redis import RedisBackend
from slow_proxy import SlowProxy

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

HOPS = 30
THREADS = 4


class Runs:
    """How often each handler ran, counted in this process (the worker is here too)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1


def chain(runs: Runs) -> Any:
    def define(workflow: Workflow, context: Context) -> None:
        def hop(n: int) -> Any:
            def handler(data: bytes, options: Any) -> bytes:
                runs.count(f"{context.request_id}:{n}")
                return b"%d" % (int(data) + 1)

            return handler

        for n in range(HOPS):
            workflow.dag.node(f"hop-{n}", hop(n))
            if n:
                workflow.dag.edge(f"hop-{n - 1}", f"hop-{n}")

    return define


def fanout(workflow: Workflow, context: Context) -> None:
    items = workflow.dag.foreach_branch(
        "split",
        lambda data: {f"i{n}": b"%d" % n for n in range(int(data))},
        aggregator=lambda outputs: b"%d" % sum(int(v) for v in outputs.values()),
    )
    items.node("item", lambda data, options: b"%d" % (2 * int(data)))


def napper(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("nap", lambda data, options: (time.sleep(float(data)), data)[1])


@pytest.fixture
def proxy(redis_url: str) -> Iterator[SlowProxy]:
    made = SlowProxy(urlsplit(redis_url).port or 6379)
    yield made
    made.close()


def service(proxy: SlowProxy, redis_url: str, prefix: str, runs: Runs) -> FlowService:
    backend = RedisBackend(
        proxy.url_base + urlsplit(redis_url).path,
        prefix=prefix,
        socket_timeout=0.5,
        retry_for=1.0,
        visibility_timeout=3.0,
        heartbeat=0.5,
    )
    fs = FlowService(backend=backend, worker_concurrency=THREADS)
    fs.register("chain", chain(runs))
    fs.register("fanout", fanout)
    fs.register("napper", napper)
    fs._ensure_worker()
    return fs


def test_answers_late_but_in_time_slow_runs_down_and_change_nothing_else(
    proxy: SlowProxy, redis_url: str, redis_prefix: str
) -> None:
    runs = Runs()
    fs = service(proxy, redis_url, redis_prefix, runs)
    try:
        proxy.delay = 0.02  # every answer 20 ms late: a hop takes at least that
        started = time.monotonic()
        request_id = fs.execute("chain", b"0")
        fan = fs.execute("fanout", b"40")
        assert fs.result("chain", request_id, timeout=60) == b"%d" % HOPS
        assert fs.result("fanout", fan, timeout=60) == b"%d" % sum(2 * n for n in range(40))
        assert time.monotonic() - started >= HOPS * 0.02  # it was slow
        assert runs.counts == Counter({f"{request_id}:{n}": 1 for n in range(HOPS)})
    finally:
        proxy.delay = 0
        fs.close()


def test_answers_later_than_the_socket_timeout_for_longer_than_retry_for(
    proxy: SlowProxy, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    runs = Runs()
    fs = service(proxy, redis_url, redis_prefix, runs)
    watcher = FlowService(backend=RedisBackend(redis_url, prefix=redis_prefix))
    watcher.register("chain", chain(runs))
    watcher.register("fanout", fanout)
    watcher.register("napper", napper)
    try:
        chains = [fs.execute("chain", b"0") for _ in range(3)]
        fan = fs.execute("fanout", b"200")

        def hops_done() -> int:
            return sum(1 for key in runs.counts if key.split(":")[0] in chains)

        deadline = time.monotonic() + 20
        while hops_done() < 5 and time.monotonic() < deadline:  # well under way
            time.sleep(0.005)
        proxy.delay = 1.2  # every answer later than socket_timeout (0.5 s) ...
        time.sleep(6.0)  # ... for longer than retry_for (1 s) and visibility_timeout (3 s)
        proxy.delay = 0
        assert "unavailable: TimeoutError" in caplog.text  # the calls did time out
        for request_id in chains:  # read directly: each hop's transition applied once
            assert watcher.result("chain", request_id, timeout=60) == b"%d" % HOPS
            state = watcher.state("chain", request_id)
            assert state.status is Status.COMPLETED
            assert all(v.status is Status.COMPLETED for v in state.vertices.values())
            for n in range(HOPS):
                assert runs.counts[f"{request_id}:{n}"] >= 1  # at least once
        assert watcher.result("fanout", fan, timeout=60) == b"%d" % sum(2 * n for n in range(200))
        # every worker thread is still taking work: as many naps as threads, at once
        started = time.monotonic()
        naps = [fs.execute("napper", b"1.0") for _ in range(THREADS)]
        for request_id in naps:
            assert fs.result("napper", request_id, timeout=30) == b"1.0"
        assert time.monotonic() - started < 2 * 1.0 + 1.5, "not every thread took one"
        fresh = fs.execute("chain", b"0")
        assert fs.result("chain", fresh, timeout=30) == b"%d" % HOPS
    finally:
        proxy.delay = 0
        watcher.close()
        fs.close()
