"""A hop on Redis writes less: a completion's vertex fields go with those of the task it
claims, in one write. What the state shows must not change: each vertex's status,
attempts, begin and end times."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from flowloom import Context, Status, Workflow, engine
from flowloom.backends import RequestRecord, Task
from flowloom.backends.redis import RedisBackend
from flowloom.plan import Plan
from flowloom.registry import Registry
from test_redis_faults import claim
from test_redis_resilience import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def three_hops(workflow: Workflow, context: Context) -> None:
    for n in range(3):
        workflow.dag.node(f"h{n}", lambda data, options: data + b"!")
        if n:
            workflow.dag.edge(f"h{n - 1}", f"h{n}")


def no_items(workflow: Workflow, context: Context) -> None:
    items = workflow.dag.foreach_branch(
        "each", lambda data: {}, aggregator=lambda outputs: b"%d" % len(outputs)
    )
    items.node("item", lambda data, options: data)


def submit(backend: RedisBackend, plan: Plan, request_id: str) -> None:
    record = RequestRecord(request_id, plan.name, plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))


def complete(backend: RedisBackend, plan: Plan, task: Task, output: bytes) -> None:
    step = plan.steps[task.step]
    transition = engine.after_output(plan, step, task.keys, output)
    backend.complete(task, task.step, task.step, output, transition)


@pytest.mark.parametrize("claims", [True, False], ids=["claims-next", "claims-nothing"])
def test_a_hop_records_the_completed_vertex_and_begins_the_next(
    make_redis_backend: Callable[..., RedisBackend],
    monkeypatch: pytest.MonkeyPatch,
    claims: bool,
) -> None:
    """The completed vertex's status and end, and the next one's status, attempt and
    begin, whether the completion claims the next task (one write) or not."""
    from flowloom.backends.redis import consumer

    if not claims:
        monkeypatch.setattr(consumer, "STREAK_HOPS", 0)  # every streak is over
    backend = make_redis_backend()
    plan = Registry().register("hops", three_hops)
    submit(backend, plan, "hop")
    task = claim(backend)
    for n in range(3):
        assert task.step == f"h{n}"
        assert backend.begin(task, task.step, task.step)
        complete(backend, plan, task, b"x" + b"!" * (n + 1))
        if n < 2:
            task = claim(backend)  # sends the completion
        else:
            backend.flush()
        state = backend.state("hop")
        assert state is not None
        done = state.vertices[f"h{n}"]
        assert done.status is Status.COMPLETED
        assert done.started is not None
        assert done.ended is not None
        assert done.started <= done.ended
        if n < 2 and claims:
            nxt = state.vertices[f"h{n + 1}"]
            assert (nxt.status, nxt.attempts) == (Status.RUNNING, 1)
            assert nxt.started is not None
            assert nxt.started >= done.ended
        elif n < 2:
            assert f"h{n + 1}" not in state.vertices  # read by the fetcher, not begun yet
    assert backend.wait("hop", 5) is Status.COMPLETED
    assert backend.result("hop") == b"x!!!"


def test_a_join_begun_by_its_splits_completion_keeps_the_splits_begin_time(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """A foreach over no items: the split's completion fires the join and begins it
    (one address, two instances); the vertex began when its split did."""
    backend = make_redis_backend()
    plan = Registry().register("none", no_items)
    submit(backend, plan, "none")
    split = claim(backend)
    step = plan.steps[split.step]
    instance, address = step.names(split.keys)
    assert backend.begin(split, instance, address)
    state = backend.state("none")
    assert state is not None
    began = state.vertices[address].started
    assert began is not None
    time.sleep(0.05)
    transition = engine.after_split(plan, step, split.keys, b"x", [])
    backend.complete(split, instance, address, None, transition)
    join = claim(backend)  # claimed and begun by the split's completion
    assert join.step != split.step
    state = backend.state("none")
    assert state is not None
    assert state.vertices[address].status is Status.RUNNING
    assert state.vertices[address].started == began


def hops(count: int) -> Callable[[Workflow, Context], None]:
    def define(workflow: Workflow, context: Context) -> None:
        for n in range(count):
            workflow.dag.node(f"h{n}", lambda data, options: data + b"!")
            if n:
                workflow.dag.edge(f"h{n - 1}", f"h{n}")

    return define


def run_hops(backend: RedisBackend, plan: Plan, request_id: str, body: bytes, count: int) -> None:
    """Run a request of ``hops(count)`` by hand, each hop's completion claiming the next."""
    record = RequestRecord(request_id, plan.name, plan.version, body, {}, created=time.time())
    backend.submit(record, engine.start(plan, body))
    task = claim(backend)
    for n in range(count):
        assert backend.begin(task, task.step, task.step)
        data = task.inputs[next(iter(task.inputs))]
        assert data == body + b"!" * n
        complete(backend, plan, task, data + b"!")
        if n < count - 1:
            task = claim(backend)
    backend.flush()


def encodings(client: redis.Redis, prefix: str, request_id: str) -> list[str]:
    base = f"{prefix}:r:{{{request_id}}}"
    return [client.object("encoding", base + part).decode() for part in (":i", ":v", ":o")]


