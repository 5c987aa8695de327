"""Broken definitions are rejected at registration with an error naming the vertex."""

import json

import pytest

from flowloom import Dag, DefinitionError, FlowService


def ok(data, options):
    return data


def register(define):
    with FlowService() as fs:
        fs.register("flow", define)


def rejected(define, vertex, *words):
    with pytest.raises(DefinitionError) as info:
        register(define)
    assert info.value.vertex == vertex, str(info.value)
    for word in words:
        assert word in str(info.value)
    return info.value


def test_edge_to_unknown_vertex():
    def define(wf, ctx):
        wf.dag.node("a", ok)
        wf.dag.edge("a", "ghost")

    rejected(define, "ghost", "unknown vertex")


def test_edge_from_unknown_vertex_inside_subdag():
    sub = Dag()
    sub.node("x", ok)
    sub.edge("nope", "x")

    def define(wf, ctx):
        wf.dag.subdag("s", sub)

    rejected(define, "nope", "unknown vertex", "sub-DAG 's'")


def test_duplicate_vertex():
    def define(wf, ctx):
        wf.dag.node("a", ok)
        wf.dag.node("a", ok)

    rejected(define, "a", "duplicate vertex")


def test_duplicate_vertex_across_kinds():
    def define(wf, ctx):
        wf.dag.node("a", ok)
        wf.dag.foreach_branch("a", lambda d: {})

    rejected(define, "a", "duplicate vertex")


def test_duplicate_edge():
    def define(wf, ctx):
        wf.dag.node("a", ok).node("b", ok)
        wf.dag.edge("a", "b")
        wf.dag.edge("a", "b")

    rejected(define, "b", "duplicate edge")


def test_cycle():
    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", ok).node("b", ok).node("c", ok).node("end", ok)
        dag.edge("a", "b").edge("b", "c").edge("c", "b").edge("c", "end")

    error = rejected(define, "b", "cycle")
    assert "'c'" in str(error)


def test_self_loop():
    def define(wf, ctx):
        wf.dag.node("a", ok)
        wf.dag.edge("a", "a")

    rejected(define, "a", "cycle")


def test_cycle_inside_foreach_branch():
    def define(wf, ctx):
        branch = wf.dag.foreach_branch("each", lambda d: {"k": d})
        branch.node("x", ok).node("y", ok)
        branch.edge("x", "y").edge("y", "x")

    rejected(define, "x", "cycle", "foreach 'each'")


def test_subdag_containing_itself():
    dag = Dag()
    dag.node("a", ok)
    dag.subdag("me", dag)
    dag.edge("a", "me")

    def define(wf, ctx):
        wf.dag.subdag("outer", dag)

    rejected(define, "sub-DAG 'outer/me'", "contains itself")


def test_fan_in_without_aggregator():
    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", ok).node("b", ok).node("c", ok).node("join", ok)
        dag.edge("a", "b").edge("a", "c").edge("b", "join").edge("c", "join")

    rejected(define, "join", "aggregator")


def test_fan_in_with_ordering_edge_needs_no_aggregator():
    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", ok).node("b", ok).node("c", ok).node("join", ok)
        dag.edge("a", "b").edge("a", "c").edge("b", "join").edge("c", "join", ordering_only=True)

    register(define)


def test_fan_in_into_branch_vertex():
    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", ok).node("b", ok)
        dag.foreach_branch("each", lambda d: {}).node("x", ok)
        dag.edge("a", "each").edge("b", "each")

    rejected(define, "each", "merge them")


def test_aggregator_without_inputs():
    def define(wf, ctx):
        wf.dag.node("a", ok, aggregator=lambda r: b"")

    rejected(define, "a", "no data edge")


def test_empty_workflow():
    rejected(lambda wf, ctx: None, "workflow 'flow'", "empty")


def test_empty_conditional_branch():
    def define(wf, ctx):
        branches = wf.dag.conditional_branch("c", ["pass", "fail"], lambda d: ["pass"])
        branches["pass"].node("x", ok)

    rejected(define, "branch 'fail' of conditional 'c'", "empty")


def test_empty_foreach_branch():
    def define(wf, ctx):
        wf.dag.foreach_branch("each", lambda d: {})

    rejected(define, "branch of foreach 'each'", "empty")


def test_empty_subdag():
    def define(wf, ctx):
        wf.dag.subdag("s", Dag())

    rejected(define, "sub-DAG 's'", "empty")


def test_several_last_vertices():
    def define(wf, ctx):
        wf.dag.node("a", ok).node("b", ok)

    rejected(define, "a", "several last vertices", "'b'")


def test_subdag_factory_returning_garbage():
    def define(wf, ctx):
        wf.dag.subdag("s", lambda: 42)

    rejected(define, "s", "must return a Dag")


def test_subdag_factory_raising():
    def factory():
        raise RuntimeError("boom")

    def define(wf, ctx):
        wf.dag.subdag("s", factory)

    rejected(define, "s", "RuntimeError", "boom")


