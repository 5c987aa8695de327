"""``RedisBackend``: the request store, the consumer and the heartbeats on one client."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ...engine import Transition
from ...types import ErrorInfo, RequestState, Status
from ..base import Backend, RequestRecord, Summary, Task
from .consumer import Consumer
from .heartbeats import Heartbeats
from .keys import KeyLayout
from .scripts import Scripts
from .store import RequestStore

__all__ = ["RedisBackend"]

log = logging.getLogger("flowloom.redis")


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
        self.keys = KeyLayout.of(prefix)
        retries = max(1, int(retry_for / 0.5))
        self._redis = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=30,
        )
        scripts = Scripts(self._redis)
        self._store = RequestStore(self._redis, scripts, self.keys, retention)
        self._consumer = Consumer(
            self._redis,
            scripts,
            self._store,
            visibility_timeout=visibility_timeout,
            prefetch=prefetch,
        )
        self._heartbeats = Heartbeats(self._redis, self.keys, heartbeat)

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
    def heartbeat(self) -> float:
        return self._heartbeats.interval

    # -- requests ------------------------------------------------------------------------------
    def submit(self, record: RequestRecord, transition: Transition) -> None:
        self.flush()
        self._store.submit(record, transition)

    def state(self, request_id: str) -> RequestState | None:
        self.flush()
        return self._store.state(request_id)

    def record(self, request_id: str) -> RequestRecord | None:
        self.flush()
        return self._store.record(request_id)

    def summary(self, request_id: str) -> Summary | None:
        self.flush()
        return self._store.summary(request_id)

    def output(self, request_id: str, address: str) -> bytes | None:
        self.flush()
        return self._store.output(request_id, address)

    def result(self, request_id: str) -> bytes | None:
        self.flush()
        return self._store.result(request_id)

    def wait(self, request_id: str, timeout: float | None) -> Status | None:
        self.flush()
        return self._store.wait(request_id, timeout)

    def control(self, request_id: str, action: Status) -> Status:
        self.flush()
        return self._store.control(request_id, action)

    def list_requests(
        self, flow: str | None, status: Status | None, offset: int, limit: int
    ) -> list[RequestState]:
        self.flush()
        return self._store.list_requests(flow, status, offset, limit)

    def sweep(self, limit: int = 1000) -> int:
        """Drop requests that have expired from the listings; how many were dropped."""
        self.flush()
        return self._store.sweep(limit)

    # -- context ---------------------------------------------------------------------------------
    def context_get(self, request_id: str, key: str) -> bytes | None:
        self.flush()
        return self._store.context_get(request_id, key)

    def context_set(self, request_id: str, key: str, value: bytes) -> None:
        self.flush()
        self._store.context_set(request_id, key, value)

    def context_delete(self, request_id: str, key: str) -> None:
        self.flush()
        self._store.context_delete(request_id, key)

    # -- the worker's side ---------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Task | None:
        return self._consumer.claim(worker, timeout)

    def begin(self, task: Task, instance: str, address: str) -> bool:
        return self._consumer.begin(task, instance, address)

    def complete(
        self, task: Task, instance: str, address: str, output: bytes | None, transition: Transition
    ) -> None:
        self._consumer.complete(task, instance, address, output, transition)

    def retry(self, task: Task, address: str, delay: float, error: ErrorInfo) -> None:
        self._consumer.retry(task, address, delay, error)

    def fail(self, task: Task, address: str, error: ErrorInfo) -> None:
        self._consumer.fail(task, address, error)

    def ack(self, task: Task) -> None:
        self._consumer.ack(task)

    def flush(self) -> None:
        """Send this thread's deferred completion, if any (see ``Consumer.complete``)."""
        self._consumer.flush()

    # -- workers' heartbeats ---------------------------------------------------------------------
    def register_worker(self, name: str, describe: Callable[[], Mapping[str, object]]) -> None:
        """Announce a live worker until ``unregister_worker``: ``describe()`` is written,
        with a TTL of three heartbeats, every ``heartbeat`` seconds."""
        self._heartbeats.register(name, describe)
        closing = self._consumer.closing
        self._consumer.start_thread("flowloom-heartbeat", lambda: self._heartbeats.run(closing))

    def unregister_worker(self, name: str) -> None:
        self._heartbeats.unregister(name)

    def workers(self) -> list[dict[str, object]]:
        return self._heartbeats.workers()

    def queue_depth(self) -> dict[str, int]:
        self.flush()
        return self._consumer.depth()

    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        """Stop fetching, hand back the tasks this process holds, release connections."""
        self.flush()
        if self._consumer.closing.is_set():
            return
        try:
            self._consumer.close()
            for name in self._heartbeats.names():
                self.unregister_worker(name)
        except redis.RedisError:
            log.exception("flowloom: handing back tasks failed; they will be taken over later")
        finally:
            self._redis.close()

    # -- for tests and tools ---------------------------------------------------------------------
    def purge(self) -> None:
        """Delete every key under the prefix (tests, tools)."""
        self._store.purge()
