"""Waiting HTTP calls, woken by the backend's push when a request ends: no end is missed
(not one before the wait registers, nor one while Redis restarts), nothing leaks after
many waits, and callbacks on Redis go out on the push without the periodic check.
Private Redis servers run on ports 20000-20999."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from flowloom import FlowService, Request, RequestNotFound, Status
from flowloom.backends import Backend
from flowloom.backends.redis import RedisBackend, loop_ends
from flowloom.backends.redis.ends import parse
from flowloom.http import create_app
from flowloom.http.waiting import ID_POOL, Waiter, new_request_id
from http_fixtures import AppClient, Gate, Receiver, register_flows
from test_redis_resilience import PrivateRedis

pytestmark = pytest.mark.timeout(120)


class Counting:
    """Counts the status reads a backend gets (``wait``), to show that waits do not poll."""

    def __init__(self, backend: Backend) -> None:
        self.reads = 0  # done
        self.ids: set[str] = set()
        original = backend.wait

        def wait(request_id: str, timeout: float | None) -> Status | None:
            found = original(request_id, timeout)
            self.reads += 1
            self.ids.add(request_id)
            return found

        backend.wait = wait  # type: ignore[method-assign]


@pytest.fixture
def service(
    make_backend: Callable[..., Backend], gate: Gate, backend_kind: str
) -> Iterator[FlowService]:
    backend = make_backend()
    with FlowService(backend=backend, worker_concurrency=4) as fs:
        register_flows(fs, gate)
        fs._ensure_worker()
        yield fs
        gate.opened.set()


def ended(fs: FlowService, request_id: str) -> Status | None:
    return fs.backend.wait(request_id, 10)


# -- no end is missed ----------------------------------------------------------------------------
def test_request_ids_made_here_are_32_hex_digits_and_distinct_across_refills() -> None:
    ids = [new_request_id() for _ in range(3 * ID_POOL // 16 + 7)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.anyio
async def test_an_end_before_the_wait_registers_is_answered_at_once(service: FlowService) -> None:
    """The request ends (and its push goes by) before the wait begins: the one read that
    follows the registration sees it, and nothing waits for a push that has gone."""
    waiter = Waiter(service)
    try:
        record = service._submit("myflow", Request(b"early"))
        assert await anyio.to_thread.run_sync(ended, service, record.request_id) is Status.COMPLETED
        reads = Counting(service.backend)
        with anyio.fail_after(10):
            status = await waiter.wait(record.request_id, None, Status.QUEUED)
        assert status is Status.COMPLETED
        # the one read; on Redis one more if the subscription (made by this first wait)
        # came up while the wait was registered: ends before it are re-read then
        assert reads.reads == 1 if service.embedded else 1 <= reads.reads <= 2
        assert waiter.waiting == {}
    finally:
        waiter.stop()


@pytest.mark.anyio
async def test_an_end_after_the_read_wakes_the_wait_by_push(
    service: FlowService, gate: Gate
) -> None:
    """The request ends while the wait waits: the push answers it, with one read only."""
    waiter = Waiter(service)
    try:
        record = service._submit("gated", Request(b"late"))
        await anyio.to_thread.run_sync(gate.entered.acquire)
        reads = Counting(service.backend)
        async with anyio.create_task_group() as tasks:
            found: list[Status] = []

            async def wait() -> None:
                found.append(await waiter.wait(record.request_id, None, Status.RUNNING))

            tasks.start_soon(wait)
            with anyio.fail_after(10):
                while record.request_id not in waiter.waiting or reads.reads < 1:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.5)  # long enough for a poll to read again and again
            gate.opened.set()
        assert found == [Status.COMPLETED]
        # no polling: the one read, and on Redis one more if the subscription was made
        # while the wait waited (ends before it are re-read then)
        assert reads.reads <= 2
        assert waiter.waiting == {}
    finally:
        waiter.stop()


@pytest.mark.anyio
async def test_execute_registers_before_it_submits(service: FlowService) -> None:
    """A quick flow's end cannot come before its execute waits for it: the wait is
    registered under the request's id before the request exists."""
    waiter = Waiter(service)
    seen: list[bool] = []
    submit = service._submit

    def watched(name: str, request: Request) -> Any:
        seen.append(request.request_id in waiter.waiting)
        return submit(name, request)

    service._submit = watched  # type: ignore[method-assign]
    try:
        with anyio.fail_after(10):
            record, status, result = await waiter.execute("myflow", Request(b"x"), 30)
        assert (status, result) == (Status.COMPLETED, b'you said "x"')
        assert seen == [True]
        with anyio.fail_after(10):
            record, status, result = await waiter.execute(
                "myflow", Request(b"y", request_id="chosen-id"), 30
            )
        assert record.request_id == "chosen-id"
        assert result == b'you said "y"'
        assert waiter.waiting == {}
    finally:
        waiter.stop()


