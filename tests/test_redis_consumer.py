"""What a process's consumer reports of the tasks it holds, and what it gives back when
it closes: a task this process completed is never reported as taken over by another
worker, and a graceful close leaves nothing pending for a consumer that is gone."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from flowloom import Context, FlowService, Status, Workflow, engine
from flowloom.backends import RequestRecord, Task
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.keys import GROUP
from flowloom.plan import Plan
from flowloom.registry import Registry

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

TAKEN_OVER = "were taken over by other workers"


def one_node(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("a", lambda data, options: data)


def four_after_one(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("a", lambda data, options: data)
    workflow.dag.node("z", lambda data, options: data, aggregator=lambda r: b"".join(r.values()))
    for name in "bcde":
        workflow.dag.node(name, lambda data, options: data)
        workflow.dag.edge("a", name)
        workflow.dag.edge(name, "z")


def submit(backend: RedisBackend, plan: Plan, request_id: str) -> None:
    record = RequestRecord(request_id, plan.name, plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))


def claim(backend: RedisBackend) -> Task:
    task = backend.claim("w", 5.0)
    assert task is not None
    return task


def run(backend: RedisBackend, plan: Plan, task: Task) -> None:
    step = plan.steps[task.step]
    instance, address = step.names(task.keys)
    if task.step == engine.START:
        backend.complete(task, engine.START, "", None, engine.start(plan, b"x"))
        return
    assert backend.begin(task, instance, address)
    data = b"".join(task.inputs[slot] or b"" for slot in sorted(task.inputs)) or b"x"
    transition = engine.after_output(plan, step, task.keys, data)
    backend.complete(task, instance, address, data, transition)


def run_all(backend: RedisBackend, plan: Plan, request_id: str) -> None:
    while backend.state(request_id).status not in (Status.COMPLETED, Status.FAILED):  # type: ignore[union-attr]
        run(backend, plan, claim(backend))
        backend.flush()


def pending(raw: redis.Redis, backend: RedisBackend) -> int:
    return int(raw.xpending(backend.keys.tasks, GROUP)["pending"])


@pytest.fixture
def raw(redis_url: str) -> Any:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# -- the keep-alive's report ------------------------------------------------------------------
def test_a_task_completed_but_not_yet_let_go_is_not_reported_taken_over(
    make_redis_backend: Callable[..., RedisBackend],
    raw: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The keep-alive runs after a completion acked a task in Redis but before its worker
    thread let it go here: the task is gone from the group, yet not stolen."""
    backend = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("one", one_node)
    submit(backend, plan, "r1")
    task = claim(backend)
    while task.step == engine.START:
        run(backend, plan, task)
        task = claim(backend)
    consumer = backend._consumer
    acked, go_on = threading.Event(), threading.Event()
    release = consumer._release

    def held_back(released: Task) -> None:  # between the completion's reply and the bookkeeping
        if released.receipt == task.receipt:
            acked.set()
            assert go_on.wait(10)
        release(released)

    consumer._release = held_back  # type: ignore[method-assign,assignment]

    def worker() -> None:
        run(backend, plan, task)
        backend.flush()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert acked.wait(10)
        assert task.receipt in consumer._held  # not let go here, though acked in Redis
        assert pending(raw, backend) == 0
        with caplog.at_level(logging.WARNING, logger="flowloom.redis"):
            consumer.keep_alive()
    finally:
        go_on.set()
        thread.join(10)
    assert TAKEN_OVER not in caplog.text
    assert backend.state("r1").status is Status.COMPLETED  # type: ignore[union-attr]


