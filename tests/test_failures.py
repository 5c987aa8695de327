"""A failing handler fails its request, never the worker; retries, timeouts, hooks."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest

from flowloom import Context, FlowService, RequestFailed, Status


@pytest.fixture
def fs():
    with FlowService(worker_concurrency=3) as service:
        yield service


def ok(data, options):
    return data


def boom(data, options):
    raise ValueError("bad input: " + data.decode())


def frames_of(traceback: str) -> set[str]:
    """The files named by a formatted traceback's frames."""
    return set(re.findall(r'^  File "([^"]+)"', traceback, re.MULTILINE))


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
    error = info.value.error
    assert (error.vertex, error.type, error.message) == ("each[k1]/b", "ValueError", "bad input: 1")
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
            lambda d: d.foreach_branch("f", lambda x: {"\ud800": b"1"}).node("n", ok),
            "f",
            "a lone surrogate",
        ),
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
    error = failure(fs)
    assert (error.vertex, error.type, error.message) == ("n", "RuntimeError", "gave up")
    # the fallback's traceback, chained to the handler's: both user frames, no flowloom ones
    assert 'raise RuntimeError("gave up") from error' in error.traceback
    assert "in boom" in error.traceback
    assert "direct cause" in error.traceback
    assert frames_of(error.traceback) == {__file__}


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


def test_raising_hook_does_not_harm_the_worker(fs, caplog):
    caplog.set_level(logging.DEBUG, logger="flowloom")

    def define(wf, ctx):
        wf.dag.node("n", ok)
        wf.finally_(lambda status: 1 / 0)

    fs.register("flow", define)
    ids = []
    for _ in range(3):
        ids.append(fs.execute("flow", b"x"))
        assert fs.result("flow", ids[-1], timeout=10) == b"x"
    fs.close()  # the hooks have run
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"request {rid} (flow flow): hook test_raising_hook_does_not_harm_the_worker"
        ".<locals>.define.<locals>.<lambda> raised ZeroDivisionError: division by zero; ignored"
        for rid in ids
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(f'File "{__file__}"' in text and "1 / 0" in text for text in debug)


# -- tracebacks -------------------------------------------------------------------------------
def lookup(data):
    return {}[data.decode()]  # the line a traceback must show


LOOKUP_LINE = lookup.__code__.co_firstlineno + 1


def sync_lookup(data, options):
    return lookup(data)


async def async_lookup(data, options):
    await asyncio.sleep(0)
    return lookup(data)


@pytest.mark.parametrize(
    ("handler", "options"),
    [
        (sync_lookup, {}),
        (sync_lookup, {"timeout": 10}),  # on a thread of its own
        (async_lookup, {}),
        (async_lookup, {"timeout": 10}),  # on the loop, under a timeout
    ],
    ids=["sync", "sync-timeout", "async", "async-timeout"],
)
def test_a_raising_handler_shows_its_file_and_line(make_backend, handler, options):
    with FlowService(backend=make_backend()) as fs:
        fs._ensure_worker()
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", handler, **options))
        rid = fs.execute("flow", b"missing-key")
        with pytest.raises(RequestFailed):
            fs.result("flow", rid, timeout=20)
        error = fs.state("flow", rid).error
    assert error is not None
    assert error.type == "KeyError"
    text = error.traceback
    assert text.startswith("Traceback (most recent call last):\n")
    assert f'File "{__file__}", line {LOOKUP_LINE}, in lookup' in text
    assert "return {}[data.decode()]" in text
    assert f"in {handler.__name__}" in text
    assert text.rstrip().endswith("KeyError: 'missing-key'")
    assert frames_of(text) == {__file__}  # flowloom's and asyncio's frames are left out


@pytest.mark.parametrize(
    "build",
    [
        lambda d: d.node("n", lambda x, o: 42),
        lambda d: d.conditional_branch("c", ["a"], lambda x: ["zzz"])["a"].node("n", ok),
        lambda d: d.foreach_branch("f", lambda x: [b"1"]).node("n", ok),
    ],
    ids=["bad-return", "unknown-key", "foreach-not-dict"],
)
def test_rule_errors_have_no_traceback(fs, build):
    fs.register("flow", lambda wf, ctx: build(wf.dag))
    error = failure(fs)
    assert error.message
    assert error.traceback == ""


def stuck(seconds):
    time.sleep(seconds)  # where a timed-out handler is stuck


