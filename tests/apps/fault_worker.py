"""A worker process for the Redis fault tests: ``python tests/apps/fault_worker.py``.

Configured by environment variables (the tests set them):
``FLOWLOOM_TEST_REDIS_URL``, ``FLOWLOOM_TEST_PREFIX``, ``FLOWLOOM_TEST_CONCURRENCY``,
``FLOWLOOM_TEST_VISIBILITY`` (seconds), ``FLOWLOOM_TEST_SLEEP`` (seconds each item or
branch handler sleeps), ``FLOWLOOM_TEST_PROCESSES`` (forked worker processes) and
``FLOWLOOM_TEST_VARIANT`` (which definition of the flow ``versioned`` to register),
``FLOWLOOM_TEST_RETRY_FOR`` and ``FLOWLOOM_TEST_MAX_DELIVERIES`` (the backend's options).
Handlers count their runs in Redis under
``PREFIX:test:...`` so that the tests can check what ran, and how often.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from flowloom import Context, FlowService, Workflow
from flowloom.backends.redis import RedisBackend

URL = os.environ.get("FLOWLOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("FLOWLOOM_TEST_PREFIX", "fltest")
CONCURRENCY = int(os.environ.get("FLOWLOOM_TEST_CONCURRENCY", "4"))
VISIBILITY = float(os.environ.get("FLOWLOOM_TEST_VISIBILITY", "2"))
VARIANT = os.environ.get("FLOWLOOM_TEST_VARIANT", "1")
SLEEP = float(os.environ.get("FLOWLOOM_TEST_SLEEP", "0"))
RETRY_FOR = float(os.environ.get("FLOWLOOM_TEST_RETRY_FOR", "10"))
MAX_DELIVERIES = int(os.environ.get("FLOWLOOM_TEST_MAX_DELIVERIES", "5"))

# the handlers' own Redis client: it rides out a Redis restart like flowloom's does
counter = redis.Redis.from_url(
    URL,
    retry=Retry(ExponentialBackoff(cap=0.5), 60),
    retry_on_error=[redis.ConnectionError],
    socket_connect_timeout=1,
    socket_timeout=5,
)


def count(what: str, request_id: str) -> int:
    return int(counter.hincrby(f"{PREFIX}:test:{what}", request_id, 1))


def fanout(workflow: Workflow, context: Context) -> None:
    """``source`` -> N items (N = the body) -> ``item`` each -> an aggregator."""

    def items(data: bytes) -> dict[str, bytes]:
        return {f"i{n}": b"%d" % n for n in range(int(data))}

    def item(data: bytes, options: Any) -> bytes:
        time.sleep(SLEEP)
        return b"%d" % (int(data) * 2)

    def aggregate(outputs: dict[str, bytes]) -> bytes:
        count("aggregate", context.request_id)
        return b",".join(b"%s=%s" % (k.encode(), outputs[k]) for k in sorted(outputs))

    dag = workflow.dag
    dag.node("source", lambda data, options: data)
    branch = dag.foreach_branch("each", items, aggregator=aggregate)
    branch.node("item", item)
    dag.edge("source", "each")


def diamond(workflow: Workflow, context: Context) -> None:
    """``a -> (b, c) -> d``, ``d`` aggregating ``b`` and ``c``."""

    def step(label: bytes) -> Any:
        def handler(data: bytes, options: Any) -> bytes:
            time.sleep(SLEEP)
            return label + b":" + data

        return handler

    def aggregate(outputs: dict[str, bytes]) -> bytes:
        count("d", context.request_id)
        return outputs["b"] + b"|" + outputs["c"]

    dag = workflow.dag
    dag.node("a", lambda data, options: data)
    dag.node("b", step(b"b"))
    dag.node("c", step(b"c"))
    dag.node("d", lambda data, options: data, aggregator=aggregate)
    for src, dst in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
        dag.edge(src, dst)


def slow(workflow: Workflow, context: Context) -> None:
    """One node that runs for ``float(body)`` seconds."""

    def handler(data: bytes, options: Any) -> bytes:
        count("slow", context.request_id)
        time.sleep(float(data))
        return b"slept " + data

    workflow.dag.node("slow", handler)


def faulty(workflow: Workflow, context: Context) -> None:
    """A node that does what its body says: raise, hang, return garbage, or succeed."""

    def handler(data: bytes, options: Any) -> Any:
        count("faulty", context.request_id)
        if data == b"raise":
            raise RuntimeError("asked to raise")
        if data == b"hang":
            time.sleep(30)
        if data == b"garbage":
            return 42
        return b"fine"

    workflow.dag.node("faulty", handler, retries=1, backoff=0.05, timeout=1.0)


def versioned(workflow: Workflow, context: Context) -> None:
    """Another definition per ``VARIANT``: a deploy that changed the flow."""
    workflow.dag.node(f"v{VARIANT}", lambda data, options: b"variant " + VARIANT.encode())


def late(workflow: Workflow, context: Context) -> None:
    """A node whose first run sleeps ``float(body)`` seconds and then raises; later runs
    succeed at once (a worker frozen past the visibility timeout, then failing late)."""

    def handler(data: bytes, options: Any) -> bytes:
        if count("late", context.request_id) == 1:
            time.sleep(float(data))
            raise RuntimeError("late failure")
        return b"done"

    workflow.dag.node("late", handler)
    workflow.dag.node("after", lambda data, options: data + b"!")
    workflow.dag.edge("late", "after")


def late_retry(workflow: Workflow, context: Context) -> None:
    """``late`` with retries: the late failure must not queue another attempt."""

    def handler(data: bytes, options: Any) -> bytes:
        if count("late", context.request_id) == 1:
            time.sleep(float(data))
            raise RuntimeError("late failure")
        return b"done"

    workflow.dag.node("late", handler, retries=2, backoff=0)
    workflow.dag.node("after", lambda data, options: data + b"!")
    workflow.dag.edge("late", "after")


CHAIN_HOPS = 200


def chain(workflow: Workflow, context: Context) -> None:
    """``hop-0 -> ... -> hop-199``, each adding one to the number it gets; each hop counts
    its runs under ``chain`` (field ``ID:N``) and records the worker's pid under
    ``chain-pid`` (a hash per request)."""

    def hop(n: int) -> Any:
        def handler(data: bytes, options: Any) -> bytes:
            count("chain", f"{context.request_id}:{n}")
            counter.hset(f"{PREFIX}:test:chain-pid:{context.request_id}", str(n), os.getpid())
            time.sleep(SLEEP)
            return b"%d" % (int(data) + 1)

        return handler

    for n in range(CHAIN_HOPS):
        workflow.dag.node(f"hop-{n}", hop(n))
        if n:
            workflow.dag.edge(f"hop-{n - 1}", f"hop-{n}")


def suicide(workflow: Workflow, context: Context) -> None:
    """A node that kills its worker process every time (a segfault, the OOM killer)."""

    def handler(data: bytes, options: Any) -> bytes:
        count("suicide", context.request_id)
        os._exit(3)

    workflow.dag.node("suicide", handler)


FLOWS = {
    "fanout": fanout,
    "diamond": diamond,
    "slow": slow,
    "faulty": faulty,
    "versioned": versioned,
    "late": late,
    "late_retry": late_retry,
    "suicide": suicide,
    "chain": chain,
}


def service() -> FlowService:
    backend = RedisBackend(
        URL,
        prefix=PREFIX,
        visibility_timeout=VISIBILITY,
        heartbeat=0.5,
        retry_for=RETRY_FOR,
        max_deliveries=MAX_DELIVERIES,
    )
    fs = FlowService(worker_concurrency=CONCURRENCY, backend=backend)
    for name, define in FLOWS.items():
        fs.register(name, define)
    return fs


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    processes = int(os.environ.get("FLOWLOOM_TEST_PROCESSES", "1"))
    if processes == 1:
        service().start_worker()
    else:
        from flowloom.processes import run_worker_processes

        run_worker_processes(service(), processes)
