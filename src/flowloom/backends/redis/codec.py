"""How the Redis backend writes tasks, deliveries and errors as Redis values.

A task travels on the stream as one blob of netstrings (``LEN:BYTES``), which
the Lua scripts read as well: request id, flow, version, step, item keys (each
followed by NUL), attempt, then slot and value pairs (``n`` for an ordering-only
input, ``d`` + data otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ...engine import Delivery
from ...types import ErrorInfo
from ..base import Task

__all__ = [
    "began",
    "decode_task",
    "delivery_args",
    "encode_keys",
    "encode_task",
    "error_from",
    "error_json",
    "names",
    "to_float",
]


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
    inputs: dict[str, bytes | None] = {}
    for i in range(6, len(fields), 2):
        value = fields[i + 1]
        inputs[fields[i].decode()] = None if value == b"n" else value[1:]
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
