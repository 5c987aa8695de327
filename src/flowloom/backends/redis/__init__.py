"""The distributed backend: tasks on a Redis Stream, request state in Redis hashes.

Any number of processes on any number of machines share one Redis (a single server or
a primary, not a cluster). Every transition is one Lua script (``lua/``), so it is
atomic, and it is idempotent: a step instance completes once and becomes ready once,
however often its task is delivered.

The package, along its seams:

- ``keys``: the key layout (documented there, once) as a small named structure;
- ``scripts`` and ``lua/``: the Lua transitions, loaded once and called by name;
- ``codec``: how tasks, deliveries and errors are written as Redis values;
- ``store``: the request side (submit, state, wait, control, listings, context);
- ``consumer``: the worker side (claim, keep-alive, take-over, outcomes);
- ``heartbeats``: live workers;
- ``backend``: ``RedisBackend``, which puts them together.

Delivery: a worker reads tasks with XREADGROUP and acks them (XACK + XDEL) in the same
script that applies their outcome; tasks a dead worker held are taken over after the
visibility timeout. Handlers thus run at least once; transitions happen exactly once.

Client mode: a process that only calls ``execute``/``state``/``result``/``pause``/
``resume``/``stop`` needs no worker, but ``execute`` needs the flow registered (the
first tasks of a request come from its plan); the other calls need no registration.
"""

from .backend import RedisBackend

__all__ = ["RedisBackend"]
