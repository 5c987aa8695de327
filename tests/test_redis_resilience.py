"""The Redis backend when Redis or user code misbehaves: outages longer than any retry
window (with and without persistence), a closed port, a frozen Redis, deadlines, a late
failure after a take-over, tasks that kill their worker, busy workers, sustained load.

Redis servers that are stopped or killed are private ones on ports 7100-7199."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from flowloom import (
    BackendUnavailable,
    FlowService,
    Request,
    RequestFailed,
    RequestNotFound,
    ResultTimeout,
    Status,
)
from flowloom.backends import deadline
from flowloom.backends.redis import RedisBackend
from test_redis_faults import APP, Workers, client, eventually, live_workers, runs

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]


@pytest.fixture
def workers(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(redis_url, redis_prefix, tmp_path)
    yield started
    started.close()


@pytest.fixture
def fs(redis_url: str, redis_prefix: str) -> Iterator[FlowService]:
    service = client(redis_url, redis_prefix)
    yield service
    service.close()


# -- private Redis servers -------------------------------------------------------------------
def free_port() -> int:
    for port in random.sample(range(7100, 7200), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 7100-7199")


class PrivateRedis:
    """A redis-server of this test's own, that the test may kill, stop and restart."""

    def __init__(self, tmp_path: Path, aof: bool) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(tmp_path), "--save", "",
            "--appendonly", "yes" if aof else "no", "--appendfsync", "always",
        ]  # fmt: skip
        self.log = tmp_path / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            eventually(lambda: _answers(probe), 10, "the private Redis answers")
            pid = probe.info("server")["process_id"]  # type: ignore[index]
        finally:
            probe.close()
        assert pid == self.proc.pid, f"port {self.port} is another Redis's (pid {pid})"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[bool], PrivateRedis]]:
    made: list[PrivateRedis] = []

    def make(aof: bool = False) -> PrivateRedis:
        server = PrivateRedis(tmp_path, aof)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def closed_port() -> int:
    """A port in the private range nothing listens on."""
    port = free_port()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something listens on {port}"
    return port


# -- errors and deadlines --------------------------------------------------------------------
def test_a_closed_port_raises_backend_unavailable_in_bounded_time() -> None:
    url = f"redis://:s3cret@127.0.0.1:{closed_port()}/0"
    with FlowService(redis_url=url) as fs:
        fs.register("diamond", APP.diamond)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as raised:
            fs.execute("diamond", b"x")
        assert time.monotonic() - started < 10 + 2  # retry_for, then it gives up
        message = str(raised.value)
        assert "s3cret" not in message
        assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in message
        assert "ConnectionError" in message  # the cause
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            fs.backend.ping()
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            fs.result("diamond", "some-id", timeout=2)
        assert time.monotonic() - started < 2 + 1


@pytest.mark.parametrize("timeout", [3, 6, 10])
def test_result_returns_by_its_deadline_with_no_worker(
    make_redis_backend: Callable[..., RedisBackend], timeout: float
) -> None:
    with FlowService(backend=make_redis_backend()) as fs:
        fs.register("slow", APP.slow)
        request_id = fs.execute("slow", b"0")
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            fs.result("slow", request_id, timeout=timeout)
        took = time.monotonic() - started
        assert timeout <= took < timeout + 1, took


def test_deadlines_hold_while_redis_is_frozen(
    private_redis: Callable[[bool], PrivateRedis], redis_prefix: str
) -> None:
    server = private_redis(False)
    with FlowService(backend=RedisBackend(server.url, prefix=redis_prefix)) as fs:
        fs.register("slow", APP.slow)
        request_id = fs.execute("slow", b"0")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # up, but answering nothing
        try:
            for timeout in (0.5, 3):
                started = time.monotonic()
                with pytest.raises((BackendUnavailable, ResultTimeout)):
                    fs.result("slow", request_id, timeout=timeout)
                assert time.monotonic() - started < timeout + 1
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                fs.backend.ping()
            assert time.monotonic() - started < 1.5
            started = time.monotonic()
            with pytest.raises(BackendUnavailable), deadline(2):
                fs.state("slow", request_id)
            assert time.monotonic() - started < 2 + 1
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert fs.state("slow", request_id).status is Status.QUEUED  # and all is well again