@pytest.mark.parametrize(
    ("build", "vertex", "words"),
    [
        (lambda d: d.node("a"), "a", "at least one handler"),
        (lambda d: d.node("a", "not callable"), "a", "handler must be callable"),
        (lambda d: d.node("a", ok, retries=-1), "a", "retries"),
        (lambda d: d.node("a", ok, timeout=0), "a", "timeout"),
        (lambda d: d.node("a/b", ok), "a/b", "name"),
        (lambda d: d.node("", ok), "", "name"),
        (lambda d: d.conditional_branch("c", [], lambda x: []), "c", "non-empty list"),
        (lambda d: d.conditional_branch("c", ["k", "k"], lambda x: []), "c", "duplicate condition"),
        (lambda d: d.conditional_branch("c", ["bad key"], lambda x: []), "bad key", "name"),
        (lambda d: d.foreach_branch("f", None), "f", "foreach must be callable"),
        (lambda d: d.edge("a", "b", ordering_only=True, forwarder=ok), "b", "ordering-only"),
    ],
)
def test_bad_arguments(build, vertex, words):
    with pytest.raises(DefinitionError) as info:
        build(Dag())
    assert info.value.vertex == vertex
    assert words in str(info.value)


def test_define_workflow_raising_is_a_definition_error():
    def define(wf, ctx):
        raise ValueError("typo in my flow")

    with pytest.raises(DefinitionError, match="typo in my flow"):
        register(define)


def test_bad_flow_name():
    with FlowService() as fs, pytest.raises(DefinitionError, match="flow name"):
        fs.register("my flow", lambda wf, ctx: wf.dag.node("a", ok))


def test_rejected_registration_keeps_the_previous_definition():
    with FlowService() as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("a", lambda d, o: b"v1"))
        with pytest.raises(DefinitionError):
            fs.register("flow", lambda wf, ctx: None)
        assert fs.run("flow", b"", timeout=5) == b"v1"


@pytest.mark.parametrize(
    ("build", "vertex", "words"),
    [
        (lambda d: d.node("a", lambda data: data), "a", "must accept (data, options)"),
        (lambda d: d.node("a", lambda d, o: d, aggregator=lambda: b""), "a", "aggregator"),
        (lambda d: d.node("a", lambda d, o: d, on_failure=lambda e: b""), "a", "(error, data)"),
        (lambda d: d.edge("a", "b", forwarder=lambda d, o: d), "b", "forwarder"),
        (lambda d: d.conditional_branch("c", ["k"], lambda: ["k"]), "c", "condition"),
        (lambda d: d.foreach_branch("f", lambda a, b: {}), "f", "foreach"),
        (lambda d: d.subdag("s", lambda x: Dag()), "s", "sub-DAG"),
    ],
)
def test_callables_with_the_wrong_arguments_are_rejected_at_definition(build, vertex, words):
    with pytest.raises(DefinitionError) as info:
        build(Dag())
    assert info.value.vertex == vertex
    assert words in str(info.value)


def test_callables_that_accept_more_are_fine():
    class Handler:
        def __call__(self, data, options, extra=None):
            return data

    dag = Dag()
    dag.node("a", Handler(), lambda *args: args[0], print)
    dag.node("b", lambda d, o, **kw: d)
    dag.edge("a", "b", forwarder=lambda d, *rest: d)


def test_hooks_with_the_wrong_arguments():
    def define(wf, ctx):
        wf.dag.node("a", ok)
        wf.on_failure(lambda: None)

    with pytest.raises(DefinitionError, match="on_failure hook"):
        register(define)


def nested(depth, mixed=False):
    """A flow of ``depth`` levels of sub-DAGs (with ``mixed``, every other level a
    foreach or a conditional branch holding the next sub-DAG), a node at the bottom."""
    inner = Dag().node("leaf", lambda data, options: data + b"!")
    level = 0
    while level < depth:
        outer = Dag()
        if mixed and level % 4 == 1 and level + 2 <= depth:
            branch = outer.foreach_branch(
                f"v{level}", lambda data: {"k": data}, lambda outputs: outputs["k"]
            )
            branch.subdag("in", inner)
            level += 2
        elif mixed and level % 4 == 3 and level + 2 <= depth:
            branches = outer.conditional_branch(f"v{level}", ["go"], lambda data: ["go"])
            branches["go"].subdag("in", inner)
            level += 2
        else:
            outer.subdag(f"v{level}", inner)
            level += 1
        inner = outer

    def define(wf, ctx):
        wf.dag.subdag("top", inner)

    return define


@pytest.mark.parametrize("mixed", [False, True])
def test_nesting_a_hundred_levels_deep_runs_and_deeper_is_rejected_naming_the_vertex(mixed):
    with FlowService() as fs:
        fs.register("deep", nested(99, mixed))  # with "top": 100 levels
        assert fs.run("deep", b"x", timeout=30) == b"x!"
        assert json.dumps(fs.definition("deep")).count('"leaf"') == 1
    with pytest.raises(DefinitionError) as info:
        register(nested(100, mixed))
    assert "nested 101 levels deep: at most 100 are taken" in str(info.value)
    assert info.value.vertex is not None
    assert info.value.vertex.startswith("top/")
    with pytest.raises(DefinitionError, match="levels deep"):
        register(nested(5_000))  # not a RecursionError