def test_a_long_requests_hashes_become_tables_and_its_state_reads_as_before(
    make_redis_backend: Callable[..., RedisBackend], redis_url: str, redis_prefix: str
) -> None:
    """Once a request has written TABLE_AT instance marks, its marks, vertex states and
    outputs are hash tables (a listpack is scanned at every write); a small request keeps
    its listpacks. The state, outputs and result read as before: no trace of the
    conversion."""
    backend = make_redis_backend()
    plan = Registry().register("hops40", hops(40))
    client = redis.Redis.from_url(redis_url)
    try:
        record = RequestRecord("long", plan.name, plan.version, b"x", {}, created=time.time())
        backend.submit(record, engine.start(plan, b"x"))
        task = claim(backend)
        for n in range(40):
            assert backend.begin(task, task.step, task.step)
            complete(backend, plan, task, b"x" + b"!" * (n + 1))
            if n == 3:
                backend.flush()
                assert encodings(client, redis_prefix, "long") == ["listpack"] * 3
            if n < 39:
                task = claim(backend)
            if n == 30:
                assert encodings(client, redis_prefix, "long") == ["hashtable"] * 3
        backend.flush()
        assert backend.wait("long", 5) is Status.COMPLETED
        assert backend.result("long") == b"x" + b"!" * 40
        state = backend.state("long")
        assert state is not None
        assert sorted(state.vertices) == sorted(f"h{n}" for n in range(40))
        assert {v.status for v in state.vertices.values()} == {Status.COMPLETED}
        assert backend.output("long", "h7") == b"x" + b"!" * 8

        small = Registry().register("hops3", hops(3))
        run_hops(backend, small, "small", b"x", 3)
        assert backend.result("small") == b"x!!!"
        base = f"{redis_prefix}:r:{{small}}"
        assert [client.object("encoding", base + p).decode() for p in (":v", ":o")] == [
            "listpack"
        ] * 2
    finally:
        client.close()


def test_a_hop_of_a_long_request_first_attempts_calls_no_cleanup_it_does_not_need(
    tmp_path: Path,
) -> None:
    """Once a long request's hashes are tables, its hops do not look at their size again
    (the request records it), and a first attempt's completion deletes no error of an
    earlier one: per hop, the two instance marks and no HLEN, HDEL or third HSETNX."""
    server = PrivateRedis(tmp_path, aof=False)
    server.start()
    backend = RedisBackend(server.url)
    client = redis.Redis.from_url(server.url)
    try:
        plan = Registry().register("hops40", hops(40))
        record = RequestRecord("long", plan.name, plan.version, b"x", {}, created=time.time())
        backend.submit(record, engine.start(plan, b"x"))
        task = claim(backend)
        for n in range(40):
            if n == 36:  # converted at TABLE_AT (32) instance marks: 16 hops in
                client.config_resetstat()
            assert backend.begin(task, task.step, task.step)
            complete(backend, plan, task, b"x" + b"!" * (n + 1))
            if n < 39:
                task = claim(backend)
        backend.flush()
        assert backend.result("long") == b"x" + b"!" * 40
        stats = client.info("commandstats")
        assert "cmdstat_hlen" not in stats
        assert "cmdstat_hdel" not in stats
        # d| and f| of hops 36-38, d| of the last one (it fires nothing)
        assert stats["cmdstat_hsetnx"]["calls"] == 2 * 3 + 1
    finally:
        client.close()
        backend.close()
        server.close()


@pytest.mark.parametrize("size", [7, 8, 9, 97, 98, 99, 120])
def test_values_cross_the_lengths_a_task_blob_writes_in_one_two_or_three_digits(
    make_redis_backend: Callable[..., RedisBackend], size: int
) -> None:
    """A task blob made by a script is netstrings whose lengths the script writes itself:
    values of 9, 10, 99, 100 bytes and around them arrive whole."""
    backend = make_redis_backend()
    plan = Registry().register("hops3", hops(3))
    body = bytes(range(32, 32 + size % 90)) * (size // 90 + 1)
    body = body[:size]
    run_hops(backend, plan, f"len{size}", body, 3)
    assert backend.wait(f"len{size}", 5) is Status.COMPLETED
    assert backend.result(f"len{size}") == body + b"!!!"


def test_a_script_call_packs_as_hiredis_packs_it_whole(redis_url: str) -> None:
    """With its head kept (the same keys again) or not, with an argument hiredis does not
    take (left to redis-py), and with no arguments."""
    import hiredis

    from flowloom.backends.redis.scripts import Scripts

    client = redis.Redis.from_url(redis_url)
    try:
        scripts = Scripts(client)
        sha = scripts._scripts["complete"].sha
        keys = ("P:r:{a}", "P:r:{a}:v")
        calls = [(keys, ["a", 1, b"x\r\n"]), (keys, ["b", 22, b""]), (keys, []), (("k",), [3])]
        for call_keys, args in calls:
            whole = ("EVALSHA", sha, len(call_keys), *call_keys, *args)
            assert scripts._packed("complete", call_keys, args) == hiredis.pack_command(whole)
        odd = [None]
        assert scripts._packed("complete", ("k",), odd) == ("EVALSHA", sha, 1, "k", None)
    finally:
        client.close()
