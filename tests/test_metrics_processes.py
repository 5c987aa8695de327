"""``flowloom worker --processes 2 --metrics-port N``: each forked process serves its own
metrics, on N and N+1, and together they count every task exactly once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from apps import observed_app
from flowloom import FlowService
from http_fixtures import free_port
from test_metrics import Samples, parse, total, value
from test_tracing_processes import APP, ROOT, scrape, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def free_pair() -> int:
    """A port N on 127.0.0.1 such that N and N+1 are both free now."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two free ports in a row")


def test_forked_worker_processes_serve_one_port_each(redis_url: str, tmp_path: Path):
    prefix = f"fltest-obs-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLOWLOOM_"))}
    env.update(FLOWLOOM_OBS_REDIS_URL=redis_url, FLOWLOOM_OBS_PREFIX=prefix)
    base = free_pair()
    command = [sys.executable, "-m", "flowloom.cli", "worker", APP, "--processes", "2"]
    with (tmp_path / "workers.log").open("wb") as log:
        workers = subprocess.Popen(
            [*command, "--metrics-port", str(base)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = observed_app.register(FlowService(redis_url=redis_url, redis_prefix=prefix))
    try:
        wait_for(lambda: len(client.workers()) == 2, "two worker processes")
        for port in (base, base + 1):
            wait_for(lambda p=port: scrape(p) is not None, f"metrics on {port}")
        for n in range(6):
            client.run("fanout", b"%d" % n, timeout=30)

        def ended() -> float:
            return sum(total(scrape(p), "flowloom_requests_ended_total") for p in (base, base + 1))

        wait_for(lambda: ended() == 6, "6 ended requests")
        first, second = scrape(base), scrape(base + 1)
        items = "flowloom_task_attempts_total"
        labels = {"flow": "fanout", "vertex": "each[]/double", "outcome": "completed"}
        assert value(first, items, **labels) + value(second, items, **labels) == 15
        splits = {"flow": "fanout", "vertex": "each:split", "outcome": "completed"}
        assert value(first, items, **splits) + value(second, items, **splits) == 6
        assert value(first, "flowloom_workers_live") == 2
        assert value(second, "flowloom_workers_live") == 2
    finally:
        client.close()
        workers.send_signal(signal.SIGTERM)
        try:
            workers.wait(30)
        except subprocess.TimeoutExpired:
            workers.kill()
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
        print((tmp_path / "workers.log").read_text()[-3000:])
    assert workers.returncode == 0


def test_a_task_taken_over_from_a_killed_worker_counts_as_redelivered(
    redis_url: str, tmp_path: Path
):
    from flowloom.backends.redis import RedisBackend

    prefix = f"fltest-obs-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLOWLOOM_"))}
    env.update(FLOWLOOM_OBS_REDIS_URL=redis_url, FLOWLOOM_OBS_PREFIX=prefix)
    command = [sys.executable, "-m", "flowloom.cli", "worker", APP, "--no-monitoring"]
    with (tmp_path / "doomed.log").open("wb") as log:
        doomed = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    client = observed_app.register(FlowService(redis_url=redis_url, redis_prefix=prefix))
    taker: FlowService | None = None
    try:
        rid = client.execute("sleepy", b"60")
        wait_for(
            lambda: (
                client.state("sleepy", rid).vertices.get("nap") is not None
                and client.state("sleepy", rid).vertices["nap"].status == "running"
            ),
            "the doomed worker to begin the task",
        )
        doomed.kill()
        doomed.wait(10)
        backend = RedisBackend(redis_url, prefix=prefix, visibility_timeout=1.0)
        taker = FlowService(redis_url=redis_url, backend=backend, enable_monitoring=True)
        observed_app.register(taker)
        taker._ensure_worker()
        assert client.result("sleepy", rid, timeout=30) == b"awake"
        assert taker.metrics is not None
        wait_for(
            lambda: total(parse_text(taker), "flowloom_requests_ended_total") == 1,
            "the request to end",
        )
        samples = parse_text(taker)
        attempts = "flowloom_task_attempts_total"
        nap = {"flow": "sleepy", "vertex": "nap"}
        assert value(samples, attempts, **nap, outcome="redelivered") == 1
        assert value(samples, attempts, **nap, outcome="completed") == 1
        assert total(samples, attempts) == 2
    finally:
        if doomed.poll() is None:
            doomed.kill()
        client.close()
        if taker is not None:
            taker.close()
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


def parse_text(service: FlowService) -> Samples:
    assert service.metrics is not None
    return parse(service.metrics.exposition().decode())
