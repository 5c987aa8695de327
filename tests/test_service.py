"""FlowService on the embedded backend: execute, state, result, control, retention."""

from __future__ import annotations

import threading
import time

import pytest

from flowloom import (
    DuplicateRequest,
    FlowNotFound,
    FlowService,
    InvalidRequest,
    NotRunning,
    Request,
    RequestNotFound,
    RequestStopped,
    ResultTimeout,
    Status,
)


class Gate:
    """A handler that blocks until opened, counting the calls that entered."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def __call__(self, data, options):
        self.calls += 1
        self.entered.release()
        assert self.opened.wait(10)
        return data + b"|gate"


def chain_with_gate(gate):
    def define(wf, ctx):
        dag = wf.dag
        dag.node("first", gate).node("second", lambda d, o: d + b"|second").node(
            "third", lambda d, o: d + b"|third"
        )
        dag.edge("first", "second").edge("second", "third")

    return define


@pytest.fixture
def fs():
    with FlowService(worker_concurrency=4) as service:
        yield service


def test_execute_returns_caller_id_and_works_without_start(fs):
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d[::-1]))
    rid = fs.execute("flow", Request(body=b"abc", request_id="my-id-1"))
    assert rid == "my-id-1"
    assert fs.result("flow", rid, timeout=10) == b"cba"
    state = fs.state("flow", rid)
    assert state.status is Status.COMPLETED
    assert state.created <= state.vertices["n"].started <= state.vertices["n"].ended <= state.ended


def test_bytes_and_str_requests(fs):
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
    assert fs.run("flow", "héllo", timeout=10) == "héllo".encode()
    assert fs.run("flow", None, timeout=10) == b""


def test_unknown_flow_and_request(fs):
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
    with pytest.raises(FlowNotFound):
        fs.execute("nope", b"")
    with pytest.raises(RequestNotFound):
        fs.state("flow", "no-such-id")
    rid = fs.execute("flow", b"")
    with pytest.raises(RequestNotFound):
        fs.state("other-flow", rid)


def test_bad_and_duplicate_request_ids(fs):
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
    for bad in ["", "has space", "../../etc", "x" * 200, "a\nb"]:
        with pytest.raises(InvalidRequest):
            fs.execute("flow", Request(request_id=bad))
    fs.execute("flow", Request(request_id="same"))
    with pytest.raises(DuplicateRequest):
        fs.execute("flow", Request(request_id="same"))
    with pytest.raises(InvalidRequest):
        fs.execute("flow", Request(query={"k": [1]}))


def test_result_timeout_then_result(fs):
    gate = Gate()
    fs.register("flow", chain_with_gate(gate))
    rid = fs.execute("flow", b"in")
    with pytest.raises(ResultTimeout):
        fs.result("flow", rid, timeout=0.05)
    assert fs.state("flow", rid).status is Status.RUNNING
    gate.opened.set()
    assert fs.result("flow", rid, timeout=10) == b"in|gate|second|third"


def test_pause_holds_after_running_task_and_resume_continues(fs):
    gate = Gate()
    fs.register("flow", chain_with_gate(gate))
    rid = fs.execute("flow", b"in")
    assert gate.entered.acquire(timeout=10)
    assert fs.pause("flow", rid) is Status.PAUSED
    gate.opened.set()  # the running task finishes...
    time.sleep(0.2)
    state = fs.state("flow", rid)
    assert state.status is Status.PAUSED
    assert state.vertices["first"].status is Status.COMPLETED
    assert "second" not in state.vertices  # ...and nothing after it starts
    assert fs.resume("flow", rid) is Status.RUNNING
    assert fs.result("flow", rid, timeout=10) == b"in|gate|second|third"


def test_pause_before_any_task_runs(fs):
    gate = Gate()
    fs.register("busy", lambda wf, ctx: wf.dag.node("n", gate))
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d + b"!"))
    blockers = [fs.execute("busy", b"") for _ in range(4)]  # occupy all 4 threads
    for _ in blockers:
        assert gate.entered.acquire(timeout=10)
    rid = fs.execute("flow", b"x")
    fs.pause("flow", rid)
    gate.opened.set()
    time.sleep(0.2)
    assert fs.state("flow", rid).status is Status.PAUSED
    assert fs.state("flow", rid).vertices == {}
    fs.resume("flow", rid)
    assert fs.result("flow", rid, timeout=10) == b"x!"


def test_stop_ends_request_and_nothing_more_runs(fs):
    gate = Gate()
    ran_after = []

    def define(wf, ctx):
        wf.dag.node("first", gate).node("second", lambda d, o: ran_after.append(d))
        wf.dag.edge("first", "second")

    fs.register("flow", define)
    rid = fs.execute("flow", b"x")
    assert gate.entered.acquire(timeout=10)
    assert fs.stop("flow", rid) is Status.STOPPED
    gate.opened.set()
    with pytest.raises(RequestStopped):
        fs.result("flow", rid, timeout=10)
    time.sleep(0.2)
    assert ran_after == []
    assert fs.state("flow", rid).status is Status.STOPPED
    with pytest.raises(NotRunning):
        fs.resume("flow", rid)
    with pytest.raises(NotRunning):
        fs.pause("flow", rid)


def test_stop_a_paused_request(fs):
    gate = Gate()
    fs.register("flow", chain_with_gate(gate))
    rid = fs.execute("flow", b"x")
    assert gate.entered.acquire(timeout=10)
    fs.pause("flow", rid)
    gate.opened.set()
    time.sleep(0.1)
    fs.stop("flow", rid)
    with pytest.raises(RequestStopped):
        fs.result("flow", rid, timeout=10)


def test_worker_concurrency_is_honoured():
    active = 0
    peak = 0
    lock = threading.Lock()

    def handler(data, options):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return data

    with FlowService(worker_concurrency=3) as fs:
        fs.register(
            "flow",
            lambda wf, ctx: wf.dag.foreach_branch(
                "each", lambda d: {str(i): b"" for i in range(30)}
            ).node("n", handler),
        )
        fs.run("flow", b"", timeout=20)
    assert peak == 3


def test_sync_handlers_run_off_any_event_loop():
    import asyncio

    def handler(data, options):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return b"no loop"
        return b"on a loop"

    with FlowService() as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", handler))
        assert fs.run("flow", b"", timeout=10) == b"no loop"


def test_finished_requests_expire_after_retention():
    with FlowService(retention=0.2) as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        rid = fs.execute("flow", b"")
        fs.result("flow", rid, timeout=10)
        assert fs.state("flow", rid).status is Status.COMPLETED
        time.sleep(0.3)
        fs.execute("flow", b"")  # expiry is swept as requests come and go
        with pytest.raises(RequestNotFound):
            fs.state("flow", rid)


def test_request_list_newest_first_with_filters(fs):
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d if d else 1 / 0))
    fs.register("other", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
    ids = [fs.execute("flow", b"x" if i % 2 == 0 else b"") for i in range(6)]
    fs.run("other", b"y", timeout=10)
    for rid in ids:
        fs.backend.wait(rid, 10)
    listed = [s.request_id for s in fs.requests("flow")]
    assert listed == ids[::-1]
    failed = [s.request_id for s in fs.requests("flow", status=Status.FAILED)]
    assert failed == [ids[5], ids[3], ids[1]]
    assert [s.request_id for s in fs.requests("flow", offset=1, limit=2)] == [ids[4], ids[3]]


def test_reregistering_keeps_running_requests_on_their_definition(fs):
    gate = Gate()

    def v1(wf, ctx):
        wf.dag.node("a", gate).node("b", lambda d, o: d + b"|v1")
        wf.dag.edge("a", "b")

    def v2(wf, ctx):
        wf.dag.node("a", lambda d, o: d).node("b", lambda d, o: d + b"|v2").node(
            "c", lambda d, o: d
        )
        wf.dag.edge("a", "b").edge("b", "c")

    fs.register("flow", v1)
    old = fs.execute("flow", b"old")
    assert gate.entered.acquire(timeout=10)
    fs.register("flow", v2)
    new = fs.execute("flow", b"new")
    assert fs.result("flow", new, timeout=10) == b"new|v2"
    gate.opened.set()
    assert fs.result("flow", old, timeout=10) == b"old|gate|v1"


def test_close_is_idempotent_and_context_manager_closes():
    fs = FlowService()
    fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
    with fs:
        assert fs.run("flow", b"a", timeout=10) == b"a"
    fs.close()
    from flowloom import FlowloomError

    with pytest.raises(FlowloomError, match="closed"):
        fs.execute("flow", b"")


def test_kept_finished_requests_are_capped_oldest_first():
    from flowloom.backends import MemoryBackend

    with FlowService(backend=MemoryBackend(max_finished=3)) as fs:
        fs.register("flow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        ids = []
        for i in range(5):
            ids.append(fs.execute("flow", b"%d" % i))
            fs.result("flow", ids[-1], timeout=10)
        fs.execute("flow", b"")  # the cap is applied as requests come in
        kept = {s.request_id for s in fs.requests("flow")}
        assert set(ids[2:]) <= kept
        for rid in ids[:2]:
            with pytest.raises(RequestNotFound):
                fs.state("flow", rid)
        assert fs.state("flow", ids[4]).vertices["n"].status is Status.COMPLETED
