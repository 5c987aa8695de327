"""How long defining and registering a flow of N nodes takes: ``python -m bench.define_scale``.

A chain of N nodes (N - 1 edges) and a fan of N nodes after one (N - 1 edges into a
join of all of them is not taken: one vertex with N inputs), registered on an embedded
service; prints seconds per size and the ratio to the smallest size per node (1.0:
linear).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from flowloom import FlowService


def _chain(n: int) -> Any:
    def define(workflow: Any, context: Any) -> None:
        for i in range(n):
            workflow.dag.node(f"n{i}", lambda data, options: data)
            if i:
                workflow.dag.edge(f"n{i - 1}", f"n{i}")

    return define


def _fan(n: int) -> Any:
    def define(workflow: Any, context: Any) -> None:
        workflow.dag.node("first", lambda data, options: data)
        workflow.dag.node("last", lambda data, options: data, aggregator=lambda o: b"")
        for i in range(n):
            workflow.dag.node(f"n{i}", lambda data, options: data)
            workflow.dag.edge("first", f"n{i}")
            workflow.dag.edge(f"n{i}", "last")

    return define


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    for shape, make in (("chain", _chain), ("fan", _fan)):
        per_node = []
        for n in sizes:
            with FlowService() as fs:
                started = time.perf_counter()
                fs.register(f"{shape}{n}", make(n))
                took = time.perf_counter() - started
            per_node.append(took / n)
            ratio = per_node[-1] / per_node[0]
            print(f"{shape:5} {n:>7,} nodes: {took:7.3f} s to register ({ratio:.2f}x per node)")


if __name__ == "__main__":
    main()