# -- the retry path --------------------------------------------------------------------------
@pytest.mark.parametrize("backoff", [0, 0.0004])
def test_zero_and_sub_millisecond_backoffs_retry_on_redis(
    make_redis_backend: Callable[..., RedisBackend], backoff: float
) -> None:
    tries: list[int] = []

    def flaky(data: bytes, options: Any) -> bytes:
        tries.append(1)
        if len(tries) < 3:
            raise ValueError(f"try {len(tries)}")
        return b"ok"

    def define(workflow: Any, context: Any) -> None:
        workflow.dag.node("a", flaky, retries=3, backoff=backoff)

    with FlowService(backend=make_redis_backend(), worker_concurrency=2) as fs:
        fs.register("flaky", define)
        fs._ensure_worker()
        request_id = fs.execute("flaky", b"")
        assert fs.result("flaky", request_id, timeout=20) == b"ok"
        vertex = fs.state("flaky", request_id).vertices["a"]
        assert (vertex.status, vertex.attempts, vertex.error) == (Status.COMPLETED, 3, None)


def test_redis_refusing_writes_for_a_while_loses_no_task_and_no_thread(
    private_redis: Callable[[bool], PrivateRedis], redis_prefix: str
) -> None:
    """Redis refuses every write (maxmemory) for 2 s while the only worker thread holds
    and reports tasks: each refused completion waits, the thread lives on, and every
    request completes once Redis takes writes again."""
    server = private_redis(False)
    backend = RedisBackend(server.url, prefix=redis_prefix, visibility_timeout=1.0)
    admin = redis.Redis.from_url(server.url)
    try:
        with FlowService(backend=backend, worker_concurrency=1) as fs:
            fs.register("diamond", APP.diamond)
            ids = {fs.execute("diamond", f"r{n}"): f"r{n}".encode() for n in range(100)}
            worker = fs._ensure_worker()
            eventually(lambda: fs.requests(status=Status.COMPLETED, limit=1), 20, "work runs")
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            time.sleep(2.0)
            admin.config_set("maxmemory", 0)
            for request_id, body in ids.items():
                assert fs.result("diamond", request_id, timeout=60) == b"b:" + body + b"|c:" + body
            assert all(thread.is_alive() for thread in worker._threads)
            eventually(lambda: backend._consumer.held() == 0, 10, "no task held")
    finally:
        admin.close()


# -- a late failure after a take-over --------------------------------------------------------
@pytest.mark.parametrize("flow", ["late", "late_retry"])
def test_a_frozen_worker_that_fails_late_changes_nothing(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str, flow: str
) -> None:
    frozen = workers.start(concurrency=1, visibility=1)
    live_workers(fs, 1)
    request_id = fs.execute(flow, b"2")  # the first run sleeps 2 s, then raises
    eventually(lambda: runs(redis_url, redis_prefix, "late") == {request_id: 1}, 20, "runs")
    frozen.send_signal(signal.SIGSTOP)
    try:
        workers.start(concurrency=1, visibility=1)  # takes the task over and succeeds
        assert fs.result(flow, request_id, timeout=30) == b"done!"
    finally:
        frozen.send_signal(signal.SIGCONT)  # wakes, its handler raises: too late
    time.sleep(3.0)  # its sleep ends, it raises and reports; give a retry time to run
    state = fs.state(flow, request_id)
    assert state.status is Status.COMPLETED
    assert state.error is None
    assert state.vertices["late"].status is Status.COMPLETED
    assert state.vertices["late"].error is None
    assert runs(redis_url, redis_prefix, "late") == {request_id: 2}  # no extra attempt
    assert fs.result(flow, request_id, timeout=1) == b"done!"
    assert frozen.poll() is None


