"""Redis at its connection limit (``maxclients``: a small managed plan, many workers): a
worker thread that cannot open its connection takes no task, so the threads that have
one run them all; the refusals are told once a minute, not once per attempt.

A Redis server of the test's own (ports 7100-7199)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import MaxClientsReachedError

from flowloom import Context, FlowService, Workflow
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.connection import Health
from flowloom.registry import Registry
from flowloom.worker import Worker
from test_redis_resilience import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def one_node(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("a", lambda data, options: data + b"!")


def test_threads_without_a_connection_leave_the_tasks_to_those_with_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PrivateRedis(tmp_path, aof=False)
    server.start()
    admin = redis.Redis(port=server.port)
    registry = Registry()
    registry.register("one", one_node)
    worker_backend = RedisBackend(server.url)
    worker = Worker(worker_backend, registry, concurrency=5)
    fs = FlowService(backend=RedisBackend(server.url))
    fs.register("one", one_node)
    worker.start()
    try:
        assert fs.run("one", b"x", timeout=10) == b"x!"  # a thread or two have connections
        connected: Any = admin.info("clients")["connected_clients"]
        admin.config_set("maxclients", connected)  # no new connection from here on
        caplog.set_level(logging.WARNING, logger="flowloom")
        for n in range(150):  # a task taken by a thread with no connection waited 10 s
            assert fs.run("one", b"%d" % n, timeout=5) == b"%d!" % n
            time.sleep(0.02)  # for 3 s and more: the threads without one try again
        refused = [r for r in caplog.records if "max number of clients" in r.getMessage()]
        assert len(refused) <= 2, [r.getMessage() for r in refused]  # once per process
    finally:
        admin.config_set("maxclients", 10000)
        admin.close()
        worker.stop(5)
        fs.close()
        worker_backend.close()
        server.close()


def test_a_connection_refused_at_maxclients_is_a_refusal_not_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis answers (its other connections work): the process is degraded, not down, and
    the refusals are told once a minute however often calls fail and succeed in turn."""
    health = Health("redis://127.0.0.1:1/0", grace=1.0)
    caplog.set_level(logging.INFO, logger="flowloom")
    for _ in range(5):
        health.failed(MaxClientsReachedError("max number of clients reached"))
        assert not health.down
        assert health.degraded
        health.succeeded()
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1, told
    assert "refused" in told[0]
    assert "max number of clients reached" in told[0]
