"""Each construct alone and nested, run on the embedded backend."""

from __future__ import annotations

import asyncio
import json

import pytest

from flowloom import Dag, FlowService, Request, RequestFailed, Status


@pytest.fixture
def fs():
    with FlowService(worker_concurrency=4) as service:
        yield service


def tag(label):
    def handler(data, options):
        return data + b"|" + label.encode()

    return handler


def run(fs, define, body=b"", **kwargs):
    fs.register("flow", define)
    return fs.run("flow", Request(body=body, **kwargs), timeout=10)


def addresses(fs, request_id):
    return {a: v.status for a, v in fs.state("flow", request_id).vertices.items()}


def test_single_node_gets_body_and_query(fs):
    seen = {}

    def handler(data, options):
        seen.update(options)
        return b'you said "%s"' % data

    assert (
        run(
            fs,
            lambda wf, ctx: wf.dag.node("test", handler),
            b"hallo",
            query={"a": ["1", "2"], "b": "x"},
        )
        == b'you said "hallo"'
    )
    assert seen == {"a": ["1", "2"], "b": ["x"]}


def test_piped_handlers_run_in_order(fs):
    assert (
        run(fs, lambda wf, ctx: wf.dag.node("n", tag("1"), tag("2"), tag("3")), b"in")
        == b"in|1|2|3"
    )


def test_async_and_sync_handlers_mix(fs):
    async def slow_upper(data, options):
        await asyncio.sleep(0.01)
        return data.upper()

    def define(wf, ctx):
        wf.dag.node("a", slow_upper, tag("sync")).node("b", slow_upper)
        wf.dag.edge("a", "b")

    assert run(fs, define, b"ab") == b"AB|SYNC"


def test_str_and_none_results(fs):
    def define(wf, ctx):
        wf.dag.node("a", lambda d, o: "héllo").node("b", lambda d, o: None).node(
            "c", lambda d, o: d + b"!"
        )
        wf.dag.edge("a", "b").edge("b", "c")

    assert run(fs, define) == b"!"


def test_chain_passes_data_along(fs):
    def define(wf, ctx):
        dag = wf.dag
        for i in range(5):
            dag.node(f"n{i}", tag(str(i)))
            if i:
                dag.edge(f"n{i - 1}", f"n{i}")

    assert run(fs, define, b"x") == b"x|0|1|2|3|4"


def test_aggregator_sees_each_parent_by_name(fs):
    def define(wf, ctx):
        dag = wf.dag
        dag.node("src", tag("src")).node("left", tag("L")).node("right", tag("R"))
        dag.node(
            "join",
            tag("J"),
            aggregator=lambda r: json.dumps({k: v.decode() for k, v in r.items()}, sort_keys=True),
        )
        dag.edge("src", "left").edge("src", "right").edge("left", "join").edge("right", "join")

    out = run(fs, define, b"x")
    assert out == b'{"left": "x|src|L", "right": "x|src|R"}|J'


def test_ordering_edge_waits_but_passes_no_data(fs):
    order = []

    def record(name):
        def handler(data, options):
            order.append(name)
            return data + name.encode()

        return handler

    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", record("a")).node("slow", lambda d, o: (order.append("slow"), b"S")[1]).node(
            "b", record("b")
        )
        dag.edge("a", "slow", ordering_only=True).edge("slow", "b").edge(
            "a", "b", ordering_only=True
        )

    assert run(fs, define, b"in") == b"Sb"
    assert order == ["a", "slow", "b"]


def test_node_with_only_ordering_inputs_gets_empty_bytes(fs):
    def define(wf, ctx):
        wf.dag.node("a", tag("a")).node("b", lambda d, o: b"got[" + d + b"]")
        wf.dag.edge("a", "b", ordering_only=True)

    assert run(fs, define, b"body") == b"got[]"


def test_forwarder_transforms_data_on_the_edge(fs):
    def define(wf, ctx):
        wf.dag.node("a", tag("a")).node("b", tag("b"))
        wf.dag.edge("a", "b", forwarder=lambda d: d.upper())

    assert run(fs, define, b"x") == b"X|A|b"