# -- poison tasks ----------------------------------------------------------------------------
def test_a_task_that_kills_its_worker_every_time_fails_after_max_deliveries(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    options = {"concurrency": 1, "visibility": 0.5, "max_deliveries": 3}
    workers.start(**options)
    live_workers(fs, 1)
    request_id = fs.execute("suicide", b"")
    deadline_at = time.monotonic() + 60
    while not fs.state("suicide", request_id).status.finished:
        assert time.monotonic() < deadline_at, "the request never ends"
        if all(proc.poll() is not None for proc in workers.procs):
            workers.start(**options)  # a supervisor restarts the dead worker
        time.sleep(0.1)
    with pytest.raises(RequestFailed) as failed:
        fs.result("suicide", request_id, timeout=1)
    error = failed.value.error
    assert error is not None
    assert (error.vertex, error.type) == ("suicide", "WorkerDied")
    assert error.message == "delivered 3 times; the worker died each time"
    assert runs(redis_url, redis_prefix, "suicide") == {request_id: 3}


# -- busy workers ----------------------------------------------------------------------------
def test_quick_requests_do_not_wait_behind_a_busy_worker(fs: FlowService, workers: Workers) -> None:
    for _ in range(2):
        workers.start(concurrency=1, visibility=30)
    live_workers(fs, 2)
    long_id = fs.execute("slow", b"20")
    eventually(lambda: fs.state("slow", long_id).status is Status.RUNNING, 20, "it runs")
    took = []
    for _ in range(10):
        started = time.monotonic()
        assert fs.run("slow", b"0", timeout=15) == b"slept 0"
        took.append(time.monotonic() - started)
    print(f"\nquick requests beside a busy worker: {min(took):.3f}-{max(took):.3f}s")
    # behind the 20 s task, one would wait 20 s; the idle worker answers at once
    assert max(took) < 2.0, took
    assert fs.state("slow", long_id).status is Status.RUNNING


# -- Redis outages ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_a_worker_rides_out_a_redis_outage_longer_than_retry_for(
    private_redis: Callable[[bool], PrivateRedis],
    tmp_path: Path,
    redis_prefix: str,
    aof: bool,
) -> None:
    server = private_redis(aof)
    workers = Workers(server.url, redis_prefix, tmp_path)
    fs = client(server.url, redis_prefix, retry_for=1.0)
    try:
        worker = workers.start(concurrency=2, visibility=2, retry_for=1.0)
        live_workers(fs, 1)
        running = [fs.execute("slow", b"2.5") for _ in range(2)]  # held and running
        queued = [fs.execute("slow", b"0.1") for _ in range(4)]  # waiting
        eventually(
            lambda: set(runs(server.url, redis_prefix, "slow")) == set(running), 20, "both run"
        )
        server.kill()  # they finish during the outage: their completions wait
        time.sleep(4.0)  # longer than retry_for, of the worker and of the client
        with pytest.raises(BackendUnavailable):
            fs.state("slow", running[0])
        server.start()
        back = time.monotonic()
        # listed again once Redis answers, first as degraded
        eventually(lambda: [w["degraded"] for w in fs.workers()] == [True], 10, "degraded")
        fresh = fs.execute("slow", b"0")
        assert fs.result("slow", fresh, timeout=30) == b"slept 0"
        recovery = time.monotonic() - back
        print(f"\nrecovery ({'aof' if aof else 'no persistence'}): {recovery:.2f}s")
        for request_id in running + queued:
            if aof:
                assert fs.result("slow", request_id, timeout=30).startswith(b"slept")
            else:
                with pytest.raises(RequestNotFound):
                    fs.result("slow", request_id, timeout=5)
                with pytest.raises(RequestNotFound):
                    fs.state("slow", request_id)
        assert worker.poll() is None  # the same process did it all
        listed = live_workers(fs, 1)
        assert listed[0]["pid"] == worker.pid
        assert fs.run("slow", b"0", timeout=10) == b"slept 0"
        eventually(lambda: fs.workers()[0]["degraded"] is False, 10, "healthy again")
        log = (tmp_path / "worker-0.log").read_text()
        # once per outage, not once per retry
        assert 1 <= log.count("; retrying") <= 2, log
        assert 1 <= log.count("backing off") <= 2, log
        assert "reconnected" in log
    finally:
        fs.close()
        workers.close()


# -- bookkeeping -----------------------------------------------------------------------------
@pytest.mark.slow
def test_listing_indexes_return_to_zero_after_sustained_load(
    redis_url: str, redis_prefix: str
) -> None:
    backend = RedisBackend(redis_url, prefix=redis_prefix, retention=2.0)
    raw = redis.Redis.from_url(redis_url)
    indexes = [
        f"{redis_prefix}:requests",
        f"{redis_prefix}:expiries",
        f"{redis_prefix}:flow:{{slow}}",
    ]

    def sizes() -> list[int]:
        return [int(raw.zcard(key)) for key in indexes]  # type: ignore[arg-type]

    try:
        with FlowService(backend=backend, worker_concurrency=4) as fs:
            fs.register("slow", APP.slow)
            fs._ensure_worker()
            rate, seconds = 150, 60
            started = time.monotonic()
            largest = 0
            ids = []
            for n in range(rate * seconds):
                due = started + n / rate
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                ids.append(fs.execute("slow", b"0"))
                if n % rate == 0:
                    largest = max(largest, *sizes())
            for request_id in ids[-100:]:
                assert fs.result("slow", request_id, timeout=60) == b"slept 0"
            print(f"\nlargest index while loaded: {largest}")
            # what is live plus what ended within retention plus one sweep period
            assert largest < rate * (2 + 5 + 5), largest
            eventually(lambda: sizes() == [0, 0, 0], 30, f"empty indexes, not {sizes()}")
    finally:
        raw.close()


