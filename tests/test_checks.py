"""Numbers given in code: settings out of range are refused when the object is made,
naming the setting; a wait's timeout takes infinity, huge numbers and negatives, and
refuses NaN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flowloom import FlowService, ResultTimeout
from flowloom.backends import MemoryBackend
from flowloom.backends.redis import RedisBackend

HUGE = 10**5000  # more digits than Python converts to text by default
BIG = pytest.param(HUGE, id="5001-digits")
BAD_SECONDS = [0, -1, float("nan"), float("inf"), 1e308, BIG, "10", True]


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda v: FlowService(retention=v),
        lambda v: MemoryBackend(retention=v),
        lambda v: RedisBackend(retention=v),
        lambda v: RedisBackend(visibility_timeout=v),
        lambda v: RedisBackend(heartbeat=v),
        lambda v: RedisBackend(socket_timeout=v),
        lambda v: RedisBackend(connect_timeout=v),
    ],
    ids=["service", "memory", "redis", "visibility", "heartbeat", "socket", "connect"],
)
def test_durations_out_of_range_are_refused_naming_the_setting(
    make: Callable[[Any], object], value: Any
) -> None:
    with pytest.raises(ValueError, match=r"(retention|timeout|heartbeat) must be a number"):
        make(value)


@pytest.mark.parametrize("value", [0, -1, BIG, 2.5, "5", None])
@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda v: FlowService(worker_concurrency=v), "worker_concurrency"),
        (lambda v: FlowService(max_deliveries=v), "max_deliveries"),
        (lambda v: FlowService(max_queued=v), "max_queued"),
        (lambda v: MemoryBackend(max_bytes=v), "max_bytes"),
        (lambda v: RedisBackend(max_value=v), "max_value"),
        (lambda v: RedisBackend(max_deliveries=v), "max_deliveries"),
    ],
)
def test_counts_out_of_range_are_refused_naming_the_setting(
    make: Callable[[Any], object], name: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an integer from 1 to"):
        make(value)


@pytest.mark.parametrize("value", [-1, 65536, 99999, BIG, 80.5, "8080"])
@pytest.mark.parametrize("name", ["port", "metrics_port"])
def test_ports_out_of_range_are_refused_naming_the_setting(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an integer from 0 to 65,535"):
        FlowService(**{name: value})


def test_retry_for_may_be_zero_and_a_retention_of_a_century_is_taken() -> None:
    backend = RedisBackend(retry_for=0, retention=100 * 365 * 86400)
    assert backend.retry_for == 0
    assert backend.retention == 100 * 365 * 86400
    backend.close()


@pytest.mark.parametrize("timeout", [float("inf"), 1e308, BIG])
def test_a_timeout_beyond_any_wait_waits_for_ever(timeout: float) -> None:
    with FlowService() as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("echo", lambda d, o: d))
        assert fs.run("echo", b"x", timeout=timeout) == b"x"
        request_id = fs.execute("echo", b"y")
        assert fs.result("echo", request_id, timeout=timeout) == b"y"


def test_a_negative_timeout_looks_once_and_nan_is_refused() -> None:
    with FlowService() as fs:
        fs.register("stuck", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        request_id = fs.execute("stuck", b"x")  # no worker runs it: the service never started one
        with pytest.raises(ResultTimeout):
            fs.result("stuck", request_id, timeout=-5)
        for bad in (float("nan"), "1", True):
            with pytest.raises(ValueError, match="timeout must be a number"):
                fs.result("stuck", request_id, timeout=bad)  # type: ignore[arg-type]
