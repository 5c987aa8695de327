"""Submits from the HTTP server's event loop: on Redis sent by the loop itself
(``loop_submits.py``), and the ordinary way, on a thread, whenever that fails."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

from flowloom import DuplicateRequest, FlowService, Status, engine
from flowloom.backends import RequestRecord
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.loop_submits import LoopSubmits
from flowloom.http import create_app
from http_fixtures import AppClient
from test_backend_contract import linear, plan_of
from test_redis_faults import eventually
from test_redis_resilience import PrivateRedis, _answers, closed_port

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def record_of(request_id: str, created: float = 1234.5) -> RequestRecord:
    return RequestRecord(request_id, "linear", "v1", b"in", {"who": ["me"]}, created=created)


def loop_submits(backend: RedisBackend) -> LoopSubmits:
    return backend._loop_submits


@pytest.mark.anyio
async def test_the_loop_creates_the_request_and_queues_its_first_task(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    backend = make_redis_backend()
    backend._store._scripts.load()  # the loop's client sends EVALSHA only (a fresh Redis: NOSCRIPT)
    plan = plan_of(linear)
    record = record_of("r1")
    keys, args = backend._store.submit_call(record, engine.start(plan, b"in"))
    try:
        with anyio.fail_after(10):
            assert await loop_submits(backend).submit(keys, args)
            # the same request again: not created, for the ordinary way to judge
            assert not await loop_submits(backend).submit(keys, args)
    finally:
        backend.leave_loop()
    found = backend.record("r1")
    assert found is not None
    assert found.query == {"who": ["me"]}
    assert found.body == b"in"
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.QUEUED
    task = backend.claim("w", 5)
    assert task is not None
    assert (task.request_id, task.step) == ("r1", "a")
    assert backend.claim("w", 0.3) is None  # queued once


@pytest.mark.anyio
async def test_a_duplicate_goes_the_ordinary_way_and_is_told_from_a_resent_submit(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    backend = make_redis_backend()
    plan = plan_of(linear)
    try:
        with anyio.fail_after(10):
            await backend.submit_async(record_of("same"), engine.start(plan, b"in"))
            await backend.submit_async(record_of("same"), engine.start(plan, b"in"))  # resent
            with pytest.raises(DuplicateRequest):
                await backend.submit_async(record_of("same", 1234.6), engine.start(plan, b"in"))
    finally:
        backend.leave_loop()
    found = backend.record("same")
    assert found is not None
    assert found.created == 1234.5


@pytest.mark.anyio
async def test_without_a_connection_the_submit_takes_the_ordinary_way(
    redis_url: str, redis_prefix: str, make_redis_backend: Callable[..., RedisBackend]
) -> None:
    """The loop cannot connect (here: its URL's port is closed; the ordinary clients use
    the real one): the submit is made on a thread, and the loop stops trying for a while."""
    backend = make_redis_backend()
    backend._loop_submits = LoopSubmits(
        f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=1.0, connect_timeout=0.5
    )
    plan = plan_of(linear)
    try:
        with anyio.fail_after(10):
            await backend.submit_async(record_of("r1"), engine.start(plan, b"in"))
        assert backend._loop_submits._replies is None
        assert backend._loop_submits._paused_until > 0
    finally:
        backend.leave_loop()
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.QUEUED


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path, aof=False)
    server.start()
    yield server
    server.close()


@pytest.mark.anyio
async def test_after_redis_lost_its_scripts_the_ordinary_way_loads_them(
    private_redis: PrivateRedis,
) -> None:
    backend = RedisBackend(private_redis.url, retry_for=5)
    plan = plan_of(linear)
    try:
        with anyio.fail_after(10):
            await backend.submit_async(record_of("r1"), engine.start(plan, b"in"))
            probe = redis.Redis.from_url(private_redis.url)
            try:
                probe.script_flush()
            finally:
                probe.close()
            await backend.submit_async(record_of("r2"), engine.start(plan, b"in"))
            await backend.submit_async(record_of("r3"), engine.start(plan, b"in"))
            # the loop's connection is kept: the scripts were not its fault
            assert backend._loop_submits._replies is not None
        for request_id in ("r1", "r2", "r3"):
            state = backend.state(request_id)
            assert state is not None
            assert state.status is Status.QUEUED
    finally:
        backend.leave_loop()
        backend.close()


@pytest.mark.anyio
async def test_a_redis_that_hangs_cuts_the_connection_after_the_socket_timeout(
    private_redis: PrivateRedis,
) -> None:
    """No reply within the socket timeout: the submit gives up, for the ordinary way."""
    backend = RedisBackend(private_redis.url, retry_for=5)
    submits = LoopSubmits(private_redis.url, socket_timeout=0.3, connect_timeout=0.5)
    plan = plan_of(linear)
    assert private_redis.proc is not None
    try:
        backend._store._scripts.load()
        keys, args = backend._store.submit_call(record_of("r1"), engine.start(plan, b"in"))
        with anyio.fail_after(10):
            assert await submits.submit(keys, args)
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            keys, args = backend._store.submit_call(record_of("r2"), engine.start(plan, b"in"))
            with anyio.fail_after(5):
                assert not await submits.submit(keys, args)
            assert submits._replies is None
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
    finally:
        submits.close()
        backend.close()


@pytest.mark.anyio
async def test_a_password_and_a_db_number_of_the_url_are_used(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, aof=False)
    with server.log.open("ab") as out:
        server.proc = subprocess.Popen(
            [*server.command, "--requirepass", "s3cret"], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    probe = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    backend = RedisBackend(url, retry_for=5)
    try:
        eventually(lambda: _answers(probe), 10, "the private Redis answers")
        plan = plan_of(linear)
        keys, args = backend._store.submit_call(record_of("r1"), engine.start(plan, b"in"))
        backend._store._scripts.load()  # for the loop's EVALSHA
        with anyio.fail_after(10):
            assert await backend._loop_submits.submit(keys, args)
        assert probe.exists(backend.keys.request("r1").request)  # in db 3
    finally:
        backend.leave_loop()
        backend.close()
        probe.close()
        server.close()


@pytest.mark.anyio
async def test_over_http_sync_async_and_duplicate_executes(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """Within the app's lifespan the loop submits; a duplicate is told the ordinary way."""
    backend = make_redis_backend()
    with FlowService(backend=backend, worker_concurrency=2) as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("n", lambda d, o: d + b"!"))
        fs._ensure_worker()
        app = create_app(fs)
        async with app.router.lifespan_context(app), AppClient(app) as http:
            with anyio.fail_after(20):
                one = {"X-Request-Id": "one"}
                answer = await http.post("/flow/echo", content=b"hi", headers=one)
                assert (answer.status_code, answer.content) == (200, b"hi!")
                assert backend._loop_submits._replies is not None  # sent by the loop
                again = await http.post("/flow/echo", content=b"hi", headers=one)
                assert again.status_code == 409
                queued = await http.post("/flow/echo", content=b"yo", headers={"X-Async": "1"})
                assert queued.status_code == 202
        assert backend._loop_submits._replies is None  # gone with the lifespan
        # waited for on a thread, the loop free to hand over the task its submit claimed
        queued_id = queued.headers["X-Request-Id"]
        assert await anyio.to_thread.run_sync(fs.result, "echo", queued_id, 10) == b"yo!"


@pytest.mark.anyio
async def test_without_a_lifespan_the_submits_are_made_on_threads(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """An app run without its lifespan could not drop the loop's connection at its end:
    its submits go the ordinary way."""
    backend = make_redis_backend()
    with FlowService(backend=backend, worker_concurrency=2) as fs:
        fs.register("echo", lambda wf, ctx: wf.dag.node("n", lambda d, o: d + b"!"))
        fs._ensure_worker()
        async with AppClient(create_app(fs)) as http:
            with anyio.fail_after(20):
                answer = await http.post("/flow/echo", content=b"hi")
            assert (answer.status_code, answer.content) == (200, b"hi!")
            assert backend._loop_submits._replies is None