@pytest.mark.anyio
async def test_a_re_read_while_an_execute_submits_does_not_find_its_request_expired(
    service: FlowService,
) -> None:
    """The statuses are read again (a subscription was made) after an execute registered
    and before its request exists: not found then, it has not expired (its end comes
    after the subscription, by push)."""
    if service.backend.nonblocking:
        pytest.skip("the submit runs on the loop: nothing reads in between")
    waiter = Waiter(service)
    submit = service._submit

    def late(name: str, request: Request) -> Any:
        anyio.from_thread.run(waiter._read_all, [request.request_id])
        return submit(name, request)

    service._submit = late  # type: ignore[method-assign]
    try:
        with anyio.fail_after(10):
            _, status, result = await waiter.execute("myflow", Request(b"x"), 30)
        assert (status, result) == (Status.COMPLETED, b'you said "x"')
    finally:
        waiter.stop()


@pytest.mark.anyio
async def test_a_wait_times_out_by_its_deadline_and_an_expired_request_is_not_found(
    service: FlowService, gate: Gate
) -> None:
    waiter = Waiter(service)
    try:
        record = service._submit("gated", Request(b"slow"))
        status = await waiter.wait(record.request_id, 0.2, Status.QUEUED)
        assert status in (Status.QUEUED, Status.RUNNING)
        assert waiter.waiting == {}
        with pytest.raises(RequestNotFound):
            await waiter.wait("no-such-request", 5, Status.QUEUED)
        assert waiter.waiting == {}
    finally:
        gate.opened.set()
        waiter.stop()


# -- nothing leaks -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_thousand_waits_leave_no_future_listener_or_subscription(
    service: FlowService, gate: Gate, backend_kind: str
) -> None:
    """1,000 waits that end in every way (the request completed, the deadline passed, the
    caller went away) leave nothing registered, and one listener on the backend."""
    waiter = Waiter(service)
    try:
        done = [service._submit("myflow", Request(b"%d" % i)) for i in range(400)]
        slow = service._submit("gated", Request(b"slow"))
        await waiter.wait(done[0].request_id, 30, Status.QUEUED)  # the listener is up
        threads = threading.active_count()

        async def completes(request_id: str) -> None:
            assert await waiter.wait(request_id, 30, Status.QUEUED) is Status.COMPLETED

        async def times_out() -> None:
            assert not (await waiter.wait(slow.request_id, 0.05, Status.QUEUED)).finished

        async def goes_away() -> None:
            with anyio.move_on_after(0.05):
                await waiter.wait(slow.request_id, 30, Status.QUEUED)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                for record in done:
                    tasks.start_soon(completes, record.request_id)
                for _ in range(300):
                    tasks.start_soon(times_out)
                for _ in range(300):
                    tasks.start_soon(goes_away)
        assert waiter.waiting == {}
        # the reads ran on anyio's bounded pool; no thread was kept per wait
        pool = anyio.to_thread.current_default_thread_limiter().total_tokens
        assert threading.active_count() <= threads + pool
        if backend_kind == "memory":
            assert len(service.backend._listeners) == 1  # type: ignore[attr-defined]
        else:
            backend = service.backend
            assert isinstance(backend, RedisBackend)
            assert backend._ends.listeners == 1
            client = redis.Redis.from_url(backend.url)
            try:
                assert client.pubsub_numsub(backend.keys.ended) == [
                    (backend.keys.ended.encode(), 1)
                ]
            finally:
                client.close()
        waiter.stop()
        if backend_kind == "memory":
            assert service.backend._listeners == []  # type: ignore[attr-defined]
        else:
            assert service.backend._ends.listeners == 0  # type: ignore[attr-defined]
    finally:
        gate.opened.set()
        waiter.stop()


