"""Large and nested foreach, and ``keep_outputs``: bounded Redis values and script calls,
every item once at the chunking boundaries, each byte kept once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowloom import Dag, DefinitionError, FlowService, engine
from flowloom.backends import Backend, RequestRecord
from flowloom.backends.redis import codec
from flowloom.backends.redis.scripts import Scripts
from flowloom.registry import Registry

pytestmark = pytest.mark.timeout(120)

Options = dict[str, list[str]]
LIMIT = codec.CHUNK_BYTES + 64 * 1024  # what one script call or task may carry here
INLINE_INPUTS = 100  # as lua/request.lua: a fan-in of more inputs is read in pages


def same(data: bytes, options: Options) -> bytes:
    return data


def distinct(outputs: dict[str, bytes]) -> bytes:
    """``count:sum`` of the items, or ``duplicate`` if one output came twice."""
    numbers = [int(v.split(b"-")[0]) for v in outputs.values()]
    if len(set(numbers)) != len(numbers):
        return b"duplicate"
    return b"%d:%d" % (len(numbers), sum(numbers))


@pytest.fixture
def service(make_backend: Callable[..., Backend]) -> Iterator[FlowService]:
    with FlowService(worker_concurrency=4, backend=make_backend()) as fs:
        fs._ensure_worker()
        yield fs


@pytest.fixture
def redis_service(make_redis_backend: Callable[..., Any]) -> Iterator[FlowService]:
    with FlowService(worker_concurrency=4, backend=make_redis_backend()) as fs:
        fs._ensure_worker()
        yield fs


class Sizes:
    """The largest script call (all its arguments) and task blob seen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.call = self.task = 0
        calls, pipelined, decode = Scripts.__call__, Scripts.pipelined, codec.decode_task

        def size(args: Any) -> int:
            return sum(len(a) if isinstance(a, bytes | str) else 8 for a in args)

        def call(scripts: Scripts, name: str, keys: Any, args: Any) -> Any:
            self.call = max(self.call, size(args))
            return calls(scripts, name, keys, args)

        def pipe(scripts: Scripts, batch: Any) -> Any:
            for _, _, args in batch:
                self.call = max(self.call, size(args))
            return pipelined(scripts, batch)

        def decoded(blob: bytes, receipt: str) -> Any:
            self.task = max(self.task, len(blob))
            return decode(blob, receipt)

        monkeypatch.setattr(Scripts, "__call__", call)
        monkeypatch.setattr(Scripts, "pipelined", pipe)
        monkeypatch.setattr(codec, "decode_task", decoded)


