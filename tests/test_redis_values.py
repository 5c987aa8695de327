"""Values larger than Redis takes: an output, a foreach item or a body over the backend's
``max_value`` (or over half of Redis's own ``proto-max-bulk-len``) fails its request with
a clear error, or is refused at submit; the worker thread goes on with the next task.
Without the check such a completion was refused by Redis for ever and its thread, which
keeps unsent completions, never took a task again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowloom import FlowService, InvalidRequest, RequestFailed, Status
from flowloom.backends.redis import RedisBackend
from test_redis_resilience import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

MB = 1024 * 1024


def flows(fs: FlowService) -> None:
    def sized(data: bytes, options: Any) -> bytes:
        return b"x" * int(data)

    def big(workflow: Any, context: Any) -> None:
        workflow.dag.node("make", sized).node("after", lambda d, o: b"%d" % len(d))
        workflow.dag.edge("make", "after")

    def items(workflow: Any, context: Any) -> None:
        each = workflow.dag.foreach_branch(
            "each",
            lambda data: {"small": b"s", "huge": b"x" * int(data)},
            lambda outputs: b",".join(sorted(outputs)),
        )
        each.node("item", lambda d, o: d[:1])

    def rescued(workflow: Any, context: Any) -> None:
        workflow.dag.node("make", sized, on_failure=lambda error, data: b"fallback")

    fs.register("big", big)
    fs.register("items", items)
    fs.register("rescued", rescued)


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis taking at most 1 MB in one value."""
    server = PrivateRedis(tmp_path, aof=False)
    server.command += ["--proto-max-bulk-len", "1mb"]
    server.start()
    yield server
    server.close()


def check_refused(fs: FlowService, limit: int) -> None:
    request_id = fs.execute("big", b"%d" % (limit + 1))
    with pytest.raises(RequestFailed) as failed:
        fs.result("big", request_id, timeout=30)
    error = failed.value.error
    assert error is not None
    assert (error.vertex, error.type) == ("make", "StepError")
    assert f"returned {limit + 1:,} bytes" in error.message
    assert f"max_value {limit:,}" in error.message
    assert fs.state("big", request_id).status is Status.FAILED
    # the one worker thread goes on: a value at the limit passes
    assert fs.run("big", b"%d" % limit, timeout=30) == b"%d" % limit
    request_id = fs.execute("items", b"%d" % (limit + 1))
    with pytest.raises(RequestFailed) as failed:
        fs.result("items", request_id, timeout=30)
    assert failed.value.error is not None
    assert "foreach item 'huge' holds" in failed.value.error.message
    assert fs.run("rescued", b"%d" % (limit + 1), timeout=30) == b"fallback"
    with pytest.raises(InvalidRequest, match="max_value"):
        fs.execute("big", b"0" * (limit + 1))
    assert fs.run("big", b"5", timeout=30) == b"5"


def test_values_over_half_of_redis_own_limit_fail_their_request_only(
    small_redis: PrivateRedis, redis_prefix: str
) -> None:
    backend = RedisBackend(small_redis.url, prefix=redis_prefix, retry_for=2)
    limit = backend.value_limit()
    assert 256 * 1024 < limit < MB // 2  # half of Redis's 1 MB, less some room
    with FlowService(backend=backend, worker_concurrency=1) as fs:
        flows(fs)
        fs._ensure_worker()
        check_refused(fs, limit)


def test_max_value_is_the_limit_when_redis_takes_more(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    backend = make_redis_backend(max_value=10_000)
    assert backend.value_limit() == 10_000
    with FlowService(backend=backend, worker_concurrency=1) as fs:
        flows(fs)
        fs._ensure_worker()
        check_refused(fs, 10_000)


@pytest.mark.parametrize("config", [True, False], ids=["config", "no-config"])
@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "noeviction"])
def test_a_worker_warns_once_at_start_of_a_redis_that_may_evict_its_keys(
    tmp_path: Path, redis_prefix: str, policy: str, config: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Read with ``CONFIG GET``, or from ``INFO memory`` where ``CONFIG`` is refused (a
    managed Redis: here renamed away)."""
    server = PrivateRedis(tmp_path, aof=False)
    server.command += ["--maxmemory-policy", policy]
    if not config:
        server.command += ["--rename-command", "CONFIG", ""]
    server.start()
    try:
        backend = RedisBackend(server.url, prefix=redis_prefix)
        with FlowService(backend=backend, worker_concurrency=1) as fs:
            flows(fs)
            fs._ensure_worker()
            warned = [r for r in caplog.records if "evicts keys" in r.getMessage()]
            assert fs.run("big", b"3", timeout=30) == b"3"
            assert fs.run("big", b"4", timeout=30) == b"4"
        again = [r for r in caplog.records if "evicts keys" in r.getMessage()]
        if policy == "noeviction":
            assert again == []
        else:
            assert len(warned) == len(again) == 1
            assert f"maxmemory-policy {policy}" in warned[0].getMessage()
    finally:
        server.close()
