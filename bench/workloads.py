"""The three benchmark workloads of ``shared/workloads.md``, written with flowloom's public API.

Handlers are no-ops on 16-byte payloads (``payload(i)`` is ``i`` as 16 ASCII digits),
and every run checks its result, so that a fast wrong answer never counts:

- ``fanout``: the foreach function ``source`` turns the request body (N) into N items,
  one ``item`` node runs per item, and the foreach's aggregator summarises what it saw
  (count, distinct indices, min, max, items whose key and value disagree); the check
  wants exactly the indices 0..N-1, each once. flowloom runs N + 2 steps for it:
  the foreach split (``source``), N ``item`` nodes and the join (the aggregator).
- ``chain``: N ``hop`` nodes in a line, each adding one to the counter it receives;
  the check wants N at the end.
- ``dags``: M requests of ``a -> (b, c) -> d``; ``b`` and ``c`` tag the index they got
  from ``a``, ``d``'s aggregator checks that both tags carry the same index and passes
  it on; the check wants each request's own index back.

The Celery peer (``celery_peer.py``) reuses the same payloads, summaries and checks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flowloom import Context, Dag, FlowService, Workflow

__all__ = [
    "Sizes",
    "Timing",
    "WORKLOADS",
    "WorkloadError",
    "chain_flow",
    "check_chain",
    "check_dag",
    "check_fanout",
    "dag_join",
    "expected_fanout",
    "fanout_summary",
    "hop",
    "measure",
    "payload",
    "register",
    "run_chain",
    "run_dags",
    "run_fanout",
    "tag",
]

WORKLOADS = ("fanout", "chain", "dags")
FANOUT_FLOW = "bench-fanout"
DAGS_FLOW = "bench-dags"


class WorkloadError(AssertionError):
    """A run produced a wrong result: its figure must not count."""


@dataclass(frozen=True)
class Sizes:
    fanout: int = 1000  # N items
    chain: int = 200  # N hops
    dags: int = 500  # M requests of 4 tasks


# -- payloads and checks (shared with the Celery peer) --------------------------------------
def payload(i: int) -> bytes:
    """The 16-byte payload carrying the number ``i``."""
    return b"%016d" % i


def tag(letter: bytes, data: bytes) -> bytes:
    """``data`` (a payload) with its first digit replaced by ``letter``: still 16 bytes."""
    return letter + data[1:]


def fanout_summary(items: Iterable[tuple[str | None, bytes]]) -> bytes:
    """What the fan-out aggregator saw: count, distinct indices, min, max, and how many
    items came under a key that is not their own index (``key`` None: not checked)."""
    count = bad = 0
    seen: set[int] = set()
    for key, value in items:
        index = int(value)
        count += 1
        seen.add(index)
        if len(value) != 16 or (key is not None and key != str(index)):
            bad += 1
    low, high = (min(seen), max(seen)) if seen else (-1, -1)
    return b"count=%d distinct=%d min=%d max=%d bad=%d" % (count, len(seen), low, high, bad)


def expected_fanout(n: int) -> bytes:
    return fanout_summary((str(i), payload(i)) for i in range(n))


def check_fanout(result: bytes, n: int) -> None:
    if result != expected_fanout(n):
        raise WorkloadError(f"fanout of {n}: aggregate saw {result!r}")


def check_chain(result: bytes, n: int) -> None:
    if result != payload(n):
        raise WorkloadError(f"chain of {n}: last output {result!r}, expected {payload(n)!r}")


def dag_join(b: bytes, c: bytes) -> bytes:
    """``d``'s aggregation: ``b`` and ``c`` must carry the same request's index."""
    if b[:1] != b"b" or c[:1] != b"c" or b[1:] != c[1:]:
        return b"x" * 16
    return tag(b"d", b)


def check_dag(result: bytes, i: int) -> None:
    expected = tag(b"d", payload(i))
    if result != expected:
        raise WorkloadError(f"dag request {i}: d returned {result!r}, expected {expected!r}")


# -- the flows -------------------------------------------------------------------------------
Options = dict[str, list[str]]


def fanout_source(data: bytes) -> dict[str, bytes]:
    return {str(i): payload(i) for i in range(int(data))}


def fanout_item(data: bytes, options: Options) -> bytes:
    return data


def fanout_aggregate(outputs: dict[str, bytes]) -> bytes:
    return fanout_summary(outputs.items())


def define_fanout(workflow: Workflow, context: Context) -> None:
    items = workflow.dag.foreach_branch("source", fanout_source, aggregator=fanout_aggregate)
    items.node("item", fanout_item)


def hop(data: bytes, options: Options | None = None) -> bytes:
    return payload(int(data) + 1)


def chain_flow(n: int) -> str:
    return f"bench-chain-{n}"


def define_chain(n: int) -> Callable[[Workflow, Context], None]:
    def define(workflow: Workflow, context: Context) -> None:
        dag: Dag = workflow.dag
        for i in range(n):
            dag.node(f"hop-{i}", hop)
            if i:
                dag.edge(f"hop-{i - 1}", f"hop-{i}")

    return define


def dag_a(data: bytes, options: Options) -> bytes:
    return data


def dag_b(data: bytes, options: Options) -> bytes:
    return tag(b"b", data)


def dag_c(data: bytes, options: Options) -> bytes:
    return tag(b"c", data)


def dag_d_aggregate(outputs: dict[str, bytes]) -> bytes:
    if outputs.keys() != {"b", "c"}:
        return b"x" * 16
    return dag_join(outputs["b"], outputs["c"])


def dag_d(data: bytes, options: Options) -> bytes:
    return data


def define_dags(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("a", dag_a)
    dag.node("b", dag_b)
    dag.node("c", dag_c)
    dag.node("d", dag_d, aggregator=dag_d_aggregate)
    dag.edge("a", "b")
    dag.edge("a", "c")
    dag.edge("b", "d")
    dag.edge("c", "d")


def register(fs: FlowService, sizes: Sizes) -> None:
    """Register the three flows (the chain's has ``sizes.chain`` nodes) on ``fs``."""
    fs.register(FANOUT_FLOW, define_fanout)
    fs.register(chain_flow(sizes.chain), define_chain(sizes.chain))
    fs.register(DAGS_FLOW, define_dags)


# -- one timed run on flowloom (any backend) -------------------------------------------------
def run_fanout(fs: FlowService, n: int, timeout: float) -> float:
    start = time.perf_counter()
    request_id = fs.execute(FANOUT_FLOW, payload(n))
    result = fs.result(FANOUT_FLOW, request_id, timeout)
    wall = time.perf_counter() - start
    check_fanout(result, n)
    return wall


def run_chain(fs: FlowService, n: int, timeout: float) -> float:
    name = chain_flow(n)
    start = time.perf_counter()
    request_id = fs.execute(name, payload(0))
    result = fs.result(name, request_id, timeout)
    wall = time.perf_counter() - start
    check_chain(result, n)
    return wall


def run_dags(fs: FlowService, m: int, timeout: float) -> float:
    start = time.perf_counter()
    request_ids = [fs.execute(DAGS_FLOW, payload(i)) for i in range(m)]
    deadline = start + timeout
    results = [
        fs.result(DAGS_FLOW, rid, max(0.001, deadline - time.perf_counter())) for rid in request_ids
    ]
    wall = time.perf_counter() - start
    for i, result in enumerate(results):
        check_dag(result, i)
    return wall


# -- figures ---------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall times (seconds) of the timed runs of one workload at one size."""

    workload: str
    size: int
    walls: list[float] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return {"fanout": self.size + 2, "chain": self.size, "dags": 4 * self.size}[self.workload]

    def figure(self, wall: float) -> float:
        """tasks/s for fanout and dags, ms per hop for chain."""
        if self.workload == "chain":
            return wall / self.size * 1000.0
        return self.tasks / wall

    @property
    def unit(self) -> str:
        return "ms/hop" if self.workload == "chain" else "tasks/s"

    @property
    def higher_is_better(self) -> bool:
        return self.workload != "chain"

    def figures(self) -> tuple[float, float, float]:
        """(median, worst, best) of the figure over the timed runs."""
        values = sorted(self.figure(w) for w in self.walls)
        median = statistics.median(values)
        worst, best = (values[0], values[-1]) if self.higher_is_better else (values[-1], values[0])
        return median, worst, best

    def requests_per_s(self) -> float:
        return self.size / statistics.median(self.walls)


def measure(workload: str, size: int, run: Callable[[], float], runs: int) -> Timing:
    """Warm up once, then time ``runs`` runs (each checks its own result)."""
    run()
    timing = Timing(workload, size)
    for _ in range(runs):
        timing.walls.append(run())
    return timing
