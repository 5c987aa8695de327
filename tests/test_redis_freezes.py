"""Processes frozen (SIGSTOP) and woken late on Redis: a worker frozen in the middle of an
eager streak, Redis frozen while HTTP callers wait on the end push, and Redis restarted
(with persistence) in the middle of a big foreach split. Nothing may be lost, nothing
applied twice, and no caller may wait past its deadline."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from flowloom import Context, FlowService, Status, Workflow
from flowloom.backends.redis import RedisBackend
from flowloom.http import create_app
from flowloom.names import REQUEST_ID
from http_fixtures import AppClient, Gate, register_flows
from test_redis_eager import HOPS, hop_pids, hop_runs, stream_is_empty
from test_redis_faults import Workers, eventually, fs, live_workers, workers
from test_redis_resilience import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

__all__ = ["fs", "workers"]  # the fixtures, imported for the tests below


def test_a_worker_frozen_mid_streak_and_woken_late_applies_nothing_twice(
    fs: FlowService, workers: Workers, redis_url: str, redis_prefix: str
) -> None:
    """The frozen worker holds the hop it runs and the one its completion may have
    claimed for it; both are taken over after the visibility timeout. Woken, its late
    completion is refused and its streak ends: the chain's hops each ran once (but the
    one in flight), and the woken worker goes on taking work."""
    frozen = workers.start(concurrency=1, visibility=1.5, sleep=0.005)
    live_workers(fs, 1)
    request_id = fs.execute("chain", b"0")
    eventually(
        lambda: sum(n > 0 for n in hop_runs(redis_url, redis_prefix, request_id)) >= 50,
        30,
        "50 hops run",
    )
    frozen.send_signal(signal.SIGSTOP)
    try:
        ran_before = sum(n > 0 for n in hop_runs(redis_url, redis_prefix, request_id))
        assert ran_before < HOPS
        rescuer = workers.start(concurrency=1, visibility=1.5, sleep=0.005)
        assert fs.result("chain", request_id, timeout=60) == b"%d" % HOPS
    finally:
        frozen.send_signal(signal.SIGCONT)
    time.sleep(3.0)  # the woken worker reports its hop, late, and claims what it may
    counts = hop_runs(redis_url, redis_prefix, request_id)
    assert min(counts) == 1
    assert sum(counts) - HOPS <= 1, counts  # only the hop in flight when it froze ran twice
    assert hop_pids(redis_url, redis_prefix, request_id)[-1] == rescuer.pid
    state = fs.state("chain", request_id)
    assert state.status is Status.COMPLETED
    assert len(state.vertices) == HOPS
    assert all(v.status is Status.COMPLETED and v.attempts == 1 for v in state.vertices.values())
    assert fs.result("chain", request_id, timeout=1) == b"%d" % HOPS
    stream_is_empty(redis_url, redis_prefix)
    assert frozen.poll() is None
    rescuer.send_signal(signal.SIGKILL)  # the woken worker alone runs the next chain
    rescuer.wait(10)
    again = fs.execute("chain", b"0")
    assert fs.result("chain", again, timeout=60) == b"%d" % HOPS
    assert set(hop_pids(redis_url, redis_prefix, again)) == {frozen.pid}


@pytest.mark.anyio
async def test_http_waits_across_a_frozen_redis_answer_by_their_deadline_then_finish(
    tmp_path: Path, gate: Gate
) -> None:
    """Redis freezes (SIGSTOP: connections open, nothing answered) while sync calls wait
    on the end push. A call whose wait ends meanwhile answers 202 within a second of its
    deadline; a new call answers 503 once the backend's socket timeout and retry window
    have passed, never 500. Once Redis wakes, the handlers' completions go through and
    the long waits answer with the results. The new call sends no id: its 503 names the
    id the server gave it. Its request either was in Redis's buffers (it runs, once, and
    sending it again with that id is refused: 409) or never reached them (sending it again
    runs it): a 503 does not say which; it runs once."""
    server = PrivateRedis(tmp_path, aof=False)
    server.start()
    backend = RedisBackend(
        server.url, retry_for=2, socket_timeout=1, connect_timeout=0.2, visibility_timeout=30
    )
    try:
        with FlowService(backend=backend, worker_concurrency=4) as fs:
            register_flows(fs, gate)
            fs._ensure_worker()
            async with AppClient(create_app(fs), timeout=90) as http:
                answers: dict[str, httpx.Response] = {}
                took: dict[str, float] = {}

                async def post(name: str, wait: float) -> None:
                    started = time.monotonic()
                    answers[name] = await http.post(
                        "/flow/gated",
                        content=name.encode(),
                        headers={"X-Wait": f"{wait:g}"}
                        | ({} if name == "new" else {"X-Request-Id": f"frozen-{name}"}),
                    )
                    took[name] = time.monotonic() - started

                async with anyio.create_task_group() as tasks:
                    for name in ("a", "b", "c"):
                        tasks.start_soon(post, name, 25)
                    tasks.start_soon(post, "d", 3)
                    for _ in range(4):
                        await anyio.to_thread.run_sync(gate.entered.acquire)
                    await anyio.sleep(0.2)  # the waits have read once and sit on the push
                    assert server.proc is not None
                    server.proc.send_signal(signal.SIGSTOP)
                    try:
                        await post("new", 25)
                        assert answers["new"].status_code == 503, answers["new"].text
                        new_id = answers["new"].headers["x-request-id"]
                        assert REQUEST_ID.fullmatch(new_id)
                        assert took["new"] < 1 + 2 + 1.5  # socket timeout, retry_for, margin
                        with anyio.fail_after(5):
                            while "d" not in answers:
                                await anyio.sleep(0.05)
                        assert answers["d"].status_code == 202, answers["d"].text
                        assert 3 <= took["d"] < 3 + 1.5  # its wait, and the last read's second
                        gate.opened.set()  # their completions wait for Redis now
                        await anyio.sleep(1)
                        assert set(answers) == {"new", "d"}  # the long waits still wait
                    finally:
                        server.proc.send_signal(signal.SIGCONT)
                for name in ("a", "b", "c"):
                    assert answers[name].status_code == 200, answers[name].text
                    assert answers[name].content == f"{name}|gate|after".encode()
                assert http.app.state.flowloom.waiter.waiting == {}
                result = await http.get(
                    f"/flow/gated/requests/{new_id}/result", headers={"X-Wait": "10"}
                )
                again = await http.post(
                    "/flow/gated", content=b"new", headers={"X-Request-Id": new_id}
                )
                if result.status_code == 404:
                    # its submit never reached Redis's buffers (sent on a connection that
                    # had to connect again while Redis was frozen): sent again, it runs
                    assert (again.status_code, again.content) == (200, b"new|gate|after")
                else:  # it was in Redis's buffers and ran once: sent again, refused
                    assert (result.status_code, result.content) == (200, b"new|gate|after")
                    assert again.status_code == 409, again.text
                state = fs.state("gated", new_id)
                assert state is not None
                assert state.status is Status.COMPLETED
                assert all(v.attempts == 1 for v in state.vertices.values())
    finally:
        server.close()


def test_redis_killed_in_the_middle_of_a_big_split_and_restarted_with_its_data(
    tmp_path: Path, redis_prefix: str
) -> None:
    """A 20,000-item foreach's deliveries go out in parts ahead of the split's
    completion. Redis (AOF, fsync always) is killed once the first parts have landed
    and items run, and started again: the split runs again after the visibility
    timeout, its parts are applied again harmlessly, and the join sees every item once."""
    items = 20_000
    server = PrivateRedis(tmp_path, aof=True)
    server.start()
    backend = RedisBackend(
        server.url, prefix=redis_prefix, retry_for=60, connect_timeout=0.2, visibility_timeout=2
    )
    seen: list[int] = []
    try:
        with FlowService(backend=backend, worker_concurrency=2) as fs:

            def define(workflow: Workflow, context: Context) -> None:
                each = workflow.dag.foreach_branch(
                    "each",
                    lambda data: {f"k{n}": b"%d" % n for n in range(items)},
                    lambda outputs: (
                        seen.append(len(outputs)) or b"%d" % sum(int(v) for v in outputs.values())
                    ),
                )
                each.node("item", lambda data, options: data)

            fs.register("each", define)
            fs._ensure_worker()
            probe = redis.Redis(port=server.port, socket_timeout=1)
            request_id = fs.execute("each", b"")
            eventually(lambda: probe.xlen(backend.keys.tasks) >= 1000, 30, "a first part")
            split = fs.state("each", request_id).vertices["each"]
            server.kill()
            assert split.status is Status.RUNNING  # its later parts not sent yet
            probe.close()
            time.sleep(0.5)
            server.start()
            result = fs.result("each", request_id, timeout=120)
            assert result == b"%d" % (items * (items - 1) // 2)
            state = fs.state("each", request_id)
            assert state.status is Status.COMPLETED
            done = [v for v in state.vertices.values() if v.status is Status.COMPLETED]
            assert len(done) == len(state.vertices) == items + 1  # the foreach, its items
        assert seen == [items]  # the join ran once, over every item
    finally:
        server.close()
