"""The distributed backend: tasks on a Redis Stream, request state in Redis hashes.

Any number of processes on any number of machines share one Redis (a single server or
a primary, not a cluster). Every transition is one Lua script (``redis.lua`` beside
this module), so it is atomic, and it is idempotent: a step instance completes once
and becomes ready once, however often its task is delivered.

Key layout (``P`` is the prefix, ``flowloom`` by default; ``{id}`` a request id)::

    P:tasks              stream    ready tasks; field ``t`` holds the task blob, ``i``
                                   its instance (so that a completion can begin it)
                                   (consumer group ``workers``; a pending entry is a
                                   task some worker has claimed and not acked yet)
    P:delayed            zset      retries waiting for their time: blob -> due (ms)
    P:requests           zset      every live request id -> created (s), for listings
    P:flow:{name}        zset      the same, per flow
    P:expiries           zset      "flow\\0id" of ended requests -> when they expire (ms)
    P:r:{id}             hash      the request: flow, version, body, query, headers,
                                   created, hooks, status, ended, result, error
    P:r:{id}:v           hash      vertex states: s|ADDR status, b|ADDR began,
                                   e|ADDR ended, a|ADDR attempts, x|ADDR error (JSON)
    P:r:{id}:i           hash      instance marks: f|INST fired (queued once),
                                   d|INST done (completed once), n|INST inputs needed,
                                   c|INST inputs received
    P:r:{id}:s           hash      inputs of instances still waiting: INST\\0SLOT -> value
    P:r:{id}:h           list      tasks held while the request is paused
    P:r:{id}:c           hash      the request's context store
    P:r:{id}:e           list      gets the final status when the request ends (wait)
    P:r:{id}:o           hash      each completed vertex instance's output: ADDR -> bytes
    P:worker:{name}      string    a live worker's description (JSON), with a TTL
    P:workers            zset      worker names -> last heartbeat (s)

When a request ends its ``i``, ``s`` and ``h`` keys are deleted and ``r``, ``v``, ``c``,
``e`` and ``o`` get a TTL of ``retention`` seconds; ``P:expiries`` lets a sweep drop it from
the listings then. Request ids cannot hold ``{`` or ``}``, so no two requests' keys meet.

Delivery: a worker reads tasks with XREADGROUP (a few at a time, ``prefetch``) and acks
them (XACK + XDEL) in the same script that applies their outcome. Every
``visibility_timeout / 3`` seconds it refreshes the idle time of the tasks it still
holds (XCLAIM to itself); tasks idle for longer than ``visibility_timeout`` belong to a
worker that died and are taken over with XAUTOCLAIM. Handlers thus run at least once;
transitions happen exactly once.

Client mode: a process that only calls ``execute``/``state``/``result``/``pause``/
``resume``/``stop`` needs no worker, but ``execute`` needs the flow registered (the
first tasks of a request come from its plan); the other calls need no registration.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from importlib import resources
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ..engine import Transition
from ..errors import DuplicateRequest, NotRunning, RequestNotFound
from ..types import ErrorInfo, RequestState, Status, VertexState
from . import redis_codec as codec
from .base import Backend, RequestRecord, Summary, Task

__all__ = ["RedisBackend"]

log = logging.getLogger("flowloom.redis")

GROUP = "workers"
_SCRIPT_NAMES = (
    "submit", "begin", "complete", "retry", "fail", "control", "context_set",
    "promote", "keepalive", "handback", "sweep",
)  # fmt: skip


def _load_scripts() -> dict[str, str]:
    source = resources.files(__package__).joinpath("redis.lua").read_text()
    helpers, *sections = source.split("-- @script ")
    scripts = {}
    for section in sections:
        name, _, body = section.partition("\n")
        scripts[name.strip()] = helpers + body
    assert set(scripts) == set(_SCRIPT_NAMES), sorted(scripts)
    return scripts


_SCRIPTS = _load_scripts()


# a deferred script call: name, keys, args, and what to do with its result
_Deferred = tuple[str, list[str], list[Any], Callable[[Any], None]]


class RedisBackend(Backend):
    """Requests and tasks in Redis at ``url``, every key under ``prefix``.

    ``retention``: seconds a finished request is kept. ``visibility_timeout``: seconds
    after which a task claimed by a worker that stopped answering goes to another one.
    ``prefetch``: how many tasks one process holds ready beyond those it runs.
    ``retry_for``: roughly how many seconds each call keeps retrying while Redis is
    unreachable (a restart, a fail-over) before it raises ``redis.ConnectionError``.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "flowloom",
        retention: float = 86400.0,
        visibility_timeout: float = 30.0,
        prefetch: int = 8,
        heartbeat: float = 2.0,
        retry_for: float = 30.0,
    ) -> None:
        if visibility_timeout <= 0 or prefetch < 0 or heartbeat <= 0:
            raise ValueError("visibility_timeout and heartbeat must be > 0, prefetch >= 0")
        self.url = url
        self.prefix = prefix
        self.retention = retention
        self.visibility_timeout = visibility_timeout
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        retries = max(1, int(retry_for / 0.5))
        self._redis = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=30,
        )
        self._scripts: dict[str, Script] = {
            name: self._redis.register_script(text) for name, text in _SCRIPTS.items()
        }
        self.tasks_key = f"{prefix}:tasks"
        self.delayed_key = f"{prefix}:delayed"
        self.requests_key = f"{prefix}:requests"
        self.expiries_key = f"{prefix}:expiries"
        self.workers_key = f"{prefix}:workers"
        self._group_ready = False
        # the worker side: tasks read but not yet run, and every task this process holds
        self._cond = threading.Condition()
        self._buffer: deque[tuple[float, Task]] = deque()  # (read at, task), oldest first
        self._held: dict[str, Task] = {}  # receipt -> task (buffered or running)
        self._consumer: str | None = None
        self._reclaim_from = "0-0"  # where the next XAUTOCLAIM scan of pending tasks starts
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: dict[str, Callable[[], Mapping[str, object]]] = {}
        self._deferred = threading.local()  # .call: a completion not sent yet (_Deferred)
        self._begun: set[str] = set()  # receipts of tasks marked running when claimed

    # -- keys ----------------------------------------------------------------------------------
    def _keys(self, request_id: str) -> list[str]:
        r = f"{self.prefix}:r:{{{request_id}}}"
        return [r, r + ":v", r + ":i", r + ":s", r + ":h", r + ":c", r + ":e",
                self.tasks_key, self.expiries_key, self.delayed_key, r + ":o"]  # fmt: skip

    def _flow_key(self, flow: str) -> str:
        return f"{self.prefix}:flow:{{{flow}}}"

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.flush()
        return self._scripts[name](keys=list(keys), args=list(args))

    def flush(self) -> None:
        """Send this thread's deferred completion, if any (see ``complete``)."""
        pending: _Deferred | None = self._deferred.__dict__.pop("call", None)
        if pending is not None:
            name, keys, args, then = pending
            then(self._scripts[name](keys=keys, args=args))

    def _with_deferred(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script, sending this thread's deferred completion first in the same
        round trip (one pipeline); returns the script's result."""
        pending: _Deferred | None = self._deferred.__dict__.pop("call", None)
        if pending is None:
            return self._scripts[name](keys=keys, args=args)
        calls = [pending[:3], (name, keys, args)]
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for script, script_keys, script_args in calls:
                sha = self._scripts[script].sha
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", sha, len(script_keys), *script_keys, *script_args
                )
            results = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                for script, _, _ in calls:  # Redis restarted and lost its scripts
                    self._redis.script_load(_SCRIPTS[script])
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            pending[3](results[0])
            return results[1]
        raise AssertionError("unreachable")

    def _retention_ms(self) -> int:
        return max(1, int(self.retention * 1000))

    # -- requests ------------------------------------------------------------------------------
    def submit(self, record: RequestRecord, transition: Transition) -> None:
        keys = [*self._keys(record.request_id), self.requests_key, self._flow_key(record.flow)]
        args = [
            record.request_id,
            record.flow,
            record.version,
            record.body,
            json.dumps(record.query),
            json.dumps(dict(record.headers)),
            repr(record.created),
            "1" if record.has_hooks else "0",
            *codec.delivery_args(transition.deliveries),
        ]
        if not self._run("submit", keys, args):
            raise DuplicateRequest(f"request {record.request_id!r} exists already")

    def state(self, request_id: str) -> RequestState | None:
        self.flush()
        keys = self._keys(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(keys[0], "flow", "status", "created", "ended", "error")
        pipe.hgetall(keys[1])
        fields, vertices = pipe.execute()
        return self._state(request_id, fields, vertices)

    @staticmethod
    def _state(
        request_id: str, fields: list[bytes | None], raw_vertices: dict[bytes, bytes]
    ) -> RequestState | None:
        flow, status, created, ended, error = fields
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
        )

    def record(self, request_id: str) -> RequestRecord | None:
        self.flush()
        names = ("flow", "version", "body", "query", "headers", "created", "hooks")
        raw = cast(list[bytes | None], self._redis.hmget(self._keys(request_id)[0], names))
        if raw[0] is None:
            return None
        flow, version, body, query, headers, created, hooks = (v or b"" for v in raw)
        return RequestRecord(
            request_id=request_id,
            flow=flow.decode(),
            version=version.decode(),
            body=body,
            query=json.loads(query or b"{}"),
            headers=json.loads(headers or b"{}"),
            created=float(created or 0.0),
            has_hooks=hooks == b"1",
        )

    def summary(self, request_id: str) -> Summary | None:
        self.flush()
        flow, status, result, error = cast(
            list[bytes | None],
            self._redis.hmget(self._keys(request_id)[0], "flow", "status", "result", "error"),
        )
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
        self.flush()
        return cast(bytes | None, self._redis.hget(self._keys(request_id)[10], address))

    def result(self, request_id: str) -> bytes | None:
        self.flush()
        status, result = cast(
            list[bytes | None], self._redis.hmget(self._keys(request_id)[0], "status", "result")
        )
        return result if status == b"completed" else None

    def wait(self, request_id: str, timeout: float | None) -> Status | None:
        """Block on the request's end-notification list (BLMOVE onto itself, so that every
        waiter sees it), re-reading the status after each wake-up."""
        self.flush()
        keys = self._keys(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = cast(bytes | None, self._redis.hget(keys[0], "status"))
            if raw is None:
                return None
            status = Status(raw.decode())
            if status.finished:
                return status
            remaining = 5.0 if deadline is None else min(5.0, deadline - time.monotonic())
            if remaining <= 0:
                return status
            timeout_s = cast(int, max(0.01, remaining))  # Redis takes fractions of seconds
            self._redis.blmove(keys[6], keys[6], timeout_s, "RIGHT", "LEFT")

    def control(self, request_id: str, action: Status) -> Status:
        if action not in (Status.PAUSED, Status.RUNNING, Status.STOPPED):
            raise ValueError(f"not a control action: {action}")
        outcome = self._run(
            "control", self._keys(request_id), [request_id, action.value, self._retention_ms()]
        )
        kind = outcome[0].decode()
        if kind == "missing":
            raise RequestNotFound(f"no request {request_id!r}")
        if kind == "ended":
            raise NotRunning(f"request {request_id!r} has ended: {outcome[1].decode()}")
        return Status(outcome[1].decode())

    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        self.flush()
        self.sweep()
        index = self.requests_key if flow is None else self._flow_key(flow)
        chosen: list[RequestState] = []
        skip, start, chunk = offset, 0, max(50, limit + offset if status is None else 200)
        while len(chosen) < limit:
            ids = codec.names(self._redis.zrevrange(index, start, start + chunk - 1))
            if not ids:
                break
            start += len(ids)
            pipe = self._redis.pipeline(transaction=False)
            for request_id in ids:
                keys = self._keys(request_id)
                pipe.hmget(keys[0], "flow", "status", "created", "ended", "error")
                pipe.hgetall(keys[1])
            replies = pipe.execute()
            for n, request_id in enumerate(ids):
                state = self._state(request_id, replies[2 * n], replies[2 * n + 1])
                if state is None or (status is not None and state.status is not status):
                    continue
                if skip:
                    skip -= 1
                    continue
                chosen.append(state)
                if len(chosen) == limit:
                    break
        return chosen

    def sweep(self, limit: int = 1000) -> int:
        """Drop requests that have expired from the listings; how many were dropped."""
        keys = [self.expiries_key, self.requests_key]
        return int(self._run("sweep", keys, [f"{self.prefix}:flow:", limit]))

    # -- context ---------------------------------------------------------------------------------
    def context_get(self, request_id: str, key: str) -> bytes | None:
        self.flush()
        keys = self._keys(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(keys[0])
        pipe.hget(keys[5], key)
        exists, value = pipe.execute()
        if not exists:
            raise RequestNotFound(f"no request {request_id!r}")
        return cast(bytes | None, value)

    def context_set(self, request_id: str, key: str, value: bytes) -> None:
        if not self._run("context_set", self._keys(request_id), [request_id, key, value]):
            raise RequestNotFound(f"no request {request_id!r}")

    def context_delete(self, request_id: str, key: str) -> None:
        self.flush()
        keys = self._keys(request_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(keys[0])
        pipe.hdel(keys[5], key)
        exists, _ = pipe.execute()
        if not exists:
            raise RequestNotFound(f"no request {request_id!r}")

    # -- the worker's side ---------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Task | None:
        self._start_fetcher(worker)
        if not self._buffer:
            self.flush()  # nothing to pair it with: send the deferred completion now
        with self._cond:
            if not self._buffer:
                self._cond.notify_all()  # wake the fetcher: someone waits for work
                self._cond.wait_for(lambda: self._buffer or self._closing.is_set(), timeout)
            if not self._buffer:
                return None
            _, task = self._buffer.popleft()
            if len(self._buffer) < self.prefetch:
                self._cond.notify_all()
            return task

    def begin(self, task: Task, instance: str, address: str) -> bool:
        with self._cond:
            if task.receipt in self._begun:  # begun when it was claimed (``complete``)
                self._begun.discard(task.receipt)
                begun_already = True
            else:
                begun_already = False
        if begun_already:
            self.flush()
            return True
        args = [task.request_id, GROUP, task.receipt, instance, address, task.attempt]
        began = bool(self._with_deferred("begin", self._keys(task.request_id), args))
        if not began:
            self._release(task)
        return began

    def complete(
        self, task: Task, instance: str, address: str, output: bytes | None, transition: Transition
    ) -> None:
        self.flush()
        want = self._want_more()
        args: list[Any] = [
            task.request_id, GROUP, task.receipt, instance, address,
            b"" if output is None else b"d" + output, "1" if transition.finished else "0",
            transition.result, self._retention_ms(), self._consumer or "", want,
            *codec.delivery_args(transition.deliveries),
        ]  # fmt: skip
        # Sent with this thread's next call: a worker thread's next call is nearly always
        # ``begin`` of its next task, so both go in one round trip. A thread about to
        # wait for work sends it first (``claim``), and so does any other call.
        keys = self._keys(task.request_id)
        self._deferred.call = ("complete", keys, args, partial(self._completed, task))

    def _completed(self, task: Task, claimed: Any) -> None:
        self._release(task)
        if claimed:
            entries, began = claimed
            kept = [entry for entry, flag in zip(entries, began, strict=True) if flag != 0]
            with self._cond:
                self._begun.update(
                    entry[0].decode()
                    for entry, flag in zip(entries, began, strict=True)
                    if flag == 1
                )
            self._take(kept)

    def retry(self, task: Task, address: str, delay: float, error: ErrorInfo) -> None:
        blob = codec.encode_task(replace(task, attempt=task.attempt + 1, receipt=""))
        error_json = codec.error_json(error)
        args = [task.request_id, GROUP, task.receipt, address, int(delay * 1000), error_json, blob]
        self._run("retry", self._keys(task.request_id), args)
        self._release(task)

    def fail(self, task: Task, address: str, error: ErrorInfo) -> None:
        error_json = codec.error_json(error)
        args = [task.request_id, GROUP, task.receipt, address, error_json, self._retention_ms()]
        self._run("fail", self._keys(task.request_id), args)
        self._release(task)

    def ack(self, task: Task) -> None:
        self.flush()
        if task.receipt:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(self.tasks_key, GROUP, task.receipt)
            pipe.xdel(self.tasks_key, task.receipt)
            pipe.execute()
        self._release(task)

    # -- workers' heartbeats ---------------------------------------------------------------------
    def register_worker(self, name: str, describe: Callable[[], Mapping[str, object]]) -> None:
        """Announce a live worker until ``unregister_worker``: ``describe()`` is written,
        with a TTL of three heartbeats, every ``heartbeat`` seconds."""
        with self._cond:
            self._workers[name] = describe
        self._beat(name, describe)
        self._start_thread("flowloom-heartbeat", self._heartbeat_loop)

    def unregister_worker(self, name: str) -> None:
        with self._cond:
            self._workers.pop(name, None)
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(f"{self.prefix}:worker:{name}")
        pipe.zrem(self.workers_key, name)
        pipe.execute()

    def workers(self) -> list[dict[str, object]]:
        names = codec.names(self._redis.zrange(self.workers_key, 0, -1))
        if not names:
            return []
        keys = [f"{self.prefix}:worker:{n}" for n in names]
        raw = cast(list[bytes | None], self._redis.mget(keys))
        alive, gone = [], []
        for name, value in zip(names, raw, strict=True):
            if value is None:
                gone.append(name)
            else:
                alive.append(json.loads(value))
        if gone:
            self._redis.zrem(self.workers_key, *gone)
        return sorted(alive, key=lambda w: str(w.get("name")))

    def queue_depth(self) -> dict[str, int]:
        self.flush()
        pipe = self._redis.pipeline(transaction=False)
        pipe.xlen(self.tasks_key)
        pipe.zcard(self.delayed_key)
        length, delayed = pipe.execute()
        taken = 0
        if length:
            try:
                taken = int(self._redis.xpending(self.tasks_key, GROUP)["pending"])
            except redis.ResponseError as exc:  # no worker has made the group yet
                if "NOGROUP" not in str(exc):
                    raise
        return {"ready": max(0, int(length) - taken), "delayed": int(delayed)}

    def _beat(self, name: str, describe: Callable[[], Mapping[str, object]]) -> None:
        now = time.time()
        info = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), **describe()}
        info["last_seen"] = now
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(f"{self.prefix}:worker:{name}", json.dumps(info), px=int(self.heartbeat * 3000))
        pipe.zadd(self.workers_key, {name: now})
        pipe.execute()

    def _heartbeat_loop(self) -> None:
        while not self._closing.wait(self.heartbeat):
            with self._cond:
                workers = list(self._workers.items())
            for name, describe in workers:
                try:
                    self._beat(name, describe)
                except Exception:
                    log.exception("flowloom: worker heartbeat failed")

    # -- fetching, keeping alive, reclaiming -----------------------------------------------------
    def _want_more(self) -> int:
        """How many tasks a completing worker thread may read for this process."""
        if self._consumer is None or self._closing.is_set():
            return 0
        with self._cond:
            return 1 if len(self._buffer) < max(1, self.prefetch) else 0

    def _take(self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | list[bytes]]]) -> None:
        tasks = []
        for receipt, fields in entries:
            if not fields:
                continue  # deleted meanwhile (its request ended and it was acked)
            blob = fields[b"t"] if isinstance(fields, dict) else fields[1]
            tasks.append(codec.decode_task(blob, receipt.decode()))
        if tasks:
            with self._cond:
                for task in tasks:
                    self._held[task.receipt] = task
                now = time.monotonic()
                self._buffer.extend((now, task) for task in tasks)
                self._cond.notify_all()

    def _release(self, task: Task) -> None:
        with self._cond:
            self._held.pop(task.receipt, None)
            self._begun.discard(task.receipt)

    def _start_fetcher(self, consumer: str) -> None:
        if self._consumer is not None:
            return
        with self._cond:
            if self._consumer is not None:
                return
            self._consumer = consumer
        self._ensure_group()
        self._start_thread("flowloom-fetcher", self._fetch_loop)
        self._start_thread("flowloom-keepalive", self._keepalive_loop)

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        with self._cond:
            if any(t.name == name and t.is_alive() for t in self._threads):
                return
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
        thread.start()

    def _ensure_group(self) -> None:
        try:
            self._redis.xgroup_create(self.tasks_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _fetch_loop(self) -> None:
        """Keep up to ``prefetch`` tasks ready; move due retries; take over stalled tasks."""
        consumer = cast(str, self._consumer)
        next_reclaim = 0.0
        next_sweep = time.monotonic() + 10.0
        block = 0.25
        while not self._closing.is_set():
            try:
                now = time.monotonic()
                moved, due_in = self._run("promote", [self.delayed_key, self.tasks_key], [100])
                block = 0.25 if due_in < 0 else min(0.25, max(0.005, due_in / 1000))
                if moved:
                    continue
                if now >= next_reclaim:
                    self._reclaim(consumer)
                    next_reclaim = now + min(5.0, self.visibility_timeout / 4)
                if now >= next_sweep:
                    self.sweep()
                    self._forget_consumers(consumer)
                    next_sweep = now + 30.0
                want = self._room()
                if want == 0:
                    with self._cond:
                        self._cond.wait(block)
                    continue
                reply = self._redis.xreadgroup(
                    GROUP, consumer, {self.tasks_key: ">"}, count=want, block=int(block * 1000)
                )
                if reply:
                    self._take(cast(Any, reply)[0][1])
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: start over
                    self._ensure_group()
                else:
                    log.exception("flowloom: fetching tasks failed")
                    self._closing.wait(0.5)
            except Exception:
                if not self._closing.is_set():
                    log.exception("flowloom: fetching tasks failed")
                    self._closing.wait(0.5)

    def _room(self) -> int:
        with self._cond:
            return max(0, max(1, self.prefetch) - len(self._buffer))

    def _reclaim(self, consumer: str) -> None:
        room = self._room()
        if room == 0:
            return
        idle_ms = int(self.visibility_timeout * 1000)
        reply = cast(Any, self._redis.xautoclaim(
            self.tasks_key, GROUP, consumer, idle_ms, self._reclaim_from, count=room
        ))  # fmt: skip
        self._reclaim_from = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        entries = reply[1]
        if entries:
            log.warning("flowloom: took over %d stalled task(s)", len(entries))
            self._take(entries)

    def _forget_consumers(self, me: str, idle: float = 3600.0) -> None:
        """Drop consumers (workers long gone) that hold no task from the group."""
        for info in self._redis.xinfo_consumers(self.tasks_key, GROUP):
            name = info["name"].decode()
            if name != me and info["pending"] == 0 and info["idle"] > idle * 1000:
                self._redis.xgroup_delconsumer(self.tasks_key, GROUP, name)

    def _keepalive_loop(self) -> None:
        interval = self.visibility_timeout / 3
        while not self._closing.wait(interval):
            try:
                self._hand_back_stale(interval)
            except Exception:
                log.exception("flowloom: handing back waiting tasks failed")
            with self._cond:
                receipts = list(self._held)
            if not receipts:
                continue
            try:
                mine = self._run("keepalive", [self.tasks_key], [GROUP, self._consumer, *receipts])
                kept = {r.decode() for r in mine}
                with self._cond:  # a task acked meanwhile is done, not lost
                    lost = [r for r in receipts if r not in kept and r in self._held]
                if lost:
                    log.warning("flowloom: %d task(s) were taken over by other workers", len(lost))
            except Exception:
                log.exception("flowloom: keeping tasks alive failed")

    def _hand_back_stale(self, patience: float) -> None:
        """Tasks read ahead that waited ``patience`` seconds for a free thread here go
        back on the stream, for workers that have threads to spare."""
        limit = time.monotonic() - patience
        with self._cond:
            if not self._buffer or self._buffer[0][0] > limit:
                return
            stale = []
            while self._buffer and self._buffer[0][0] <= limit:
                stale.append(self._buffer.popleft()[1].receipt)
            for receipt in stale:
                self._held.pop(receipt, None)
                self._begun.discard(receipt)
        self._run("handback", [self.tasks_key], [GROUP, *stale])

    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        """Stop fetching, hand back the tasks this process holds, release connections."""
        self.flush()
        if self._closing.is_set():
            return
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5.0)
        with self._cond:
            receipts = list(self._held)
            self._held.clear()
            self._buffer.clear()
            self._begun.clear()
        try:
            if receipts:
                self._run("handback", [self.tasks_key], [GROUP, *receipts])
            if self._consumer is not None:
                self._redis.xgroup_delconsumer(self.tasks_key, GROUP, self._consumer)
            for name in list(self._workers):
                self.unregister_worker(name)
        except redis.RedisError:
            log.exception("flowloom: handing back tasks failed; they will be taken over later")
        finally:
            self._redis.close()

    # -- for tests and tools ---------------------------------------------------------------------
    def purge(self) -> None:
        """Delete every key under the prefix (tests, tools)."""
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                self._redis.delete(*batch)
                batch.clear()
        if batch:
            self._redis.delete(*batch)
