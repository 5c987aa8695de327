"""Random valid DAGs: the engine's result equals a straightforward recursive evaluation.

Each generated flow is run twice: through ``FlowService`` (threads, real concurrency),
and step by step in a shuffled order with some tasks delivered twice, which must
change nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowloom import Dag, FlowService, engine
from flowloom.backends import MemoryBackend, RequestRecord
from flowloom.registry import Registry
from flowloom.worker import Worker


def handler(name):
    def run(data, options):
        return data[-40:] + b"." + name.encode()

    return run


def aggregate(responses):
    return (
        b"(" + b"+".join(k.encode() + b"=" + v[-20:] for k, v in sorted(responses.items())) + b")"
    )


def forward(data):
    return data + b">"


def condition(data):
    return [[], ["a"], ["a", "b"]][len(data) % 3]


def foreach(data):
    return {f"i{i}": data[-5:] + str(i).encode() for i in range(len(data) % 3)}


@dataclass
class V:
    name: str
    kind: str  # node | subdag | cond | each
    children: list[G] = field(default_factory=list)


@dataclass
class E:
    source: int
    target: int
    ordering: bool
    forwarder: bool


@dataclass
class G:
    vertices: list[V]
    edges: list[E]


@st.composite
def graphs(draw, depth=0, prefix="v"):
    n = draw(st.integers(1, 4 if depth else 5))
    vertices = []
    for i in range(n):
        kinds = ["node"] if depth >= 2 else ["node", "node", "subdag", "cond", "each"]
        kind = draw(st.sampled_from(kinds))
        name = f"{prefix}{i}"
        children = []
        if kind in ("subdag", "each"):
            children = [draw(graphs(depth + 1, name + "x"))]
        elif kind == "cond":
            children = [draw(graphs(depth + 1, name + "a")), draw(graphs(depth + 1, name + "b"))]
        vertices.append(V(name, kind, children))
    edges = []
    for j in range(1, n):
        for i in range(j):
            if draw(st.booleans()):
                edges.append(E(i, j, draw(st.booleans()), draw(st.booleans())))
    # exactly one last vertex: link every other sink to the last vertex
    for i in range(n - 1):
        if not any(e.source == i for e in edges):
            edges.append(E(i, n - 1, draw(st.booleans()), False))
    # branch vertices take at most one data input
    for j, vertex in enumerate(vertices):
        data_in = [e for e in edges if e.target == j and not e.ordering]
        if vertex.kind != "node":
            for e in data_in[1:]:
                e.ordering, e.forwarder = True, False
        for e in edges:
            if e.ordering:
                e.forwarder = False
    return G(vertices, edges)


def build(g: G, dag: Dag) -> Dag:
    for v in g.vertices:
        j = g.vertices.index(v)
        data_in = [e for e in g.edges if e.target == j and not e.ordering]
        if v.kind == "node":
            dag.node(v.name, handler(v.name), aggregator=aggregate if len(data_in) > 1 else None)
        elif v.kind == "subdag":
            dag.subdag(v.name, build(v.children[0], Dag()))
        elif v.kind == "each":
            build(v.children[0], dag.foreach_branch(v.name, foreach, aggregator=aggregate))
        else:
            branches = dag.conditional_branch(v.name, ["a", "b"], condition, aggregator=aggregate)
            build(v.children[0], branches["a"])
            build(v.children[1], branches["b"])
    for e in g.edges:
        dag.edge(
            g.vertices[e.source].name,
            g.vertices[e.target].name,
            ordering_only=e.ordering,
            forwarder=forward if e.forwarder else None,
        )
    return dag


def evaluate(g: G, data: bytes) -> bytes:
    """The reference: evaluate vertices in index order (a topological order)."""
    outputs: list[bytes] = []
    for j, v in enumerate(g.vertices):
        incoming = [e for e in g.edges if e.target == j]
        inputs = {
            g.vertices[e.source].name: forward(outputs[e.source])
            if e.forwarder
            else outputs[e.source]
            for e in incoming
            if not e.ordering
        }
        if not incoming:
            x = data
        elif len(inputs) > 1:
            x = aggregate(inputs)
        else:
            x = next(iter(inputs.values()), b"")
        if v.kind == "node":
            outputs.append(handler(v.name)(x, {}))
        elif v.kind == "subdag":
            outputs.append(evaluate(v.children[0], x))
        elif v.kind == "each":
            items = foreach(x)
            outputs.append(
                aggregate({k: evaluate(v.children[0], item) for k, item in items.items()})
            )
        else:
            keys = condition(x)
            branches = dict(zip(["a", "b"], v.children, strict=True))
            outputs.append(aggregate({k: evaluate(branches[k], x) for k in keys}))
    return outputs[-1]


def define_for(g: G):
    def define(workflow, context):
        build(g, workflow.dag)

    return define


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.binary(min_size=0, max_size=8))
def test_engine_matches_reference(g, body):
    expected = evaluate(g, body)
    with FlowService(worker_concurrency=3) as fs:
        fs.register("random", define_for(g))
        assert fs.run("random", body, timeout=20) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.binary(min_size=0, max_size=8), st.randoms(use_true_random=False))
def test_shuffled_and_duplicated_deliveries_change_nothing(g, body, rnd: random.Random):
    backend = MemoryBackend()
    registry = Registry()
    plan = registry.register("random", define_for(g))
    worker = Worker(backend, registry, concurrency=1)
    record = RequestRecord("r1", "random", plan.version, body, {})
    backend.submit(record, engine.start(plan, body))
    pending = []
    for _ in range(10_000):
        while (task := backend.claim("w", 0)) is not None:
            pending.append(task)
        if not pending:
            break
        task = pending.pop(rnd.randrange(len(pending)))
        worker.execute(task)
        if rnd.random() < 0.3:
            worker.execute(task)  # delivered twice
    state = backend.state("r1")
    assert state is not None
    assert state.status.value == "completed", state.error
    assert backend.result("r1") == evaluate(g, body)
