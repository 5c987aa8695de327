"""The worker side: claim tasks, keep them alive, report their outcomes.

A fetcher thread reads tasks with XREADGROUP into a buffer the worker threads claim
from, only as many as threads wait for (at most ``prefetch``); a task read ahead that
waits for a free thread longer than ``HAND_BACK_AFTER`` goes back on the stream for
other processes. An outcome script acks its task (XACK + XDEL).

Eager hand-off: the script that completes a task also claims, for the same worker
thread, the first task that completion made ready (XADD, then XREADGROUP by this
consumer, so the task is pending for this process as any other) and marks it running;
the thread goes straight on with it, without a wake-up through the buffer. A streak of
such hand-offs is bounded (``STREAK_HOPS`` tasks or ``STREAK_SECONDS``): then the
thread's next completion claims nothing, its task goes through the stream, and any
waiting thread of any process may take it. When more tasks are ready, a completion
claims and begins up to ``CLAIM_BATCH`` of them: the others go to the buffer, and the
thread that takes one runs it at once, keeping its completion back to go with the
next batch's claim (see ``_flush_due``); one that waited longer than
``AHEAD_SECONDS`` is begun again, with the usual checks. Every
``visibility_timeout / 3`` seconds a keep-alive thread refreshes the idle time of the
tasks this process still holds (XCLAIM to itself); tasks idle for longer than
``visibility_timeout`` belong to a worker that died or froze and are taken over. A task
delivered more than ``max_deliveries`` times (its worker died each time) fails its
request instead of running again.

Redis failures in the background threads are recorded in ``Health`` (logged once per
outage) and retried with a back-off; the worker's calls raise and the worker backs off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import redis

from ...engine import Transition
from ...types import ErrorInfo
from ..base import RequestRecord, Task
from . import codec
from .connection import Health
from .keys import GROUP, KeyLayout
from .scripts import Call, Scripts
from .store import RequestStore, record_to_run

__all__ = [
    "CLAIM_BATCH", "DEFER_SECONDS", "HAND_BACK_AFTER", "STREAK_HOPS", "STREAK_SECONDS", "Consumer",
]  # fmt: skip

log = logging.getLogger("flowloom.redis")

HAND_BACK_AFTER = 1.0  # seconds a task read ahead waits for a free thread here
SWEEP_EVERY = 5.0  # seconds between two housekeeping passes of a fetcher
FORGET_AFTER = 120.0  # seconds a consumer holding nothing may idle before it is dropped
PROMOTE_EVERY = 0.05  # seconds between two moves of due retries while busy (or when due)
STREAK_HOPS = 100  # tasks a worker thread may take by eager hand-off in a row
STREAK_SECONDS = 0.1  # ... or for at most this long
CLAIM_BATCH = 4  # tasks a completion may claim at once (at most ``prefetch``)
DEFER_SECONDS = 0.002  # at most this long a completion waits for the next round trip
AHEAD_SECONDS = 0.005  # a task begun when claimed runs without a second look this long
# what leaves a completion unapplied and worth sending again: Redis out of reach, or
# refusing writes for a while (out of memory, a read-only replica): a script is refused
# at its first write, before it changes anything
_UNSENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)

# a completion not sent yet, and its task (None: a part of its deliveries sent ahead)
_Deferred = tuple[Call, Task | None]


class Consumer:
    """The tasks this process reads from the stream, holds and runs."""

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        store: RequestStore,
        health: Health,
        *,
        visibility_timeout: float,
        prefetch: int,
        max_deliveries: int,
        housekeeping: Callable[[], object] = lambda: None,
    ) -> None:
        self._redis = client
        self._scripts = scripts
        self._store = store
        self._health = health
        self._housekeeping = housekeeping
        self.keys: KeyLayout = store.keys
        self.visibility_timeout = visibility_timeout
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # worker threads wait on it for tasks
        self._wanted = threading.Condition(lock)  # the fetcher waits on it for waiting threads
        self._buffer: deque[tuple[float, Task]] = deque()  # (read at, task), oldest first
        self._held: dict[str, Task] = {}  # receipt -> task (buffered or running)
        self._begun: dict[str, float] = {}  # receipt -> when, of tasks begun when claimed
        self._took: dict[tuple[str, str], float] = {}  # (flow, step) -> its last run, seconds
        self._redelivered: dict[str, int] = {}  # receipt -> deliveries, of taken-over tasks
        self._facts: dict[str, list[bytes | None]] = {}  # receipt -> its request's, see facts_of
        self._waiting = 0  # worker threads waiting in ``claim``
        self._deferred = threading.local()  # .calls: completions not sent yet (_Deferred)
        self._eager = threading.local()  # .task: handed to this thread; .streak, .since
        self.name: str | None = None  # the consumer's name, once it claims
        self._last_keys: tuple[str, tuple[str, ...]] = ("", ())  # see ``_keys_of``
        self._reclaim_from = "0-0"  # where the next XAUTOCLAIM scan of pending tasks starts
        self.closing = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- sending -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Send this thread's deferred completions, if any (see ``complete``). If Redis
        cannot be reached they stay deferred, to be sent with the next call."""
        self._with_deferred(None)

    def deferring(self) -> bool:
        """Whether this thread has deferred completions to send."""
        return bool(self._deferred.__dict__.get("calls"))

    def _flush_for_next(self) -> Task | None:
        """Send this thread's deferred completions; the task they handed to this thread
        (eager hand-off), if any."""
        self._with_deferred(None, eager=True)
        task: Task | None = self._eager.__dict__.pop("task", None)
        return task

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.flush()
        return self._scripts(name, keys, args)

    def _with_deferred(self, call: Call | None, eager: bool = False) -> Any:
        """Run ``call`` (if any) after this thread's deferred completions, all in one
        round trip (one pipeline); returns the result of ``call``. A completion that
        cannot be sent for want of Redis, or that Redis refuses for a while (``_UNSENT``),
        stays deferred; one that fails otherwise lets its task go (it is taken over later
        and runs again). ``eager``: the thread is free, a task a completion claims is for
        it (else it goes to the buffer)."""
        pending: list[_Deferred] = self._deferred.__dict__.pop("calls", [])
        if not pending:  # on the thread's own connection all the same
            return None if call is None else self._scripts.pipelined([call])[0]
        calls = [deferred[0] for deferred in pending] + ([] if call is None else [call])
        try:
            results = self._scripts.pipelined(calls)
        except _UNSENT:
            self._deferred.calls = pending  # not lost: sent with the next call
            raise
        except BaseException:
            for _, task in pending:
                if task is not None:
                    self._release(task)
            raise
        for (_, task), result in zip(pending, results[: len(pending)], strict=True):
            if task is not None:
                self._completed(task, result, eager)
        return results[-1] if call is not None else None

    # -- the worker's calls ------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Task | None:
        self._start(worker)
        if not self._buffer:
            # nothing to pair it with: send the deferred completion now, and go on with
            # the task it claimed for this thread, if any
            task = self._flush_for_next()
            if task is not None:
                self._eager.streak = getattr(self._eager, "streak", 0) + 1
                return task
        # a thread that cannot talk to Redis (no connection: Redis at its ``maxclients``)
        # takes no task from the buffer: it could neither begin nor complete it, and would
        # hold it while the threads that can sit idle
        self._scripts.connect()
        with self._cond:
            if not self._buffer:
                self._waiting += 1
                self._wanted.notify()  # wake the fetcher: someone waits for work
                try:
                    self._cond.wait_for(lambda: self._buffer or self.closing.is_set(), timeout)
                finally:
                    self._waiting -= 1
            if not self._buffer:
                return None
            _, task = self._buffer.popleft()
        # a task from the stream: a new streak starts now (not when the thread began
        # to wait, or every task would go through the stream after a long wait)
        self._eager.streak = 0
        self._eager.since = time.monotonic()
        return task

    def begin(self, task: Task, instance: str, address: str) -> bool:
        with self._cond:
            begun_at = self._begun.pop(task.receipt, None)  # begun when claimed (``complete``)
            # a task begun ahead that waited here longer is looked at again (its request
            # may have been stopped, paused or failed meanwhile)
            begun_already = begun_at is not None and time.monotonic() - begun_at < AHEAD_SECONDS
            deliveries = self._redelivered.get(task.receipt, 1)  # forgotten on release
        if begun_already:
            try:
                if self._flush_due(task):  # else it goes with a later call (``CLAIM_BATCH``)
                    self.flush()
            except redis.RedisError as exc:  # the completions stay deferred; the task runs
                self._health.failed(exc)
            self._read_inputs(task)
            self._deferred.began = time.monotonic()  # how long it runs: see ``complete``
            return True
        if deliveries > self.max_deliveries:
            message = f"delivered {deliveries - 1} times; the worker died each time"
            log.error("flowloom: request %s failed at %s: %s", task.request_id, address, message)
            self.fail(task, instance, address, ErrorInfo(address, "WorkerDied", message))
            return False
        args = [task.request_id, GROUP, task.receipt, instance, address, task.attempt]
        keys = self._keys_of(task.request_id)
        facts = self._with_deferred(("begin", keys, args))  # 0: not begun
        if facts == 0:
            self._release(task)
            return False
        self._facts[task.receipt] = facts
        self._read_inputs(task)
        self._deferred.began = time.monotonic()
        return True

    def facts_of(self, task: Task) -> RequestRecord | None:
        """What the worker running ``task`` needs of its request's record (its query,
        created and trace: ``store.record_to_run``), if that came with the task's begin:
        the begin script returns it, and a completion's claim does for a task of another
        request, so that the first task of a request submitted elsewhere costs no read of
        its own. None if it did not (a task of the completing request: its worker has it)."""
        facts = self._facts.pop(task.receipt, None)
        return None if facts is None else record_to_run(task, facts)

    def _read_inputs(self, task: Task) -> None:
        """Read the inputs a fan-in keeps in Redis (a big foreach's join), page by page."""
        if isinstance(task.inputs, codec.PagedInputs):
            key = self.keys.request(task.request_id).inputs_of(task.inputs.instance)
            task.inputs.fill(dict(self._redis.hscan_iter(key, count=1000)))

    def complete(
        self, task: Task, instance: str, address: str, output: bytes | None, transition: Transition
    ) -> None:
        *ahead, last = codec.delivery_chunks(transition.deliveries)
        args: list[Any] = [
            task.request_id, GROUP, task.receipt, instance, address,
            _output_arg(output, transition), "1" if transition.finished else "0",
            transition.result, self._store.retention_ms(), self.name or "", self._want_more(),
            _flags(task), *last,
        ]  # fmt: skip
        # Sent with this thread's next call: a worker thread's next call is nearly always
        # ``begin`` of its next task, so both go in one round trip. A thread about to
        # wait for work sends it first (``claim``), and so does any other call. While
        # Redis cannot be reached, completions queue up here (one per task run). The
        # deliveries of a big transition go ahead in parts (``deliver``), in order.
        keys = self._keys_of(task.request_id)
        deferred = self._deferred.__dict__
        calls: list[_Deferred] = deferred.setdefault("calls", [])
        now = time.monotonic()
        if not calls:
            deferred["since"] = now
        # how long this step ran: a later task of it may be run with completions held back
        # only if it was quick (``_flush_due``)
        self._took[(task.flow, task.step)] = now - deferred.get("began", now)
        for part in ahead:
            calls.append((("deliver", keys, [task.request_id, instance, *part]), None))
        calls.append((("complete", keys, args), task))

    def _completed(self, task: Task, claimed: Any, eager: bool) -> None:
        self._release(task)
        if claimed:
            with self._cond:
                kept = self._claimed(claimed)
            if eager and kept and kept[0][1] and "task" not in self._eager.__dict__:
                self._eager.task = self._hold(kept[0])
                kept = kept[1:]
            if kept:
                self._take(kept)

    def retry(
        self, task: Task, instance: str, address: str, delay: float, error: ErrorInfo
    ) -> None:
        blob = codec.encode_task(replace(task, attempt=task.attempt + 1, receipt=""))
        args = [
            task.request_id, GROUP, task.receipt, instance, address, int(delay * 1000),
            codec.error_json(error), blob,
        ]  # fmt: skip
        try:
            self._run("retry", self._keys_of(task.request_id), args)
        finally:
            self._release(task)

    def fail(self, task: Task, instance: str, address: str, error: ErrorInfo) -> None:
        args = [
            task.request_id, GROUP, task.receipt, instance, address, codec.error_json(error),
            self._store.retention_ms(), codec.encode_task(replace(task, receipt="")),
        ]  # fmt: skip
        try:
            self._run("fail", self._keys_of(task.request_id), args)
        finally:
            self._release(task)
            self.look_again(task.request_id)

    def look_again(self, request_id: str) -> None:
        """The tasks of ``request_id`` this process holds begun ahead are begun again (and
        so checked) before they run: the request was just ended, paused or stopped here."""
        with self._cond:
            for receipt in list(self._begun):
                held = self._held.get(receipt)
                if held is None or held.request_id == request_id:
                    del self._begun[receipt]

    def ack(self, task: Task) -> None:
        try:
            self.flush()
            if task.receipt:
                pipe = self._redis.pipeline(transaction=True)
                pipe.xack(self.keys.tasks, GROUP, task.receipt)
                pipe.xdel(self.keys.tasks, task.receipt)
                pipe.execute()
        finally:
            self._release(task)

    def _keys_of(self, request_id: str) -> tuple[str, ...]:
        """The KEYS of a script about ``request_id``. The last request's are kept: a chain's
        hops, and most tasks a thread runs in a row, are of one request."""
        last = self._last_keys  # one read: another thread may replace it meanwhile
        if last[0] != request_id:
            last = (request_id, tuple(self.keys.request(request_id).script_keys()))
            self._last_keys = last
        return last[1]

    # -- what this process holds -------------------------------------------------------------
    def _want_more(self) -> int:
        """How many tasks a completing worker thread may claim: up to ``CLAIM_BATCH`` (the
        first for itself, the others to the buffer), none if one waits for it in the
        buffer already or its streak of eager hand-offs is over (``STREAK_HOPS``,
        ``STREAK_SECONDS``)."""
        if self.name is None or self.closing.is_set() or self._buffer:
            return 0
        eager = self._eager.__dict__
        if eager.get("streak", 0) >= STREAK_HOPS:
            return 0
        if time.monotonic() - eager.get("since", 0.0) >= STREAK_SECONDS:
            return 0
        return min(CLAIM_BATCH, max(1, self.prefetch))

    def _flush_due(self, task: Task) -> bool:
        """Whether this thread's deferred completions must go before it runs ``task``, a
        task it holds begun already: when ``CLAIM_BATCH`` of them wait, the oldest has
        waited ``DEFER_SECONDS``, or ``task``'s step has not run here in less than
        ``DEFER_SECONDS`` last time (a slow task, or one of unknown length, must not hold
        them back: its successors, or another request's end, would wait for it). Until
        then they wait for a round trip the thread makes anyway (one completion claims
        the next batch of tasks), so that a batch of quick tasks costs one round trip, not
        one per task."""
        deferred = self._deferred.__dict__
        calls = deferred.get("calls")
        if not calls:
            return False
        if len(calls) >= CLAIM_BATCH:
            return True
        if self._took.get((task.flow, task.step), DEFER_SECONDS) >= DEFER_SECONDS:
            return True
        since: float = deferred.get("since", 0.0)
        return time.monotonic() - since >= DEFER_SECONDS

    def _room(self) -> int:
        """How many tasks the fetcher may read: one per waiting thread, up to ``prefetch``."""
        with self._cond:
            return max(0, min(self._waiting, max(1, self.prefetch)) - len(self._buffer))

    def _take(
        self,
        entries: Sequence[tuple[bytes, dict[bytes, bytes] | list[bytes]]],
        deliveries: Sequence[int] = (),
    ) -> None:
        tasks = []
        with self._cond:
            for n, (receipt, fields) in enumerate(entries):
                if not fields:
                    continue  # deleted meanwhile (its request ended and it was acked)
                blob = fields[b"t"] if isinstance(fields, dict) else fields[1]
                task = codec.decode_task(blob, receipt.decode())
                if n < len(deliveries) and deliveries[n] > 1:
                    self._redelivered[task.receipt] = deliveries[n]
                    task = replace(task, redelivered=True)
                tasks.append(task)
                self._held[task.receipt] = task
            now = time.monotonic()
            self._buffer.extend((now, task) for task in tasks)
            self._cond.notify(len(tasks))  # a thread per task, not all of them

    def _hold(self, entry: tuple[bytes, list[bytes]]) -> Task:
        """The task of a stream entry a completion claimed for this thread, held (kept
        alive) until its outcome is sent."""
        receipt, fields = entry
        task = codec.decode_task(fields[1], receipt.decode())
        with self._cond:
            self._held[task.receipt] = task
        return task

    def release(self, task: Task) -> None:
        """Let ``task`` go: no longer kept alive, taken over after the visibility timeout."""
        self._release(task)

    def _release(self, task: Task) -> None:
        with self._cond:
            self._held.pop(task.receipt, None)
            self._begun.pop(task.receipt, None)
            self._redelivered.pop(task.receipt, None)
            self._facts.pop(task.receipt, None)

    def held(self) -> int:
        """How many tasks this process holds (buffered or running)."""
        with self._cond:
            return len(self._held)

    # -- the background threads --------------------------------------------------------------
    def _start(self, consumer: str) -> None:
        if self.name is not None:
            return
        with self._cond:
            if self.name is not None:
                return
            self.name = consumer
        self.start_thread("flowloom-fetcher", self._fetch_loop)
        self.start_thread("flowloom-keepalive", self._keepalive_loop)

    def start_thread(self, name: str, target: Callable[[], None]) -> None:
        with self._cond:
            if any(t.name == name and t.is_alive() for t in self._threads):
                return
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
        thread.start()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self._redis.xgroup_create(self.keys.tasks, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _fetch_loop(self) -> None:
        """Read tasks for waiting threads; move due retries; take over stalled tasks; hand
        back what waits here too long; keep the listings and the group tidy. Survives any
        error: logged once per outage, then retried with a back-off."""
        consumer = cast(str, self.name)
        timers = {"promote": 0.0, "due": 0.0, "reclaim": 0.0, "sweep": time.monotonic() + 1.0}
        backoff = 0.0
        group_ready = False
        while not self.closing.is_set():
            try:
                if not group_ready:
                    self.ensure_group()
                    group_ready = True
                if self._fetch_once(consumer, timers):  # only an answer ends an outage
                    self._health.succeeded()
                backoff = 0.0
            except Exception as exc:
                if self.closing.is_set():
                    return
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    group_ready = False  # Redis lost its data: start over
                    continue
                if isinstance(exc, redis.RedisError):
                    self._health.failed(exc)
                else:
                    log.exception("flowloom: fetching tasks failed")
                backoff = min(2.0, max(0.05, backoff * 2))
                self.closing.wait(backoff)

    def _fetch_once(self, consumer: str, timers: dict[str, float]) -> bool:
        """One round of the fetcher; whether it talked to Redis (a round with nothing to
        read or do may not)."""
        now = time.monotonic()
        talked = False
        if now >= timers["promote"]:  # not before every read: a read per task is common
            moved, due_in = self._run("promote", [self.keys.delayed, self.keys.tasks], [100])
            talked = True
            timers["due"] = now + due_in / 1000 if due_in >= 0 else float("inf")
            timers["promote"] = now if moved else min(now + PROMOTE_EVERY, timers["due"])
            if moved:
                return True
        block = min(0.25, max(0.005, timers["due"] - now))
        self._hand_back_stale(HAND_BACK_AFTER)
        if now >= timers["reclaim"]:
            self._reclaim(consumer)
            talked = True
            timers["reclaim"] = now + min(5.0, self.visibility_timeout / 4)
        if now >= timers["sweep"]:
            timers["sweep"] = now + SWEEP_EVERY
            self._tidy(consumer)
            talked = True
        with self._cond:  # one lock for the check and the wait: no wake-up is missed
            want = self._room()
            if want == 0:
                self._wanted.wait(block)
                return talked
        # on the fetcher's own connection, packed by hiredis (a read per task is common:
        # redis-py's pool round and reply parsing cost more than the read's packing)
        reply = self._scripts.command(
            "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", want, "BLOCK", int(block * 1000),
            "STREAMS", self.keys.tasks, ">",
        )  # fmt: skip
        if reply:  # RESP2: [[stream, entries]]; RESP3: {stream: entries}
            streams = list(reply.values()) if isinstance(reply, dict) else [s[1] for s in reply]
            self._take(streams[0])
        return True

    def _tidy(self, consumer: str) -> None:
        """Sweep the listings (in batches, until what expired is gone), drop consumers long
        gone from the group, and dead workers from the workers' listing."""
        for _ in range(100):
            if self._store.sweep(1000) < 1000:
                break
        self._scripts("forget", [self.keys.tasks], [GROUP, consumer, int(FORGET_AFTER * 1000)])
        self._housekeeping()

    def _reclaim(self, consumer: str) -> None:
        room = self._room()  # only for threads waiting here: held back, it would be handed
        if room == 0:  # back, and lose its count of deliveries
            return
        idle_ms = int(self.visibility_timeout * 1000)
        start, entries, deliveries = self._scripts(
            "reclaim", [self.keys.tasks], [GROUP, consumer, idle_ms, self._reclaim_from, room]
        )
        self._reclaim_from = start.decode() if isinstance(start, bytes) else str(start)
        if entries:
            log.warning("flowloom: took over %d stalled task(s)", len(entries))
            self._take([(e[0], e[1]) for e in entries], deliveries)

    def _keepalive_loop(self) -> None:
        interval = self.visibility_timeout / 3
        while not self.closing.wait(interval):
            try:
                if self.keep_alive():  # only an answer ends an outage
                    self._health.succeeded()
            except redis.RedisError as exc:
                self._health.failed(exc)

    def keep_alive(self) -> bool:
        """Refresh the idle time of the tasks this process holds; warn of those another
        consumer took over (see ``_taken_over``). Whether it talked to Redis (not when
        nothing is held)."""
        with self._cond:
            receipts = list(self._held)
        if not receipts:
            return False
        mine = self._run("keepalive", [self.keys.tasks], [GROUP, self.name, *receipts])
        kept = {r.decode() for r in mine}
        with self._cond:
            missing = [r for r in receipts if r not in kept and r in self._held]
        lost = self._taken_over(missing) if missing else 0
        if lost:
            log.warning("flowloom: %d task(s) were taken over by other workers", lost)
        return True

    def _taken_over(self, receipts: Sequence[str]) -> int:
        """How many of ``receipts`` (held here, but not pending for this consumer when the
        keep-alive ran) are pending for another consumer now. Most are not: a worker
        thread sent the task's outcome (which acked it) and has not let it go here yet, or
        its request was stopped; a task another worker took over is pending for it."""
        pipe = self._redis.pipeline(transaction=False)
        for receipt in receipts:
            pipe.xpending_range(self.keys.tasks, GROUP, receipt, receipt, 1)
        owners = pipe.execute()
        name = (self.name or "").encode()
        return sum(1 for pending in owners if pending and pending[0]["consumer"] != name)

    def _hand_back_stale(self, patience: float) -> None:
        """Tasks read ahead that waited ``patience`` seconds for a free thread here go
        back on the stream, for workers that have threads to spare."""
        limit = time.monotonic() - patience
        with self._cond:
            if not self._buffer or self._buffer[0][0] > limit:
                return
            stale = []
            while self._buffer and self._buffer[0][0] <= limit:
                stale.append(self._buffer.popleft()[1])
        try:
            self._run(
                "handback", [self.keys.tasks], [GROUP, self.name, *(t.receipt for t in stale)]
            )
        finally:
            for task in stale:  # handed back, or taken over later if that failed
                self._release(task)

    def close(self, hand_back: bool = True) -> int:
        """Stop the threads and hand back the tasks this process holds (unless not
        ``hand_back``: they are taken over after the visibility timeout). Returns how many
        it held."""
        self.closing.set()
        with self._cond:
            self._cond.notify_all()
            self._wanted.notify_all()
        for thread in self._threads:
            thread.join(5.0)
        with self._cond:
            receipts = list(self._held)
            self._held.clear()
            self._buffer.clear()
            self._begun.clear()
            self._redelivered.clear()
            self._facts.clear()
        if not hand_back:
            return len(receipts)
        if receipts:
            self._run("handback", [self.keys.tasks], [GROUP, self.name, *receipts])
        if self.name is not None:
            self._hand_back_pending(self.name)
        return len(receipts)

    def _hand_back_pending(self, consumer: str) -> None:
        """Hand back what is still pending for ``consumer`` though this process does not
        hold it (a submit's claim whose reply was never read here), then leave the group.
        A consumer that still has pending tasks is kept, never deleted with them (their
        entries would be lost for good): they are taken over after the visibility
        timeout."""
        for _ in range(100):
            pending = self._redis.xpending_range(
                self.keys.tasks, GROUP, "-", "+", 1000, consumername=consumer
            )
            if pending:
                receipts = [p["message_id"] for p in pending]
                self._run("handback", [self.keys.tasks], [GROUP, consumer, *receipts])
            elif self._run("leave", [self.keys.tasks], [GROUP, consumer]) == 0:
                return  # left the group with nothing pending, atomically (``lua/leave.lua``)

    # -- tasks claimed by a submit from this process (``lua/submit.lua``) ---------------------
    def idle(self) -> int:
        """How many tasks a submit from this process may claim for its waiting worker
        threads (see ``_room``): none before this consumer has a name or once closing."""
        if self.name is None or self.closing.is_set():
            return 0
        return self._room()

    def take_claimed(self, claimed: Any) -> None:
        """Hand the tasks a submit claimed for this consumer (for its waiting worker
        threads: see ``_room``) to those threads, as a completion's claimed batch: held
        (kept alive) from now on, and those begun already run without a second look for
        ``AHEAD_SECONDS``; those the script dropped (0) are not kept."""
        with self._cond:
            self._take(self._claimed(claimed))

    def _claimed(self, claimed: Any) -> list[Any]:
        """The entries of a script's claim (``claim_tasks`` in ``lua/request.lua``: id,
        blob, began, facts of each task, flat) to keep, as stream entries (id, [b"t",
        blob]): those begun are noted as begun now, with their request's record if it came
        along; those the script dropped (0) are not kept."""
        kept = []
        now = time.monotonic()
        for n in range(0, len(claimed), 4):
            entry_id, blob, flag, known = claimed[n : n + 4]
            if flag == 1:
                receipt = entry_id.decode()
                self._begun[receipt] = now
                if known != 0:
                    self._facts[receipt] = known
            if flag != 0:
                kept.append((entry_id, [b"t", blob] if blob else []))
        return kept


def _flags(task: Task) -> str:
    """What ``complete.lua`` must clean up besides the usual: ``p`` the task's inputs
    wait in Redis (paged), ``x`` an earlier attempt may have left the vertex's error."""
    paged = "p" if isinstance(task.inputs, codec.PagedInputs) else ""
    return (paged + "x") if task.attempt > 1 else paged


def _output_arg(output: bytes | None, transition: Transition) -> bytes:
    """How ``complete.lua`` gets a step's output: ``""`` a split (no output of its own),
    ``n`` not kept (``keep_outputs=False``), ``r`` the request's result (sent once, as the
    result), else ``d`` + the output."""
    if output is None:
        return b""
    if not transition.keep_output:
        return b"n"
    return b"r" if transition.finished else b"d" + output
