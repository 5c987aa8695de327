"""Live workers: each announces itself every ``heartbeat`` seconds, with a TTL of three.

An entry says ``degraded: true`` while its process cannot reach Redis reliably (a call
failed within the last three heartbeats); during an outage longer than that the entry
runs out and the worker is not listed until Redis answers again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import cast

import redis

from . import codec
from .connection import Health
from .keys import KeyLayout

__all__ = ["Heartbeats"]

log = logging.getLogger("flowloom.redis")

Describe = Callable[[], Mapping[str, object]]


class Heartbeats:
    """The workers of this process, announced until unregistered; and the listing."""

    def __init__(
        self, client: redis.Redis, keys: KeyLayout, interval: float, health: Health
    ) -> None:
        self._redis = client
        self.keys = keys
        self.interval = interval
        self._health = health
        self._lock = threading.Lock()
        self._workers: dict[str, Describe] = {}

    def register(self, name: str, describe: Describe) -> None:
        with self._lock:
            self._workers[name] = describe
        self.beat(name, describe)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._workers.pop(name, None)
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(self.keys.worker(name))
        pipe.zrem(self.keys.workers, name)
        pipe.execute()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def workers(self) -> list[dict[str, object]]:
        """Live workers (whose heartbeat has not run out); drops the others' names."""
        names = codec.names(self._redis.zrange(self.keys.workers, 0, -1))
        if not names:
            return []
        raw = cast(list[bytes | None], self._redis.mget([self.keys.worker(n) for n in names]))
        alive, gone = [], []
        for name, value in zip(names, raw, strict=True):
            if value is None:
                gone.append(name)
            else:
                alive.append(json.loads(value))
        if gone:
            self._redis.zrem(self.keys.workers, *gone)
        return sorted(alive, key=lambda w: str(w.get("name")))

    def beat(self, name: str, describe: Describe) -> None:
        now = time.time()
        info = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), **describe()}
        info["last_seen"] = now
        info["degraded"] = self._health.degraded
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(name), json.dumps(info), px=int(self.interval * 3000))
        pipe.zadd(self.keys.workers, {name: now})
        pipe.execute()

    def run(self, closing: threading.Event) -> None:
        """Beat for every registered worker until ``closing`` is set."""
        while not closing.wait(self.interval):
            with self._lock:
                workers = list(self._workers.items())
            for name, describe in workers:
                try:
                    self.beat(name, describe)
                    self._health.succeeded()
                except redis.RedisError as exc:
                    self._health.failed(exc)
                except Exception:
                    log.exception("flowloom: worker heartbeat failed")
