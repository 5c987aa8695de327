"""Shared fixtures.

Redis: tests marked ``redis`` use ``FLOWLOOM_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/9``), each under a key prefix of its own that is deleted
afterwards. Without a reachable Redis they are skipped, except under CI (``CI=true``),
where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowloom.backends import Backend, MemoryBackend

REDIS_URL = os.environ.get("FLOWLOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


# -- Redis -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis URL, once it is known to answer."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} is needed in CI: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix for this test alone; its keys are deleted afterwards."""
    import redis

    prefix = f"fltest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def make_redis_backend(redis_url: str, redis_prefix: str) -> Iterator[Callable[..., Any]]:
    """``make_redis_backend(**options)``: a RedisBackend on the test prefix, closed after."""
    from flowloom.backends.redis import RedisBackend

    made: list[RedisBackend] = []

    def make(**options: Any) -> RedisBackend:
        options.setdefault("prefix", redis_prefix)
        backend = RedisBackend(redis_url, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


# -- any backend -----------------------------------------------------------------------------
@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_backend(
    backend_kind: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Backend]]:
    """``make_backend(retention=...)``: a backend of each kind (the test runs once per kind)."""
    made: list[Backend] = []

    def make(**options: Any) -> Backend:
        backend: Backend
        if backend_kind == "memory":
            backend = MemoryBackend(**options)
        else:
            backend = request.getfixturevalue("make_redis_backend")(**options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: Callable[..., Backend]) -> Backend:
    return make_backend()


# -- HTTP and async tests --------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def gate() -> Iterator[Any]:
    """A gate the HTTP tests' ``gated`` flow waits on; opened at the end of the test."""
    from http_fixtures import Gate

    gate = Gate()
    yield gate
    gate.opened.set()
