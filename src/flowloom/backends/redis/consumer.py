"""The worker side: claim tasks, keep them alive, report their outcomes.

A fetcher thread reads tasks with XREADGROUP (a few at a time, ``prefetch``) into a
buffer the worker threads claim from; an outcome script acks its task (XACK + XDEL).
Every ``visibility_timeout / 3`` seconds a keep-alive thread refreshes the idle time of
the tasks this process still holds (XCLAIM to itself); tasks idle for longer than
``visibility_timeout`` belong to a worker that died and are taken over with XAUTOCLAIM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, cast

import redis

from ...engine import Transition
from ...types import ErrorInfo
from ..base import Task
from . import codec
from .keys import GROUP, KeyLayout
from .scripts import Call, Scripts
from .store import RequestStore

__all__ = ["Consumer"]

log = logging.getLogger("flowloom.redis")

# a deferred script call and what to do with its result
_Deferred = tuple[Call, Callable[[Any], None]]


class Consumer:
    """The tasks this process reads from the stream, holds and runs."""

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        store: RequestStore,
        *,
        visibility_timeout: float,
        prefetch: int,
    ) -> None:
        self._redis = client
        self._scripts = scripts
        self._store = store
        self.keys: KeyLayout = store.keys
        self.visibility_timeout = visibility_timeout
        self.prefetch = prefetch
        self._cond = threading.Condition()
        self._buffer: deque[tuple[float, Task]] = deque()  # (read at, task), oldest first
        self._held: dict[str, Task] = {}  # receipt -> task (buffered or running)
        self._begun: set[str] = set()  # receipts of tasks marked running when claimed
        self._deferred = threading.local()  # .call: a completion not sent yet (_Deferred)
        self.name: str | None = None  # the consumer's name, once it claims
        self._reclaim_from = "0-0"  # where the next XAUTOCLAIM scan of pending tasks starts
        self.closing = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- sending -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Send this thread's deferred completion, if any (see ``complete``)."""
        pending: _Deferred | None = self._deferred.__dict__.pop("call", None)
        if pending is not None:
            (name, keys, args), then = pending
            then(self._scripts(name, keys, args))

    def depth(self) -> dict[str, int]:
        """Tasks no worker has taken yet (stream entries not pending in the group) and
        retries waiting for their time."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xlen(self.keys.tasks)
        pipe.zcard(self.keys.delayed)
        length, delayed = pipe.execute()
        taken = 0
        if length:
            try:
                taken = int(self._redis.xpending(self.keys.tasks, GROUP)["pending"])
            except redis.ResponseError as exc:  # no worker has made the group yet
                if "NOGROUP" not in str(exc):
                    raise
        return {"ready": max(0, int(length) - taken), "delayed": int(delayed)}

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.flush()
        return self._scripts(name, keys, args)

    def _with_deferred(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script, sending this thread's deferred completion first in the same
        round trip (one pipeline); returns the script's result."""
        pending: _Deferred | None = self._deferred.__dict__.pop("call", None)
        if pending is None:
            return self._scripts(name, keys, args)
        first, second = self._scripts.pipelined([pending[0], (name, keys, args)])
        pending[1](first)
        return second

    # -- the worker's calls ------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Task | None:
        self._start(worker)
        if not self._buffer:
            self.flush()  # nothing to pair it with: send the deferred completion now
        with self._cond:
            if not self._buffer:
                self._cond.notify_all()  # wake the fetcher: someone waits for work
                self._cond.wait_for(lambda: self._buffer or self.closing.is_set(), timeout)
            if not self._buffer:
                return None
            _, task = self._buffer.popleft()
            if len(self._buffer) < self.prefetch:
                self._cond.notify_all()
            return task

    def begin(self, task: Task, instance: str, address: str) -> bool:
        with self._cond:
            begun_already = task.receipt in self._begun  # begun when claimed (``complete``)
            self._begun.discard(task.receipt)
        if begun_already:
            self.flush()
            return True
        args = [task.request_id, GROUP, task.receipt, instance, address, task.attempt]
        keys = self.keys.request(task.request_id).script_keys()
        began = bool(self._with_deferred("begin", keys, args))
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
            transition.result, self._store.retention_ms(), self.name or "", want,
            *codec.delivery_args(transition.deliveries),
        ]  # fmt: skip
        # Sent with this thread's next call: a worker thread's next call is nearly always
        # ``begin`` of its next task, so both go in one round trip. A thread about to
        # wait for work sends it first (``claim``), and so does any other call.
        keys = self.keys.request(task.request_id).script_keys()
        self._deferred.call = (("complete", keys, args), partial(self._completed, task))

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
        self._run("retry", self.keys.request(task.request_id).script_keys(), args)
        self._release(task)

    def fail(self, task: Task, address: str, error: ErrorInfo) -> None:
        error_json = codec.error_json(error)
        args = [
            task.request_id, GROUP, task.receipt, address, error_json, self._store.retention_ms()
        ]  # fmt: skip
        self._run("fail", self.keys.request(task.request_id).script_keys(), args)
        self._release(task)

    def ack(self, task: Task) -> None:
        self.flush()
        if task.receipt:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(self.keys.tasks, GROUP, task.receipt)
            pipe.xdel(self.keys.tasks, task.receipt)
            pipe.execute()
        self._release(task)

    # -- what this process holds -------------------------------------------------------------
    def _want_more(self) -> int:
        """How many tasks a completing worker thread may read for this process."""
        if self.name is None or self.closing.is_set():
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

    def _room(self) -> int:
        with self._cond:
            return max(0, max(1, self.prefetch) - len(self._buffer))

    # -- the background threads --------------------------------------------------------------
    def _start(self, consumer: str) -> None:
        if self.name is not None:
            return
        with self._cond:
            if self.name is not None:
                return
            self.name = consumer
        self._ensure_group()
        self.start_thread("flowloom-fetcher", self._fetch_loop)
        self.start_thread("flowloom-keepalive", self._keepalive_loop)

    def start_thread(self, name: str, target: Callable[[], None]) -> None:
        with self._cond:
            if any(t.name == name and t.is_alive() for t in self._threads):
                return
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
        thread.start()

    def _ensure_group(self) -> None:
        try:
            self._redis.xgroup_create(self.keys.tasks, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _fetch_loop(self) -> None:
        """Keep up to ``prefetch`` tasks ready; move due retries; take over stalled tasks."""
        consumer = cast(str, self.name)
        next_reclaim = 0.0
        next_sweep = time.monotonic() + 10.0
        block = 0.25
        while not self.closing.is_set():
            try:
                now = time.monotonic()
                moved, due_in = self._run("promote", [self.keys.delayed, self.keys.tasks], [100])
                block = 0.25 if due_in < 0 else min(0.25, max(0.005, due_in / 1000))
                if moved:
                    continue
                if now >= next_reclaim:
                    self._reclaim(consumer)
                    next_reclaim = now + min(5.0, self.visibility_timeout / 4)
                if now >= next_sweep:
                    self._store.sweep()
                    self._forget_consumers(consumer)
                    next_sweep = now + 30.0
                want = self._room()
                if want == 0:
                    with self._cond:
                        self._cond.wait(block)
                    continue
                reply = self._redis.xreadgroup(
                    GROUP, consumer, {self.keys.tasks: ">"}, count=want, block=int(block * 1000)
                )
                if reply:
                    self._take(cast(Any, reply)[0][1])
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: start over
                    self._ensure_group()
                else:
                    log.exception("flowloom: fetching tasks failed")
                    self.closing.wait(0.5)
            except Exception:
                if not self.closing.is_set():
                    log.exception("flowloom: fetching tasks failed")
                    self.closing.wait(0.5)

    def _reclaim(self, consumer: str) -> None:
        room = self._room()
        if room == 0:
            return
        idle_ms = int(self.visibility_timeout * 1000)
        reply = cast(Any, self._redis.xautoclaim(
            self.keys.tasks, GROUP, consumer, idle_ms, self._reclaim_from, count=room
        ))  # fmt: skip
        self._reclaim_from = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        entries = reply[1]
        if entries:
            log.warning("flowloom: took over %d stalled task(s)", len(entries))
            self._take(entries)

    def _forget_consumers(self, me: str, idle: float = 3600.0) -> None:
        """Drop consumers (workers long gone) that hold no task from the group."""
        for info in self._redis.xinfo_consumers(self.keys.tasks, GROUP):
            name = info["name"].decode()
            if name != me and info["pending"] == 0 and info["idle"] > idle * 1000:
                self._redis.xgroup_delconsumer(self.keys.tasks, GROUP, name)

    def _keepalive_loop(self) -> None:
        interval = self.visibility_timeout / 3
        while not self.closing.wait(interval):
            try:
                self._hand_back_stale(interval)
            except Exception:
                log.exception("flowloom: handing back waiting tasks failed")
            with self._cond:
                receipts = list(self._held)
            if not receipts:
                continue
            try:
                mine = self._run("keepalive", [self.keys.tasks], [GROUP, self.name, *receipts])
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
        self._run("handback", [self.keys.tasks], [GROUP, *stale])

    def close(self) -> None:
        """Stop the threads and hand back the tasks this process holds."""
        self.closing.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5.0)
        with self._cond:
            receipts = list(self._held)
            self._held.clear()
            self._buffer.clear()
            self._begun.clear()
        if receipts:
            self._run("handback", [self.keys.tasks], [GROUP, *receipts])
        if self.name is not None:
            self._redis.xgroup_delconsumer(self.keys.tasks, GROUP, self.name)
