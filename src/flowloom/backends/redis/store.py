"""The request side: create requests, read their state and results, wait for them,
control them, list them, and their context store."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from ...engine import Transition
from ...errors import DuplicateRequest, NoOutput, NotRunning, RequestNotFound
from ...types import RequestState, Status, VertexState
from ..base import RequestRecord, Summary, Task, not_kept
from . import codec
from .keys import GROUP, KeyLayout
from .scripts import Scripts

__all__ = ["RequestStore", "record_to_run"]

_STATE_FIELDS = ("flow", "status", "created", "ended", "error", "trace", "retries")
WAIT_BLOCK = 0.2  # seconds one blocking read of ``wait`` lasts at most


class RequestStore:
    """Requests in Redis under ``keys``; finished ones kept ``retention`` seconds."""

    def __init__(
        self, client: redis.Redis, scripts: Scripts, keys: KeyLayout, retention: float
    ) -> None:
        self._redis = client
        self._scripts = scripts
        self.keys = keys
        self.retention = retention

    def retention_ms(self) -> int:
        return max(1, int(self.retention * 1000))

    def submit(self, record: RequestRecord, transition: Transition) -> None:
        keys, args = self.submit_call(record, transition)
        if not self._scripts("submit", keys, args) and not self._is_ours(record):
            raise DuplicateRequest(f"request {record.request_id!r} exists already")

    def submit_call(
        self, record: RequestRecord, transition: Transition, consumer: str = "", claim: int = 0
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the ``submit`` script for ``record``; with ``claim``,
        the script also claims and begins up to that many ready tasks for ``consumer``."""
        keys = [
            *self.keys.request(record.request_id).script_keys(),
            self.keys.requests,
            self.keys.flow(record.flow),
        ]
        args = [
            record.request_id,
            record.flow,
            record.version,
            record.body,
            json.dumps(record.query) if record.query else "{}",
            json.dumps(dict(record.headers)) if record.headers else "{}",
            repr(record.created),
            "1" if record.has_hooks else "0",
            record.trace,
            GROUP,
            consumer,
            claim,
            *codec.delivery_args(transition.deliveries),
        ]
        return keys, args

    def _is_ours(self, record: RequestRecord) -> bool:
        """Whether the request that exists is ``record`` itself: a submit sent again after
        its reply was lost (a timeout) must not report its own request as a duplicate."""
        flow, created = self._redis.hmget(
            self.keys.request(record.request_id).request, "flow", "created"
        )
        return flow == record.flow.encode() and created == repr(record.created).encode()

    def state(self, request_id: str) -> RequestState | None:
        keys = self.keys.request(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(keys.request, *_STATE_FIELDS)
        pipe.hgetall(keys.vertices)
        fields, vertices = pipe.execute()
        return _state(request_id, fields, vertices)

    def record(self, request_id: str) -> RequestRecord | None:
        names = ("flow", "version", "body", "query", "headers", "created", "hooks", "trace")
        raw = cast(
            list[bytes | None], self._redis.hmget(self.keys.request(request_id).request, names)
        )
        if raw[0] is None:
            return None
        flow, version, body, query, headers, created, hooks, trace = (v or b"" for v in raw)
        return RequestRecord(
            request_id=request_id,
            flow=flow.decode(),
            version=version.decode(),
            body=body,
            query=json.loads(query or b"{}"),
            headers=json.loads(headers or b"{}"),
            created=float(created or 0.0),
            has_hooks=hooks == b"1",
            trace=trace.decode(),
        )

    def summary(self, request_id: str) -> Summary | None:
        # read for every request ``FlowService.result`` returns: sent the lean way
        fields = ("flow", "status", "result", "error")
        reply = self._scripts.command("HMGET", self.keys.record(request_id), *fields)
        flow, status, result, error = cast(list[bytes | None], reply)
        if flow is None or status is None:
            return None
        done = Status(status.decode())
        return Summary(
            flow.decode(),
            done,
            result if done is Status.COMPLETED else None,
            codec.error_from(error),
        )

    def output(self, request_id: str, address: str) -> bytes | None:
        """The vertex's output; the result if it is the last vertex's (kept once, as the
        result); ``NoOutput`` if it completed without its output kept (``keep_outputs``)."""
        keys = self.keys.request(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(keys.outputs, address)
        pipe.hget(keys.request, "result_of")
        pipe.hget(keys.vertices, f"s|{address}")
        output, result_of, status = pipe.execute()
        if output is not None:
            return cast(bytes, output)
        if result_of == address.encode():
            return cast(bytes | None, self._redis.hget(keys.request, "result"))
        if status == b"completed":
            raise NoOutput(not_kept(request_id, address))
        return None

    def result(self, request_id: str) -> bytes | None:
        status, result = cast(
            list[bytes | None],
            self._redis.hmget(self.keys.request(request_id).request, "status", "result"),
        )
        return result if status == b"completed" else None

    def wait(self, request_id: str, until: float | None) -> Status | None:
        """Block until the request has finished or the monotonic time ``until``; its status.

        Blocks on the request's end-notification list (BLMOVE onto itself, so that every
        waiter sees it) at most ``WAIT_BLOCK`` seconds at a time, re-reading the status
        after each wake-up, so that no socket read outlasts the deadline by much."""
        keys = self.keys.request(request_id)
        while True:
            raw = cast(bytes | None, self._redis.hget(keys.request, "status"))
            if raw is None:
                return None
            status = Status(raw.decode())
            if status.finished:
                return status
            block = WAIT_BLOCK
            if until is not None:
                block = min(block, until - time.monotonic())
                if block <= 0:
                    return status
            timeout_s = cast(int, max(0.01, block))  # Redis takes fractions of seconds
            self._redis.blmove(keys.ended, keys.ended, timeout_s, "RIGHT", "LEFT")

    def control(self, request_id: str, action: Status) -> Status:
        if action not in (Status.PAUSED, Status.RUNNING, Status.STOPPED):
            raise ValueError(f"not a control action: {action}")
        outcome = self._scripts(
            "control",
            self.keys.request(request_id).script_keys(),
            [request_id, action.value, self.retention_ms()],
        )
        kind = outcome[0].decode()
        if kind == "missing":
            raise RequestNotFound(f"no request {request_id!r}")
        if kind == "ended":
            raise NotRunning(f"request {request_id!r} has ended: {outcome[1].decode()}")
        return Status(outcome[1].decode())

    def rerun(self, request_id: str, trace: str = "") -> Status:
        keys = self.keys.request(request_id).script_keys()
        outcome = self._scripts("rerun", keys, [request_id, trace])
        kind = outcome[0].decode()
        if kind == "missing":
            raise RequestNotFound(f"no request {request_id!r}")
        if kind == "kept-nothing":
            raise NotRunning(
                f"request {request_id!r} {outcome[1].decode()} before flowloom kept what a "
                "retry needs: execute it again"
            )
        if kind == "not":
            status = outcome[1].decode()
            raise NotRunning(
                f"request {request_id!r} is {status}: only a failed or stopped request "
                "can be retried"
            )
        return Status.RUNNING

    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        """Without ``status``, reads the page straight from the index; with it, scans the
        index reading only each request's status, then reads the page's states (deep
        pages of 100,000 requests cost reads of ids and statuses, not of states)."""
        self.sweep()
        index = self.keys.requests if flow is None else self.keys.flow(flow)
        if status is None:
            ids = codec.names(self._redis.zrevrange(index, offset, offset + limit - 1))
            return self._states(ids)
        chosen: list[str] = []
        skip, start, chunk = offset, 0, 1000
        while len(chosen) < limit:
            ids = codec.names(self._redis.zrevrange(index, start, start + chunk - 1))
            if not ids:
                break
            start += len(ids)
            pipe = self._redis.pipeline(transaction=False)
            for request_id in ids:
                pipe.hget(self.keys.request(request_id).request, "status")
            for request_id, found in zip(ids, pipe.execute(), strict=True):
                if found is None or found.decode() != status.value:
                    continue
                if skip:
                    skip -= 1
                    continue
                chosen.append(request_id)
                if len(chosen) == limit:
                    break
        return [s for s in self._states(chosen) if s.status is status]

    def _states(self, ids: list[str]) -> list[RequestState]:
        """The states of ``ids`` that still exist, in order."""
        pipe = self._redis.pipeline(transaction=False)
        for request_id in ids:
            keys = self.keys.request(request_id)
            pipe.hmget(keys.request, *_STATE_FIELDS)
            pipe.hgetall(keys.vertices)
        replies = pipe.execute()
        states = (_state(r, replies[2 * n], replies[2 * n + 1]) for n, r in enumerate(ids))
        return [s for s in states if s is not None]

    def sweep(self, limit: int = 1000) -> int:
        """Drop requests that have expired from the listings; how many were dropped."""
        keys = [self.keys.expiries, self.keys.requests]
        args = [self.keys.flow_prefix, f"{self.keys.prefix}:r:", limit]
        return int(self._scripts("sweep", keys, args))

    # -- context ---------------------------------------------------------------------------
    def context_get(self, request_id: str, key: str) -> bytes | None:
        keys = self.keys.request(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(keys.request)
        pipe.hget(keys.context, key)
        exists, value = pipe.execute()
        if not exists:
            raise RequestNotFound(f"no request {request_id!r}")
        return cast(bytes | None, value)

    def context_set(self, request_id: str, key: str, value: bytes) -> None:
        keys = self.keys.request(request_id).script_keys()
        if not self._scripts("context_set", keys, [request_id, key, value]):
            raise RequestNotFound(f"no request {request_id!r}")

    def context_delete(self, request_id: str, key: str) -> None:
        keys = self.keys.request(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(keys.request)
        pipe.hdel(keys.context, key)
        exists, _ = pipe.execute()
        if not exists:
            raise RequestNotFound(f"no request {request_id!r}")

    def purge(self) -> None:
        """Delete every key under the prefix (tests, tools)."""
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                self._redis.delete(*batch)
                batch.clear()
        if batch:
            self._redis.delete(*batch)


def _state(
    request_id: str, fields: list[bytes | None], raw_vertices: dict[bytes, bytes]
) -> RequestState | None:
    flow, status, created, ended, error, trace, retries = fields
    if flow is None or status is None:
        return None
    parts: dict[str, dict[str, bytes]] = {}
    for name, value in raw_vertices.items():
        kind, _, address = name.decode().partition("|")
        parts.setdefault(address, {})[kind] = value
    vertices = {
        address: VertexState(
            address=address,
            status=Status(p.get("s", b"queued").decode()),
            started=codec.to_float(p.get("b")),
            ended=codec.to_float(p.get("e")),
            attempts=int(p.get("a", b"0")),
            error=codec.error_from(p.get("x")),
        )
        for address, p in sorted(parts.items(), key=codec.began)
    }
    return RequestState(
        request_id=request_id,
        flow=flow.decode(),
        status=Status(status.decode()),
        created=float(created or 0.0),
        ended=codec.to_float(ended),
        error=codec.error_from(error),
        vertices=vertices,
        trace_id=trace[:32].decode() if trace else None,
        retries=tuple(float(t) for t in retries.split(b",")) if retries else (),
    )


def record_to_run(task: Task, facts: list[bytes | None]) -> RequestRecord:
    """The record of ``task``'s request as its worker needs it, from the facts that came
    with the task's begin (``facts`` in ``request.lua``: query, created, trace); without
    its body and headers."""
    query, created, trace = (v or b"" for v in facts)
    return RequestRecord(
        request_id=task.request_id,
        flow=task.flow,
        version=task.version,
        body=b"",
        query=json.loads(query or b"{}"),
        created=float(created or 0.0),
        trace=trace.decode(),
    )
