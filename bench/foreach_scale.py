"""Large and nested foreach: time and Redis memory as the items grow.

    python -m bench.foreach_scale                                  # Redis, default sizes
    python -m bench.foreach_scale --flat 10000,100000 --nested ''  # the big foreach only
    python -m bench.foreach_scale --backend embedded --nested 1000x5,5000x2,10000x1

``--flat N``: one foreach of N items (a one-node branch each), its aggregator counting
them. ``--nested AxB``: a sub-DAG holding a foreach of A items, each running a foreach of
B items: the cost per item should not depend on how the items are split between the two.
Each run checks its result (every item seen exactly once). Worker processes
(``--workers``, 4 threads each) run against ``--redis-url`` (FLUSHED first) under a
prefix of their own; for Redis the peak growth of ``used_memory`` during the run is
printed too (sampled every 20 ms; the server's figure, so other clients' keys count).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from flowloom import Context, FlowService, Request, Workflow

Options = dict[str, list[str]]


# -- the flows -------------------------------------------------------------------------------
def flat_items(data: bytes) -> dict[str, bytes]:
    return {f"i{n}": b"%d" % n for n in range(int(data))}


def same(data: bytes, options: Options) -> bytes:
    return data


def count_distinct(outputs: dict[str, bytes]) -> bytes:
    """The number of items seen, or an error mark if one output came twice or was wrong."""
    seen = {int(v) for v in outputs.values()}
    return b"%d" % len(outputs) if len(seen) == len(outputs) else b"duplicate"


def define_flat(workflow: Workflow, context: Context) -> None:
    each = workflow.dag.foreach_branch("items", flat_items, aggregator=count_distinct)
    each.node("item", same)


def rows(data: bytes) -> dict[str, bytes]:
    a, b = (int(x) for x in data.split(b"x"))
    return {f"r{n}": b"%d" % b for n in range(a)}


def cells(data: bytes) -> dict[str, bytes]:
    return {f"c{n}": b"1" for n in range(int(data))}


def total(outputs: dict[str, bytes]) -> bytes:
    return b"%d" % sum(int(v) for v in outputs.values())


def define_nested(workflow: Workflow, context: Context) -> None:
    from flowloom import Dag

    sub = Dag()
    outer = sub.foreach_branch("rows", rows, aggregator=total)
    inner = outer.foreach_branch("cells", cells, aggregator=total)
    inner.node("cell", same)
    workflow.dag.subdag("grid", sub)


def register(fs: FlowService) -> None:
    fs.register("scale-flat", define_flat)
    fs.register("scale-nested", define_nested)


# -- measuring -------------------------------------------------------------------------------
class MemoryPeak:
    """The highest ``used_memory`` of the Redis server seen while running, sampled."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.base = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def used(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.used())

    @contextmanager
    def watching(self) -> Iterator[None]:
        self.base = self.peak = self.used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()
            self._stop.clear()


@contextmanager
def workers(url: str, prefix: str, count: int) -> Iterator[None]:
    code = (
        "import sys; from flowloom import FlowService; from bench.foreach_scale import register;"
        "fs = FlowService(redis_url=sys.argv[1], redis_prefix=sys.argv[2], worker_concurrency=4);"
        "register(fs); fs.start_worker()"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), root])),
    }
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, prefix], env=env) for _ in range(count)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def run_one(fs: FlowService, flow: str, body: bytes, expected: bytes, timeout: float) -> float:
    began = time.perf_counter()
    result = fs.run(flow, Request(body=body), timeout=timeout)
    wall = time.perf_counter() - began
    if result != expected:
        raise SystemExit(f"{flow} {body!r}: wrong result {result[:80]!r}, expected {expected!r}")
    return wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.foreach_scale")
    parser.add_argument("--backend", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--flat", default="10000,100000", help="item counts, comma-separated")
    parser.add_argument("--nested", default="1000x5,5000x2,10000x1", help="AxB, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (Redis)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)

    runs: list[tuple[str, bytes, bytes, str]] = []
    for n in filter(None, args.flat.split(",")):
        runs.append(("scale-flat", n.encode(), n.encode(), f"flat foreach of {int(n):,}"))
    for shape in filter(None, args.nested.split(",")):
        a, b = (int(x) for x in shape.split("x"))
        runs.append(("scale-nested", shape.encode(), b"%d" % (a * b), f"nested {a:,} x {b:,}"))

    if args.backend == "embedded":
        with FlowService(worker_concurrency=4, max_queued=10**7, max_bytes=2**34) as fs:
            register(fs)
            for flow, body, expected, label in runs:
                wall = run_one(fs, flow, body, expected, args.timeout)
                items = int(expected)
                print(f"{label:>28}: {wall:7.2f} s  {wall / items * 1e6:7.1f} us/item", flush=True)
        return

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    prefix = f"bench-foreach-{uuid.uuid4().hex[:6]}"
    memory = MemoryPeak(args.redis_url)
    with (
        workers(args.redis_url, prefix, args.workers),
        FlowService(redis_url=args.redis_url, redis_prefix=prefix) as fs,
    ):
        register(fs)
        for flow, body, expected, label in runs:
            with memory.watching():
                wall = run_one(fs, flow, body, expected, args.timeout)
            items = int(expected)
            grown = (memory.peak - memory.base) / 2**20
            print(
                f"{label:>28}: {wall:7.2f} s  {wall / items * 1e6:7.1f} us/item  "
                f"Redis used_memory peak +{grown:6.1f} MB",
                flush=True,
            )
    redis.Redis.from_url(args.redis_url).flushdb()


if __name__ == "__main__":
    main()