def test_subdag_instance_or_factory(fs):
    def validation() -> Dag:
        dag = Dag()
        dag.node("verify", tag("verify")).node("detect", tag("detect"))
        dag.edge("verify", "detect")
        return dag

    def define(wf, ctx):
        dag = wf.dag
        dag.node("get", tag("get"))
        dag.subdag("check", validation)
        dag.subdag("again", validation())
        dag.node("mark", tag("mark"))
        dag.edge("get", "check").edge("check", "again").edge("again", "mark")

    fs.register("flow", define)
    rid = fs.execute("flow", b"img")
    assert fs.result("flow", rid, timeout=10) == b"img|get|verify|detect|verify|detect|mark"
    assert set(addresses(fs, rid)) == {
        "get",
        "check/verify",
        "check/detect",
        "again/verify",
        "again/detect",
        "mark",
    }


def test_subdag_with_two_entry_vertices_feeds_both(fs):
    sub = Dag()
    sub.node("x", tag("x")).node("y", tag("y")).node(
        "z", tag("z"), aggregator=lambda r: r["x"] + b"&" + r["y"]
    )
    sub.edge("x", "z").edge("y", "z")

    def define(wf, ctx):
        wf.dag.node("a", tag("a"))
        wf.dag.subdag("s", sub)
        wf.dag.edge("a", "s")

    assert run(fs, define, b"i") == b"i|a|x&i|a|y|z"


@pytest.mark.parametrize(
    ("picked", "expected"),
    [([], b"in|pre|post"), (["pass"], b"in|pre|P|post"), (["fail"], b"in|pre|F|post")],
)
def test_conditional_picks_zero_or_one(fs, picked, expected):
    def define(wf, ctx):
        dag = wf.dag
        dag.node("pre", tag("pre"))
        branches = dag.conditional_branch("cond", ["pass", "fail"], lambda d: picked)
        branches["pass"].node("p", tag("P"))
        branches["fail"].node("f", tag("F"))
        dag.node("post", tag("post"))
        dag.edge("pre", "cond").edge("cond", "post")

    fs.register("flow", define)
    rid = fs.execute("flow", b"in")
    assert fs.result("flow", rid, timeout=10) == expected
    ran = set(addresses(fs, rid))
    assert ("cond[pass]/p" in ran) == ("pass" in picked)
    assert ("cond[fail]/f" in ran) == ("fail" in picked)


def test_conditional_picks_several_with_aggregator(fs):
    def define(wf, ctx):
        branches = wf.dag.conditional_branch(
            "cond", ["a", "b", "c"], lambda d: ["a", "c"], aggregator=lambda r: ",".join(sorted(r))
        )
        for key in "abc":
            branches[key].node("n", tag(key))

    assert run(fs, define) == b"a,c"


def test_conditional_aggregator_sees_empty_mapping(fs):
    def define(wf, ctx):
        branches = wf.dag.conditional_branch(
            "cond", ["a"], lambda d: [], aggregator=lambda r: repr(r)
        )
        branches["a"].node("n", tag("a"))

    assert run(fs, define) == b"{}"


def test_conditional_picking_several_without_aggregator_fails(fs):
    def define(wf, ctx):
        branches = wf.dag.conditional_branch("cond", ["a", "b"], lambda d: ["a", "b"])
        branches["a"].node("n", tag("a"))
        branches["b"].node("n", tag("b"))

    fs.register("flow", define)
    with pytest.raises(RequestFailed) as info:
        fs.run("flow", b"", timeout=10)
    assert info.value.error.vertex == "cond"
    assert "no aggregator" in info.value.error.message


@pytest.mark.parametrize("count", [0, 1, 25])
def test_foreach_over_zero_one_many(fs, count):
    def define(wf, ctx):
        dag = wf.dag
        each = dag.foreach_branch(
            "each",
            lambda d: {f"k{i}": b"%d" % i for i in range(count)},
            aggregator=lambda r: json.dumps({k: v.decode() for k, v in sorted(r.items())}),
        )
        each.node("double", lambda d, o: b"%d" % (2 * int(d)))
        dag.node("after", tag("after"))
        dag.edge("each", "after")

    fs.register("flow", define)
    rid = fs.execute("flow", b"")
    out = fs.result("flow", rid, timeout=10)
    assert json.loads(out.removesuffix(b"|after")) == {f"k{i}": str(2 * i) for i in range(count)}
    assert sum(a.startswith("each[") for a in addresses(fs, rid)) == count


def test_foreach_without_aggregator_passes_its_input_on(fs):
    seen = []

    def define(wf, ctx):
        dag = wf.dag
        dag.foreach_branch("each", lambda d: {"a": b"1", "b": b"2"}).node(
            "n", lambda d, o: seen.append(d)
        )
        dag.node("after", tag("after"))
        dag.edge("each", "after")

    assert run(fs, define, b"in") == b"in|after"
    assert sorted(seen) == [b"1", b"2"]


