"""``FlowService.retry``: a failed or stopped request goes on from where it ended.

Each test runs on the embedded and on the Redis backend, with a worker in this process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowloom import FlowNotFound, FlowService, NotRunning, RequestFailed, RequestNotFound, Status
from flowloom.backends import Backend, MemoryBackend

pytestmark = pytest.mark.timeout(90)


class Calls:
    """Counts calls by key, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    until = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < until, "not in time"
        time.sleep(0.01)


@pytest.fixture
def service(make_backend: Callable[..., Backend]) -> Iterator[FlowService]:
    with FlowService(worker_concurrency=4, backend=make_backend()) as fs:
        fs._ensure_worker()  # a worker in this process, on either backend
        yield fs


def flaky_chain(calls: Calls, up: threading.Event, ends: list[Status]) -> Any:
    """a -> b -> c, where b fails (no node retries) until ``up`` is set."""

    def node(name: str) -> Callable[[bytes, Any], bytes]:
        def run(data: bytes, options: Any) -> bytes:
            calls.add(name)
            if name == "b" and not up.is_set():
                raise ConnectionError("the service b calls is down")
            return data + name.encode()

        return run

    def define(workflow: Any, context: Any) -> None:
        dag = workflow.dag
        for name in "abc":
            dag.node(name, node(name))
        dag.edge("a", "b")
        dag.edge("b", "c")
        workflow.finally_(ends.append)

    return define


def test_a_retry_goes_on_from_the_failed_vertex(service: FlowService) -> None:
    calls, up, ends = Calls(), threading.Event(), []
    service.register("chain", flaky_chain(calls, up, ends))
    request_id = service.execute("chain", b"in-")
    with pytest.raises(RequestFailed, match="down"):
        service.result("chain", request_id, timeout=20)
    eventually(lambda: ends == [Status.FAILED])  # the hooks ran for the failure

    up.set()
    assert service.retry("chain", request_id) is Status.RUNNING
    assert service.result("chain", request_id, timeout=20) == b"in-abc"
    assert calls.counts == {"a": 1, "b": 2, "c": 1}  # a's side effect happened once
    state = service.state("chain", request_id)
    assert state.status is Status.COMPLETED
    assert state.error is None
    assert len(state.retries) == 1
    assert state.created <= state.retries[0] <= (state.ended or 0.0)
    assert state.to_json()["retries"] == list(state.retries)
    assert state.vertices["b"].status is Status.COMPLETED
    assert state.vertices["b"].attempts == 1  # a fresh count
    assert service.output("chain", request_id, "a") == b"in-a"
    eventually(lambda: ends == [Status.FAILED, Status.COMPLETED])  # and again at the end


def test_a_foreach_with_failed_items_reruns_only_those(service: FlowService) -> None:
    keys = [f"k{i:02d}" for i in range(50)]
    bad = {"k03", "k10", "k22", "k31", "k47"}
    calls, up, aggregated = Calls(), threading.Event(), []

    def item(data: bytes, options: Any) -> bytes:
        key = data.decode()
        calls.add(key)
        if key in bad and not up.is_set():
            raise ValueError(f"item {key} failed")
        return b"done-" + data

    def aggregate(outputs: dict[str, bytes]) -> bytes:
        aggregated.append(dict(outputs))
        return b",".join(outputs[k] for k in sorted(outputs))

    def define(workflow: Any, context: Any) -> None:
        dag = workflow.dag
        dag.node("source", lambda data, options: data)
        each = dag.foreach_branch(
            "each", lambda data: {k: k.encode() for k in keys}, aggregator=aggregate
        )
        each.node("work", item)
        dag.edge("source", "each")

    service.register("fan", define)
    request_id = service.execute("fan", b"")
    with pytest.raises(RequestFailed, match="failed"):
        service.result("fan", request_id, timeout=30)
    assert aggregated == []

    up.set()
    service.retry("fan", request_id)
    result = service.result("fan", request_id, timeout=30)
    assert result == b",".join(b"done-" + k.encode() for k in keys)
    assert len(aggregated) == 1  # the aggregator fired once, with every item
    assert aggregated[0] == {k: b"done-" + k.encode() for k in keys}
    good = [k for k in keys if k not in bad]
    assert [calls.counts[k] for k in good] == [1] * 45  # the 45 did not run again
    assert all(1 <= calls.counts[k] <= 2 for k in bad)  # a failed item ran once more
    state = service.state("fan", request_id)
    assert all(state.vertices[f"each[{k}]/work"].status is Status.COMPLETED for k in keys)