# -- the 10,000-item foreach on Redis --------------------------------------------------------
@pytest.mark.redis
def test_a_10000_item_foreach_sees_each_item_once_in_bounded_values(
    redis_service: FlowService, monkeypatch: pytest.MonkeyPatch
) -> None:
    items, pad = 10_000, b"-" + b"p" * 300  # ~3 MB of items: one call could not hold them
    sizes = Sizes(monkeypatch)

    def define(workflow: Any, context: Any) -> None:
        each = workflow.dag.foreach_branch(
            "each", lambda data: {f"k{n}": b"%d" % n + pad for n in range(items)}, distinct
        )
        each.node("item", same)

    redis_service.register("big", define)
    request_id = redis_service.execute("big", b"")
    result = redis_service.result("big", request_id, timeout=110)
    assert result == b"%d:%d" % (items, items * (items - 1) // 2)
    assert 0 < sizes.call <= LIMIT
    assert 0 < sizes.task <= LIMIT
    backend = redis_service.backend
    client = backend._redis  # type: ignore[attr-defined]
    keys = backend.keys.request(request_id)  # type: ignore[attr-defined]
    assert not list(client.scan_iter(match=keys.inputs + "*"))  # no inputs left behind
    biggest = max(client.hstrlen(keys.outputs, f) for f in client.hkeys(keys.outputs))
    assert biggest <= LIMIT
    assert redis_service.output("big", request_id, "each[k7]/item") == b"7" + pad


# -- nested foreach at the chunking boundaries -------------------------------------------------
def define_nested(inner: int, size: int) -> Callable[[Any, Any], None]:
    """A sub-DAG holding a foreach of 2 rows, each a foreach of ``inner`` items of ``size``
    bytes; the rows' aggregator checks that each row saw its items once."""

    def cells(data: bytes) -> dict[str, bytes]:
        return {f"c{n}": b"%d-" % n + b"x" * size for n in range(inner)}

    def row(outputs: dict[str, bytes]) -> bytes:
        return distinct(outputs)

    def define(workflow: Any, context: Any) -> None:
        sub = Dag()
        rows = sub.foreach_branch("rows", lambda data: {"r0": b"", "r1": b""}, row_total)
        each = rows.foreach_branch("cells", cells, row)
        each.node("cell", same)
        workflow.dag.subdag("grid", sub)

    return define


def row_total(outputs: dict[str, bytes]) -> bytes:
    return b",".join(outputs[k] for k in sorted(outputs))


BOUNDARIES = [
    # a split sends its items plus the passthrough in parts of CHUNK_DELIVERIES
    (codec.CHUNK_DELIVERIES - 2, 0),
    (codec.CHUNK_DELIVERIES - 1, 0),
    (codec.CHUNK_DELIVERIES, 0),
    # a join of more than INLINE_INPUTS inputs (its items and the passthrough) is paged
    (INLINE_INPUTS - 1, 0),
    (INLINE_INPUTS, 0),
    # ... and so is one of more than 1 MB; a part of the split stays under CHUNK_BYTES
    (8, codec.CHUNK_BYTES // 8 - 200),
    (8, codec.CHUNK_BYTES // 8 + 200),
]


@pytest.mark.parametrize(("inner", "size"), BOUNDARIES)
def test_a_nested_foreach_sees_each_item_once_at_the_chunk_boundaries(
    service: FlowService, inner: int, size: int
) -> None:
    service.register("grid", define_nested(inner, size))
    row = b"%d:%d" % (inner, inner * (inner - 1) // 2)
    assert service.run("grid", b"", timeout=100) == row + b"," + row


@pytest.mark.redis
@pytest.mark.parametrize("inner", [codec.CHUNK_DELIVERIES, INLINE_INPUTS])
def test_a_retry_after_a_paged_join_failed_reads_its_inputs_again(
    redis_service: FlowService, inner: int
) -> None:
    failures = [1]

    def flaky(outputs: dict[str, bytes]) -> bytes:
        if failures:
            failures.pop()
            raise ValueError("once")
        return distinct(outputs)

    def define(workflow: Any, context: Any) -> None:
        each = workflow.dag.foreach_branch(
            "each", lambda data: {f"k{n}": b"%d" % n for n in range(inner)}, flaky
        )
        each.node("item", same)

    redis_service.register("flaky", define)
    request_id = redis_service.execute("flaky", b"")
    with pytest.raises(Exception, match="once"):
        redis_service.result("flaky", request_id, timeout=60)
    redis_service.retry("flaky", request_id)
    expected = b"%d:%d" % (inner, inner * (inner - 1) // 2)
    assert redis_service.result("flaky", request_id, timeout=60) == expected


@pytest.mark.redis
def test_parts_of_a_split_sent_again_fire_each_item_and_the_join_once(
    make_redis_backend: Callable[..., Any],
) -> None:
    items = 2 * codec.CHUNK_DELIVERIES + 500

    def define(workflow: Any, context: Any) -> None:
        each = workflow.dag.foreach_branch(
            "each", lambda data: {f"k{n}": b"%d" % n for n in range(items)}, distinct
        )
        each.node("item", same)

    backend = make_redis_backend()
    plan = Registry().register("parts", define)
    record = RequestRecord("r1", "parts", plan.version, b"", {}, created=1.0)
    backend.submit(record, engine.start(plan, b""))
    split = backend.claim("w", 5)
    step = plan.steps[split.step]
    instance, address = step.names(split.keys)
    assert backend.begin(split, instance, address)
    branches = [(f"k{n}", b"%d" % n) for n in range(items)]
    transition = engine.after_split(plan, step, split.keys, b"", branches)
    # a worker sent the first parts and died; the next one sends them all again
    keys = backend.keys.request("r1").script_keys()
    for part in codec.delivery_chunks(transition.deliveries)[:-1]:
        Scripts(backend._redis)("deliver", keys, ["r1", instance, *part])
    backend.complete(split, instance, address, None, transition)
    backend.flush()
    seen = set()
    for _ in range(items):
        task = backend.claim("w", 5)
        assert task is not None
        assert task.step == "each[]/item"
        seen.add(task.keys)
        item = plan.steps[task.step]
        assert backend.begin(task, *item.names(task.keys))
        output = task.inputs[""] or b""
        after = engine.after_output(plan, item, task.keys, output)
        backend.complete(task, *item.names(task.keys), output, after)
    backend.flush()
    assert len(seen) == items
    join = backend.claim("w", 5)
    assert join is not None
    assert join.step == "each:join"
    assert backend.begin(join, *plan.steps[join.step].names(join.keys))
    assert isinstance(join.inputs, codec.PagedInputs)
    assert len(join.inputs) == items + 1  # each item once, and the passthrough
    assert backend.claim("w", 0.3) is None


# -- keep_outputs: each byte once ------------------------------------------------------------
def chain(keep: bool) -> Callable[[Any, Any], None]:
    def define(workflow: Any, context: Any) -> None:
        workflow.keep_outputs = keep
        for name in ("a", "b", "c"):
            workflow.dag.node(name, lambda data, options: data[::-1])
        workflow.dag.edge("a", "b")
        workflow.dag.edge("b", "c")

    return define


@pytest.mark.redis
@pytest.mark.parametrize("keep", [True, False])
def test_a_large_body_is_kept_once_per_vertex_at_most(
    redis_service: FlowService, keep: bool
) -> None:
    body = (bytes(range(256)) * 8192)[:-1024]  # 2 MiB, less room for the allocator's header
    redis_service.register("big-body", chain(keep))
    request_id = redis_service.execute("big-body", body)
    assert redis_service.result("big-body", request_id, timeout=30) == body[::-1]
    backend = redis_service.backend
    client = backend._redis  # type: ignore[attr-defined]
    keys = backend.keys.request(request_id)  # type: ignore[attr-defined]
    held = sum(
        client.memory_usage(k, samples=0) or 0 for k in client.scan_iter(match=f"{keys.request}*")
    )
    kept = 4 if keep else 2  # body, result (and the outputs of a and b): never c's again
    assert len(body) * kept <= held < len(body) * (kept + 0.5)
    assert client.hlen(keys.outputs) == (2 if keep else 0)


# -- pure parts --------------------------------------------------------------------------------
def test_deliveries_go_in_parts_bounded_in_count_and_bytes() -> None:
    def deliveries(count: int, size: int) -> list[engine.Delivery]:
        return [engine.Delivery(f"i{n}", "s", (), "", b"x" * size, 1) for n in range(count)]

    limit = codec.CHUNK_DELIVERIES
    assert [c[0] for c in codec.delivery_chunks([])] == [0]
    assert [c[0] for c in codec.delivery_chunks(deliveries(limit, 1))] == [limit]
    assert [c[0] for c in codec.delivery_chunks(deliveries(limit + 1, 1))] == [limit, 1]
    big = codec.CHUNK_BYTES // 4
    assert [c[0] for c in codec.delivery_chunks(deliveries(9, big))] == [3, 3, 3]
    huge = deliveries(2, 2 * codec.CHUNK_BYTES)  # one larger than a part goes alone
    assert [c[0] for c in codec.delivery_chunks(huge)] == [1, 1]


def test_a_paged_task_travels_as_a_reference() -> None:
    task = codec.decode_task(
        codec.encode_task(codec.decode_task(b"1:r4:flow1:v1:s0:1:1" + b"6:!paged4:dj:x", "1-0")),
        "1-0",
    )
    assert isinstance(task.inputs, codec.PagedInputs)
    assert task.inputs.instance == "j:x"
    with pytest.raises(RuntimeError):
        dict(task.inputs)
    task.inputs.fill({b"^": b"dP", b"k": b"n"})
    assert dict(task.inputs) == {"^": b"P", "k": None}


def test_keep_outputs_is_a_bool_and_part_of_the_version() -> None:
    def define(keep: object) -> Callable[[Any, Any], None]:
        def inner(workflow: Any, context: Any) -> None:
            workflow.keep_outputs = keep
            workflow.dag.node("a", same)

        return inner

    registry = Registry()
    kept, dropped = registry.register("k", define(True)), registry.register("d", define(False))
    assert kept.keep_outputs
    assert not dropped.keep_outputs
    assert Registry().register("d", define(True)).version != dropped.version
    with pytest.raises(DefinitionError, match="keep_outputs must be True or False"):
        Registry().register("x", define("no"))