def test_foreach_item_keys_are_escaped_in_addresses(fs):
    def define(wf, ctx):
        wf.dag.foreach_branch(
            "each",
            lambda d: {"a/b": b"1", "[x]": b"2", "": b"3"},
            aggregator=lambda r: ",".join(sorted(r)),
        ).node("n", tag("n"))

    fs.register("flow", define)
    rid = fs.execute("flow", b"")
    assert fs.result("flow", rid, timeout=10) == b",[x],a/b"
    assert {"each[a%2Fb]/n", "each[%5Bx%5D]/n", "each[]/n"} <= set(addresses(fs, rid))


def test_foreach_inside_conditional_inside_subdag(fs):
    def inner() -> Dag:
        dag = Dag()
        dag.node("start", tag("start"))
        branches = dag.conditional_branch(
            "cond", ["many", "one"], lambda d: ["many"] if b"m" in d else ["one"]
        )
        each = branches["many"].foreach_branch(
            "each",
            lambda d: {c: c.encode() for c in "xyz"},
            aggregator=lambda r: b"".join(v for _, v in sorted(r.items())),
        )
        each.node("up", lambda d, o: d.upper())
        branches["one"].node("single", tag("single"))
        dag.edge("start", "cond")
        return dag

    def define(wf, ctx):
        wf.dag.subdag("sub", inner)

    fs.register("flow", define)
    rid = fs.execute("flow", b"m")
    assert fs.result("flow", rid, timeout=10) == b"XYZ"
    assert "sub/cond[many]/each[y]/up" in addresses(fs, rid)
    rid = fs.execute("flow", b"o")
    assert fs.result("flow", rid, timeout=10) == b"o|start|single"


def test_subdag_inside_conditional_inside_foreach(fs):
    sub = Dag()
    sub.node("s1", tag("s1")).node("s2", tag("s2"))
    sub.edge("s1", "s2")

    def define(wf, ctx):
        dag = wf.dag
        each = dag.foreach_branch(
            "users",
            lambda d: {u: u.encode() for u in d.decode().split(",")},
            aggregator=lambda r: b";".join(v for _, v in sorted(r.items())),
        )
        branches = each.conditional_branch(
            "check", ["vip"], lambda d: ["vip"] if d.startswith(b"v") else []
        )
        branches["vip"].subdag("verify", sub)

    fs.register("flow", define)
    rid = fs.execute("flow", b"v1,n2,v3")
    assert fs.result("flow", rid, timeout=10) == b"n2;v1|s1|s2;v3|s1|s2"
    seen = addresses(fs, rid)
    assert "users[v1]/check[vip]/verify/s2" in seen
    assert not any(a.startswith("users[n2]/check[vip]") for a in seen)
    assert all(status is Status.COMPLETED for status in seen.values())


def test_foreach_inside_foreach(fs):
    def define(wf, ctx):
        outer = wf.dag.foreach_branch(
            "rows",
            lambda d: {str(i): b"%d" % i for i in range(3)},
            aggregator=lambda r: b"/".join(v for _, v in sorted(r.items())),
        )
        inner = outer.foreach_branch(
            "cols",
            lambda d: {str(j): d + b"%d" % j for j in range(2)},
            aggregator=lambda r: b",".join(v for _, v in sorted(r.items())),
        )
        inner.node("cell", lambda d, o: d)

    fs.register("flow", define)
    rid = fs.execute("flow", b"")
    assert fs.result("flow", rid, timeout=10) == b"00,01/10,11/20,21"
    assert addresses(fs, rid)["rows[2]/cols[1]/cell"] is Status.COMPLETED


def test_definition_is_json_and_describes_everything(fs):
    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", tag("a"))
        dag.subdag("s", Dag().node("x", tag("x")))
        branches = dag.conditional_branch("c", ["k"], lambda d: ["k"])
        branches["k"].node("y", tag("y"))
        dag.foreach_branch("f", lambda d: {}).node("z", tag("z"))
        dag.edge("a", "s").edge("s", "c", forwarder=lambda d: d).edge("c", "f", ordering_only=True)

    fs.register("flow", define)
    definition = json.loads(json.dumps(fs.definition("flow")))
    kinds = {v["name"]: v["kind"] for v in definition["dag"]["vertices"]}
    assert kinds == {"a": "node", "s": "subdag", "c": "conditional", "f": "foreach"}
    assert [e["kind"] for e in definition["dag"]["edges"]] == ["data", "data", "ordering"]
    assert definition["dag"]["edges"][1]["forwarder"]
