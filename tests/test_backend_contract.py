"""The Backend contract: every test runs on the embedded and on the Redis backend.

The first part drives the interface by hand (submit, claim, begin, complete, retry,
fail, control, context, listings, wait, expiry, duplicate deliveries); the second runs
real flows through ``FlowService`` with a worker in this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowloom import (
    Dag,
    DuplicateRequest,
    FlowService,
    NoOutput,
    NotRunning,
    Request,
    RequestFailed,
    RequestNotFound,
    Status,
    engine,
)
from flowloom.backends import HOOKS, Backend, RequestRecord, Summary, Task
from flowloom.plan import Plan
from flowloom.registry import Registry
from flowloom.types import ErrorInfo

pytestmark = pytest.mark.timeout(60)

WORKER = "contract-worker"


# -- helpers ---------------------------------------------------------------------------------
def plan_of(define: Callable[..., Any], name: str = "flow") -> Plan:
    return Registry().register(name, define)


def noop(data: bytes, options: dict[str, list[str]]) -> bytes:
    return data


def linear(workflow: Any, context: Any) -> None:
    workflow.dag.node("a", noop)
    workflow.dag.node("b", noop)
    workflow.dag.edge("a", "b")


def diamond(workflow: Any, context: Any) -> None:
    dag = workflow.dag
    dag.node("a", noop)
    dag.node("b", noop)
    dag.node("c", noop)
    dag.node("d", noop, aggregator=lambda inputs: b"+".join(inputs[k] for k in sorted(inputs)))
    for src, dst in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
        dag.edge(src, dst)


def with_hooks(workflow: Any, context: Any) -> None:
    workflow.dag.node("a", noop)
    workflow.finally_(lambda status: None)


def submit(
    backend: Backend, plan: Plan, body: bytes = b"in", request_id: str = "r1", **extra: Any
) -> RequestRecord:
    record = RequestRecord(
        request_id=request_id,
        flow=plan.name,
        version=plan.version,
        body=body,
        query=extra.pop("query", {}),
        headers=extra.pop("headers", {}),
        created=extra.pop("created", time.time()),
        has_hooks=plan.has_hooks,
    )
    backend.submit(record, engine.start(plan, body))
    return record


def claim(backend: Backend, timeout: float = 5.0) -> Task:
    task = backend.claim(WORKER, timeout)
    assert task is not None, "no task was ready in time"
    return task


def claim_all(backend: Backend, count: int, timeout: float = 5.0) -> list[Task]:
    return [claim(backend, timeout) for _ in range(count)]


def nothing_ready(backend: Backend, wait: float = 0.3) -> bool:
    return backend.claim(WORKER, wait) is None


def ids(plan: Plan, task: Task) -> tuple[str, str]:
    step = plan.steps[task.step]
    return step.instance(task.keys), step.address(task.keys)


def begin(backend: Backend, plan: Plan, task: Task) -> bool:
    return backend.begin(task, *ids(plan, task))


def complete(backend: Backend, plan: Plan, task: Task, output: bytes) -> None:
    step = plan.steps[task.step]
    transition = engine.after_output(plan, step, task.keys, output)
    backend.complete(task, *ids(plan, task), output, transition)


def run(backend: Backend, plan: Plan, task: Task, output: bytes | None = None) -> None:
    assert begin(backend, plan, task)
    complete(backend, plan, task, task.inputs.get("", b"") + b"." if output is None else output)


# -- the interface by hand -------------------------------------------------------------------
def test_submit_creates_a_queued_request_with_its_record(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan, b"body", query={"q": ["1", "2"]}, headers={"h": "v"}, created=123.5)
    state = backend.state("r1")
    assert state is not None
    assert (state.request_id, state.flow, state.status, state.created) == (
        "r1", "flow", Status.QUEUED, 123.5,
    )  # fmt: skip
    assert state.vertices == {}
    record = backend.record("r1")
    assert record is not None
    assert (record.body, record.version, record.has_hooks) == (b"body", plan.version, False)
    assert dict(record.query) == {"q": ["1", "2"]}
    assert dict(record.headers) == {"h": "v"}
    assert backend.state("nope") is None
    assert backend.record("nope") is None
    assert backend.result("r1") is None


def test_submit_twice_is_refused(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    with pytest.raises(DuplicateRequest):
        submit(backend, plan)


def test_claim_waits_then_gives_up(backend: Backend) -> None:
    started = time.monotonic()
    assert backend.claim(WORKER, 0.3) is None
    assert 0.25 <= time.monotonic() - started < 3.0


def test_a_request_runs_step_by_step(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan, b"in", query={"k": ["v"]})
    task = claim(backend)
    assert (task.request_id, task.flow, task.version, task.step, task.keys) == (
        "r1", "flow", plan.version, "a", (),
    )  # fmt: skip
    assert dict(task.inputs) == {"": b"in"}
    assert task.attempt == 1
    assert begin(backend, plan, task)
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.RUNNING
    assert state.vertices["a"].status is Status.RUNNING
    assert state.vertices["a"].attempts == 1
    assert state.vertices["a"].started is not None
    complete(backend, plan, task, b"A")
    task = claim(backend)
    assert task.step == "b"
    assert dict(task.inputs) == {"a": b"A"}
    run(backend, plan, task, b"B")
    assert backend.wait("r1", 5) is Status.COMPLETED
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.COMPLETED
    assert state.ended is not None
    assert {a: v.status for a, v in state.vertices.items()} == {
        "a": Status.COMPLETED, "b": Status.COMPLETED,
    }  # fmt: skip
    assert backend.result("r1") == b"B"
    assert nothing_ready(backend)


def test_a_fan_in_fires_once_with_every_input(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    run(backend, plan, b, b"B")
    assert nothing_ready(backend)
    run(backend, plan, c, b"C")
    d = claim(backend)
    assert d.step == "d"
    assert dict(d.inputs) == {"b": b"B", "c": b"C"}
    run(backend, plan, d, b"D")
    assert backend.result("r1") == b"D"


def test_a_duplicate_delivery_changes_nothing(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    a = claim(backend)
    run(backend, plan, a, b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    run(backend, plan, b, b"B")
    before = backend.state("r1")
    # the same task again, and its outcome again (another output, even): nothing changes
    assert not begin(backend, plan, b)
    complete(backend, plan, b, b"B-again")
    complete(backend, plan, a, b"A-again")
    assert backend.state("r1") == before
    assert nothing_ready(backend)
    run(backend, plan, c, b"C")
    d = claim(backend)
    assert dict(d.inputs) == {"b": b"B", "c": b"C"}
    run(backend, plan, d, b"D")
    complete(backend, plan, d, b"D-again")
    assert nothing_ready(backend)
    assert backend.result("r1") == b"D"


def test_retry_queues_the_next_attempt_after_the_delay(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    task = claim(backend)
    assert begin(backend, plan, task)
    error = ErrorInfo("a", "ValueError", "boom")
    backend.retry(task, "a", "a", 0.3, error)
    state = backend.state("r1")
    assert state is not None
    assert state.vertices["a"].status is Status.QUEUED
    assert state.vertices["a"].error == error
    started = time.monotonic()
    again = claim(backend)
    assert time.monotonic() - started >= 0.2
    assert (again.step, again.attempt, dict(again.inputs)) == ("a", 2, {"": b"in"})
    assert begin(backend, plan, again)
    state = backend.state("r1")
    assert state is not None
    assert state.vertices["a"].attempts == 2
    complete(backend, plan, again, b"A")
    state = backend.state("r1")
    assert state is not None
    assert state.vertices["a"].error is None


def test_defer_gives_a_task_back_unrun_after_the_delay(backend: Backend) -> None:
    """A worker that lacks the task's definition gives it back: the same task (attempt,
    inputs, version), after the delay, and nothing of the request changed meanwhile."""
    plan = plan_of(linear)
    submit(backend, plan)
    task = claim(backend)
    backend.defer(task, 0.3)
    assert backend.depth()["delayed"] == 1
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.QUEUED
    assert "a" not in state.vertices or state.vertices["a"].attempts == 0
    started = time.monotonic()
    again = claim(backend)
    assert time.monotonic() - started >= 0.2
    assert (again.step, again.attempt, dict(again.inputs), again.version, again.keys) == (
        task.step, task.attempt, dict(task.inputs), task.version, task.keys,
    )  # fmt: skip
    run(backend, plan, again, b"A")
    run(backend, plan, claim(backend), b"B")
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert backend.result("r1") == b"B"


@pytest.mark.parametrize("delay", [0.0, 0.0004])
def test_a_retry_without_delay_is_ready_at_once(backend: Backend, delay: float) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    task = claim(backend)
    assert begin(backend, plan, task)
    backend.retry(task, "a", "a", delay, ErrorInfo("a", "ValueError", "boom"))
    again = claim(backend, timeout=2.0)
    assert (again.step, again.attempt) == ("a", 2)
    run(backend, plan, again, b"A")
    run(backend, plan, claim(backend), b"B")
    assert backend.wait("r1", 5) is Status.COMPLETED


@pytest.mark.parametrize("outcome", ["fail", "retry"])
def test_a_late_failure_of_a_completed_instance_changes_nothing(
    backend: Backend, outcome: str
) -> None:
    """Another worker took the task over and completed it; the first one's handler
    then raises: its fail or retry is a no-op."""
    plan = plan_of(linear)
    submit(backend, plan)
    task = claim(backend)
    assert begin(backend, plan, task)
    complete(backend, plan, task, b"A")
    before = backend.state("r1")
    assert before is not None
    error = ErrorInfo("a", "RuntimeError", "too late", "Traceback ...")
    if outcome == "fail":
        backend.fail(task, "a", "a", error)
    else:
        backend.retry(task, "a", "a", 0.0, error)
    assert backend.state("r1") == before
    assert before.vertices["a"].status is Status.COMPLETED
    assert before.status is not Status.FAILED
    b = claim(backend)
    assert b.step == "b"  # and no second attempt of "a" was queued
    assert nothing_ready(backend)
    run(backend, plan, b, b"B")
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert backend.result("r1") == b"B"


def test_an_error_keeps_its_traceback(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    task = claim(backend)
    assert begin(backend, plan, task)
    trace = "Traceback (most recent call last):\n  File \"app.py\", line 3, in a\nKeyError: 'x'\n"
    error = ErrorInfo("a", "KeyError", "'x'", trace)
    backend.fail(task, "a", "a", error)
    state = backend.state("r1")
    assert state is not None
    assert state.error == error
    assert state.vertices["a"].error == error
    summary = backend.summary("r1")
    assert summary is not None
    assert summary.error == error


def test_ping_answers(backend: Backend) -> None:
    backend.ping()


def test_fail_ends_the_request_with_the_error(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert begin(backend, plan, b)
    error = ErrorInfo("b", "ValueError", "boom")
    backend.fail(b, "b", "b", error)
    assert backend.wait("r1", 5) is Status.FAILED
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.FAILED
    assert state.error == error
    assert state.vertices["b"].status is Status.FAILED
    assert state.vertices["b"].ended is not None
    # what was still on its way does not run, nor change anything
    assert not begin(backend, plan, c)
    complete(backend, plan, c, b"C")
    backend.fail(c, "c", "c", ErrorInfo("c", "X", "later"))
    after = backend.state("r1")
    assert after is not None
    assert after.error == error
    assert after.status is Status.FAILED
    assert backend.result("r1") is None
    with pytest.raises(NotRunning):
        backend.control("r1", Status.PAUSED)


def test_pause_holds_tasks_and_resume_releases_them(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert begin(backend, plan, b)
    assert backend.control("r1", Status.PAUSED) is Status.PAUSED
    complete(backend, plan, b, b"B")  # a task already running finishes
    assert not begin(backend, plan, c)  # a task claimed but not begun waits for resume
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.PAUSED
    assert nothing_ready(backend)
    assert backend.control("r1", Status.RUNNING) is Status.RUNNING
    c = claim(backend)
    assert c.step == "c"
    run(backend, plan, c, b"C")
    run(backend, plan, claim(backend), b"D")
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert backend.result("r1") == b"D"


def test_pause_of_a_queued_request_holds_its_first_tasks(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    assert backend.control("r1", Status.PAUSED) is Status.PAUSED
    a = claim(backend)
    assert not begin(backend, plan, a)
    assert nothing_ready(backend)
    assert backend.control("r1", Status.RUNNING) is Status.RUNNING
    a = claim(backend)
    assert a.step == "a"
    assert dict(a.inputs) == {"": b"in"}
    run(backend, plan, a, b"A")
    for task in claim_all(backend, 2):
        run(backend, plan, task)
    run(backend, plan, claim(backend), b"D")
    assert backend.wait("r1", 5) is Status.COMPLETED


def test_tasks_that_become_ready_while_paused_wait_for_resume(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    a = claim(backend)
    assert begin(backend, plan, a)
    backend.control("r1", Status.PAUSED)
    complete(backend, plan, a, b"A")
    assert nothing_ready(backend)
    backend.control("r1", Status.RUNNING)
    b = claim(backend)
    assert b.step == "b"
    assert dict(b.inputs) == {"a": b"A"}


def test_stop_ends_the_request(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    a = claim(backend)
    assert backend.control("r1", Status.STOPPED) is Status.STOPPED
    assert backend.wait("r1", 1) is Status.STOPPED
    assert not begin(backend, plan, a)
    for action in (Status.PAUSED, Status.RUNNING, Status.STOPPED):
        with pytest.raises(NotRunning):
            backend.control("r1", action)
    with pytest.raises(RequestNotFound):
        backend.control("nope", Status.PAUSED)


def test_resume_of_a_running_request_changes_nothing(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    assert begin(backend, plan, claim(backend))
    assert backend.control("r1", Status.RUNNING) is Status.RUNNING
    assert nothing_ready(backend)


def test_the_hooks_task_comes_after_the_end(backend: Backend) -> None:
    plan = plan_of(with_hooks)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    hooks = claim(backend)
    assert hooks.step == HOOKS
    assert dict(hooks.inputs) == {"status": b"completed"}
    backend.ack(hooks)
    assert nothing_ready(backend)


def test_the_context_store_is_per_request(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan, request_id="r1")
    submit(backend, plan, request_id="r2")
    backend.context_set("r1", "k", b"v1")
    backend.context_set("r2", "k", b"\x00\xff")
    assert backend.context_get("r1", "k") == b"v1"
    assert backend.context_get("r2", "k") == b"\x00\xff"
    assert backend.context_get("r1", "other") is None
    backend.context_delete("r1", "k")
    backend.context_delete("r1", "k")
    assert backend.context_get("r1", "k") is None
    for call in (
        lambda: backend.context_get("nope", "k"),
        lambda: backend.context_set("nope", "k", b"v"),
        lambda: backend.context_delete("nope", "k"),
    ):
        with pytest.raises(RequestNotFound):
            call()


def test_list_requests_newest_first_by_flow_and_status(backend: Backend) -> None:
    one, two = plan_of(linear, "one"), plan_of(linear, "two")
    now = time.time()
    for n in range(5):
        submit(backend, one if n % 2 == 0 else two, request_id=f"r{n}", created=now + n)
    backend.control("r3", Status.STOPPED)
    listed = backend.list_requests(None, None, 0, 50)
    assert [s.request_id for s in listed] == ["r4", "r3", "r2", "r1", "r0"]
    assert [s.request_id for s in backend.list_requests("one", None, 0, 50)] == ["r4", "r2", "r0"]
    assert [s.request_id for s in backend.list_requests(None, Status.STOPPED, 0, 50)] == ["r3"]
    assert [s.request_id for s in backend.list_requests("two", Status.QUEUED, 0, 50)] == ["r1"]
    assert [s.request_id for s in backend.list_requests(None, None, 1, 2)] == ["r3", "r2"]
    assert backend.list_requests("three", None, 0, 50) == []


def test_wait_gives_the_status_when_time_is_up(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    started = time.monotonic()
    assert backend.wait("r1", 0.3) is Status.QUEUED
    assert 0.25 <= time.monotonic() - started < 3.0
    assert backend.wait("nope", 0.1) is None


def test_wait_wakes_when_the_request_ends(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    seen: list[Status | None] = []
    waiters = [
        threading.Thread(target=lambda: seen.append(backend.wait("r1", 10))) for _ in range(3)
    ]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)
    started = time.monotonic()
    backend.control("r1", Status.STOPPED)
    for waiter in waiters:
        waiter.join(5)
    assert seen == [Status.STOPPED] * 3
    assert time.monotonic() - started < 2.0


def test_finished_requests_expire_after_the_retention(
    make_backend: Callable[..., Backend],
) -> None:
    backend = make_backend(retention=0.3)
    plan = plan_of(linear)
    submit(backend, plan, request_id="old")
    submit(backend, plan, request_id="live")
    backend.context_set("old", "k", b"v")
    backend.control("old", Status.STOPPED)
    assert backend.state("old") is not None
    time.sleep(0.6)
    assert [s.request_id for s in backend.list_requests(None, None, 0, 50)] == ["live"]
    assert backend.state("old") is None
    assert backend.state("live") is not None
    with pytest.raises(RequestNotFound):
        backend.context_get("old", "k")


# -- real flows through FlowService ----------------------------------------------------------
@pytest.fixture
def service(make_backend: Callable[..., Backend]) -> Iterator[FlowService]:
    with FlowService(worker_concurrency=4, backend=make_backend()) as fs:
        fs._ensure_worker()  # a worker in this process, on either backend
        yield fs


def test_a_foreach_with_aggregator_sees_every_item_once(service: FlowService) -> None:
    def define(workflow: Any, context: Any) -> None:
        dag = workflow.dag
        dag.node("source", noop)
        branch = dag.foreach_branch(
            "each",
            lambda data: {f"k/{i}": b"%d" % i for i in range(int(data))},
            aggregator=lambda items: b",".join(items[k] for k in sorted(items)),
        )
        branch.node("double", lambda data, options: b"%d" % (2 * int(data)))
        dag.edge("source", "each")

    service.register("fan", define)
    result = service.run("fan", b"50", timeout=30)
    expected = {f"k/{i}": b"%d" % (2 * i) for i in range(50)}
    assert result == b",".join(expected[k] for k in sorted(expected))
    state = service.state("fan", service.requests("fan")[0].request_id)
    assert state.status is Status.COMPLETED
    assert state.vertices["each[k%2F7]/double"].status is Status.COMPLETED


def test_conditional_branches_sub_dags_and_query(service: FlowService) -> None:
    def define(workflow: Any, context: Any) -> None:
        sub = Dag()
        sub.node("x", lambda data, options: data + b"x" + options["tag"][0].encode())
        dag = workflow.dag
        dag.node("first", noop)
        branches = dag.conditional_branch(
            "pick", ["left", "right"], lambda data: ["left"] if data == b"L" else ["right"]
        )
        branches["left"].subdag("sub", sub)
        branches["right"].node("r", lambda data, options: b"right")
        dag.edge("first", "pick")

    service.register("cond", define)
    assert service.run("cond", Request(body=b"L", query={"tag": "T"}), timeout=20) == b"LxT"
    assert service.run("cond", b"R", timeout=20) == b"right"


def test_a_failing_handler_fails_the_request_and_others_go_on(service: FlowService) -> None:
    attempts: list[bytes] = []

    def flaky(data: bytes, options: Any) -> bytes:
        attempts.append(data)
        if data == b"bad" or len([a for a in attempts if a == data]) < 2:
            raise ValueError(f"no {data.decode()}")
        return b"ok " + data

    def define(workflow: Any, context: Any) -> None:
        workflow.dag.node("flaky", flaky, retries=1, backoff=0.05)

    service.register("flaky", define)
    bad = service.execute("flaky", b"bad")
    assert service.run("flaky", b"good", timeout=20) == b"ok good"
    with pytest.raises(RequestFailed) as failed:
        service.result("flaky", bad, timeout=20)
    assert failed.value.error is not None
    assert (failed.value.error.vertex, failed.value.error.type) == ("flaky", "ValueError")
    assert service.state("flaky", bad).vertices["flaky"].attempts == 2


def test_the_context_store_is_shared_by_the_nodes_of_a_request(service: FlowService) -> None:
    def define(workflow: Any, context: Any) -> None:
        def first(data: bytes, options: Any) -> bytes:
            context.set("seen", {"body": data.decode(), "id": context.request_id})
            return data

        def second(data: bytes, options: Any) -> bytes:
            seen = context.get("seen")
            assert seen["id"] == context.request_id
            return seen["body"].encode() + b"!"

        workflow.dag.node("first", first)
        workflow.dag.node("second", second)
        workflow.dag.edge("first", "second")

    service.register("ctx", define)
    ids = [service.execute("ctx", f"body{n}") for n in range(10)]
    assert [service.result("ctx", i, timeout=20) for i in ids] == [
        f"body{n}!".encode() for n in range(10)
    ]


def test_pause_resume_and_stop_through_the_service(service: FlowService) -> None:
    gate, second_gate = threading.Event(), threading.Event()

    def wait_for_gate(data: bytes, options: Any) -> bytes:
        (gate if data == b"x" else second_gate).wait(10)
        return data

    def define(workflow: Any, context: Any) -> None:
        workflow.dag.node("slow", wait_for_gate)
        workflow.dag.node("after", lambda data, options: data + b"+after")
        workflow.dag.edge("slow", "after")

    service.register("paused", define)
    request_id = service.execute("paused", b"x")
    deadline = time.monotonic() + 10
    while service.state("paused", request_id).status is not Status.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert service.pause("paused", request_id) is Status.PAUSED
    gate.set()
    time.sleep(0.5)
    state = service.state("paused", request_id)
    assert state.status is Status.PAUSED
    assert "after" not in state.vertices
    assert service.resume("paused", request_id) is Status.RUNNING
    assert service.result("paused", request_id, timeout=10) == b"x+after"
    stopped = service.execute("paused", b"y")
    assert service.stop("paused", stopped) is Status.STOPPED
    second_gate.set()
    with pytest.raises(NotRunning):
        service.resume("paused", stopped)


def test_workers_are_listed(service: FlowService) -> None:
    service.register("listed", linear)  # after the worker started: the next heartbeat says so
    deadline = time.monotonic() + 10
    while "listed" not in service.workers()[0]["flows"]:  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    workers = service.workers()
    assert len(workers) == 1
    worker = workers[0]
    assert worker["concurrency"] == 4
    assert "listed" in worker["flows"]
    assert {"name", "host", "pid", "last_seen"} <= set(worker)


def test_summary_gives_flow_status_result_and_error(backend: Backend) -> None:
    assert backend.summary("r1") is None
    plan = plan_of(linear)
    submit(backend, plan)
    assert backend.summary("r1") == Summary("flow", Status.QUEUED, None, None)
    run(backend, plan, claim(backend), b"A")
    running = backend.summary("r1")
    assert running is not None
    assert (running.status, running.result) == (Status.RUNNING, None)
    run(backend, plan, claim(backend), b"B")
    assert backend.summary("r1") == Summary("flow", Status.COMPLETED, b"B", None)

    submit(backend, plan, request_id="r2")
    task = claim(backend)
    assert begin(backend, plan, task)
    error = ErrorInfo("a", "KeyError", "'x'")
    backend.fail(task, "a", "a", error)
    assert backend.summary("r2") == Summary("flow", Status.FAILED, None, error)


def test_a_completion_is_seen_by_its_thread_at_once_and_by_others_after_flush(
    backend: Backend,
) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    task = claim(backend)
    assert begin(backend, plan, task)
    complete(backend, plan, task, b"A")
    state = backend.state("r1")  # the same thread reads its own write
    assert state is not None
    assert state.vertices["a"].status is Status.COMPLETED

    task = claim(backend)
    assert begin(backend, plan, task)
    complete(backend, plan, task, b"B")
    backend.flush()
    seen: list[Status | None] = []
    reader = threading.Thread(target=lambda: seen.append(backend.wait("r1", 5)))
    reader.start()
    reader.join(10)
    assert seen == [Status.COMPLETED]


def test_each_completed_instance_keeps_its_output(backend: Backend) -> None:
    plan = plan_of(linear)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    backend.flush()
    assert backend.output("r1", "a") == b"A"
    assert backend.output("r1", "b") is None  # not run yet
    run(backend, plan, claim(backend), b"")  # an empty output is an output
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert (backend.output("r1", "a"), backend.output("r1", "b")) == (b"A", b"")
    assert backend.output("r1", "nope") is None
    assert backend.output("no-such-request", "a") is None


def test_outputs_of_foreach_items_through_the_service(service: FlowService) -> None:
    def define(workflow: Any, context: Any) -> None:
        each = workflow.dag.foreach_branch(
            "each",
            lambda data: {k: k.encode() for k in ("x", "y/z")},
            aggregator=lambda r: b",".join(sorted(r.values())),
        )
        each.node("up", lambda data, options: data.upper())

    service.register("flow", define)
    request_id = service.execute("flow", b"")
    assert service.result("flow", request_id, timeout=10) == b"X,Y/Z"
    assert service.output("flow", request_id, "each[x]/up") == b"X"
    assert service.output("flow", request_id, "each[y%2Fz]/up") == b"Y/Z"
    assert service.output("flow", request_id, "each") == b"X,Y/Z"
    with pytest.raises(NoOutput):
        service.output("flow", request_id, "each[q]/up")
    with pytest.raises(RequestNotFound):
        service.output("other", request_id, "each")


def test_without_keep_outputs_outputs_go_once_used_and_the_result_stays(
    service: FlowService,
) -> None:
    def define(workflow: Any, context: Any) -> None:
        workflow.keep_outputs = False
        dag = workflow.dag
        dag.node("a", lambda data, options: data + b"a")
        each = dag.foreach_branch(
            "each",
            lambda data: {"x": data, "y": data + b"!"},
            aggregator=lambda r: b"|".join(r[k] for k in sorted(r)),
        )
        each.node("up", lambda data, options: data.upper())
        dag.node("z", lambda data, options: data + b"z")
        dag.edge("a", "each")
        dag.edge("each", "z")

    service.register("lean", define)
    request_id = service.execute("lean", b"in")
    assert service.result("lean", request_id, timeout=10) == b"INA|INA!z"
    state = service.state("lean", request_id)
    assert state.vertices["each[x]/up"].status is Status.COMPLETED
    for address in ("a", "each[x]/up", "each", "z"):
        with pytest.raises(NoOutput, match="not kept: its flow sets keep_outputs=False"):
            service.output("lean", request_id, address)
    with pytest.raises(NoOutput, match="has no output"):  # not a vertex: said as before
        service.output("lean", request_id, "nope")
    assert service.result("lean", request_id) == b"INA|INA!z"


def test_with_keep_outputs_the_last_output_reads_as_the_result(service: FlowService) -> None:
    service.register("kept", linear)
    request_id = service.execute("kept", b"in")
    assert service.result("kept", request_id, timeout=10) == b"in"
    assert service.output("kept", request_id, "a") == b"in"
    assert service.output("kept", request_id, "b") == b"in"  # kept once, as the result


# -- retry of a failed or stopped request (``rerun``) ------------------------------------------
def failed_diamond(backend: Backend) -> tuple[Plan, Task]:
    """A diamond whose ``b`` failed while ``c`` ran: ``c`` completes after the failure."""
    plan = plan_of(diamond)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert begin(backend, plan, b)
    assert begin(backend, plan, c)
    backend.fail(b, *ids(plan, b), ErrorInfo("b", "ValueError", "boom"))
    complete(backend, plan, c, b"C")  # in flight when b failed: completes into the state
    assert backend.wait("r1", 5) is Status.FAILED
    return plan, b


def test_rerun_stores_the_retry_trace_when_given(backend: Backend) -> None:
    failed_diamond(backend)
    record = backend.record("r1")
    assert record is not None
    retry = f"{1:032x}-{2:016x}-{3:016x}-01"
    assert backend.rerun("r1", retry) is Status.RUNNING
    again = backend.record("r1")
    assert again is not None
    assert again.trace == retry
    assert again.body == record.body


def test_rerun_runs_only_what_did_not_complete(backend: Backend) -> None:
    plan, b = failed_diamond(backend)
    assert backend.output("r1", "c") == b"C"
    assert nothing_ready(backend)  # nothing of a failed request is queued
    assert backend.rerun("r1") is Status.RUNNING
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.RUNNING
    assert state.error is None
    assert state.ended is None
    assert len(state.retries) == 1
    assert state.retries[0] >= state.created
    assert state.vertices["b"].status is Status.QUEUED
    assert state.vertices["b"].error is None  # queued again: its last error goes
    again = claim(backend)
    assert (again.step, again.attempt, again.inputs) == ("b", 1, b.inputs)
    assert nothing_ready(backend)  # a and c completed: they do not run again
    run(backend, plan, again, b"B")
    d = claim(backend)
    assert d.step == "d"
    assert d.inputs == {"b": b"B", "c": b"C"}
    run(backend, plan, d, b"D")
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert backend.result("r1") == b"D"
    done = backend.state("r1")
    assert done is not None
    assert len(done.retries) == 1
    assert done.error is None
    assert done.vertices["b"].error is None


def test_rerun_of_a_request_that_is_not_failed_or_stopped_is_refused(backend: Backend) -> None:
    plan = plan_of(linear)
    with pytest.raises(RequestNotFound):
        backend.rerun("nope")
    submit(backend, plan)
    with pytest.raises(NotRunning, match="queued"):
        backend.rerun("r1")
    run(backend, plan, claim(backend))
    with pytest.raises(NotRunning, match="running"):
        backend.rerun("r1")
    run(backend, plan, claim(backend))
    assert backend.wait("r1", 5) is Status.COMPLETED
    with pytest.raises(NotRunning, match="completed"):
        backend.rerun("r1")


def test_tasks_claimed_after_the_failure_run_on_the_retry(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert begin(backend, plan, b)
    backend.fail(b, *ids(plan, b), ErrorInfo("b", "ValueError", "boom"))
    assert not begin(backend, plan, c)  # queued when b failed: set aside, not run
    backend.rerun("r1")
    again = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert [(t.step, t.attempt) for t in again] == [("b", 1), ("c", 1)]
    assert nothing_ready(backend)


def test_a_retry_attempt_after_the_failure_runs_afresh_on_the_retry(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    run(backend, plan, claim(backend), b"A")
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert begin(backend, plan, b)
    assert begin(backend, plan, c)
    backend.fail(b, *ids(plan, b), ErrorInfo("b", "ValueError", "boom"))
    backend.retry(c, *ids(plan, c), 0.0, ErrorInfo("c", "X", "flaky"))
    assert nothing_ready(backend)
    backend.rerun("r1")
    again = sorted(claim_all(backend, 2), key=lambda t: t.step)
    assert [(t.step, t.attempt) for t in again] == [("b", 1), ("c", 1)]


def test_rerun_of_a_stopped_request_releases_what_it_held(backend: Backend) -> None:
    plan = plan_of(diamond)
    submit(backend, plan)
    a = claim(backend)
    assert begin(backend, plan, a)
    backend.control("r1", Status.PAUSED)
    complete(backend, plan, a, b"A")  # b and c become ready: held
    assert nothing_ready(backend)
    assert backend.control("r1", Status.STOPPED) is Status.STOPPED
    assert nothing_ready(backend)
    assert backend.rerun("r1") is Status.RUNNING
    b, c = sorted(claim_all(backend, 2), key=lambda t: t.step)
    run(backend, plan, b, b"B")
    run(backend, plan, c, b"C")
    run(backend, plan, claim(backend), b"D")
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert backend.output("r1", "a") == b"A"


def test_a_request_fails_again_after_a_retry_and_is_retried_again(backend: Backend) -> None:
    plan, _ = failed_diamond(backend)
    backend.rerun("r1")
    b = claim(backend)
    assert begin(backend, plan, b)
    backend.fail(b, *ids(plan, b), ErrorInfo("b", "ValueError", "again"))
    assert backend.wait("r1", 5) is Status.FAILED
    failed = backend.state("r1")
    assert failed is not None
    assert failed.error is not None
    assert failed.error.message == "again"
    assert backend.rerun("r1") is Status.RUNNING
    b = claim(backend)
    assert b.attempt == 1
    run(backend, plan, b, b"B")
    run(backend, plan, claim(backend), b"D")
    assert backend.wait("r1", 5) is Status.COMPLETED
    state = backend.state("r1")
    assert state is not None
    assert len(state.retries) == 2
    assert state.retries[0] <= state.retries[1]


def test_concurrent_reruns_one_wins(backend: Backend) -> None:
    failed_diamond(backend)
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def retry() -> None:
        barrier.wait()
        try:
            outcomes.append(backend.rerun("r1"))
        except NotRunning as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(Status.RUNNING) == 1
    assert sum(isinstance(o, NotRunning) for o in outcomes) == 7
    claim(backend)
    assert nothing_ready(backend)  # b queued once