# -- Redis restarted while waits are pending -----------------------------------------------------
@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server with AOF, that the test kills and starts again."""
    server = PrivateRedis(tmp_path, aof=True)
    server.start()
    yield server
    server.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_waits_pending_across_a_redis_restart_finish_or_time_out(
    private_redis: PrivateRedis, gate: Gate
) -> None:
    """Redis is killed while waits are pending and comes back with its data (AOF). The
    requests then end; the waits finish (the re-subscription re-reads what they wait
    for, and the push comes once it is back), and one with a short deadline answers by
    then although Redis was down."""
    backend = RedisBackend(private_redis.url, retry_for=30, connect_timeout=0.2)
    with FlowService(backend=backend, worker_concurrency=4) as fs:
        register_flows(fs, gate)
        fs._ensure_worker()
        waiter = Waiter(fs)
        try:
            assert waiter._listen(asyncio.get_running_loop())
            probe = redis.Redis.from_url(private_redis.url)
            try:  # the subscription (made by this loop) is up before anything waits
                with anyio.fail_after(10):
                    while not probe.pubsub_numsub(backend.keys.ended)[0][1]:
                        await anyio.sleep(0.01)
            finally:
                probe.close()
            records = [fs._submit("gated", Request(b"%d" % i)) for i in range(4)]
            for _ in records:
                await anyio.to_thread.run_sync(gate.entered.acquire)
            reads = Counting(backend)
            results: dict[int, Status] = {}

            async def wait(index: int, timeout: float) -> None:
                request_id = records[index].request_id
                results[index] = await waiter.wait(request_id, timeout, Status.RUNNING)

            async with anyio.create_task_group() as tasks:
                for index in range(3):
                    tasks.start_soon(wait, index, 60)
                tasks.start_soon(wait, 3, 1.0)
                with anyio.fail_after(10):
                    while len(reads.ids) < 4:  # every wait's one read is done
                        await anyio.sleep(0.01)
                private_redis.kill()
                with anyio.fail_after(10):  # its deadline passes while Redis is down
                    while 3 not in results:
                        await anyio.sleep(0.05)
                assert results[3] is Status.RUNNING
                private_redis.start()
                gate.opened.set()
            assert [results[i] for i in range(3)] == [Status.COMPLETED] * 3
            assert waiter.waiting == {}
        finally:
            gate.opened.set()
            waiter.stop()


@pytest.mark.redis
@pytest.mark.anyio
async def test_an_end_missed_by_a_cut_subscription_is_found_on_resubscribing(
    make_redis_backend: Callable[..., RedisBackend], redis_url: str
) -> None:
    """The push of a request's end is lost (dropped here, as a cut connection would);
    once the subscription is cut and made again, the wait re-reads and is answered."""
    backend = make_redis_backend()
    ends = backend._ends
    deliver = ends._deliver
    dropped: list[bytes] = []
    dropping = threading.Event()

    def lossy(data: bytes) -> None:
        if dropping.is_set():
            dropped.append(data)
        else:
            deliver(data)

    ends._deliver = lossy  # type: ignore[method-assign]
    with FlowService(backend=backend) as fs:
        fs.register("once", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        waiter = Waiter(fs)
        try:
            record = fs._submit("once", Request(b"x"))  # no worker runs it yet
            found: list[Status] = []

            async def wait() -> None:
                found.append(await waiter.wait(record.request_id, 60, Status.QUEUED))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                with anyio.fail_after(10):
                    while record.request_id not in waiter.waiting:
                        await anyio.sleep(0.01)
                    await anyio.sleep(0.1)  # its one read is done: the subscription is up
                dropping.set()
                fs._ensure_worker()
                with anyio.fail_after(10):
                    while not dropped:
                        await anyio.sleep(0.01)
                await anyio.sleep(0.1)
                assert found == []  # the push was lost: the wait still waits
                dropping.clear()
                client = redis.Redis.from_url(redis_url)
                try:
                    assert client.client_kill_filter(_type="pubsub") >= 1
                finally:
                    client.close()
            assert found == [Status.COMPLETED]
            assert dropped == [record.request_id.encode() + b" completed x"]  # with its result
        finally:
            waiter.stop()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_listener_on_an_event_loop_hears_ends_on_that_loop_and_no_thread_subscribes(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """Listening from an event loop, that loop holds the subscription: ends reach the
    listener on the loop's thread, no thread subscribes, and the subscription goes once
    the listener stops. A listener without a loop then gets the thread."""
    backend = make_redis_backend()
    probe = redis.Redis.from_url(backend.url)

    def subscribers() -> int:
        return int(probe.pubsub_numsub(backend.keys.ended)[0][1])

    with FlowService(backend=backend) as fs:
        fs.register("once", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        heard: dict[str, tuple[Status, bytes | None, int]] = {}
        subscribed = asyncio.Event()

        def ended(request_id: str, status: Status, result: bytes | None) -> None:
            heard[request_id] = (status, result, threading.get_ident())

        stop = backend.listen(ended, subscribed.set)
        try:
            with anyio.fail_after(10):
                await subscribed.wait()
            assert "flowloom-ends" not in [thread.name for thread in threading.enumerate()]
            fs._ensure_worker()
            record = fs._submit("once", Request(b"on the loop"))
            with anyio.fail_after(10):
                while record.request_id not in heard:
                    await anyio.sleep(0.01)
            assert heard[record.request_id] == (
                Status.COMPLETED,
                b"on the loop",
                threading.get_ident(),
            )
        finally:
            stop()
        with anyio.fail_after(10):
            while subscribers():
                await anyio.sleep(0.01)
        on_thread = threading.Event()
        stop = await anyio.to_thread.run_sync(backend.listen, ended, on_thread.set)
        try:
            assert await anyio.to_thread.run_sync(on_thread.wait, 10)
            assert "flowloom-ends" in [thread.name for thread in threading.enumerate()]
        finally:
            stop()
    probe.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_loop_subscription_whose_redis_stops_answering_is_cut_and_made_again(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis is frozen (SIGSTOP: the connection stays open, nothing answers): the loop's
    health check cuts the subscription, and once Redis answers again it subscribes
    again and calls ``lost()``, so that the listener reads what it waits for again."""
    monkeypatch.setattr(loop_ends, "HEALTH_CHECK", 0.1)
    backend = RedisBackend(private_redis.url, connect_timeout=0.2)
    losses: list[int] = []
    stop = backend.listen(lambda *_: None, lambda: losses.append(1))
    try:
        with anyio.fail_after(10):
            while not losses:
                await anyio.sleep(0.01)
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(10):
                while not backend.health.degraded:
                    await anyio.sleep(0.01)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
        with anyio.fail_after(10):
            while len(losses) < 2:
                await anyio.sleep(0.01)
    finally:
        stop()
        backend.close()


