"""``RedisBackend``: the request store, the consumer and the heartbeats on one URL."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import redis

from ... import checks
from ...engine import Transition
from ...errors import BackendRefused, BackendUnavailable, InvalidRequest
from ...logs import safe_url
from ...types import ErrorInfo, RequestState, Status
from ..base import Backend, RequestRecord, Summary, Task, current_deadline
from . import access
from .connection import QUICK_TIMEOUT, Guard, Health, make_client
from .consumer import Consumer
from .ends import Ends
from .heartbeats import Heartbeats
from .keys import GROUP, KeyLayout
from .loop_submits import LoopSubmits
from .scripts import Scripts
from .store import RequestStore

__all__ = ["RedisBackend"]

log = logging.getLogger("flowloom.redis")

T = TypeVar("T")

MAX_VALUE = 256 * 1024 * 1024  # bytes one output, item or body may hold by default


class RedisBackend(Backend):
    """Requests and tasks in Redis at ``url``, every key under ``prefix``.

    ``retention``: seconds a finished request is kept. ``visibility_timeout``: seconds
    after which a task claimed by a worker that stopped answering goes to another one.
    ``prefetch``: at most how many tasks one process reads ahead for its idle threads.
    ``heartbeat``: seconds between two announcements of a live worker.
    ``retry_for``: how many seconds a call rides out an unreachable Redis (a restart, a
    fail-over) before it raises ``BackendUnavailable`` (a worker carries on regardless).
    ``socket_timeout``, ``connect_timeout``: seconds one Redis command or connection may
    take. ``max_deliveries``: a task delivered that many times, its worker dying each
    time, fails its request rather than run again. ``max_value``: the most bytes one
    output, foreach item or request body may hold (less if Redis's own
    ``proto-max-bulk-len`` is lower: at most half of it); a step that returns more fails
    its request, a bigger body is refused (``InvalidRequest``).

    Every failure of Redis surfaces as ``BackendUnavailable`` (never a ``redis``
    exception), after at most ``retry_for`` seconds, or by the end of an enclosing
    ``flowloom.backends.deadline`` block if that comes first.
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
        retry_for: float = 10.0,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_deliveries: int = 5,
        max_value: int = MAX_VALUE,
    ) -> None:
        for name, value in (
            ("retention", retention),
            ("visibility_timeout", visibility_timeout),
            ("heartbeat", heartbeat),
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
        ):
            checks.seconds(name, value)
        checks.seconds("retry_for", retry_for, zero=True)
        checks.count("prefetch", prefetch, 0, 100_000)
        checks.count("max_deliveries", max_deliveries, 1, 1_000_000)
        checks.count("max_value", max_value, 1, 2**62)
        self.url = url
        self.prefix = prefix
        self.max_value = max_value
        self._value_limit: int | None = None  # max_value, and Redis's, once read
        self._config_due = 0.0  # when to read Redis's settings (again)
        self._access_checked = False  # see ``ping``
        self.retry_for = retry_for
        self.keys = KeyLayout.of(prefix)
        try:
            self._redis = make_client(
                url, socket_timeout=socket_timeout, connect_timeout=connect_timeout
            )
            # for calls bounded by a caller's deadline: wait, ping
            self._quick = make_client(
                url, socket_timeout=QUICK_TIMEOUT, connect_timeout=QUICK_TIMEOUT
            )
        except ValueError as exc:
            raise ValueError(f"not a Redis URL: {safe_url(url)}: {exc}") from None
        self.health = Health(url, grace=3 * heartbeat, on_read_only=self._reconnect)
        self._ends = Ends(
            url,
            self.keys.ended,
            self.health,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
        )
        self._loop_submits = LoopSubmits(
            url, socket_timeout=socket_timeout, connect_timeout=connect_timeout
        )
        scripts = Scripts(self._redis)
        self._store = RequestStore(self._redis, scripts, self.keys, retention)
        self._quick_store = RequestStore(self._quick, Scripts(self._quick), self.keys, retention)
        self._heartbeats = Heartbeats(self._redis, self.keys, heartbeat, self.health)
        self._consumer = Consumer(
            self._redis,
            scripts,
            self._store,
            self.health,
            visibility_timeout=visibility_timeout,
            prefetch=prefetch,
            max_deliveries=max_deliveries,
            housekeeping=self._heartbeats.workers,
        )
        self._guard = Guard(self.health, retry_for, on_nogroup=self._consumer.ensure_group)

    @property
    def retention(self) -> float:
        return self._store.retention

    @property
    def visibility_timeout(self) -> float:
        return self._consumer.visibility_timeout

    @property
    def prefetch(self) -> int:
        return self._consumer.prefetch

    @property
    def max_deliveries(self) -> int:
        return self._consumer.max_deliveries

    @property
    def heartbeat(self) -> float:
        return self._heartbeats.interval

    @property
    def degraded(self) -> bool:
        """Whether this process could not reach Redis lately (see ``Heartbeats``)."""
        return self.health.degraded

    def _call(self, call: Callable[[], T]) -> T:
        """``call`` after this thread's deferred completion, under the error policy."""

        def flushed() -> T:
            self._consumer.flush()
            return call()

        return self._guard(flushed)

    def _reads(self) -> RequestStore:
        """The store for reads: on the quick client when a caller's deadline is set."""
        return self._store if current_deadline() is None else self._quick_store

    # -- requests ------------------------------------------------------------------------------
    def submit(self, record: RequestRecord, transition: Transition) -> None:
        self._check_body(record)
        self._call(lambda: self._store.submit(record, transition))

    async def submit_async(self, record: RequestRecord, transition: Transition) -> None:
        """``submit`` sent from the event loop itself (see ``loop_submits.py``); on a
        thread, the ordinary way, when that does not create the request."""
        self._check_body(record, self._value_limit or self.max_value)  # no I/O on the loop
        consumer = self._consumer
        # this process's idle worker threads take the request's first tasks from the
        # submit's own reply (no wake-up of the fetcher, no round trip to begin them)
        keys, args = self._store.submit_call(
            record, transition, consumer.name or "", consumer.idle()
        )
        if not await self._loop_submits.submit(keys, args, consumer.take_claimed):
            await super().submit_async(record, transition)

    def leave_loop(self) -> None:
        self._loop_submits.close()

    def _check_body(self, record: RequestRecord, limit: int | None = None) -> None:
        limit = self.value_limit() if limit is None else limit
        if len(record.body) > limit:
            raise InvalidRequest(
                f"a body of {len(record.body):,} bytes is more than Redis takes in one "
                f"value here (max_value {limit:,})"
            )

    def value_limit(self) -> int:
        """``max_value``, lowered to half of Redis's ``proto-max-bulk-len`` if that is
        less (a completion carries an output and a delivery of it)."""
        if self._value_limit is None and time.monotonic() >= self._config_due:
            self._read_config()
        return self._value_limit or self.max_value

    def _read_config(self) -> None:
        """Read Redis's settings that matter here, once (again in 10 s if Redis does not
        answer); warn if Redis may evict flowloom's keys."""
        try:
            found = self._quick.config_get("proto-max-bulk-len", "maxmemory-policy")
            configured = int(found["proto-max-bulk-len"] or "")
        except (redis.ConnectionError, redis.TimeoutError):
            self._config_due = time.monotonic() + 10.0
            return
        except (redis.RedisError, KeyError, ValueError):
            found, configured = {}, 2 * self.max_value  # CONFIG refused (a managed Redis)
        policy = found.get("maxmemory-policy") or self._eviction_policy()
        if policy is not None and policy != "noeviction":
            log.warning(
                "flowloom: Redis at %s evicts keys when full (maxmemory-policy %s): requests "
                "and tasks may then vanish; set maxmemory-policy noeviction",
                self.health.url,
                policy,
            )
        self._value_limit = max(1, min(self.max_value, configured // 2 - 4096))

    def _eviction_policy(self) -> str | None:
        """``maxmemory-policy`` as ``INFO memory`` tells it: a Redis that refuses
        ``CONFIG`` (a managed one) answers ``INFO``."""
        try:
            policy = self._quick.info("memory").get("maxmemory_policy")
        except redis.RedisError:
            return None
        return policy if isinstance(policy, str) else None

    def state(self, request_id: str) -> RequestState | None:
        return self._call(lambda: self._reads().state(request_id))

    def record(self, request_id: str) -> RequestRecord | None:
        return self._call(lambda: self._reads().record(request_id))

    def summary(self, request_id: str) -> Summary | None:
        return self._call(lambda: self._reads().summary(request_id))

    def output(self, request_id: str, address: str) -> bytes | None:
        return self._call(lambda: self._reads().output(request_id, address))

    def result(self, request_id: str) -> bytes | None:
        return self._call(lambda: self._reads().result(request_id))

    def wait(self, request_id: str, timeout: float | None) -> Status | None:
        until = None if timeout is None else time.monotonic() + timeout
        return self._call(lambda: self._quick_store.wait(request_id, until))

    def control(self, request_id: str, action: Status) -> Status:
        try:
            return self._call(lambda: self._store.control(request_id, action))
        finally:
            self._consumer.look_again(request_id)

    def rerun(self, request_id: str, trace: str = "") -> Status:
        return self._call(lambda: self._store.rerun(request_id, trace))

    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        return self._call(lambda: self._store.list_requests(flow, status, offset, limit))

    def sweep(self, limit: int = 1000) -> int:
        """Drop requests that have expired from the listings; how many were dropped."""
        return self._call(lambda: self._store.sweep(limit))

    # -- context ---------------------------------------------------------------------------------
    def context_get(self, request_id: str, key: str) -> bytes | None:
        return self._call(lambda: self._store.context_get(request_id, key))

    def context_set(self, request_id: str, key: str, value: bytes) -> None:
        self._call(lambda: self._store.context_set(request_id, key, value))

    def context_delete(self, request_id: str, key: str) -> None:
        self._call(lambda: self._store.context_delete(request_id, key))

    # -- the worker's side ---------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Task | None:
        return self._guard(lambda: self._consumer.claim(worker, timeout), contacts=False)

    def begin(self, task: Task, instance: str, address: str) -> bool:
        try:
            return self._guard(lambda: self._consumer.begin(task, instance, address))
        except BaseException:  # given up: the task goes, to be taken over
            self._consumer.release(task)
            raise

    def record_to_run(self, task: Task) -> RequestRecord | None:
        known = self._consumer.facts_of(task)  # came with the task's begin, usually
        return known if known is not None else self.record(task.request_id)

    def complete(
        self, task: Task, instance: str, address: str, output: bytes | None, transition: Transition
    ) -> None:
        self._guard(
            lambda: self._consumer.complete(task, instance, address, output, transition),
            contacts=False,
        )

    def retry(
        self, task: Task, instance: str, address: str, delay: float, error: ErrorInfo
    ) -> None:
        self._guard(lambda: self._consumer.retry(task, instance, address, delay, error))

    def fail(self, task: Task, instance: str, address: str, error: ErrorInfo) -> None:
        self._guard(lambda: self._consumer.fail(task, instance, address, error))

    def ack(self, task: Task) -> None:
        self._guard(lambda: self._consumer.ack(task))

    def defer(self, task: Task, delay: float) -> None:
        self._guard(lambda: self._consumer.defer(task, delay))

    def flush(self) -> None:
        """Send this thread's deferred completion, if any (see ``Consumer.complete``)."""
        if self._consumer.deferring():  # sending nothing is no sign that Redis answers
            self._guard(self._consumer.flush)

    # -- workers' heartbeats ---------------------------------------------------------------------
    def register_worker(self, name: str, describe: Callable[[], Mapping[str, object]]) -> None:
        """Announce a live worker until ``unregister_worker``: ``describe()`` is written,
        with a TTL of three heartbeats, every ``heartbeat`` seconds. A worker whose first
        heartbeat Redis does not take (down, or refusing writes) runs all the same: its
        next heartbeat that goes through announces it."""
        try:
            self._guard(lambda: self._heartbeats.register(name, describe))
        except BackendUnavailable as exc:
            log.warning(
                "flowloom: worker %s is not announced yet (%s); its next heartbeat that "
                "Redis takes announces it",
                name,
                exc,
            )
        closing = self._consumer.closing
        self._consumer.start_thread("flowloom-heartbeat", lambda: self._heartbeats.run(closing))

    def unregister_worker(self, name: str) -> None:
        if self.health.down:  # a stopping worker does not wait out an outage
            raise BackendUnavailable(f"Redis at {self.health.url} is unavailable")
        self._guard(lambda: self._heartbeats.unregister(name))

    def workers(self) -> list[dict[str, object]]:
        return self._call(self._heartbeats.workers)

    def depth(self) -> Mapping[str, int]:
        """Ready: on the stream and not yet delivered to any worker (delivered entries are
        pending until acked, and deleted then); delayed: retries; held: of paused requests."""
        return self._call(self._depth)

    def _depth(self) -> Mapping[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xlen(self.keys.tasks)
        pipe.xpending(self.keys.tasks, GROUP)
        pipe.zcard(self.keys.delayed)
        pipe.get(self.keys.held)
        try:
            length, pending, delayed, held = pipe.execute()
        except redis.ResponseError as exc:  # no stream or group yet: nothing has been queued
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            return {"ready": 0, "delayed": 0, "held": 0}
        ready = max(0, int(length) - int(pending["pending"] if pending else 0))
        return {"ready": ready, "delayed": int(delayed), "held": max(0, int(held or 0))}

    def listen(
        self,
        listener: Callable[[str, Status, bytes | None], None],
        lost: Callable[[], None] = lambda: None,
    ) -> Callable[[], None]:
        """Calls ``listener`` from this backend's one subscription to ``P:ended`` (see
        ``ends.py``), with the result of a completed request up to 4 KiB, and ``lost()``
        each time it is (re)established: ends published before then were not heard."""
        return self._ends.listen(listener, lost)

    def ping(self) -> None:
        """``BackendUnavailable`` unless Redis answers within about a second. A probe: the
        caller reports the answer, so a failure is not logged here.

        Until one has found nothing amiss, a ping also asks Redis whether its user may
        run every command flowloom sends (``access.py``): ``BackendRefused`` (a
        ``BackendUnavailable``) naming those it may not, as a worker or server would
        otherwise start and run nothing."""
        try:
            self._quick.ping()
            missing = None if self._access_checked else access.refused(self._quick, self.keys)
        except redis.RedisError as exc:
            raise self._guard.unavailable(exc) from exc
        if missing:
            user = self._quick.connection_pool.connection_kwargs.get("username") or "default"
            raise BackendRefused(
                f"Redis at {self.health.url} refuses its user {user!r} commands flowloom "
                f"needs: {', '.join(missing)} (on keys and channels {self.prefix}:*); "
                'see docs/redis.md, "Redis users and ACLs"'
            )
        self._access_checked = True
        self.health.succeeded()

    def _reconnect(self) -> None:
        """Redis refused a write as a read-only replica (a fail-over): close the idle
        connections, so that calls connect again to wherever the URL leads now. A
        connection in use is closed by its own call's refusal (``scripts._send_on``)."""
        for client in (self._redis, self._quick):
            client.connection_pool.disconnect(inuse_connections=False)
        self._loop_submits.close()

    def close(self) -> None:
        """Stop fetching, hand back the tasks this process holds, release connections."""
        if self._consumer.closing.is_set():
            return
        self._ends.close()
        self._loop_submits.close()
        try:
            if self.health.down:
                # every call would wait for its timeout: a stop does not wait out an outage
                held = self._consumer.close(hand_back=False)
                log.warning(
                    "flowloom: Redis at %s is unavailable: %d task(s) held here are taken "
                    "over after the visibility timeout",
                    self.health.url,
                    held,
                )
                return
            self._consumer.flush()
            self._consumer.close()
            for name in self._heartbeats.names():
                self._heartbeats.unregister(name)
        except redis.RedisError as exc:
            log.warning(
                "flowloom: could not hand back tasks (%s); they are taken over after the "
                "visibility timeout",
                exc,
            )
        finally:
            self._redis.close()
            self._quick.close()

    # -- for tests and tools ---------------------------------------------------------------------
    def purge(self) -> None:
        """Delete every key under the prefix (tests, tools)."""
        self._call(self._store.purge)
