"""Client mode: a process that registers nothing executes a flow a live worker serves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowloom import FlowNotFound, FlowService, Request, RequestFailed, Status

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

APP = textwrap.dedent(
    """
    import os
    from flowloom import FlowService

    fs = FlowService(redis_url=os.environ["APP_REDIS"], redis_prefix=os.environ["APP_PREFIX"],
                     worker_concurrency=2)

    def shout(data, options):
        if data == b"boom":
            raise ValueError("boom")
        return data.upper() + b"!" + "".join(options.get("tail", [])).encode()

    def define(workflow, context):
        workflow.dag.node("shout", shout)
        workflow.dag.node("wrap", lambda data, options: b"<" + data + b">")
        workflow.dag.edge("shout", "wrap")

    fs.register("loud", define)
    fs.register("quiet", lambda workflow, context: workflow.dag.node("q", lambda d, o: d))

    if __name__ == "__main__":
        fs.start_worker()
    """
)


def wait_for_worker(client: FlowService, timeout: float = 30.0) -> None:
    until = time.monotonic() + timeout
    while not any("loud" in (w.get("flows") or []) for w in client.workers()):  # type: ignore[operator]
        assert time.monotonic() < until, "the worker did not come up"
        time.sleep(0.1)


@pytest.fixture
def worker(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[None]:
    app = tmp_path / "loud_app.py"
    app.write_text(APP)
    env = {**os.environ, "APP_REDIS": redis_url, "APP_PREFIX": redis_prefix}
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(app)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_a_client_executes_a_flow_a_worker_serves(
    worker: None, redis_url: str, redis_prefix: str
) -> None:
    with FlowService(redis_url=redis_url, redis_prefix=redis_prefix) as client:
        assert client.flows() == []
        wait_for_worker(client)
        request_id = client.execute("loud", Request(body=b"hey", query={"tail": "?"}))
        assert client.result("loud", request_id, timeout=30) == b"<HEY!?>"
        state = client.state("loud", request_id)
        assert state.status is Status.COMPLETED
        assert set(state.vertices) == {"shout", "wrap"}  # the start task is no vertex
        assert client.output("loud", request_id, "shout") == b"HEY!?"

        failed = client.execute("loud", b"boom")
        with pytest.raises(RequestFailed, match="boom"):
            client.result("loud", failed, timeout=30)

        assert client.run("quiet", "as str", timeout=30) == b"as str"


def test_a_flow_no_live_worker_serves_fails_fast_naming_those_served(
    worker: None, redis_url: str, redis_prefix: str
) -> None:
    with FlowService(redis_url=redis_url, redis_prefix=redis_prefix) as client:
        wait_for_worker(client)
        started = time.monotonic()
        with pytest.raises(FlowNotFound, match=r"'nope'.*no live worker.*'loud', 'quiet'"):
            client.execute("nope", b"x")
        assert time.monotonic() - started < 5
        assert client.requests() == []  # nothing was queued


def test_without_any_worker_execute_says_none_is_served(redis_url: str, redis_prefix: str) -> None:
    none_served = r"no live worker serves it \(flows served: none\)"
    with (
        FlowService(redis_url=redis_url, redis_prefix=redis_prefix) as client,
        pytest.raises(FlowNotFound, match=none_served),
    ):
        client.execute("loud", b"x")


def test_a_registered_flow_keeps_the_local_path(redis_url: str, redis_prefix: str) -> None:
    with FlowService(redis_url=redis_url, redis_prefix=redis_prefix) as fs:
        fs.register("here", lambda workflow, context: workflow.dag.node("n", lambda d, o: d))
        request_id = fs.execute("here", b"x")  # no worker needed to queue it
        record = fs.backend.record(request_id)
        assert record is not None
        assert record.version == fs.registry.latest("here").version
        assert not record.has_hooks