# -- callbacks on Redis --------------------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.anyio
async def test_callbacks_on_redis_are_sent_on_the_push_without_the_periodic_check(
    make_redis_backend: Callable[..., RedisBackend], gate: Gate
) -> None:
    backend = make_redis_backend()
    with FlowService(backend=backend, worker_concurrency=2) as fs, Receiver() as receiver:
        register_flows(fs, gate)
        fs._ensure_worker()
        async with AppClient(create_app(fs, callback_allow="127.0.0.1")) as client:
            api = client.app.state.flowloom
            api.callbacks.sweep = 3600.0  # the periodic check never comes in this test
            headers = {"X-Async": "true", "X-Callback-Url": receiver.url}
            response = await client.post("/flow/gated", content=b"cb", headers=headers)
            assert response.status_code == 202
            await anyio.to_thread.run_sync(gate.entered.acquire)
            with anyio.fail_after(10):  # the callback waits for the request's end
                while api.callbacks.fresh:
                    await anyio.sleep(0.01)
            assert api.callbacks.pending == 1
            gate.opened.set()
            delivery = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=20))
    assert delivery.body == b"cb|gate|after"
    assert delivery.headers["x-request-status"] == "completed"


@pytest.mark.anyio
async def test_the_server_stopping_ends_every_wait_at_once(
    service: FlowService, gate: Gate
) -> None:
    waiter = Waiter(service)
    try:
        record = service._submit("gated", Request(b"s"))
        found: list[Status] = []

        async def wait() -> None:
            found.append(await waiter.wait(record.request_id, 60, Status.QUEUED))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                while record.request_id not in waiter.waiting:
                    await anyio.sleep(0.01)
                waiter.close()
        assert len(found) == 1
        assert not found[0].finished
        assert waiter.waiting == {}
    finally:
        gate.opened.set()
        waiter.stop()


def test_the_waits_use_the_event_loop_they_run_on() -> None:
    """A waiter used from two event loops in turn (two test clients, two servers)
    listens from the one it runs on."""
    with FlowService() as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
        waiter = Waiter(fs)

        async def run() -> Status:
            _, status, _ = await waiter.execute("myflow", Request(b"a"), 10)
            return status

        assert asyncio.run(run()) is Status.COMPLETED
        assert asyncio.run(run()) is Status.COMPLETED
        assert len(fs.backend._listeners) == 1  # type: ignore[attr-defined]
        waiter.stop()


@pytest.mark.parametrize("size", [0, 100, 4096, 4097, 100_000])
@pytest.mark.anyio
async def test_execute_answers_with_the_result_pushed_or_read(
    service: FlowService, size: int
) -> None:
    """A small result comes with the push of the end (on Redis, up to 4 KiB), a larger
    one is read: either way the execute answers with it, byte for byte."""
    service.register("echo", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
    body = bytes(random.Random(size).randrange(256) for _ in range(size))
    waiter = Waiter(service)
    try:
        with anyio.fail_after(20):
            _, status, result = await waiter.execute("echo", Request(body), 30)
        assert status is Status.COMPLETED
        assert result == body
    finally:
        waiter.stop()


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        (b"r-1 completed", ("r-1", Status.COMPLETED, None)),
        (b"r-1 completed ", ("r-1", Status.COMPLETED, b"")),
        (b"r-1 completed a b\x00\xff", ("r-1", Status.COMPLETED, b"a b\x00\xff")),
        (b"r:2 failed", ("r:2", Status.FAILED, None)),
        (b"r-1 sleeping", None),
        (b"", None),
        (b"\xff\xfe completed", None),
    ],
)
def test_end_messages_are_parsed(message: bytes, parsed: object) -> None:
    assert parse(message) == parsed