def test_retry_of_a_stopped_request_runs_what_it_had_left(service: FlowService) -> None:
    entered, gate, calls = threading.Event(), threading.Event(), Calls()

    def slow(data: bytes, options: Any) -> bytes:
        calls.add("slow")
        entered.set()
        assert gate.wait(20)
        return data + b"|slow"

    def after(data: bytes, options: Any) -> bytes:
        calls.add("after")
        return data + b"|after"

    def define(workflow: Any, context: Any) -> None:
        workflow.dag.node("slow", slow)
        workflow.dag.node("after", after)
        workflow.dag.edge("slow", "after")

    service.register("gated", define)
    request_id = service.execute("gated", b"x")
    assert entered.wait(20)
    assert service.stop("gated", request_id) is Status.STOPPED
    gate.set()  # "slow" was running: it completes into the stopped request's state
    eventually(lambda: service.state("gated", request_id).vertices["slow"].status
               is Status.COMPLETED)  # fmt: skip
    assert calls.counts == {"slow": 1}  # "after" does not run while it is stopped
    assert asyncio.run(service.aretry("gated", request_id)) is Status.RUNNING
    assert service.result("gated", request_id, timeout=20) == b"x|slow|after"
    assert calls.counts == {"slow": 1, "after": 1}


def test_retry_of_a_request_that_did_not_fail_is_refused(service: FlowService) -> None:
    calls, up, ends = Calls(), threading.Event(), []
    up.set()
    service.register("chain", flaky_chain(calls, up, ends))
    request_id = service.execute("chain", b"")
    service.result("chain", request_id, timeout=20)
    with pytest.raises(NotRunning, match=r"completed.*only a failed or stopped"):
        service.retry("chain", request_id)
    with pytest.raises(RequestNotFound):
        service.retry("chain", "no-such-request")
    with pytest.raises(RequestNotFound):
        service.retry("other-flow", request_id)
    assert service.state("chain", request_id).retries == ()


def test_concurrent_retries_one_wins(
    service: FlowService, make_backend: Callable[..., Backend]
) -> None:
    calls, up, ends = Calls(), threading.Event(), []
    define = flaky_chain(calls, up, ends)
    service.register("chain", define)
    request_id = service.execute("chain", b"")
    with pytest.raises(RequestFailed):
        service.result("chain", request_id, timeout=20)
    up.set()
    # a second client: on Redis its own connections, as another process would have
    shared = service.backend
    with FlowService(
        backend=shared if isinstance(shared, MemoryBackend) else make_backend()
    ) as other:
        other.register("chain", define)
        clients = [service, other] * 4
        barrier = threading.Barrier(len(clients))
        outcomes: list[object] = []

        def retry(fs: FlowService) -> None:
            barrier.wait()
            try:
                outcomes.append(fs.retry("chain", request_id))
            except NotRunning as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=retry, args=(fs,)) for fs in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert outcomes.count(Status.RUNNING) == 1
    assert sum(isinstance(o, NotRunning) for o in outcomes) == len(clients) - 1
    assert service.result("chain", request_id, timeout=20) == b"abc"
    assert calls.counts == {"a": 1, "b": 2, "c": 1}
    assert len(service.state("chain", request_id).retries) == 1