def test_a_reused_id_stays_listed(make_redis_backend: Callable[..., RedisBackend]) -> None:
    with FlowService(backend=make_redis_backend(retention=0.3)) as fs:
        fs.register("slow", APP.slow)
        fs.execute("slow", Request(body=b"0", request_id="again"))
        fs.stop("slow", "again")
        time.sleep(0.6)  # it expired; the sweep has not run yet
        with pytest.raises(RequestNotFound):
            fs.state("slow", "again")
        fs.execute("slow", Request(body=b"0", request_id="again"))
        fs.backend.sweep()  # drops the old request's expiry entry, not the new request
        assert [s.request_id for s in fs.requests("slow")] == ["again"]
        assert [s.request_id for s in fs.requests()] == ["again"]
        # reused by another flow: listed there, and no longer under the old one
        fs.register("diamond", APP.diamond)
        fs.execute("slow", Request(body=b"0", request_id="moved"))
        fs.stop("slow", "moved")
        time.sleep(0.6)
        fs.execute("diamond", Request(body=b"x", request_id="moved"))
        fs.backend.sweep()
        assert [s.request_id for s in fs.requests("diamond")] == ["moved"]
        assert [s.request_id for s in fs.requests("slow")] == ["again"]
        assert {s.request_id for s in fs.requests()} == {"again", "moved"}


def test_consumers_long_gone_are_dropped_from_the_group(
    make_redis_backend: Callable[..., RedisBackend], redis_url: str
) -> None:
    backend = make_redis_backend()
    tasks = backend.keys.tasks
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.xgroup_create(tasks, "workers", id="0", mkstream=True)
        raw.xadd(tasks, {"t": b"x"})
        raw.xreadgroup("workers", "holds-one", {tasks: ">"}, count=1)
        raw.xgroup_createconsumer(tasks, "workers", "holds-none")
        time.sleep(0.05)
        dropped = backend._consumer._scripts("forget", [tasks], ["workers", "me", 10])
        assert dropped == 1
        names = {c["name"] for c in raw.xinfo_consumers(tasks, "workers")}
        assert names == {b"holds-one"}  # its task is not lost with it
    finally:
        raw.close()


# -- scripts lost and loaded again -------------------------------------------------------------
def _foreach_of(items: int) -> Callable[[Any, Any], None]:
    def define(workflow: Any, context: Any) -> None:
        each = workflow.dag.foreach_branch(
            "each",
            lambda data: {f"k{n}": b"%d" % n for n in range(items)},
            lambda outputs: b"%d" % sum(int(v) for v in outputs.values()),
        )
        each.node("item", lambda data, options: data)

    return define


