"""A fail-over of Redis to its replica, the way a managed Redis does it: the replica is
promoted, the old primary becomes a replica of it, and the name clients connect to (a
DNS name, a virtual IP: here a proxy) now leads to the new primary. Connections opened
before the switch still reach the old primary, which refuses every write (READONLY)
for as long as they stay open: flowloom drops such a connection and opens a new one,
so it follows the fail-over by itself, losing nothing and running nothing twice.

Redis servers of the test's own (ports 7100-7199), behind ``SlowProxy`` (no delay)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from flowloom import Context, FlowService, Status, Workflow, engine
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.connection import make_client
from flowloom.backends.redis.scripts import SOURCES, Scripts
from flowloom.registry import Registry
from flowloom.worker import Worker
from slow_proxy import SlowProxy
from test_backend_contract import linear, plan_of
from test_http_submits import record_of
from test_redis_faults import eventually
from test_redis_resilience import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

HOPS = 6


class Pair:
    """A primary and its replica, reached through a proxy that can be re-pointed."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        self.primary = PrivateRedis(tmp_path / "a", aof=False)
        self.primary.start()  # before the replica picks its port (see free_port)
        self.replica = PrivateRedis(tmp_path / "b", aof=False)
        self.replica.command += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        try:
            self.replica.start()
        except BaseException:
            self.replica.close()
            self.primary.close()
            raise
        self.proxy = SlowProxy(self.primary.port)
        self.url = f"{self.proxy.url_base}/0"

    def admin(self, server: PrivateRedis) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=5)

    def fail_over(self) -> None:
        """Promote the replica once it has every write, demote the primary to a replica of
        it, and send new connections to the new primary."""
        old, new = self.admin(self.primary), self.admin(self.replica)
        try:
            eventually(lambda: old.wait(1, 1000) == 1, 10, "the replica has every write")
            new.replicaof("NO", "ONE")
            old.replicaof("127.0.0.1", self.replica.port)
            self.proxy.upstream = ("127.0.0.1", self.replica.port)
            eventually(
                lambda: old.info("replication")["master_link_status"] == "up",
                10,
                "the old primary replicates from the new one",
            )
        finally:
            old.close()
            new.close()

    def close(self) -> None:
        self.proxy.close()
        self.replica.close()
        self.primary.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made = Pair(tmp_path)
    yield made
    made.close()


def chain(runs: Counter[tuple[str, str]], lock: threading.Lock) -> Any:
    def define(workflow: Workflow, context: Context) -> None:
        def hop(name: str) -> Any:
            def handler(data: bytes, options: Any) -> bytes:
                with lock:
                    runs[(context.request_id, name)] += 1
                time.sleep(0.02)
                return data + b"!"

            return handler

        for n in range(HOPS):
            workflow.dag.node(f"h{n}", hop(f"h{n}"))
            if n:
                workflow.dag.edge(f"h{n - 1}", f"h{n}")

    return define


def test_a_fail_over_behind_one_name_is_followed_with_nothing_lost_or_run_twice(
    pair: Pair,
) -> None:
    runs: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    registry = Registry()
    registry.register("chain", chain(runs, lock))
    worker_backend = RedisBackend(pair.url, visibility_timeout=30.0)
    worker = Worker(worker_backend, registry, concurrency=3)
    fs = FlowService(backend=RedisBackend(pair.url))
    fs.register("chain", chain(runs, lock))
    worker.start()
    try:
        assert fs.run("chain", b"x", timeout=20) == b"x" + b"!" * HOPS
        before = [fs.execute("chain", b"%d" % n) for n in range(6)]
        time.sleep(0.05)  # some of them part-way through their hops
        pair.fail_over()
        after = [fs.execute("chain", b"late%d" % n) for n in range(3)]
        for n, request_id in enumerate(before):
            assert fs.result("chain", request_id, 30) == b"%d" % n + b"!" * HOPS
        for n, request_id in enumerate(after):
            assert fs.result("chain", request_id, 30) == b"late%d" % n + b"!" * HOPS
        # nothing ran twice: every completion was refused whole, then sent again
        ids = [*before, *after]
        assert {key: count for key, count in runs.items() if key[0] in ids} == {
            (rid, f"h{n}"): 1 for rid in ids for n in range(HOPS)
        }
        state = fs.state("chain", before[0])
        assert state.status is Status.COMPLETED
        assert {v.status for v in state.vertices.values()} == {Status.COMPLETED}
        new_primary = pair.admin(pair.replica)
        try:  # the requests live on the new primary
            assert new_primary.exists(f"flowloom:r:{{{after[0]}}}") == 1
        finally:
            new_primary.close()
    finally:
        worker.stop(5)
        fs.close()
        worker_backend.close()


def test_scripts_missing_on_a_new_server_are_loaded_on_the_connection_that_missed_them(
    tmp_path: Path,
) -> None:
    """The address leads to another server (a fail-over to a replica without the scripts,
    a Redis replaced behind its name) while a connection of the pool still leads to the
    old one: the scripts are loaded where they were missing, not on whichever connection
    the pool hands out."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old = PrivateRedis(tmp_path / "a", aof=False)
    old.start()  # before the second picks its port: a free port is one not bound yet
    new = PrivateRedis(tmp_path / "b", aof=False)
    proxy = SlowProxy(old.port)
    client = make_client(f"{proxy.url_base}/0", socket_timeout=5, connect_timeout=5)
    scripts = Scripts(client)
    keys = ["t:delayed", "t:tasks"]
    try:
        new.start()
        assert scripts.pipelined([("promote", keys, [100])])[0] == [0, -1]
        assert client.ping()  # an idle connection of the pool, to the old server
        proxy.upstream = ("127.0.0.1", new.port)
        scripts._connection().disconnect()  # this thread's: it connects again, to the new
        assert scripts.pipelined([("promote", keys, [100])])[0] == [0, -1]
        probe = redis.Redis(port=new.port)
        try:
            shas = [hashlib.sha1(source.encode()).hexdigest() for source in SOURCES.values()]
            assert all(probe.script_exists(*shas))
        finally:
            probe.close()
    finally:
        client.close()
        proxy.close()
        new.close()
        old.close()


@pytest.mark.anyio
async def test_the_http_servers_submits_follow_a_fail_over(pair: Pair) -> None:
    """The event loop's own connection (the HTTP server's submits) to the demoted primary
    is dropped with the others at the first refusal: the refused submit goes the ordinary
    way, which reconnects, and the loop's next connection leads to the new primary."""
    backend = RedisBackend(pair.url, retry_for=10)
    plan = plan_of(linear)
    try:
        with anyio.fail_after(30):
            await backend.submit_async(record_of("r1"), engine.start(plan, b"in"))
            assert backend._loop_submits._replies is not None  # the loop's connection
            pair.fail_over()
            await backend.submit_async(record_of("r2"), engine.start(plan, b"in"))
            assert backend._loop_submits._replies is None  # refused: dropped
            await backend.submit_async(record_of("r3"), engine.start(plan, b"in"))
            assert backend._loop_submits._replies is not None  # the new primary's
        new_primary = pair.admin(pair.replica)
        try:
            for request_id in ("r1", "r2", "r3"):
                assert new_primary.hget(f"flowloom:r:{{{request_id}}}", "status") == b"queued"
        finally:
            new_primary.close()
    finally:
        backend.leave_loop()
        backend.close()
