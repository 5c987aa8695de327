"""Where everything lives in Redis: the key layout, in one place.

``P`` is the prefix (``flowloom`` by default), ``{id}`` a request id::

    P:tasks              stream    ready tasks; field ``t`` holds the task blob, ``i``
                                   its instance (so that a completion can begin it)
                                   (consumer group ``workers``; a pending entry is a
                                   task some worker has claimed and not acked yet)
    P:delayed            zset      retries waiting for their time: blob -> due (ms)
    P:held               string    how many tasks are held over all paused requests
    P:requests           zset      every live request id -> created (s), for listings
    P:flow:{name}        zset      the same, per flow
    P:expiries           zset      "flow\\0id" of ended requests -> when they expire (ms)
    P:r:{id}             hash      the request: flow, version, body, query, headers,
                                   created, hooks, trace, status, ended, result, error,
                                   retries (comma-separated times), retryable (1 once it
                                   failed or stopped), result_of (the address whose
                                   output the result is: kept once, as the result),
                                   table (1 once its i, v and o hashes are hash tables:
                                   a long request, see ``lua/complete.lua``)
    P:r:{id}:v           hash      vertex states: s|ADDR status, b|ADDR began,
                                   e|ADDR ended, a|ADDR attempts, x|ADDR error (JSON)
    P:r:{id}:i           hash      instance marks: f|INST fired (queued once),
                                   d|INST done (completed once), n|INST inputs needed,
                                   c|INST inputs received, r|ADDR running when the
                                   request was retried (a failure then re-queues it)
    P:r:{id}:s           set       instances with inputs waiting (or, for a large
                                   fan-in, kept until it is done)
    P:r:{id}:s:{inst}    hash      the inputs of one such instance: SLOT -> value
    P:r:{id}:h           list      tasks held while the request is paused
    P:r:{id}:l           list      tasks a failed or stopped request set aside (held,
                                   failed, or claimed after it ended), for a retry
    P:r:{id}:c           hash      the request's context store
    P:r:{id}:e           list      gets the final status when the request ends (wait)
    P:r:{id}:o           hash      each completed vertex instance's output: ADDR -> bytes
                                   (but the last one's; none if the flow sets
                                   ``keep_outputs = False``)
    P:worker:{name}      string    a live worker's description (JSON), with a TTL
    P:workers            zset      worker names -> last heartbeat (s)
    P:ended              channel   "<id> <status>[ <result>]" each time a request ends,
                                   with a result up to 4 KiB (pub/sub, not a key: see
                                   ``ends.py``)

When a request completes its ``i``, ``s`` (with each ``s:{inst}``), ``h`` and ``l`` keys
are deleted and ``r``, ``v``, ``c``, ``e`` and ``o`` get a TTL of ``retention`` seconds
(when it fails or stops, ``i``, ``s`` and ``l`` are kept with that TTL too, for a retry,
which removes the TTLs);
``P:expiries`` lets a sweep drop it from the listings then. Request ids cannot hold ``{``
or ``}``, so no two requests' keys meet.

Every script about one request (``lua/request.lua``) takes ``RequestKeys.script_keys()``
as its first KEYS and names them as the fields below do (``vertices_key``...).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GROUP", "KeyLayout", "RequestKeys"]

GROUP = "workers"  # the consumer group of P:tasks


@dataclass(frozen=True, slots=True)
class RequestKeys:
    """The keys of one request, and the shared ones its scripts write to."""

    request: str  # P:r:{id}
    vertices: str  # P:r:{id}:v
    instances: str  # P:r:{id}:i
    inputs: str  # P:r:{id}:s (and P:r:{id}:s:{inst}, see ``inputs_of``)
    held: str  # P:r:{id}:h
    context: str  # P:r:{id}:c
    ended: str  # P:r:{id}:e
    outputs: str  # P:r:{id}:o
    tasks: str  # P:tasks
    expiries: str  # P:expiries
    delayed: str  # P:delayed

    def inputs_of(self, instance: str) -> str:
        """``P:r:{id}:s:{inst}``: the inputs waiting for ``instance`` (its instance id)."""
        return f"{self.inputs}:{instance}"

    def script_keys(self) -> list[str]:
        """KEYS of a request script, in the order ``lua/request.lua`` names them."""
        return [
            self.request, self.vertices, self.instances, self.inputs, self.held, self.context,
            self.ended, self.outputs, self.tasks, self.expiries, self.delayed,
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Every key under ``prefix``: the shared ones as fields, the others by name."""

    prefix: str
    tasks: str
    delayed: str
    requests: str
    expiries: str
    workers: str
    held: str
    ended: str  # a pub/sub channel

    @classmethod
    def of(cls, prefix: str) -> KeyLayout:
        return cls(
            prefix=prefix,
            tasks=f"{prefix}:tasks",
            delayed=f"{prefix}:delayed",
            requests=f"{prefix}:requests",
            expiries=f"{prefix}:expiries",
            workers=f"{prefix}:workers",
            held=f"{prefix}:held",
            ended=f"{prefix}:ended",
        )

    @property
    def flow_prefix(self) -> str:
        """``P:flow:``; a flow's index is this plus ``{name}``."""
        return f"{self.prefix}:flow:"

    def flow(self, name: str) -> str:
        return f"{self.flow_prefix}{{{name}}}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def record(self, request_id: str) -> str:
        """The request's own hash (``RequestKeys.request``), without its other keys."""
        return f"{self.prefix}:r:{{{request_id}}}"

    def request(self, request_id: str) -> RequestKeys:
        r = self.record(request_id)
        return RequestKeys(
            request=r,
            vertices=r + ":v",
            instances=r + ":i",
            inputs=r + ":s",
            held=r + ":h",
            context=r + ":c",
            ended=r + ":e",
            outputs=r + ":o",
            tasks=self.tasks,
            expiries=self.expiries,
            delayed=self.delayed,
        )