def test_a_redis_knowing_some_scripts_only_loses_no_delivery(
    private_redis: Callable[[bool], PrivateRedis], redis_prefix: str
) -> None:
    """A big split's deliveries go ahead of its completion in one pipeline. With Redis
    holding the completion's script but not the deliveries' (another process loaded one
    script), the deliveries must still land before the completion does."""
    from flowloom.backends.redis.scripts import SOURCES

    server = private_redis(False)
    items = 2_500  # more deliveries than one script call takes: sent in parts
    for flush in (False, True):
        with redis.Redis(port=server.port) as admin:
            admin.script_flush()
            admin.script_load(SOURCES["complete"])
            admin.script_load(SOURCES["begin"])
        with FlowService(redis_url=server.url, redis_prefix=redis_prefix) as fs:
            fs.register("each", _foreach_of(items))
            fs._ensure_worker()
            if flush:  # scripts lost while the process runs: all are loaded again
                fs.run("each", b"", timeout=30)
                with redis.Redis(port=server.port) as admin:
                    admin.script_flush()
                    admin.script_load(SOURCES["complete"])
            result = fs.run("each", b"", timeout=30)
        assert result == b"%d" % (items * (items - 1) // 2), flush


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_a_worker_stopped_while_redis_is_down_exits_and_loses_nothing(
    private_redis: Callable[[bool], PrivateRedis],
    tmp_path: Path,
    redis_prefix: str,
    outage: str,
) -> None:
    """SIGTERM while Redis is down (killed, or frozen by SIGSTOP): the worker cannot hand
    back what it holds, says so, and exits anyway in bounded time (it does not wait for
    Redis); once Redis is back, another worker takes those tasks over after the
    visibility timeout and every request completes with its own result."""
    server = private_redis(True)
    workers = Workers(server.url, redis_prefix, tmp_path)
    fs = client(server.url, redis_prefix, retry_for=1.0)
    try:
        first = workers.start(concurrency=1, visibility=2, retry_for=1.0)
        live_workers(fs, 1)
        running = fs.execute("slow", b"1.5")
        queued = [fs.execute("slow", b"0.%d" % n) for n in range(1, 5)]
        eventually(lambda: running in runs(server.url, redis_prefix, "slow"), 20, "it runs")
        if outage == "killed":
            server.kill()
        else:
            server.freeze()
        stopped = time.monotonic()
        first.send_signal(signal.SIGTERM)
        code = first.wait(60)
        took = time.monotonic() - stopped
        print(f"\nstop with Redis down: exit {code} after {took:.2f}s")
        assert code == 0
        assert took < 20  # the running task's grace (10 s), not a timeout per call
        log = (tmp_path / "worker-0.log").read_text()
        assert "taken over after the visibility timeout" in log, log
        assert "Traceback" not in log, log
        if outage == "killed":
            server.start()
        else:
            server.thaw()
        workers.start(concurrency=4, visibility=2, retry_for=1.0)
        assert fs.result("slow", running, timeout=30) == b"slept 1.5"
        for n, request_id in enumerate(queued, 1):
            assert fs.result("slow", request_id, timeout=30) == b"slept 0.%d" % n
        counted = runs(server.url, redis_prefix, "slow")
        assert set(counted) == {running, *queued}
        # at least once: the task running at the stop may run again, the others did not
        # begin on the stopped worker (it ran one task at a time)
        assert counted[running] in (1, 2)
        assert all(counted[request_id] == 1 for request_id in queued), counted
    finally:
        fs.close()
        workers.close()


@pytest.mark.slow
def test_an_idle_worker_reports_redis_back_only_when_it_is(
    private_redis: Callable[[bool], PrivateRedis], tmp_path: Path, redis_prefix: str
) -> None:
    """An idle worker's periodic work that has nothing to send to Redis (no task held to
    keep alive, no thread wanting a task) does not count as Redis answering: an outage
    is reported once, its end once, when Redis is back, and the worker stays degraded
    in between."""
    server = private_redis(False)
    workers = Workers(server.url, redis_prefix, tmp_path)
    fs = client(server.url, redis_prefix, retry_for=1.0)
    try:
        workers.start(concurrency=1, visibility=0.6, retry_for=1.0)
        live_workers(fs, 1)
        server.kill()
        time.sleep(3.0)  # many keep-alive rounds (every 0.2 s) with nothing held
        log = (tmp_path / "worker-0.log").read_text()
        assert log.count("unavailable") == 1, log
        assert "reconnected" not in log, log
        server.start()
        eventually(
            lambda: "reconnected" in (tmp_path / "worker-0.log").read_text(), 10, "reconnected"
        )
        assert fs.run("slow", b"0", timeout=20) == b"slept 0"
    finally:
        fs.close()
        workers.close()


def test_a_completion_refused_for_want_of_memory_is_sent_again_not_run_again(
    private_redis: Callable[[bool], PrivateRedis], redis_prefix: str, tmp_path: Path
) -> None:
    """Redis refuses writes (maxmemory) while a task runs: its completion waits and goes
    through once Redis takes writes again. The task does not run a second time, its
    request does not wait for the visibility timeout, and the refusals are told in one
    warning, not one per call."""
    server = private_redis(False)
    workers = Workers(server.url, redis_prefix, tmp_path)
    fs = client(server.url, redis_prefix)
    admin = redis.Redis.from_url(server.url)
    try:
        workers.start(concurrency=1, visibility=30)
        live_workers(fs, 1)
        request_id = fs.execute("slow", b"1")
        eventually(lambda: request_id in runs(server.url, redis_prefix, "slow"), 20, "it runs")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        time.sleep(2.5)  # the task ends during the refusal; its completion is refused
        admin.config_set("maxmemory", 0)
        refused = time.monotonic()
        assert fs.result("slow", request_id, timeout=60) == b"slept 1"
        assert time.monotonic() - refused < 10  # sent again, not taken over after 30 s
        assert runs(server.url, redis_prefix, "slow") == {request_id: 1}
        log = (tmp_path / "worker-0.log").read_text()
        assert log.count("refused") == 1, log
        assert "reconnected" not in log, log  # no outage begun and ended per call
        assert log.count("backing off") <= 1, log
    finally:
        admin.close()
        fs.close()
        workers.close()


def test_a_worker_started_while_redis_refuses_writes_runs_once_it_takes_them(
    private_redis: Callable[[bool], PrivateRedis], redis_prefix: str, tmp_path: Path
) -> None:
    """A worker process started while Redis is full does not give up: it says it is not
    announced yet, then is listed and runs what waits once Redis takes writes again."""
    server = private_redis(False)
    workers = Workers(server.url, redis_prefix, tmp_path)
    fs = client(server.url, redis_prefix)
    admin = redis.Redis.from_url(server.url)
    try:
        request_id = fs.execute("slow", b"0")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        worker = workers.start(concurrency=1)
        log = tmp_path / "worker-0.log"
        eventually(lambda: "is not announced yet" in log.read_text(), 20, "it says so")
        assert worker.poll() is None
        admin.config_set("maxmemory", 0)
        assert fs.result("slow", request_id, timeout=30) == b"slept 0"
        assert live_workers(fs, 1)[0]["pid"] == worker.pid
        assert "Traceback" not in log.read_text()
    finally:
        admin.close()
        fs.close()
        workers.close()


def test_well_into_an_outage_a_call_gives_up_at_once(
    private_redis: Callable[[bool], PrivateRedis], redis_prefix: str
) -> None:
    """``retry_for`` is a window from the start of an outage, not one per call: the
    first call rides it out, a call made after it gives up after one attempt (an HTTP
    caller gets its 503 at once, not after another window), and once Redis is back the
    next call goes through."""
    server = private_redis(True)
    fs = client(server.url, redis_prefix, retry_for=2.0)
    try:
        request_id = fs.execute("slow", b"0")
        server.kill()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            fs.state("slow", request_id)
        first = time.monotonic() - started
        assert 1.5 < first < 4, first  # the window
        took = []
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                fs.state("slow", request_id)
            took.append(time.monotonic() - started)
        assert max(took) < 1.0, took  # one attempt each, no window of their own
        server.start()
        assert fs.state("slow", request_id).status is Status.QUEUED
    finally:
        fs.close()


def test_connections_redis_closes_while_idle_are_no_outage(
    tmp_path: Path, redis_prefix: str
) -> None:
    """A Redis that closes connections idle for a second (its ``timeout`` setting, as
    some managed Redis and proxies do): a worker's periodic calls and a client's calls
    after a pause open a new connection at once; no outage is logged, the worker is not
    listed as degraded, requests run, and a stop hands back what it holds."""
    server = PrivateRedis(tmp_path, aof=False)
    server.command += ["--timeout", "1"]
    server.start()
    workers = Workers(server.url, redis_prefix, tmp_path)
    fs = client(server.url, redis_prefix)
    try:
        worker = workers.start(concurrency=1, visibility=3)  # keep-alive every second
        live_workers(fs, 1)
        running = fs.execute("slow", b"4")  # held across several keep-alives
        waiting = fs.execute("slow", b"0")
        time.sleep(2.5)  # every connection of the worker and of this client idles past 1 s
        assert fs.workers()[0]["degraded"] is False
        assert fs.result("slow", running, timeout=20) == b"slept 4"
        assert fs.result("slow", waiting, timeout=20) == b"slept 0"
        time.sleep(2.5)
        assert fs.run("slow", b"0", timeout=20) == b"slept 0"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        log = (tmp_path / "worker-0.log").read_text()
        assert "unavailable" not in log, log
        assert "could not hand back" not in log, log
        assert runs(server.url, redis_prefix, "slow")[running] == 1
    finally:
        fs.close()
        workers.close()
        server.close()