STUCK_LINE = stuck.__code__.co_firstlineno + 1


def sync_stuck(data, options):
    stuck(3)


async def async_stuck(data, options):
    await asyncio.sleep(0)
    await asyncio.sleep(3)  # where a timed-out async handler waits


@pytest.mark.parametrize(
    ("handler", "where"),
    [
        (sync_stuck, f"line {STUCK_LINE}, in stuck\n    time.sleep(seconds)"),
        (async_stuck, "in async_stuck\n    await asyncio.sleep(3)"),
    ],
    ids=["sync", "async"],
)
def test_a_timeout_shows_where_the_handler_was_stuck(fs, handler, where):
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", ok, handler, timeout=0.3))
    error = failure(fs)
    assert (error.type, error.message) == ("TimeoutError", "timed out after 0.3s")
    text = error.traceback
    assert text.startswith("Stack of the handler when its time ran out (most recent call last):\n")
    assert f'File "{__file__}", ' in text
    assert where in text
    assert text.endswith("TimeoutError: timed out after 0.3s\n")
    assert "execute.py" not in text  # flowloom's frames are left out


def test_user_code_raising_in_a_condition_or_foreach_has_a_traceback(fs):
    fs.register("flow", lambda wf, ctx: wf.dag.foreach_branch("f", lookup).node("n", ok))
    error = failure(fs, b"nope")
    assert (error.vertex, error.type) == ("f", "KeyError")
    assert f"line {LOOKUP_LINE}, in lookup" in error.traceback


def test_a_huge_traceback_is_cut_in_the_middle():
    from flowloom.execute import TRACEBACK_LIMIT, user_traceback

    def deep(n):
        if n == 0:
            raise ValueError("x" * 100_000)
        return deep(n - 1)

    try:
        deep(5)
    except ValueError as exc:
        text = user_traceback(exc)
    assert len(text) < TRACEBACK_LIMIT + 100
    assert text.startswith("Traceback (most recent call last):\n")
    assert "characters left out" in text
    assert text.endswith("x" * 1000 + "\n")


def test_the_http_state_has_the_traceback(make_backend):
    import httpx

    from flowloom.http import create_app

    with FlowService(backend=make_backend()) as fs:
        fs._ensure_worker()
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", sync_lookup))
        rid = fs.execute("flow", b"k")
        with pytest.raises(RequestFailed):
            fs.result("flow", rid, timeout=20)

        async def get() -> httpx.Response:
            transport = httpx.ASGITransport(app=create_app(fs))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get(f"/flow/flow/requests/{rid}")

        answer = asyncio.run(get())
    assert answer.status_code == 200
    error = answer.json()["error"]
    assert error["type"] == "KeyError"
    assert f'File "{__file__}", line {LOOKUP_LINE}, in lookup' in error["traceback"]


# -- cancellation -----------------------------------------------------------------------------
def test_an_async_handler_past_its_timeout_is_cancelled(fs):
    cleaned, went_on = threading.Event(), threading.Event()

    async def slow(data, options):
        try:
            await asyncio.sleep(3)
            went_on.set()
        finally:
            await asyncio.sleep(0.01)  # a cleanup that itself awaits
            cleaned.set()

    fs.register("flow", lambda wf, ctx: wf.dag.node("n", slow, timeout=0.2))
    started = time.monotonic()
    error = failure(fs)
    assert (error.type, error.message) == ("TimeoutError", "timed out after 0.2s")
    assert cleaned.is_set()  # its finally ran before the attempt was reported
    assert time.monotonic() - started < 2.5
    time.sleep(3.2)
    assert not went_on.is_set()  # and it never ran on


def test_an_async_handler_that_ignores_cancellation_is_left_behind(fs):
    async def stubborn(data, options):
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    fs.register("flow", lambda wf, ctx: wf.dag.node("n", stubborn, timeout=0.1))
    started = time.monotonic()
    assert failure(fs).type == "TimeoutError"
    assert time.monotonic() - started < 0.1 + 1.0 + 1.5  # timeout + cancel grace + margin
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", ok))
    assert fs.run("flow", b"still working", timeout=10) == b"still working"


