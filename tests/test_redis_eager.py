"""The eager hand-off on Redis: a completion claims the task it made ready for the thread
that completed it. It must keep every guarantee of the stream: a killed worker loses
nothing, the streak is bounded so other workers get work, and duplicated deliveries and
completions sent together change nothing the second time."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
import redis

from flowloom import Context, ErrorInfo, FlowService, Status, Workflow, engine
from flowloom.backends import RequestRecord, Task
from flowloom.backends.redis import RedisBackend
from flowloom.plan import Plan
from flowloom.registry import Registry
from test_redis_faults import (
    APP,
    Workers,
    claim,
    eventually,
    fs,
    live_workers,
    runs,
    workers,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

__all__ = ["fs", "workers"]  # the fixtures, imported for the tests below

HOPS = APP.CHAIN_HOPS


def hop_pids(url: str, prefix: str, request_id: str) -> list[int]:
    client = redis.Redis.from_url(url)
    try:
        raw: dict[bytes, bytes] = client.hgetall(f"{prefix}:test:chain-pid:{request_id}")  # type: ignore[assignment]
    finally:
        client.close()
    return [int(raw[b"%d" % n]) for n in range(HOPS)]


def hop_runs(url: str, prefix: str, request_id: str) -> list[int]:
    counts = runs(url, prefix, "chain")
    return [counts.get(f"{request_id}:{n}", 0) for n in range(HOPS)]


def stream_is_empty(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        assert client.xlen(f"{prefix}:tasks") == 0
        assert client.xpending(f"{prefix}:tasks", "workers")["pending"] == 0  # type: ignore[index]
    finally:
        client.close()


def test_sigkill_mid_chain_loses_nothing(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    victim = workers.start(concurrency=2, visibility=1.5, sleep=0.005)
    live_workers(fs, 1)
    request_id = fs.execute("chain", b"0")
    eventually(
        lambda: sum(n > 0 for n in hop_runs(redis_url, redis_prefix, request_id)) >= 50,
        30,
        "50 hops run",
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    ran_before = sum(n > 0 for n in hop_runs(redis_url, redis_prefix, request_id))
    assert ran_before < HOPS
    rescuer = workers.start(concurrency=2, visibility=1.5, sleep=0.005)
    assert fs.result("chain", request_id, timeout=60) == b"%d" % HOPS
    counts = hop_runs(redis_url, redis_prefix, request_id)
    assert min(counts) == 1  # every hop ran
    assert sum(counts) - HOPS <= 1  # only the hop in flight when it died ran twice
    pids = hop_pids(redis_url, redis_prefix, request_id)
    assert pids[-1] == rescuer.pid
    assert set(pids) == {victim.pid, rescuer.pid}
    state = fs.state("chain", request_id)
    assert state.status is Status.COMPLETED
    assert all(v.status is Status.COMPLETED for v in state.vertices.values())
    assert len(state.vertices) == HOPS
    stream_is_empty(redis_url, redis_prefix)


def test_a_second_worker_gets_work_while_a_long_chain_runs(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    first = workers.start(concurrency=1)
    second = workers.start(concurrency=1)
    live_workers(fs, 2)
    request_id = fs.execute("chain", b"0")
    assert fs.result("chain", request_id, timeout=60) == b"%d" % HOPS
    pids = hop_pids(redis_url, redis_prefix, request_id)
    assert set(pids) == {first.pid, second.pid}  # the streaks were bounded
    assert hop_runs(redis_url, redis_prefix, request_id) == [1] * HOPS


def three_hops(workflow: Workflow, context: Context) -> None:
    for n in range(3):
        workflow.dag.node(f"h{n}", lambda data, options: data + b"!")
        if n:
            workflow.dag.edge(f"h{n - 1}", f"h{n}")


def test_duplicated_deliveries_completed_in_one_batch_change_nothing(
    make_redis_backend: Callable[..., RedisBackend], redis_url: str
) -> None:
    backend = make_redis_backend()
    plan = Registry().register("hops", three_hops)
    record = RequestRecord("dup", "hops", plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))
    raw = redis.Redis.from_url(redis_url)

    def deliver_again(task: Task) -> Task:
        entry = raw.xrange(backend.keys.tasks, task.receipt, task.receipt)
        raw.xadd(backend.keys.tasks, entry[0][1])  # type: ignore[index]
        again = claim(backend)
        assert (again.step, dict(again.inputs)) == (task.step, dict(task.inputs))
        return again

    def complete(task: Task, output: bytes) -> None:
        step = plan.steps[task.step]
        transition = engine.after_output(plan, step, task.keys, output)
        backend.complete(task, task.step, task.step, output, transition)

    try:
        h0 = claim(backend)
        h0_again = deliver_again(h0)
        assert backend.begin(h0, "h0", "h0")
        assert backend.begin(h0_again, "h0", "h0")  # both run: at least once
        complete(h0, b"x!")
        complete(h0_again, b"other")  # deferred: both go in one round trip
        h1 = claim(backend)  # handed over by the first completion, begun already
        assert (h1.step, dict(h1.inputs)) == ("h1", {"h0": b"x!"})
        before = backend.state("dup")
        complete(h0, b"third")  # a third completion of h0, alone
        backend.flush()
        assert backend.state("dup") == before
        assert backend.begin(h1, "h1", "h1")
        complete(h1, b"x!!")
        h2 = claim(backend)
        assert (h2.step, dict(h2.inputs)) == ("h2", {"h1": b"x!!"})
        complete(h1, b"again")  # h1 completed twice: the second is sent with h2's begin
        assert backend.begin(h2, "h2", "h2")
        complete(h2, b"x!!!")
        assert backend.claim("w", 0.3) is None  # every hop was queued once
        assert backend.result("dup") == b"x!!!"
        state = backend.state("dup")
        assert state is not None
        assert state.status is Status.COMPLETED
        assert {a: v.attempts for a, v in state.vertices.items()} == {"h0": 1, "h1": 1, "h2": 1}
        assert raw.xlen(backend.keys.tasks) == 0  # every delivery was acked and deleted
        assert raw.xpending(backend.keys.tasks, "workers")["pending"] == 0  # type: ignore[index]
    finally:
        raw.close()


def test_a_zero_delay_retry_claimed_by_a_completion_keeps_its_attempt(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """A retry without back-off goes straight on the stream, where another request's
    completion may claim it for its thread: the vertex must then count the attempt the
    task carries (2), not a first one."""
    backend = make_redis_backend()
    plan = Registry().register("hops", three_hops)
    for rid in ("flaky", "other"):
        record = RequestRecord(rid, "hops", plan.version, b"x", {}, created=time.time())
        backend.submit(record, engine.start(plan, b"x"))
    first, second = claim(backend), claim(backend)
    tasks = {task.request_id: task for task in (first, second)}
    for task in tasks.values():
        assert backend.begin(task, "h0", "h0")
    backend.retry(tasks["flaky"], "h0", "h0", 0.0, ErrorInfo("h0", "ValueError", "once"))
    other = tasks["other"]
    transition = engine.after_output(plan, plan.steps["h0"], other.keys, b"x!")
    backend.complete(other, "h0", "h0", b"x!", transition)
    again = claim(backend)  # the retry, older on the stream than the other request's h1
    assert (again.request_id, again.step, again.attempt) == ("flaky", "h0", 2)
    assert backend.begin(again, "h0", "h0")
    state = backend.state("flaky")
    assert state is not None
    assert state.vertices["h0"].attempts == 2


def four_after_one(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("a", lambda data, options: data)
    workflow.dag.node(
        "z",
        lambda data, options: data,
        aggregator=lambda outputs: b"".join(outputs[k] for k in sorted(outputs)),
    )
    for name in "bcde":
        workflow.dag.node(name, lambda data, options: data + b"!")
        workflow.dag.edge("a", name)
        workflow.dag.edge(name, "z")


def run_to_the_end(backend: RedisBackend, plan: Plan, tasks: list[Task]) -> None:
    """Run ``tasks`` (b, c, d and e), then the join, and check the request's result."""
    for task in tasks:
        assert backend.begin(task, task.step, task.step)
        transition = engine.after_output(plan, plan.steps[task.step], (), task.step.encode())
        backend.complete(task, task.step, task.step, task.step.encode(), transition)
    z = claim(backend)
    assert z.step == "z"
    assert backend.begin(z, "z", "z")
    output = b"".join(z.inputs[slot] for slot in sorted(z.inputs))
    backend.complete(z, "z", "z", output, engine.after_output(plan, plan.steps["z"], (), output))
    backend.flush()
    assert backend.wait(tasks[0].request_id, 5) is Status.COMPLETED
    assert backend.result(tasks[0].request_id) == b"bcde"


