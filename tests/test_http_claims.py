"""Tasks claimed by the submit itself (``lua/submit.lua``): an execute sent from the
server's event loop claims and begins its first task for the server's idle worker
threads, which run it without the fetcher's wake-up. Only for idle threads (another
process still gets the rest), and pending for the server's consumer as any task it
reads: a server killed or frozen with it loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import anyio
import httpx
import pytest
import redis

from flowloom import Status, engine
from flowloom.backends import Task
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.keys import GROUP
from test_backend_contract import linear, plan_of
from test_http import wait_until_up
from test_http_submits import record_of
from test_redis_faults import eventually
from test_redis_resilience import free_port

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]


def waiting_claim(backend: RedisBackend) -> tuple[threading.Thread, list[Task | None]]:
    """A worker thread of ``backend`` waiting for a task (for up to 10 s)."""
    got: list[Task | None] = []
    thread = threading.Thread(target=lambda: got.append(backend.claim("w", 10)), daemon=True)
    thread.start()
    eventually(lambda: backend._consumer._room() == 1 or None, 10, "a thread waiting")
    return thread, got


def pending_for(backend: RedisBackend) -> list[str]:
    """The consumers the stream's pending tasks are held by."""
    pending = backend._redis.xpending_range(backend.keys.tasks, GROUP, "-", "+", 100)
    return [entry["consumer"].decode() for entry in pending]


@pytest.mark.anyio
async def test_a_submit_from_the_loop_hands_its_task_begun_to_a_waiting_thread(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    backend = make_redis_backend()
    backend._store._scripts.load()  # the loop's EVALSHA needs them known
    thread, got = waiting_claim(backend)
    try:
        with anyio.fail_after(10):
            await backend.submit_async(record_of("r1"), engine.start(plan_of(linear), b"in"))
        # handed over in the turn of the loop that read the reply, once the callers it
        # woke have taken their next step (this one's is to yield): a thread woken
        # before would only wait for the GIL the loop holds
        assert backend._consumer.held() == 0
        await anyio.sleep(0)
        assert backend._consumer.held() == 1
    finally:
        backend.leave_loop()
    thread.join(10)
    task = got[0]
    assert task is not None
    assert (task.request_id, task.step) == ("r1", "a")
    # begun by the submit itself: running before the worker's begin, pending for this
    # process's consumer (kept alive by it, taken over if it dies)
    state = backend.state("r1")
    assert state is not None
    assert state.status is Status.RUNNING
    assert state.vertices["a"].status is Status.RUNNING
    assert pending_for(backend) == [backend._consumer.name]
    assert backend._consumer.held() == 1
    assert backend.begin(task, "a", "a")  # runs without a second look


@pytest.mark.anyio
async def test_with_no_thread_idle_the_submit_claims_nothing_and_another_process_gets_it(
    make_redis_backend: Callable[..., RedisBackend],
) -> None:
    """The server's worker is busy (no thread waits): its submit leaves the task on the
    stream, and a second process's worker takes it."""
    server = make_redis_backend()
    server._store._scripts.load()
    assert server.claim("server", 0.05) is None  # the consumer exists; its thread went on
    assert server._consumer._room() == 0
    time.sleep(0.5)  # the fetcher's read for that thread (blocking 0.25 s at most) is over
    other = make_redis_backend()
    try:
        with anyio.fail_after(10):
            await server.submit_async(record_of("r1"), engine.start(plan_of(linear), b"in"))
    finally:
        server.leave_loop()
    assert pending_for(server) == []
    task = other.claim("other", 5)
    assert task is not None
    assert task.request_id == "r1"
    assert pending_for(server) == [other._consumer.name]


SERVER = textwrap.dedent(
    """
    import os, sys, time
    from flowloom import FlowService
    from flowloom.backends.redis import RedisBackend
    from flowloom.http import serve

    port, url, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def step(data, options):
        if os.environ["FLOWLOOM_TEST_STALL"] == "1":
            print("running", flush=True)
            time.sleep(60)
        return data + b"!"

    backend = RedisBackend(url, prefix=prefix, visibility_timeout=1.0)
    fs = FlowService(redis_url=url, backend=backend, worker_concurrency=2)
    fs.register("stalls", lambda wf, ctx: wf.dag.node("step", step))
    fs._ensure_worker()
    serve(fs, host="127.0.0.1", port=port, access_log=False, log_level="warning")
    """
)


def start_server(url: str, prefix: str, *, stall: bool) -> tuple[subprocess.Popen[str], str]:
    """A server with a worker of its own (2 threads); its step prints ``running`` and
    sleeps a minute if ``stall``."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLOWLOOM_TEST_STALL": "1" if stall else "0"}
    env.pop("FLOWLOOM_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), url, prefix],
        stdout=subprocess.PIPE if stall else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, process)
    except BaseException:
        process.kill()
        raise
    return process, base


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGCONT)  # if frozen
    process.kill()
    process.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_a_task_claimed_by_a_servers_submit_is_taken_over_when_the_server_dies_or_freezes(
    redis_url: str, redis_prefix: str, sig: signal.Signals
) -> None:
    """A sync POST whose task the server's own worker took from the submit; the server
    is killed (or frozen) while the step runs: another server's worker takes the task
    over after the visibility timeout and ends the request."""
    server, base = start_server(redis_url, redis_prefix, stall=True)
    try:
        answer = httpx.post(
            base + "/flow/stalls", content=b"x", headers={"X-Wait": "0.5"}, timeout=10
        )
        assert answer.status_code == 202, answer.text
        request_id = answer.json()["request_id"]
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "running"
        probe = redis.Redis.from_url(redis_url)
        try:
            assert probe.xpending(f"{redis_prefix}:tasks", GROUP)["pending"] == 1
        finally:
            probe.close()
        server.send_signal(sig)
        rescuer, rescuer_base = start_server(redis_url, redis_prefix, stall=False)
        try:
            answer = httpx.get(
                f"{rescuer_base}/flow/stalls/requests/{request_id}/result",
                headers={"X-Wait": "30"},
                timeout=40,
            )
            assert answer.status_code == 200, answer.text
            assert answer.content == b"x!"
            state = httpx.get(f"{rescuer_base}/flow/stalls/requests/{request_id}").json()
            assert state["status"] == "completed"
        finally:
            stop(rescuer)
    finally:
        stop(server)


def test_sync_posts_run_on_the_servers_idle_worker_and_answer(
    redis_url: str, redis_prefix: str
) -> None:
    """Sync POSTs one after another on a server whose threads idle: each answered with its
    result, none left pending."""
    server, base = start_server(redis_url, redis_prefix, stall=False)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            for n in range(50):
                answer = client.post("/flow/stalls", content=b"%d" % n)
                assert answer.status_code == 200
                assert answer.content == b"%d!" % n
        probe = redis.Redis.from_url(redis_url)
        try:
            assert probe.xpending(f"{redis_prefix}:tasks", GROUP)["pending"] == 0
        finally:
            probe.close()
    finally:
        stop(server)