def test_timed_handlers_see_their_request_context(fs):
    def define(wf, ctx: Context):
        async def first(data, options):
            await asyncio.sleep(0)
            return data + b"|" + ctx.request_id.encode()

        def second(data, options):
            return data + b"|" + ctx.request_id.encode() + b"|" + options["q"][0].encode()

        wf.dag.node("n", first, second, timeout=5)

    fs.register("flow", define)
    from flowloom import Request

    rid = fs.execute("flow", Request(body=b"in", query={"q": "v"}))
    assert fs.result("flow", rid, timeout=10) == b"in|%s|%s|v" % (rid.encode(), rid.encode())


# -- user code that raises what is not an Exception ---------------------------------------------
def exits(data, options):
    raise SystemExit(3)


async def cancelled(data, options):
    raise asyncio.CancelledError()


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def unprintable(data, options):
    raise Unprintable()


@pytest.mark.parametrize(
    ("build", "kind", "message"),
    [
        (lambda d: d.node("n", exits), "SystemExit", "3"),
        (lambda d: d.node("n", exits, timeout=5), "SystemExit", "3"),
        (lambda d: d.node("n", cancelled), "CancelledError", "CancelledError()"),
        (lambda d: d.node("n", cancelled, timeout=5), "CancelledError", "CancelledError()"),
        (
            lambda d: d.foreach_branch(
                "n", lambda x: {"a": x}, aggregator=lambda r: exits(1, 2)
            ).node("m", ok),
            "SystemExit",
            "3",
        ),
        (
            lambda d: d.node("n", unprintable),
            "Unprintable",
            "<Unprintable: str() raised RuntimeError>",
        ),
    ],
    ids=["exit", "exit-timeout", "cancelled", "cancelled-timeout", "exit-aggregator", "no-str"],
)
def test_what_is_not_an_exception_fails_the_request_not_the_worker(build, kind, message):
    with FlowService(worker_concurrency=1) as fs:  # one thread: it must survive
        fs.register("flow", lambda wf, ctx: build(wf.dag))
        error = failure(fs)
        assert (error.vertex, error.type, error.message) == ("n", kind, message)
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", ok))
        assert fs.run("flow", b"still here", timeout=10) == b"still here"


def test_on_failure_sees_a_system_exit_and_a_hook_raising_one_is_ignored():
    seen = []
    done = threading.Event()

    def define(wf, ctx):
        wf.dag.node("n", exits, on_failure=lambda error, data: seen.append(error) or b"saved")
        wf.finally_(lambda status: done.set() or exits(1, 2))

    with FlowService(worker_concurrency=1) as fs:
        fs.register("flow", define)
        assert fs.run("flow", b"", timeout=10) == b"saved"
        assert done.wait(10)
        assert fs.run("flow", b"", timeout=10) == b"saved"  # the thread lived on
    assert [type(error) for error in seen] == [SystemExit, SystemExit]


def test_a_huge_message_is_cut():
    from flowloom.execute import MESSAGE_LIMIT

    def huge(data, options):
        raise ValueError("y" * (MESSAGE_LIMIT * 3))

    with FlowService() as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", huge))
        error = failure(fs)
    assert error.message.startswith("y" * MESSAGE_LIMIT + "... (")
    assert error.message.endswith(f"({2 * MESSAGE_LIMIT} characters left out)")


# -- numbers in a definition --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"backoff": float("nan")}, "backoff must be a finite number >= 0, got nan"),
        ({"backoff": float("inf")}, "backoff must be a finite number >= 0, got inf"),
        ({"backoff": 10**5000}, "backoff must be a finite number >= 0, got an int of 16,610 bits"),
        ({"backoff": True}, "backoff must be a finite number"),
        ({"timeout": float("nan")}, "timeout must be a finite number > 0, got nan"),
        ({"timeout": float("inf")}, "timeout must be a finite number > 0"),
        ({"retries": 10**5000}, "retries must be an int from 0 to 1,000,000, got an int of"),
        ({"retries": 1_000_001}, "retries must be an int from 0 to 1,000,000, got 1000001"),
    ],
)
def test_numbers_that_would_break_a_retry_or_a_timeout_are_refused(options, words):
    from flowloom import Dag, DefinitionError

    with pytest.raises(DefinitionError) as info:
        Dag().node("n", ok, **options)
    assert words in str(info.value)
    assert info.value.vertex == "n"


def test_many_zero_backoff_retries_do_not_overflow_the_delay():
    from flowloom.engine import retry_delay

    assert retry_delay(5000, 0.0) == 0.0
    assert retry_delay(5000, 0.5) == 300.0
    assert retry_delay(3, 0.5) == 2.0
