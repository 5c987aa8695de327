"""The per-request context: isolated between concurrent requests, shared within one."""

from __future__ import annotations

import threading
import time

import pytest

from flowloom import Context, FlowloomError, FlowService, Request


def test_context_isolation_across_100_concurrent_requests():
    lock = threading.Lock()
    seen: dict[str, list[str]] = {}

    def define(wf, context: Context):
        def remember(data, options):
            context.set("me", data.decode())
            context.set("count", {"n": 1})
            time.sleep(0.001)
            return data

        def each_item(data, options):
            with lock:
                seen.setdefault(context.request_id, []).append(context.get("me"))
            return context.get("me").encode()

        def check(data, options):
            assert context.get("count") == {"n": 1}
            context.delete("count")
            assert context.get("count", "gone") == "gone"
            return f"{context.request_id}:{context.get('me')}:{options['tag'][0]}"

        dag = wf.dag
        dag.node("remember", remember)
        each = dag.foreach_branch(
            "each",
            lambda d: {str(i): d for i in range(3)},
            aggregator=lambda r: b"".join(r.values()),
        )
        each.node("item", each_item)
        dag.node("check", check)
        dag.edge("remember", "each").edge("each", "check")

    with FlowService(worker_concurrency=8) as fs:
        fs.register("flow", define)
        ids = {
            fs.execute(
                "flow", Request(body=b"body%d" % i, request_id=f"req-{i}", query={"tag": [str(i)]})
            ): i
            for i in range(100)
        }
        for rid, i in ids.items():
            assert fs.result("flow", rid, timeout=30) == f"{rid}:body{i}:{i}".encode()
    assert len(seen) == 100
    for rid, values in seen.items():
        assert values == [f"body{ids[rid]}"] * 3


def test_bytes_and_json_values_round_trip():
    def define(wf, context):
        def handler(data, options):
            context.set("raw", b"\x00\xff")
            context.set("obj", [1, "two", None])
            return repr((context.get("raw"), context.get("obj"), context.get("missing", 7)))

        wf.dag.node("n", handler)

    with FlowService() as fs:
        fs.register("flow", define)
        assert fs.run("flow", b"", timeout=10) == repr((b"\x00\xff", [1, "two", None], 7)).encode()


def test_unserialisable_value_fails_the_request_clearly():
    def define(wf, context):
        wf.dag.node("n", lambda d, o: context.set("k", object()))

    with FlowService() as fs:
        fs.register("flow", define)
        with pytest.raises(FlowloomError, match="not bytes nor JSON"):
            fs.run("flow", b"", timeout=10)


def test_context_outside_a_request_raises():
    holder = {}

    def define(wf, context):
        holder["ctx"] = context
        wf.dag.node("n", lambda d, o: d)

    with FlowService() as fs:
        fs.register("flow", define)
    with pytest.raises(FlowloomError, match="no request is running"):
        holder["ctx"].request_id