def test_a_completion_claims_and_begins_a_batch_of_ready_tasks(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """The tasks a completion makes ready are claimed by it for this process, up to
    ``CLAIM_BATCH``, and begun: each runs once and the request completes."""
    backend = make_redis_backend()
    plan = Registry().register("fan", four_after_one)
    record = RequestRecord("fan", "fan", plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))
    a = claim(backend)
    assert backend.begin(a, "a", "a")
    backend.complete(a, "a", "a", b"x", engine.after_output(plan, plan.steps["a"], (), b"x"))
    first = claim(backend)  # sends a's completion, which claims the four for this process
    state = backend.state("fan")
    assert state is not None
    assert {name: state.vertices[name].status for name in "bcde"} == dict.fromkeys(
        "bcde", Status.RUNNING
    )
    tasks = [first] + [claim(backend) for _ in range(3)]
    assert sorted(task.step for task in tasks) == ["b", "c", "d", "e"]
    run_to_the_end(backend, plan, tasks)
    state = backend.state("fan")
    assert state is not None
    assert {a: v.attempts for a, v in state.vertices.items()} == dict.fromkeys("abcdez", 1)
    assert backend.claim("w", 0.3) is None


def test_a_task_begun_ahead_that_waited_is_looked_at_again(
    make_redis_backend: Callable[..., RedisBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task claimed and begun with a batch that waits here longer than
    ``AHEAD_SECONDS`` is begun again before it runs: a pause from another process
    meanwhile holds it."""
    from flowloom.backends.redis import consumer

    monkeypatch.setattr(consumer, "AHEAD_SECONDS", 0.0)  # every wait is too long
    backend, other = make_redis_backend(), make_redis_backend()
    plan = Registry().register("fan", four_after_one)
    record = RequestRecord("fan", "fan", plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))
    a = claim(backend)
    assert backend.begin(a, "a", "a")
    backend.complete(a, "a", "a", b"x", engine.after_output(plan, plan.steps["a"], (), b"x"))
    tasks = [claim(backend) for _ in range(4)]  # all four begun by a's completion
    assert other.control("fan", Status.PAUSED) is Status.PAUSED
    assert not any(backend.begin(task, task.step, task.step) for task in tasks)
    assert other.control("fan", Status.RUNNING) is Status.RUNNING
    again = [claim(backend) for _ in range(4)]
    assert sorted(task.step for task in again) == ["b", "c", "d", "e"]
    run_to_the_end(backend, plan, again)


@pytest.mark.parametrize(
    ("took", "held_back"),
    [(None, False), (0.0, True), (120.0, False)],
    ids=["step-never-ran-here", "step-was-quick", "step-was-slow"],
)
def test_a_completion_waits_only_behind_a_task_whose_step_ran_quickly_here(
    make_redis_backend: Callable[..., RedisBackend],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    took: float | None,
    held_back: bool,
) -> None:
    """A completion is held back for a later round trip only while the thread runs a
    task begun ahead whose step ran in less than ``DEFER_SECONDS`` here last time: behind
    a slow task, or one of a step not seen yet, it goes before the task runs (its
    successors, or another request's end, must not wait for that task)."""
    from flowloom.backends.redis import consumer

    monkeypatch.setattr(consumer, "AHEAD_SECONDS", 60.0)  # begun ahead: no second look
    monkeypatch.setattr(consumer, "DEFER_SECONDS", 60.0)  # no completion waits that long here
    backend = make_redis_backend()
    plan = Registry().register("fan", four_after_one)
    record = RequestRecord("held", "fan", plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))
    a = claim(backend)
    assert backend.begin(a, "a", "a")
    backend.complete(a, "a", "a", b"x", engine.after_output(plan, plan.steps["a"], (), b"x"))
    first, second = claim(backend), claim(backend)  # begun by a's completion
    assert backend.begin(first, first.step, first.step)
    transition = engine.after_output(plan, plan.steps[first.step], (), b"x!")
    backend.complete(first, first.step, first.step, b"x!", transition)
    if took is not None:
        backend._consumer._took[("fan", second.step)] = took
    backend._consumer._took.pop(("fan", first.step), None)  # only second's step is known
    assert backend.begin(second, second.step, second.step)
    raw = redis.Redis.from_url(redis_url)
    try:
        vertices = backend.keys.request("held").vertices
        sent = raw.hget(vertices, f"s|{first.step}") == b"completed"
        assert sent is not held_back
        backend.flush()
        assert raw.hget(vertices, f"s|{first.step}") == b"completed"
    finally:
        raw.close()
