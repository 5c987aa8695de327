"""A failing handler fails its request, never the worker; retries, timeouts, hooks."""

from __future__ import annotations

import threading
import time

import pytest

from flowloom import ErrorInfo, FlowService, RequestFailed, Status


@pytest.fixture
def fs():
    with FlowService(worker_concurrency=3) as service:
        yield service


def ok(data, options):
    return data


def boom(data, options):
    raise ValueError("bad input: " + data.decode())


def failure(fs, body=b"x"):
    with pytest.raises(RequestFailed) as info:
        fs.run("flow", body, timeout=10)
    return info.value.error


def test_raising_handler_fails_request_with_type_message_and_address(fs):
    def define(wf, ctx):
        each = wf.dag.foreach_branch("each", lambda d: {"k1": b"1"})
        each.node("a", ok).node("b", boom)
        each.edge("a", "b")

    fs.register("flow", define)
    rid = fs.execute("flow", b"")
    with pytest.raises(RequestFailed) as info:
        fs.result("flow", rid, timeout=10)
    assert info.value.error == ErrorInfo("each[k1]/b", "ValueError", "bad input: 1")
    state = fs.state("flow", rid)
    assert state.status is Status.FAILED
    assert state.error == info.value.error
    assert state.vertices["each[k1]/b"].status is Status.FAILED
    assert state.vertices["each[k1]/a"].status is Status.COMPLETED


def test_worker_survives_and_other_requests_are_untouched(fs):
    def define(wf, ctx):
        wf.dag.node("n", lambda d, o: boom(d, o) if d == b"bad" else d + b"!")

    fs.register("flow", define)
    ids = [fs.execute("flow", b"bad" if i % 2 else b"good%d" % i) for i in range(40)]
    for i, rid in enumerate(ids):
        if i % 2:
            with pytest.raises(RequestFailed):
                fs.result("flow", rid, timeout=10)
        else:
            assert fs.result("flow", rid, timeout=10) == b"good%d!" % i


@pytest.mark.parametrize(
    ("build", "vertex", "words"),
    [
        (lambda d: d.node("n", lambda x, o: 42), "n", "returned int"),
        (lambda d: d.node("n", lambda x, o: ["list"]), "n", "returned list"),
        (
            lambda d: d.conditional_branch("c", ["a"], lambda x: ["zzz"])["a"].node("n", ok),
            "c",
            "unknown key 'zzz'",
        ),
        (
            lambda d: d.conditional_branch("c", ["a"], lambda x: "a")["a"].node("n", ok),
            "c",
            "expected a list",
        ),
        (lambda d: d.foreach_branch("f", lambda x: [b"1"]).node("n", ok), "f", "expected a dict"),
        (lambda d: d.foreach_branch("f", lambda x: {1: b"1"}).node("n", ok), "f", "expected str"),
        (
            lambda d: d.foreach_branch("f", lambda x: {"k": 1}).node("n", ok),
            "f",
            "foreach item 'k'",
        ),
        (lambda d: d.foreach_branch("f", lambda x: 1 / 0).node("n", ok), "f", "division by zero"),
    ],
)
def test_bad_user_code_is_a_clear_request_failure(fs, build, vertex, words):
    fs.register("flow", lambda wf, ctx: build(wf.dag))
    error = failure(fs)
    assert error.vertex == vertex
    assert words in error.message


def test_failing_aggregator_and_forwarder(fs):
    def define(wf, ctx):
        dag = wf.dag
        dag.node("a", ok).node("b", ok).node("c", ok)
        dag.node("j", ok, aggregator=lambda r: 1 / 0)
        dag.edge("a", "b").edge("a", "c", forwarder=lambda d: d).edge("b", "j").edge("c", "j")

    fs.register("flow", define)
    assert failure(fs).type == "ZeroDivisionError"

    def define2(wf, ctx):
        wf.dag.node("a", ok).node("b", ok)
        wf.dag.edge("a", "b", forwarder=lambda d: d.nope())

    fs.register("flow", define2)
    error = failure(fs)
    assert (error.vertex, error.type) == ("b", "AttributeError")


