"""Faults on the Redis backend, with real worker processes (``tests/apps/fault_worker.py``)
and a real Redis: SIGKILL, kill-and-restart chaos, duplicate deliveries, a Redis restart,
handlers that raise, hang or return garbage, SIGTERM, long tasks, a changed definition.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from flowloom import FlowService, RequestFailed, Status, engine
from flowloom.backends import RequestRecord, Task
from flowloom.backends.redis import RedisBackend
from flowloom.registry import Registry

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

APP_PATH = Path(__file__).parent / "apps" / "fault_worker.py"


def load_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flowloom_fault_worker", APP_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


APP = load_app()


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


class Workers:
    """Worker processes of the test app, all killed at the end of the test."""

    def __init__(self, url: str, prefix: str, logs: Path) -> None:
        self.url, self.prefix, self.logs = url, prefix, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, **env: object) -> subprocess.Popen[bytes]:
        environ = {
            **os.environ,
            "FLOWLOOM_TEST_REDIS_URL": self.url,
            "FLOWLOOM_TEST_PREFIX": self.prefix,
            **{f"FLOWLOOM_TEST_{k.upper()}": str(v) for k, v in env.items()},
        }
        log = (self.logs / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, str(APP_PATH)], env=environ, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture
def workers(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(redis_url, redis_prefix, tmp_path)
    yield started
    started.close()


def client(url: str, prefix: str, **options: Any) -> FlowService:
    """A client-mode service: the flows registered, no worker."""
    options.setdefault("visibility_timeout", 2.0)
    fs = FlowService(backend=RedisBackend(url, prefix=prefix, **options))
    for name, define in APP.FLOWS.items():
        fs.register(name, define)
    return fs


@pytest.fixture
def fs(redis_url: str, redis_prefix: str) -> Iterator[FlowService]:
    service = client(redis_url, redis_prefix)
    yield service
    service.close()


def live_workers(fs: FlowService, count: int) -> list[dict[str, object]]:
    return eventually(  # type: ignore[no-any-return]
        lambda: (lambda ws: ws if len(ws) == count else None)(fs.workers()),
        20,
        f"{count} live worker(s)",
    )


def runs(url: str, prefix: str, what: str) -> dict[str, int]:
    counter = redis.Redis.from_url(url)
    try:
        raw: dict[bytes, bytes] = counter.hgetall(f"{prefix}:test:{what}")  # type: ignore[assignment]
    finally:
        counter.close()
    return {k.decode(): int(v) for k, v in raw.items()}


def completed_items(fs: FlowService, flow: str, request_id: str) -> int:
    vertices = fs.state(flow, request_id).vertices.values()
    return sum(v.status is Status.COMPLETED for v in vertices)


def fanout_result(n: int) -> bytes:
    return b",".join(b"i%d=%d" % (i, 2 * i) for i in sorted(range(n), key=lambda i: f"i{i}"))


# -- the tests -------------------------------------------------------------------------------
def test_sigkill_mid_fanout_another_worker_finishes(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    victim = workers.start(concurrency=4, visibility=2, sleep=0.03)
    workers.start(concurrency=4, visibility=2, sleep=0.03)
    live_workers(fs, 2)
    request_id = fs.execute("fanout", b"200")
    eventually(lambda: completed_items(fs, "fanout", request_id) >= 30, 30, "30 items done")
    assert fs.state("fanout", request_id).status is Status.RUNNING
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert fs.result("fanout", request_id, timeout=60) == fanout_result(200)
    assert runs(redis_url, redis_prefix, "aggregate") == {request_id: 1}
    assert len(live_workers(fs, 1)) == 1  # the dead one's heartbeat ran out


def test_1000_requests_while_workers_are_killed_and_restarted(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    options = {"concurrency": 4, "visibility": 1.5, "sleep": 0.01}
    alive = [workers.start(**options) for _ in range(3)]
    live_workers(fs, 3)
    ids = {fs.execute("diamond", f"req{n}"): f"req{n}".encode() for n in range(1000)}
    rng = random.Random(7)
    kills = 0
    while not all(fs.state("diamond", i).status.finished for i in list(ids)[-50:]) or kills < 2:
        time.sleep(1.0)
        victim = alive.pop(rng.randrange(len(alive)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        kills += 1
        alive.append(workers.start(**options))
        assert kills <= 40, "the run does not end"
    for request_id, body in ids.items():
        assert fs.result("diamond", request_id, timeout=60) == b"b:" + body + b"|c:" + body
    fired = runs(redis_url, redis_prefix, "d")
    assert set(fired) == set(ids)
    # a handler runs at least once: only the tasks a killed worker held may run again
    reruns = sum(fired.values()) - len(ids)
    assert reruns <= kills * (4 + 8), (reruns, kills)


def test_the_same_task_delivered_twice_changes_nothing(
    make_redis_backend: Callable[..., RedisBackend], redis_url: str
) -> None:
    backend = make_redis_backend()
    plan = Registry().register("diamond", APP.diamond)
    record = RequestRecord("dup", "diamond", plan.version, b"x", {}, created=time.time())
    backend.submit(record, engine.start(plan, b"x"))
    raw = redis.Redis.from_url(redis_url)

    def deliver_again(task: Task) -> Task:
        entry = raw.xrange(backend.keys.tasks, task.receipt, task.receipt)
        raw.xadd(backend.keys.tasks, entry[0][1])  # type: ignore[index]
        again = claim(backend)
        assert (again.step, again.keys, dict(again.inputs)) == (
            task.step, task.keys, dict(task.inputs),
        )  # fmt: skip
        assert again.receipt != task.receipt
        return again

    def run(task: Task, output: bytes) -> None:
        step = plan.steps[task.step]
        instance, address = step.instance(task.keys), step.address(task.keys)
        if backend.begin(task, instance, address):
            transition = engine.after_output(plan, step, task.keys, output)
            backend.complete(task, instance, address, output, transition)

    try:
        a = claim(backend)
        a_again = deliver_again(a)
        run(a, b"A")
        before = backend.state("dup")
        run(a_again, b"A2")  # begin refuses it: a is done
        step = plan.steps["a"]
        backend.complete(  # and completing it anyway changes nothing
            a_again, "a", "a", b"A3", engine.after_output(plan, step, (), b"A3")
        )
        assert backend.state("dup") == before
        b, c = sorted([claim(backend), claim(backend)], key=lambda t: t.step)
        assert backend.claim("w", 0.3) is None  # b and c were queued once
        b_again = deliver_again(b)
        run(b, b"B")
        run(b_again, b"B2")
        run(c, b"C")
        d = claim(backend)
        assert dict(d.inputs) == {"b": b"B", "c": b"C"}
        d_again = deliver_again(d)
        run(d, b"D")
        run(d_again, b"D2")
        assert backend.claim("w", 0.3) is None
        assert backend.result("dup") == b"D"
        state = backend.state("dup")
        assert state is not None
        assert state.status is Status.COMPLETED
        assert all(v.attempts == 1 for v in state.vertices.values())
        assert raw.xlen(backend.keys.tasks) == 0  # every delivery was acked and deleted
        assert raw.xpending(backend.keys.tasks, "workers")["pending"] == 0  # type: ignore[index]
    finally:
        raw.close()


def claim(backend: RedisBackend) -> Task:
    task = backend.claim("w", 5.0)
    assert task is not None
    return task


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A redis-server of this test's own, with AOF; yields a function that restarts it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
    ]  # fmt: skip
    log = tmp_path / "redis.log"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        with log.open("ab") as out:
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        probe = redis.Redis(port=port, socket_connect_timeout=0.2)
        try:
            eventually(lambda: _answers(probe), 10, "the private Redis answers")
        finally:
            probe.close()

    def restart() -> None:
        procs[-1].send_signal(signal.SIGTERM)  # a clean shutdown: the AOF is complete
        procs[-1].wait(10)
        time.sleep(1.0)  # the workers and the client see it gone for a while
        start()

    start()
    restart.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
    yield restart
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_redis_restarts_in_the_middle_of_a_run(
    private_redis: Any, tmp_path: Path, redis_prefix: str
) -> None:
    url = private_redis.url
    started = Workers(url, redis_prefix, tmp_path)
    fs = client(url, redis_prefix)
    try:
        for _ in range(2):
            started.start(concurrency=4, visibility=2, sleep=0.01)
        live_workers(fs, 2)
        ids = {fs.execute("diamond", f"req{n}"): f"req{n}".encode() for n in range(300)}
        eventually(
            lambda: fs.state("diamond", next(iter(ids))).status.finished, 20, "work has begun"
        )
        private_redis()
        for request_id, body in ids.items():
            assert fs.result("diamond", request_id, timeout=60) == b"b:" + body + b"|c:" + body
        assert all(proc.poll() is None for proc in started.procs)
    finally:
        fs.close()
        started.close()


def test_a_handler_that_raises_hangs_or_returns_garbage(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    worker = workers.start(concurrency=2)
    live_workers(fs, 1)
    ids = {body: fs.execute("faulty", body) for body in ("raise", "hang", "garbage", "fine")}
    expected = {
        "raise": ("RuntimeError", "asked to raise"),
        "hang": ("TimeoutError", "timed out after 1s"),
        "garbage": ("StepError", "returned int"),
    }
    for body, (kind, message) in expected.items():
        with pytest.raises(RequestFailed) as failed:
            fs.result("faulty", ids[body], timeout=30)
        error = failed.value.error
        assert error is not None
        assert (error.vertex, error.type) == ("faulty", kind)
        assert message in error.message
        assert fs.state("faulty", ids[body]).vertices["faulty"].attempts == 2  # retried once
    raised = fs.state("faulty", ids["raise"]).error
    assert raised is not None
    assert "fault_worker.py" in raised.traceback  # the file and line of the handler
    assert 'raise RuntimeError("asked to raise")' in raised.traceback
    assert fs.result("faulty", ids["fine"], timeout=30) == b"fine"
    assert runs(redis_url, redis_prefix, "faulty") == {
        ids["raise"]: 2, ids["hang"]: 2, ids["garbage"]: 2, ids["fine"]: 1,
    }  # fmt: skip
    assert worker.poll() is None
    assert fs.run("faulty", b"again", timeout=30) == b"fine"  # the worker carries on


def test_sigterm_finishes_running_tasks_and_hands_back_the_rest(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    first = workers.start(concurrency=1, visibility=60)
    live_workers(fs, 1)
    ids = [fs.execute("slow", b"0.5") for _ in range(6)]
    eventually(lambda: fs.state("slow", ids[0]).status is Status.RUNNING, 20, "the first runs")
    first.send_signal(signal.SIGTERM)
    assert first.wait(20) == 0
    assert fs.state("slow", ids[0]).status is Status.COMPLETED  # it finished what it ran
    eventually(lambda: fs.workers() == [], 5, "the stopped worker is unlisted")
    raw = redis.Redis.from_url(redis_url)
    try:  # and it left the consumer group, holding nothing
        assert raw.xinfo_consumers(f"{redis_prefix}:tasks", "workers") == []
    finally:
        raw.close()
    # what it had read but not begun went back on the stream: no visibility timeout to wait
    workers.start(concurrency=6, visibility=60)
    started = time.monotonic()
    for request_id in ids:
        assert fs.result("slow", request_id, timeout=20) == b"slept 0.5"
    assert time.monotonic() - started < 15
    assert all(n == 1 for n in runs(redis_url, redis_prefix, "slow").values())


def test_a_long_task_is_not_taken_over_while_it_runs(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    for _ in range(2):
        workers.start(concurrency=2, visibility=1)
    live_workers(fs, 2)
    request_id = fs.execute("slow", b"4")  # four visibility timeouts
    assert fs.result("slow", request_id, timeout=30) == b"slept 4"
    assert runs(redis_url, redis_prefix, "slow") == {request_id: 1}


def test_a_worker_without_the_requests_definition_fails_it_clearly(
    fs: FlowService, workers: Workers
) -> None:
    workers.start(variant=2)  # deployed with another definition of "versioned"
    live_workers(fs, 1)
    request_id = fs.execute("versioned", b"")  # this client has variant 1
    with pytest.raises(RequestFailed) as failed:
        fs.result("versioned", request_id, timeout=20)
    error = failed.value.error
    assert error is not None
    assert error.type == "FlowNotFound"
    assert "re-registered with another definition" in error.message
    workers.start(variant=1)  # a worker with the definition runs new requests as before
    live_workers(fs, 2)


def test_a_worker_without_the_requests_definition_leaves_it_to_one_that_has_it(
    fs: FlowService, workers: Workers, tmp_path: Path
) -> None:
    """A rolling deploy: while a worker with the request's definition is live, one
    without it gives its tasks back for it instead of failing the request (before: about
    half of these requests failed with ``FlowNotFound``), and says so once."""
    workers.start(variant=2, concurrency=8)  # another definition, and more threads asking
    workers.start(variant=1, concurrency=1)
    live_workers(fs, 2)
    ids = [fs.execute("versioned", b"") for _ in range(20)]  # this client has variant 1
    for request_id in ids:
        assert fs.result("versioned", request_id, timeout=30) == b"variant 1"
    log = (tmp_path / "worker-0.log").read_text()
    assert log.count("lacks flow 'versioned' version") == 1, log
    assert "FlowNotFound" not in log


def test_re_registering_in_a_process_keeps_running_requests_on_their_definition(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    gate = threading.Event()

    def first(workflow: Any, context: Any) -> None:
        workflow.dag.node("wait", lambda data, options: gate.wait(10) and b"")
        workflow.dag.node("old", lambda data, options: b"old")
        workflow.dag.edge("wait", "old")

    def second(workflow: Any, context: Any) -> None:
        workflow.dag.node("new", lambda data, options: b"new")

    with FlowService(worker_concurrency=2, backend=make_redis_backend()) as service:
        service.register("flow", first)
        service._ensure_worker()
        running = service.execute("flow")
        eventually(lambda: service.state("flow", running).status is Status.RUNNING, 10, "runs")
        service.register("flow", second)
        fresh = service.execute("flow")
        gate.set()
        assert service.result("flow", running, timeout=10) == b"old"
        assert service.result("flow", fresh, timeout=10) == b"new"


def test_workers_of_other_processes_are_listed(fs: FlowService, workers: Workers) -> None:
    procs = [workers.start(concurrency=3) for _ in range(2)]
    listed = live_workers(fs, 2)
    assert {w["pid"] for w in listed} == {p.pid for p in procs}
    for worker in listed:
        assert worker["concurrency"] == 3
        assert set(APP.FLOWS) <= set(worker["flows"])  # type: ignore[call-overload]
        assert worker["host"] == socket.gethostname()
        assert time.time() - float(worker["last_seen"]) < 5  # type: ignore[arg-type]
    procs[0].send_signal(signal.SIGKILL)
    assert [w["pid"] for w in live_workers(fs, 1)] == [procs[1].pid]


def test_several_worker_processes_from_one_command(fs: FlowService, workers: Workers) -> None:
    parent = workers.start(processes=2, concurrency=2)
    first = {w["pid"] for w in live_workers(fs, 2)}
    assert parent.pid not in first
    ids = {fs.execute("diamond", f"r{n}"): f"r{n}".encode() for n in range(50)}
    for request_id, body in ids.items():
        assert fs.result("diamond", request_id, timeout=30) == b"b:" + body + b"|c:" + body
    killed = first.pop()
    os.kill(int(killed), signal.SIGKILL)  # type: ignore[call-overload]

    def replaced() -> bool:
        pids = {w["pid"] for w in fs.workers()}
        return len(pids) == 2 and killed not in pids and first <= pids

    eventually(replaced, 20, "a new process replaced the killed one")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(30) == 0
    eventually(lambda: fs.workers() == [], 10, "every worker process stopped")