def test_a_task_another_consumer_took_over_is_reported(
    make_redis_backend: Callable[..., RedisBackend],
    raw: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("one", one_node)
    submit(backend, plan, "r1")
    task = claim(backend)
    raw.xclaim(backend.keys.tasks, GROUP, "another", 0, [task.receipt])
    with caplog.at_level(logging.WARNING, logger="flowloom.redis"):
        backend._consumer.keep_alive()
    assert f"1 task(s) {TAKEN_OVER}" in caplog.text


# -- a graceful close ------------------------------------------------------------------------
def test_close_hands_back_the_tasks_a_completion_claimed_for_the_buffer(
    make_redis_backend: Callable[..., RedisBackend], raw: redis.Redis
) -> None:
    """Tasks a completion claimed (and began) for this process, waiting in its buffer
    for a thread, go back on the stream when it closes: another worker runs each once,
    at once, not after the visibility timeout."""
    first = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("fan", four_after_one)
    submit(first, plan, "fan")
    a = claim(first)
    while a.step != "a":
        run(first, plan, a)
        a = claim(first)
    run(first, plan, a)
    first.flush()  # not from a free thread: the four it claims go to the buffer
    assert first._consumer.held() == 4
    assert pending(raw, first) == 4
    first.close()
    assert pending(raw, first) == 0
    assert raw.xlen(first.keys.tasks) == 4
    assert raw.xinfo_consumers(first.keys.tasks, GROUP) == []
    second = make_redis_backend(visibility_timeout=60)
    run_all(second, plan, "fan")
    state = second.state("fan")
    assert state is not None
    assert state.status is Status.COMPLETED
    assert {name: v.attempts for name, v in state.vertices.items()} == dict.fromkeys("abcdez", 1)


def test_close_hands_back_a_submits_claim_whose_reply_was_never_read(
    make_redis_backend: Callable[..., RedisBackend], raw: redis.Redis
) -> None:
    """A submit from this process claimed the request's first task for it, but the reply
    was never handed over (the server stopped meanwhile): the task is pending for this
    consumer without being held. Closing gives it back instead of deleting the consumer
    with it (which would lose the task for good)."""
    first = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("one", one_node)
    submit(first, plan, "warm")
    run_all(first, plan, "warm")  # the consumer has its name
    consumer = first._consumer
    assert consumer.name is not None
    record = RequestRecord("r1", "one", plan.version, b"x", {}, created=time.time())
    keys, args = first._store.submit_call(record, engine.start(plan, b"x"), consumer.name, 1)
    reply = consumer._scripts("submit", keys, args)
    assert isinstance(reply, list)  # it claimed a task, which nobody here holds
    assert consumer.held() == 0
    assert pending(raw, first) == 1
    first.close()
    assert pending(raw, first) == 0
    assert raw.xinfo_consumers(first.keys.tasks, GROUP) == []
    second = make_redis_backend(visibility_timeout=60)
    run_all(second, plan, "r1")
    assert second.result("r1") == b"x"


SERVER = """
import sys, time
import redis
from flowloom import FlowService
from flowloom.backends.redis import RedisBackend
from flowloom.http import serve

port, url, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
counts = redis.Redis.from_url(url)

def slow(data, options):
    time.sleep(0.3)
    counts.hincrby(prefix + ":test:runs", data, 1)
    return data

backend = RedisBackend(url, prefix=prefix, visibility_timeout=60)
fs = FlowService(backend=backend, worker_concurrency=2)
fs.register("slow", lambda workflow, context: workflow.dag.node("a", slow))
fs._ensure_worker()
try:
    serve(fs, host="127.0.0.1", port=port, log_level="warning", access_log=False)
finally:
    fs.close()
"""


def start_server(url: str, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), url, prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"no server: {server.communicate()[0].decode()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.05)


def stop(server: subprocess.Popen[bytes]) -> bytes:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, output.decode()
    return output


def test_a_server_stopped_by_sigterm_leaves_no_task_pending(
    redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    """SIGTERM while a server's worker runs tasks and holds others (claimed by its
    submits and completions for its threads): the running ones finish, the others go
    back on the stream at once, nothing stays pending for the consumer that is gone,
    and another server's worker runs each remaining request once, well within the
    visibility timeout."""
    server, base = start_server(redis_url, redis_prefix)
    try:
        answers = [
            httpx.post(base + "/flow/slow", content=b"%d" % n, headers={"X-Async": "true"})
            for n in range(8)
        ]
        ids = [answer.json()["request_id"] for answer in answers]
        time.sleep(0.15)  # two tasks run; the others wait, some claimed for this process
    finally:
        output = stop(server)
    assert b"taken over" not in output
    tasks = f"{redis_prefix}:tasks"
    assert raw.xpending(tasks, GROUP)["pending"] == 0
    assert raw.xinfo_consumers(tasks, GROUP) == []

    def runs() -> dict[bytes, bytes]:
        return raw.hgetall(f"{redis_prefix}:test:runs")  # type: ignore[return-value]

    assert 2 <= len(runs()) < 8  # the two it ran, and maybe the next ones
    other, _ = start_server(redis_url, redis_prefix)
    try:
        with FlowService(backend=RedisBackend(redis_url, prefix=redis_prefix)) as client:
            started = time.monotonic()
            for n, request_id in enumerate(ids):
                assert client.result("slow", request_id, timeout=20) == b"%d" % n
            assert time.monotonic() - started < 15  # not after the visibility timeout
    finally:
        stop(other)
    assert runs() == {b"%d" % n: b"1" for n in range(8)}


def test_a_consumer_leaves_the_group_only_with_nothing_pending(
    make_redis_backend: Callable[..., RedisBackend], raw: redis.Redis
) -> None:
    """The last step of a close (``lua/leave.lua``): a task claimed for the consumer after
    its hand-back keeps it in the group, so the task is taken over later, not lost."""
    backend = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("one", one_node)
    submit(backend, plan, "r1")
    task = claim(backend)
    consumer = backend._consumer
    assert consumer.name is not None
    tasks = backend.keys.tasks
    assert consumer._run("leave", [tasks], [GROUP, consumer.name]) == 1
    assert [c["name"] for c in raw.xinfo_consumers(tasks, GROUP)] == [consumer.name.encode()]
    assert pending(raw, backend) == 1
    raw.xack(tasks, GROUP, task.receipt)
    assert consumer._run("leave", [tasks], [GROUP, consumer.name]) == 0
    assert raw.xinfo_consumers(tasks, GROUP) == []


def test_a_server_stopped_while_redis_is_down_exits_at_once(tmp_path: Path) -> None:
    """SIGTERM to a server (with its worker) while Redis is down: it does not spend a
    retry window on each call of its stop, and exits cleanly."""
    from test_redis_resilience import PrivateRedis

    private = PrivateRedis(tmp_path, aof=False)
    private.start()
    try:
        server, base = start_server(private.url, "down")
        try:
            assert httpx.post(base + "/flow/slow", content=b"x", timeout=10).content == b"x"
        finally:
            private.kill()
            time.sleep(1.0)  # the fetcher's next read fails: the server knows Redis is down
            started = time.monotonic()
            output = stop(server)  # exit status 0, or it raises
        took = time.monotonic() - started
        assert took < 8, output.decode()  # was 20 s: a retry window for each call
        assert b"Traceback" not in output, output.decode()
        assert b"taken over after the visibility timeout" in output, output.decode()
    finally:
        private.close()


def test_a_hand_back_leaves_a_task_another_worker_took_over(
    make_redis_backend: Callable[..., RedisBackend], raw: redis.Redis
) -> None:
    """A process frozen past the visibility timeout wakes and hands back what it held
    (a stop, or tasks read ahead that waited too long): a task another worker took over
    meanwhile stays that worker's, pending for it, and is not put on the stream again
    (it would run twice, and the other worker's receipt would be gone)."""
    backend = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("one", one_node)
    submit(backend, plan, "r1")
    submit(backend, plan, "r2")
    mine, taken = claim(backend), claim(backend)
    consumer = backend._consumer
    tasks = backend.keys.tasks
    raw.xclaim(tasks, GROUP, "other", 0, [taken.receipt])  # the take-over
    length = raw.xlen(tasks)
    handed = consumer._run("handback", [tasks], [GROUP, consumer.name, mine.receipt, taken.receipt])
    assert handed == 1  # only its own
    assert raw.xlen(tasks) == length  # one entry added (``mine`` again), one deleted
    owners = {
        p["message_id"].decode(): p["consumer"].decode()
        for p in raw.xpending_range(tasks, GROUP, "-", "+", 10)
    }
    assert owners == {taken.receipt: "other"}


def test_a_deferral_leaves_a_task_another_worker_took_over(
    make_redis_backend: Callable[..., RedisBackend], raw: redis.Redis
) -> None:
    """A worker that lacks a task's definition, frozen past the visibility timeout
    between its claim and its deferral, wakes and defers: a task another worker took
    over meanwhile stays that worker's, and is not put in the delayed set (it would run
    twice); one still its own goes there and leaves the stream."""
    backend = make_redis_backend(visibility_timeout=60)
    plan = Registry().register("one", one_node)
    submit(backend, plan, "r1")
    submit(backend, plan, "r2")
    mine, taken = claim(backend), claim(backend)
    tasks, delayed = backend.keys.tasks, backend.keys.delayed
    raw.xclaim(tasks, GROUP, "other", 0, [taken.receipt])  # the take-over
    backend.defer(taken, 0.5)
    assert raw.zcard(delayed) == 0
    backend.defer(mine, 0.5)
    assert raw.zcard(delayed) == 1
    owners = {
        p["message_id"].decode(): p["consumer"].decode()
        for p in raw.xpending_range(tasks, GROUP, "-", "+", 10)
    }
    assert owners == {taken.receipt: "other"}
    assert [entry[0].decode() for entry in raw.xrange(tasks)] == [taken.receipt]