def test_retries_with_backoff_then_success(fs):
    calls = []

    def flaky(data, options):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("try again")
        return b"ok after %d" % len(calls)

    fs.register("flow", lambda wf, ctx: wf.dag.node("n", flaky, retries=3, backoff=0.05))
    rid = fs.execute("flow", b"")
    assert fs.result("flow", rid, timeout=10) == b"ok after 3"
    assert calls[1] - calls[0] >= 0.05
    assert calls[2] - calls[1] >= 0.1  # doubled
    vertex = fs.state("flow", rid).vertices["n"]
    assert (vertex.status, vertex.attempts, vertex.error) == (Status.COMPLETED, 3, None)


def test_retries_exhausted_fail_with_last_error(fs):
    calls = []

    def always(data, options):
        calls.append(1)
        raise ConnectionError(f"attempt {len(calls)}")

    fs.register("flow", lambda wf, ctx: wf.dag.node("n", always, retries=2, backoff=0.01))
    error = failure(fs)
    assert (error.type, error.message, len(calls)) == ("ConnectionError", "attempt 3", 3)


def test_timeout_fails_the_attempt_and_is_retried(fs):
    calls = []

    def slow_first(data, options):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return b"fast"

    fs.register(
        "flow", lambda wf, ctx: wf.dag.node("n", slow_first, timeout=0.1, retries=1, backoff=0)
    )
    started = time.monotonic()
    assert fs.run("flow", b"", timeout=10) == b"fast"
    assert time.monotonic() - started < 0.9


def test_async_handler_timeout(fs):
    import asyncio

    async def hang(data, options):
        await asyncio.sleep(5)

    fs.register("flow", lambda wf, ctx: wf.dag.node("n", hang, timeout=0.1))
    error = failure(fs)
    assert (error.vertex, error.type) == ("n", "TimeoutError")


def test_on_failure_fallback_becomes_the_output(fs):
    seen = []

    def fallback(error, data):
        seen.append((type(error).__name__, data))
        return b"fallback for " + data

    def define(wf, ctx):
        wf.dag.node("a", lambda d, o: d + b"1").node("b", boom, on_failure=fallback).node(
            "c", lambda d, o: d + b"!"
        )
        wf.dag.edge("a", "b").edge("b", "c")

    fs.register("flow", define)
    assert fs.run("flow", b"x", timeout=10) == b"fallback for x1!"
    assert seen == [("ValueError", b"x1")]


def test_on_failure_that_raises_fails_the_request(fs):
    def fallback(error, data):
        raise RuntimeError("gave up") from error

    fs.register("flow", lambda wf, ctx: wf.dag.node("n", boom, on_failure=fallback))
    assert failure(fs) == ErrorInfo("n", "RuntimeError", "gave up")


def test_workflow_hooks_run_once_with_error_and_status(fs):
    events = []
    done = threading.Event()

    def define(wf, ctx):
        wf.dag.node("n", lambda d, o: boom(d, o) if d == b"bad" else d)
        wf.on_failure(lambda error: events.append(("failure", ctx.request_id, error.vertex)))

        @wf.finally_
        def finish(status):
            events.append(("finally", ctx.request_id, status))
            done.set()

    fs.register("flow", define)
    rid = fs.execute("flow", b"bad")
    with pytest.raises(RequestFailed):
        fs.result("flow", rid, timeout=10)
    assert done.wait(5)
    assert events == [("failure", rid, "n"), ("finally", rid, Status.FAILED)]
    events.clear()
    done.clear()
    rid = fs.execute("flow", b"good")
    assert fs.result("flow", rid, timeout=10) == b"good"
    assert done.wait(5)
    assert events == [("finally", rid, Status.COMPLETED)]


def test_raising_hook_does_not_harm_the_worker(fs):
    def define(wf, ctx):
        wf.dag.node("n", ok)
        wf.finally_(lambda status: 1 / 0)

    fs.register("flow", define)
    for _ in range(3):
        assert fs.run("flow", b"x", timeout=10) == b"x"
