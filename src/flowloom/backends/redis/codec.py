"""How the Redis backend writes tasks, deliveries and errors as Redis values.

A task travels on the stream as one blob of netstrings (``LEN:BYTES``), which
the Lua scripts read as well: request id, flow, version, step, item keys (each
followed by NUL), attempt, then slot and value pairs (``n`` for an ordering-only
input, ``d`` + data otherwise). A fan-in with many inputs (a big foreach's join) keeps
them in Redis instead: its task has the one slot ``PAGED``, whose value names the
instance; the worker reads its inputs in pages (``PagedInputs``).

A transition with many deliveries (a big foreach's split) is sent in parts of at most
``CHUNK_BYTES`` bytes and ``CHUNK_DELIVERIES`` deliveries (``delivery_chunks``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ...engine import Delivery
from ...types import ErrorInfo
from ..base import Task

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_DELIVERIES",
    "PAGED",
    "PagedInputs",
    "began",
    "decode_task",
    "delivery_args",
    "delivery_chunks",
    "encode_keys",
    "encode_task",
    "error_from",
    "error_json",
    "names",
    "to_float",
]


PAGED = "!paged"  # the slot of a task whose inputs wait in Redis (as in lua/request.lua)
CHUNK_BYTES = 1 << 20  # at most this many bytes of deliveries per script call...
CHUNK_DELIVERIES = 1000  # ...and at most this many deliveries (one large one goes alone)


class PagedInputs(Mapping[str, bytes | None]):
    """The inputs of a fan-in kept in Redis (the hash of ``instance``), read by the
    consumer in pages (``fill``) once the task has begun, before its step runs."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._inputs: dict[str, bytes | None] | None = None

    def fill(self, raw: Mapping[bytes, bytes]) -> None:
        self._inputs = {
            slot.decode(): None if value == b"n" else value[1:] for slot, value in raw.items()
        }

    def _loaded(self) -> dict[str, bytes | None]:
        if self._inputs is None:
            raise RuntimeError(f"the inputs of {self.instance!r} were not read yet")
        return self._inputs

    def __getitem__(self, slot: str) -> bytes | None:
        return self._loaded()[slot]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


def _ns(data: bytes) -> bytes:
    return b"%d:%s" % (len(data), data)


def encode_keys(keys: Sequence[str]) -> bytes:
    return "".join(key + "\0" for key in keys).encode()


def encode_task(task: Task) -> bytes:
    parts = [
        _ns(task.request_id.encode()),
        _ns(task.flow.encode()),
        _ns(task.version.encode()),
        _ns(task.step.encode()),
        _ns(encode_keys(task.keys)),
        _ns(b"%d" % task.attempt),
    ]
    if isinstance(task.inputs, PagedInputs):  # the inputs stay where they are
        return b"".join([*parts, _ns(PAGED.encode()), _ns(b"d" + task.inputs.instance.encode())])
    for slot, data in task.inputs.items():
        parts.append(_ns(slot.encode()))
        parts.append(_ns(b"n" if data is None else b"d" + data))
    return b"".join(parts)


def decode_task(blob: bytes, receipt: str) -> Task:
    fields: list[bytes] = []
    pos, end = 0, len(blob)
    while pos < end:
        colon = blob.index(b":", pos)
        start = colon + 1
        pos = start + int(blob[pos:colon])
        fields.append(blob[start:pos])
    keys = fields[4].decode().split("\0")[:-1]
    inputs: Mapping[str, bytes | None]
    if len(fields) == 8 and fields[6] == PAGED.encode():
        inputs = PagedInputs(fields[7][1:].decode())
    else:
        inputs = {
            fields[i].decode(): None if fields[i + 1] == b"n" else fields[i + 1][1:]
            for i in range(6, len(fields), 2)
        }
    return Task(
        request_id=fields[0].decode(),
        flow=fields[1].decode(),
        version=fields[2].decode(),
        step=fields[3].decode(),
        keys=tuple(keys),
        inputs=inputs,
        attempt=int(fields[5]),
        receipt=receipt,
    )


def delivery_args(deliveries: Sequence[Delivery]) -> list[bytes | str | int]:
    args: list[bytes | str | int] = [len(deliveries)]
    for d in deliveries:
        value = b"n" if d.data is None else b"d" + d.data
        args += [d.instance, d.step, encode_keys(d.keys), d.slot, value, d.needed]
    return args


def delivery_chunks(deliveries: Sequence[Delivery]) -> list[list[bytes | str | int]]:
    """``delivery_args`` in parts of at most ``CHUNK_BYTES`` bytes (a delivery larger than
    that alone) and ``CHUNK_DELIVERIES`` deliveries; always at least one part."""
    chunks: list[list[bytes | str | int]] = []
    first, size = 0, 0
    for n, d in enumerate(deliveries):
        weight = len(d.data or b"") + len(d.instance) + len(d.step) + 64
        if n > first and (size + weight > CHUNK_BYTES or n - first >= CHUNK_DELIVERIES):
            chunks.append(delivery_args(deliveries[first:n]))
            first, size = n, 0
        size += weight
    chunks.append(delivery_args(deliveries[first:]))
    return chunks


def error_json(error: ErrorInfo) -> str:
    return json.dumps(error.to_json())


def error_from(raw: bytes | None) -> ErrorInfo | None:
    if not raw:
        return None
    data = json.loads(raw)
    return ErrorInfo(data["vertex"], data["type"], data["message"], data.get("traceback", ""))


def to_float(raw: bytes | None) -> float | None:
    return None if raw is None else float(raw)


def began(item: tuple[str, dict[str, bytes]]) -> tuple[float, str]:
    return (to_float(item[1].get("b")) or 0.0, item[0])


def names(raw: Any) -> list[str]:
    return [n.decode() for n in raw]
