"""Redis-only behaviour of the backend: what the contract suite cannot see."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flowloom import Status
from flowloom.backends import Backend
from test_backend_contract import claim, complete, ids, linear, plan_of, submit

pytestmark = pytest.mark.timeout(60)


def test_a_completion_reads_and_begins_the_next_task(
    make_redis_backend: Callable[..., Any],
) -> None:
    backend: Backend = make_redis_backend()
    plan = plan_of(linear)
    submit(backend, plan)
    first = claim(backend)
    assert backend.begin(first, *ids(plan, first))
    complete(backend, plan, first, b"A")
    backend.flush()
    # the script that completed "a" also read "b" for this process and marked it
    # running: one round trip per hop of a chain
    state = backend.state("r1")
    assert state is not None
    assert state.vertices["b"].status is Status.RUNNING
    assert state.vertices["b"].started is not None
    second = claim(backend)
    assert second.step == "b"
    assert backend.begin(second, *ids(plan, second))
    complete(backend, plan, second, b"B")
    assert backend.wait("r1", 5) is Status.COMPLETED
    assert backend.result("r1") == b"B"


def test_a_submit_sent_again_is_not_its_own_duplicate(
    make_redis_backend: Callable[..., Any],
) -> None:
    """A submit whose reply was lost (a timeout) is sent again: it finds its own request,
    which is no duplicate; another request under the same id is."""
    from flowloom import DuplicateRequest, engine
    from flowloom.backends import RequestRecord

    backend: Backend = make_redis_backend()
    plan = plan_of(linear)
    record = RequestRecord("same", plan.name, plan.version, b"in", {}, created=1234.5)
    backend.submit(record, engine.start(plan, b"in"))
    backend.submit(record, engine.start(plan, b"in"))
    other = RequestRecord("same", plan.name, plan.version, b"in", {}, created=1234.6)
    with pytest.raises(DuplicateRequest):
        backend.submit(other, engine.start(plan, b"in"))
    first = claim(backend)
    assert first.step == "a"
    assert backend.claim("w", 0.3) is None  # its first task was queued once


def test_a_paged_join_forgets_its_inputs_once_it_completed(
    make_redis_backend: Callable[..., Any],
) -> None:
    """A join of more inputs than travel in its task reads them from their hash; once it
    completed, the hash and its listing go, while the request runs on."""
    from flowloom import Context, FlowService

    backend = make_redis_backend()
    keys = backend.keys
    left: list[int] = []

    def define(workflow: Any, context: Context) -> None:
        def after(data: bytes, options: Any) -> bytes:
            inputs = keys.request(context.request_id).inputs
            client = backend._redis
            left.append(client.scard(inputs) + len(list(client.scan_iter(match=inputs + ":*"))))
            return data

        each = workflow.dag.foreach_branch(
            "each", lambda data: {f"k{n}": b"%d" % n for n in range(150)}, lambda o: b"%d" % len(o)
        )
        each.node("item", lambda data, options: data)
        workflow.dag.node("after", after)
        workflow.dag.edge("each", "after")

    with FlowService(worker_concurrency=2, backend=backend) as fs:
        fs._ensure_worker()
        fs.register("paged", define)
        assert fs.run("paged", b"", timeout=60) == b"150"
    assert left == [0]


def test_a_request_submitted_elsewhere_runs_without_a_read_of_its_record(
    make_redis_backend: Callable[..., Any],
) -> None:
    """What a worker needs of a request's record (its query options) comes with its
    tasks' begin and claim: a request submitted by another process costs its worker no
    read of the record, and its handlers still see its options."""
    from flowloom import Context, FlowService, Request

    worker_backend = make_redis_backend()
    reads: list[str] = []
    read = worker_backend.record
    worker_backend.record = lambda request_id: reads.append(request_id) or read(request_id)

    def define(workflow: Any, context: Context) -> None:
        def tagged(data: bytes, options: Any) -> bytes:
            return data + b"/" + ",".join(options.get("tag", [])).encode()

        workflow.dag.node("a", tagged)
        workflow.dag.node("b", tagged)
        workflow.dag.edge("a", "b")

    with (
        FlowService(worker_concurrency=2, backend=worker_backend) as worker,
        FlowService(backend=make_redis_backend()) as client,
    ):
        worker.register("tagged", define)
        worker._ensure_worker()
        client.register("tagged", define)
        ids = [
            client.execute("tagged", Request(body=b"%d" % n, query={"tag": f"t{n}"}))
            for n in range(20)
        ]
        for n, request_id in enumerate(ids):
            assert client.result("tagged", request_id, timeout=30) == b"%d/t%d/t%d" % (n, n, n)
    assert reads == []


def test_a_task_of_another_request_claimed_by_a_completion_brings_its_record(
    make_redis_backend: Callable[..., Any],
) -> None:
    """A completion that claims a task of another request returns what the worker needs
    of that request's record (query, created, trace), read in the same script."""
    from flowloom.backends import RequestRecord
    from flowloom.engine import start

    backend, elsewhere = make_redis_backend(), make_redis_backend()
    plan = plan_of(linear)
    submit(backend, plan)
    first = claim(backend)
    assert backend.begin(first, *ids(plan, first))
    other = RequestRecord(
        "r2", plan.name, plan.version, b"x", {"tag": ["t2"]}, created=123.5,
        trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )  # fmt: skip
    elsewhere.submit(other, start(plan, b"x"))
    complete(backend, plan, first, b"A")
    backend.record = lambda request_id: pytest.fail(f"read the record of {request_id}")
    claimed = claim(backend)  # sends the completion; it claimed r2's first task
    assert claimed.request_id == "r2"
    known = backend.record_to_run(claimed)
    assert (known.query, known.created, known.trace) == ({"tag": ["t2"]}, 123.5, other.trace)
