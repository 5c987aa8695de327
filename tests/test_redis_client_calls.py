"""A client's calls on Redis: each thread sends its scripts and reads on a connection of
its own (no pool round per call), given back to the pool when the thread ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from flowloom import Status, engine
from flowloom.backends import RequestRecord, Summary
from flowloom.backends.redis import RedisBackend
from flowloom.registry import Registry

pytestmark = pytest.mark.redis


def one_step(workflow: Any, context: Any) -> None:
    workflow.dag.node("only", lambda data, options: data)


def test_threads_that_end_give_their_connections_back(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    backend = make_redis_backend()
    plan = Registry().register("one", one_step)
    seen: list[Summary | None] = []

    def submit_and_read(n: int) -> None:
        record = RequestRecord(f"r{n}", "one", plan.version, b"x", {}, created=time.time())
        backend.submit(record, engine.start(plan, b"x"))
        seen.append(backend.summary(f"r{n}"))

    for n in range(20):  # one after another, each on a thread of its own
        thread = threading.Thread(target=submit_and_read, args=(n,))
        thread.start()
        thread.join()
    assert seen == [Summary("one", Status.QUEUED, None, None)] * 20
    pool = backend._redis.connection_pool
    assert len(pool._in_use_connections) == 0  # type: ignore[attr-defined]
    # kept for ever, each thread's connection would have made a new one
    assert pool._created_connections <= 2  # type: ignore[attr-defined]


def test_a_thread_keeps_its_connection_from_call_to_call(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    backend = make_redis_backend()
    plan = Registry().register("one", one_step)
    ids = set()
    for n in range(5):
        record = RequestRecord(f"r{n}", "one", plan.version, b"x", {}, created=time.time())
        backend.submit(record, engine.start(plan, b"x"))
        assert backend.summary(f"r{n}") == Summary("one", Status.QUEUED, None, None)
        ids.add(backend._redis.client_id())  # on the pool: a connection other than its own
    pool = backend._redis.connection_pool
    # the thread's own, in use the whole time, and the pool's one for client_id
    assert len(pool._in_use_connections) == 1  # type: ignore[attr-defined]
    assert pool._created_connections == 2  # type: ignore[attr-defined]
    assert len(ids) == 1