def test_a_retry_needs_the_requests_own_version(make_backend: Callable[..., Backend]) -> None:
    calls, up, ends = Calls(), threading.Event(), []
    backend = make_backend()
    with FlowService(worker_concurrency=2, backend=backend) as first:
        first.register("chain", flaky_chain(calls, up, ends))
        first._ensure_worker()
        request_id = first.execute("chain", b"")
        with pytest.raises(RequestFailed):
            first.result("chain", request_id, timeout=20)
        version = first.registry.latest("chain").version
    # a process that knows only another definition of the flow
    later = backend if isinstance(backend, MemoryBackend) else make_backend()
    with FlowService(backend=later) as second:
        second.register("chain", lambda workflow, context: workflow.dag.node("x", print))
        with pytest.raises(FlowNotFound, match=f"version {version}.* not registered any more"):
            second.retry("chain", request_id)
        assert second.state("chain", request_id).status is Status.FAILED  # nothing changed
        assert second.state("chain", request_id).retries == ()


@pytest.mark.redis
def test_a_request_that_failed_before_retries_existed_says_so(
    make_redis_backend: Callable[..., Any], redis_url: str
) -> None:
    import redis

    calls, up, ends = Calls(), threading.Event(), []
    backend = make_redis_backend()
    with FlowService(worker_concurrency=2, backend=backend) as fs:
        fs.register("chain", flaky_chain(calls, up, ends))
        fs._ensure_worker()
        request_id = fs.execute("chain", b"")
        with pytest.raises(RequestFailed):
            fs.result("chain", request_id, timeout=20)
        client = redis.Redis.from_url(redis_url)
        try:  # as a request that failed under an older flowloom looks
            client.hdel(backend.keys.request(request_id).request, "retryable")
        finally:
            client.close()
        with pytest.raises(NotRunning, match="before flowloom kept what a retry needs"):
            fs.retry("chain", request_id)
        assert fs.state("chain", request_id).status is Status.FAILED


def test_what_a_retry_requeues_is_one_fresh_task_per_instance() -> None:
    from flowloom.backends import HOOKS, Task
    from flowloom.backends.base import requeued

    def task(step: str, keys: tuple[str, ...], attempt: int, data: bytes) -> Task:
        return Task("r", "f", "v1", step, keys, {"": data}, attempt, "1-0", True)

    tasks = [
        task("work", ("a",), 3, b"first"),
        task("work", ("b",), 1, b"b"),
        task("work", ("a",), 1, b"again"),  # the same instance set aside twice
        task(HOOKS, (), 1, b"failed"),
    ]
    assert requeued(tasks) == [
        Task("r", "f", "v1", "work", ("a",), {"": b"first"}, 1, "", False),
        Task("r", "f", "v1", "work", ("b",), {"": b"b"}, 1, "", False),
    ]


@pytest.mark.redis
def test_two_processes_retrying_at_once_one_wins(
    make_redis_backend: Callable[..., Any], redis_url: str, redis_prefix: str, tmp_path: Any
) -> None:
    import subprocess
    import sys
    import textwrap

    calls, up, ends = Calls(), threading.Event(), []
    with FlowService(worker_concurrency=2, backend=make_redis_backend()) as fs:
        fs.register("chain", flaky_chain(calls, up, ends))
        fs._ensure_worker()
        request_id = fs.execute("chain", b"")
        with pytest.raises(RequestFailed):
            fs.result("chain", request_id, timeout=20)
        up.set()
        script = tmp_path / "retry_once.py"
        script.write_text(
            textwrap.dedent(
                """
                import sys, time
                from flowloom import FlowService, NotRunning
                url, prefix, request_id, at = sys.argv[1:5]
                with FlowService(redis_url=url, redis_prefix=prefix) as client:
                    client.state("chain", request_id)  # connected before the start line
                    time.sleep(max(0.0, float(at) - time.time()))
                    try:
                        print(client.retry("chain", request_id).value)
                    except NotRunning as exc:
                        print("NotRunning:", exc)
                """
            )
        )
        at = str(time.time() + 2.0)
        args = [sys.executable, str(script), redis_url, redis_prefix, request_id, at]
        processes = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        answers = sorted(p.communicate(timeout=30)[0].strip() for p in processes)
        assert answers[1] == "running", answers
        assert answers[0].startswith("NotRunning:"), answers
        assert "only a failed or stopped request can be retried" in answers[0]
        assert fs.result("chain", request_id, timeout=20) == b"abc"
        assert calls.counts == {"a": 1, "b": 2, "c": 1}
