"""How the backend talks to Redis when Redis misbehaves.

Two clients on one URL, neither with redis-py's own retries: the main one, and a quick
one (short socket timeouts) for calls bounded by a caller's deadline (``wait``,
``ping``, anything inside ``backends.deadline``). ``Guard`` runs a call, riding out a
connection failure until ``retry_for`` seconds after the outage began (or until the
caller's deadline, if sooner: a call made well into an outage gives up after one
attempt instead of waiting out a window of its own), and turns every Redis failure into
``BackendUnavailable`` naming the URL (without its password) and the cause. ``Health``
records outages: one WARNING when one begins, one INFO when Redis answers again. A call
Redis answers with a refusal (out of memory, a read-only replica, a script error) is no
outage: it is told at most once a minute (``REFUSALS_TOLD_EVERY``), with how many there
were, however often calls fail and succeed in turn; so is a new connection refused at
Redis's ``maxclients`` (``Guard`` retries it as it would a connection failure).

A read-only refusal means the server this URL led to is a replica now: a fail-over
promoted another one, and the URL's name (DNS, a virtual IP) leads there for new
connections only. ``Health`` then drops the pools' idle connections (``on_read_only``),
a connection that got the refusal is closed (``scripts._send_on``), and ``Guard``
retries the call within its window like one that found Redis down: the calls that
follow reach the new primary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import MaxClientsReachedError
from redis.retry import Retry

from ...errors import BackendUnavailable
from ...logs import safe_url
from ..base import current_deadline

__all__ = ["QUICK_TIMEOUT", "Guard", "Health", "make_client"]

log = logging.getLogger("flowloom.redis")

T = TypeVar("T")

QUICK_TIMEOUT = 0.5  # socket and connect timeout of the quick client (seconds)
REFUSALS_TOLD_EVERY = 60.0  # seconds between two warnings of calls Redis refused


def make_client(url: str, *, socket_timeout: float, connect_timeout: float) -> redis.Redis:
    """A client that fails fast: explicit timeouts, and no retry of its own but one, at
    once, on a new connection when a connection breaks (``ConnectionError``, not a
    timeout): a connection Redis closed while it sat idle (Redis's ``timeout`` setting,
    or a proxy's) is no outage, and a Redis that is down refuses the second connection at
    once. ``Guard`` decides how long to ride out anything more."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        retry_on_error=[redis.ConnectionError],
        health_check_interval=30,
    )


class Health:
    """Whether this process reaches Redis: outages are logged once, at their start and end.

    ``degraded`` is true while calls fail and for ``grace`` seconds after the last failure.
    """

    def __init__(
        self, url: str, grace: float, on_read_only: Callable[[], None] = lambda: None
    ) -> None:
        self.url = safe_url(url)
        self.grace = grace
        self.on_read_only = on_read_only  # drops the idle connections of the pools
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_failure = float("-inf")
        self._refusals = 0  # since the last warning of them
        self._refusals_told = float("-inf")

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        # Redis answered: it refused this call, or a new connection (at its maxclients,
        # while this process's other connections work)
        if isinstance(exc, (redis.ResponseError, MaxClientsReachedError)):
            if isinstance(exc, redis.ReadOnlyError):  # a replica now: reconnect
                self.on_read_only()
            self._refused(exc, now)
            return
        with self._lock:
            self._last_failure = now
            if self._down_since is not None:
                return
            self._down_since = now
        log.warning("flowloom: Redis at %s unavailable: %s; retrying", self.url, _cause(exc))

    def _refused(self, exc: redis.RedisError, now: float) -> None:
        with self._lock:
            self._last_failure = now
            self._refusals += 1
            if now < self._refusals_told + REFUSALS_TOLD_EVERY:
                return
            first = self._refusals_told == float("-inf")
            count, self._refusals, self._refusals_told = self._refusals, 0, now
        if first:
            log.warning(
                "flowloom: Redis at %s refused a call: %s (further refusals are told once "
                "a minute)",
                self.url,
                _cause(exc),
            )
        else:
            log.warning(
                "flowloom: Redis at %s refused %d call(s) in the last minute, the latest: %s",
                self.url,
                count,
                _cause(exc),
            )

    def succeeded(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info(
                "flowloom: Redis at %s reconnected after %.1fs", self.url, time.monotonic() - since
            )

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def down_since(self) -> float | None:
        """When the outage under way began (``time.monotonic()``), if one is."""
        return self._down_since

    @property
    def degraded(self) -> bool:
        return self.down or time.monotonic() - self._last_failure < self.grace


class Guard:
    """Run calls to Redis under the error policy described above."""

    def __init__(
        self,
        health: Health,
        retry_for: float,
        on_nogroup: Callable[[], None] = lambda: None,
    ) -> None:
        self.health = health
        self.retry_for = retry_for
        self.on_nogroup = on_nogroup

    def __call__(self, call: Callable[[], T], *, contacts: bool = True) -> T:
        """``call()``; ``contacts``: whether its success shows that Redis answers (a call
        that may not talk to Redis at all does not end an outage)."""
        give_up: float | None = None
        delay = 0.01
        regroup = False
        while True:
            try:
                if regroup:
                    self.on_nogroup()
                result = call()
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
                self.health.failed(exc)
                now = time.monotonic()
                if give_up is None:
                    # the window runs from the outage's start: during a long one, a call
                    # makes one attempt and gives up, instead of waiting it out again
                    since = self.health.down_since
                    give_up = (now if since is None else min(now, since)) + self.retry_for
                    deadline = current_deadline()
                    give_up = give_up if deadline is None else min(give_up, deadline)
                if now + delay >= give_up:
                    raise self.unavailable(exc) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc) and not regroup:
                    regroup = True  # Redis came back empty: make the group again, once
                    continue
                self.health.failed(exc)
                raise self.unavailable(exc) from exc
            except redis.RedisError as exc:
                self.health.failed(exc)
                raise self.unavailable(exc) from exc
            if contacts:
                self.health.succeeded()
            return result

    def unavailable(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"Redis at {self.health.url} is unavailable: {_cause(exc)}")


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
