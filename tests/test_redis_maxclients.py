"""Redis at its connection limit (``maxclients``: a small managed plan, many workers): a
worker thread that cannot open its connection takes no task, so the threads that have
one run them all; the refusals are told once a minute, not once per attempt.

A Redis server of the test's own (ports 7100-7199)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import MaxClientsReachedError

from flowloom import BackendUnavailable, engine
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.connection import Health
from test_backend_contract import linear, plan_of
from test_http_submits import record_of
from test_redis_faults import claim
from test_redis_resilience import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def test_a_thread_that_cannot_connect_leaves_the_task_to_one_that_can(tmp_path: Path) -> None:
    """A task is ready; Redis takes no new connection. A thread without one (a new
    thread) gets no task: before, the fetcher read this one for it, which it could
    neither begin nor report, and held it for ``retry_for``."""
    server = PrivateRedis(tmp_path, aof=False)
    server.start()
    admin = redis.Redis(port=server.port)
    backend = RedisBackend(server.url, retry_for=0.5)
    plan = plan_of(linear)
    try:
        backend.submit(record_of("r0"), engine.start(plan, b"in"))
        first = claim(backend)  # this thread's connection, the fetcher's and the rest
        assert backend.begin(first, "a", "a")
        backend.submit(record_of("r1"), engine.start(plan, b"in"))
        connected: Any = admin.info("clients")["connected_clients"]
        admin.config_set("maxclients", connected)  # no new connection from here on
        got: list[object] = []

        def other_thread() -> None:
            try:
                got.append(backend.claim("w", 0.2))
            except BackendUnavailable as exc:
                got.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert len(got) == 1
        assert isinstance(got[0], BackendUnavailable), got
        assert "max number of clients" in str(got[0])
        task = claim(backend)  # this thread has its connection: it gets the task
        assert task.request_id == "r1"
        assert backend.begin(task, "a", "a")
    finally:
        admin.config_set("maxclients", 10000)
        admin.close()
        backend.close()
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
