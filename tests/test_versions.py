"""A flow's version changes with anything that changes how it runs, and only then."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from flowloom import Dag, FlowService, Workflow
from flowloom.plan import compile_workflow


def a(data, options):
    return data


def tagged(data, options, tag=b""):
    return data + tag


def b(data, options):
    return data


def merge(responses):
    return b"".join(responses.values())


def merge2(responses):
    return b"".join(responses.values())


def pick(data):
    return ["x"]


def pick2(data):
    return ["x"]


def items(data):
    return {"k": data}


def items2(data):
    return {"k": data}


def fallback(error, data):
    return b"fallback"


def fallback2(error, data):
    return b"fallback"


def forward(data):
    return data


def hook(arg):
    pass


def hook2(arg):
    pass


def build(wf: Workflow, **change: Any) -> None:
    """The base flow; ``change`` swaps one of its parts."""
    dag = wf.dag
    dag.node(
        change.get("name", "first"),
        *change.get("handlers", (a,)),
        retries=change.get("retries", 2),
        backoff=change.get("backoff", 0.5),
        timeout=change.get("timeout", 10.0),
        on_failure=change.get("on_failure", fallback),
    )
    dag.node("second", a)
    dag.node("join", a, aggregator=change.get("aggregator", merge))
    branches = dag.conditional_branch("cond", ["x", "y"], change.get("condition", pick))
    branches["x"].node("bx", a)
    branches["y"].node("by", a)
    dag.foreach_branch("each", change.get("foreach", items)).node("item", a)
    first = change.get("name", "first")
    dag.edge(
        first,
        "second",
        ordering_only=change.get("ordering_only", False),
        forwarder=change.get("forwarder"),
    )
    dag.edge(first, "join")
    dag.edge("second", "join")
    dag.edge("join", "cond")
    dag.edge("cond", "each")
    wf.on_failure(change.get("failure_hook", hook))
    wf.finally_(change.get("finally_hook", hook))


def version(**change: Any) -> str:
    wf = Workflow(change.pop("flow", "flow"))
    build(wf, **change)
    return compile_workflow(wf).version


CHANGES: dict[str, dict[str, Any]] = {
    "flow name": {"flow": "other"},
    "vertex name": {"name": "premier"},
    "handler": {"handlers": (b,)},
    "handlers piped": {"handlers": (a, b)},
    "handler order": {"handlers": (b, a)},
    "retries": {"retries": 3},
    "backoff": {"backoff": 0.25},
    "timeout": {"timeout": 5.0},
    "no timeout": {"timeout": None},
    "on_failure": {"on_failure": fallback2},
    "no on_failure": {"on_failure": None},
    "aggregator": {"aggregator": merge2},
    "condition": {"condition": pick2},
    "foreach": {"foreach": items2},
    "ordering-only edge": {"ordering_only": True},
    "forwarder": {"forwarder": forward},
    "failure hook": {"failure_hook": hook2},
    "finally hook": {"finally_hook": hook2},
}


def test_the_same_definition_gives_the_same_version():
    assert version() == version()


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_each_behaviour_change_gives_a_new_version(change):
    assert version(**change) != version()


def test_every_change_gives_a_version_of_its_own():
    versions = {name: version(**c) for name, c in CHANGES.items()}
    assert len(set(versions.values())) == len(versions)


def test_a_changed_branch_or_subdag_gives_a_new_version():
    def flow(
        inner: Callable[[Dag], object], sub_handler: Callable[..., Any], other: str = "y"
    ) -> str:
        wf = Workflow("flow")
        sub = Dag().node("s", sub_handler)
        branches = wf.dag.conditional_branch("c", ["x", other], pick)
        inner(branches["x"])
        branches[other].node("n", a)
        wf.dag.subdag("sub", sub)
        wf.dag.edge("c", "sub")
        return compile_workflow(wf).version

    base = flow(lambda d: d.node("n", a), a)
    assert flow(lambda d: d.node("n", a), a) == base
    assert flow(lambda d: d.node("n", b), a) != base  # inside a branch
    assert flow(lambda d: d.node("n", a), b) != base  # inside a sub-DAG
    assert flow(lambda d: d.node("n", a).node("m", a).edge("n", "m"), a) != base
    assert flow(lambda d: d.node("n", a), a, other="z") != base  # a branch key


def test_a_backoff_change_reregistered_gives_a_new_version_and_keeps_the_old_plan():
    with FlowService() as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", a, retries=1, backoff=1.0))
        old = fs.registry.latest("flow").version
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", a, retries=1, backoff=0.1))
        new = fs.registry.latest("flow").version
        assert new != old
        assert fs.registry.version("flow", old).steps["n"].backoff == 1.0
        assert fs.registry.version("flow", new).steps["n"].backoff == 0.1


class Handler:
    def __call__(self, data, options):
        return data

    def method(self, data, options):
        return data


def test_versions_never_depend_on_memory_addresses():
    """Each process compiles the flow on its own: a partial, a callable object or a bound
    method must name the same code in all of them (a repr with an address would not)."""

    def with_handler(make: Callable[[], Any]) -> str:
        wf = Workflow("flow")
        wf.dag.node("n", make())
        return compile_workflow(wf).version

    for make in (
        lambda: functools.partial(a),
        lambda: functools.partial(tagged, tag=b"!"),
        lambda: Handler(),
        lambda: Handler().method,
    ):
        assert with_handler(make) == with_handler(make)
    assert with_handler(lambda: functools.partial(a)) != with_handler(lambda: functools.partial(b))
    assert with_handler(lambda: Handler()) != with_handler(lambda: Handler().method)


def test_one_app_file_gives_one_version_under_any_module_name(tmp_path):
    """A client imports the app as ``app``, the CLI loads it as ``flowloom_app_app``, a
    script runs it as ``__main__``: all must agree on the version."""
    import importlib.util

    path = tmp_path / "app.py"
    path.write_text(
        "from flowloom import FlowService\nfs = FlowService()\n"
        "def handler(data, options):\n    return data\n"
        "def define(wf, ctx):\n"
        "    wf.dag.node('n', handler, on_failure=lambda e, d: d)\n"
        "    wf.on_failure(print)\n"
        "fs.register('f', define)\n"
    )
    versions = set()
    for name in ("app", "flowloom_app_app", "__main__"):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        versions.add(module.fs.registry.latest("f").version)
        module.fs.close()
    assert len(versions) == 1
