"""The Lua scripts (``lua/``), loaded once and called by name.

Each script is ``lua/common.lua``, then ``lua/request.lua`` for the scripts about one
request (which name the request's keys), then the script's own file.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from importlib import resources
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.connection import Connection
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

__all__ = ["REQUEST_SCRIPTS", "SOURCES", "Scripts"]

REQUEST_SCRIPTS = (
    "submit", "begin", "deliver", "complete", "retry", "fail", "control", "context_set",
    "rerun",
)  # fmt: skip
_OTHER_SCRIPTS = ("promote", "keepalive", "handback", "sweep", "reclaim", "forget", "leave")


def _load() -> dict[str, str]:
    lua = resources.files(__package__).joinpath("lua")
    common = lua.joinpath("common.lua").read_text()
    request = lua.joinpath("request.lua").read_text()
    sources = {}
    for name in REQUEST_SCRIPTS + _OTHER_SCRIPTS:
        own = lua.joinpath(f"{name}.lua").read_text()
        sources[name] = common + (request if name in REQUEST_SCRIPTS else "") + own
    return sources


SOURCES = _load()

# one script call: name, keys, args
Call = tuple[str, Sequence[str], Sequence[Any]]
# a command for ``_send_on``: packed already, or as redis-py packs it
Command = bytes | tuple[Any, ...]


class Scripts:
    """The scripts registered on one client; loaded again if Redis lost them."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Script] = {
            name: client.register_script(source) for name, source in SOURCES.items()
        }
        self._pinned = threading.local()  # .held: this thread's own connection (_Pinned)
        self._heads: dict[str, tuple[Sequence[str], bytes]] = {}  # see ``_packed``
        self._loaded = False  # every script loaded by this process since Redis lost them

    def _connection(self) -> Connection:
        """This thread's own connection from the client's pool, kept for its next calls
        (a worker thread sends a pipeline per task, a client a submit and a read per
        request: no pool round per call, which costs as much CPU as the call's own
        packing). Given back to the pool when the thread ends; not used in a process
        forked since it was taken."""
        held: _Pinned | None = getattr(self._pinned, "held", None)
        if held is None or held.pid != os.getpid():
            held = _Pinned(self._client)
            self._pinned.held = held
        return held.connection

    def connect(self) -> None:
        """Open this thread's connection now, if it is not open (``ConnectionError`` if
        Redis takes no new one: at its ``maxclients``, or down)."""
        self._connection().connect()  # type: ignore[no-untyped-call]

    def __call__(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script on this thread's connection (any thread may call it: a
        client's submit, a worker's fetcher), packed as ``_send`` packs: a submit's many
        arguments cost redis-py's generic command path more than its round trip."""
        command = self._packed(name, keys, args)
        result = self._send([command])[0]
        if isinstance(result, NoScriptError):
            self.load()  # every script, not this one only: see ``load``
            result = self._send([command])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def command(self, *command: Any) -> Any:
        """One plain command (``"HMGET", key, ...``) on this thread's connection, packed
        by hiredis: a client's read of each request's end costs redis-py's generic
        command path more than its round trip. Its reply as Redis sent it (bytes)."""
        result = self._send([command])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _packed(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Command:
        """The ``EVALSHA`` of script ``name``. When it has the keys of its last call (a
        chain's hops, and most tasks a thread runs in a row, are of one request), the head
        (the script and its keys) is packed once and kept: hiredis then packs the arguments
        only, 40% less work for a completion's 33 arguments. Keys that changed are packed
        whole, as before (calls about many requests in turn pay nothing more). An argument
        hiredis does not take leaves the whole command to redis-py."""
        sha = self._scripts[name].sha
        head = self._heads.get(name)  # one read: another thread may replace it meanwhile
        if head is None or head[0] != keys:
            self._heads[name] = (keys, b"")  # the head is packed on a second call
            return _pack(("EVALSHA", sha, len(keys), *keys, *args))
        if not head[1]:
            packed = _pack(("EVALSHA", sha, len(keys), *keys))  # str and int: bytes
            assert isinstance(packed, bytes)
            head = (keys, packed[packed.index(b"\n") + 1 :])  # without its "*COUNT" line
            self._heads[name] = head
        body = _pack(tuple(args))
        if not isinstance(body, bytes):
            return ("EVALSHA", sha, len(keys), *keys, *args)
        count = 3 + len(keys) + len(args)
        return b"*%d\r\n%s%s" % (count, head[1], body[body.index(b"\n") + 1 :])

    def load(self) -> None:
        """Load every script at once (one round trip), on this thread's connection: the
        server that said it lacks a script (after a fail-over, another connection of the
        pool may still lead to the old primary).

        A pipeline's calls depend on each other (the parts of a transition's deliveries
        go before its completion), so none may fail for want of its script while a later
        one runs: Redis knows either all of flowloom's scripts or, after a restart or a
        ``SCRIPT FLUSH``, none of them."""
        for result in self._send([("SCRIPT", "LOAD", source) for source in SOURCES.values()]):
            if isinstance(result, Exception):
                raise result
        self._loaded = True

    def pipelined(self, calls: Sequence[Call]) -> list[Any]:
        """Run several scripts in one round trip; their results, in order. Raises the
        first error any of them raised."""
        if not self._loaded:
            self.load()
        for attempt in range(2):
            commands = [self._packed(name, keys, args) for name, keys, args in calls]
            results = self._send(commands)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                self.load()  # Redis restarted (or was flushed) and lost every script
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results
        raise AssertionError("unreachable")

    def _send(self, commands: list[Command]) -> list[Any]:
        """Send ``commands`` on this thread's connection in one write (see ``_send_on``)."""
        return _send_on(self._connection(), commands)


class _Pinned:
    """A connection taken from ``client``'s pool for one thread. When the thread ends,
    its ``threading.local`` slot (and so this) is dropped and the connection goes back to
    the pool: threads that come and go leave no connections behind."""

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        self.pid = os.getpid()
        self.connection: Connection = pool.get_connection()
        weakref.finalize(self, pool.release, self.connection)


def _send_on(connection: Connection, commands: list[Command]) -> list[Any]:
    """Send ``commands`` on ``connection`` in one write; their replies, an error reply as
    its exception. A broken connection is closed and the commands sent once more on a new
    one (as ``make_client``'s clients do: a connection Redis closed while it sat idle is
    no outage; the scripts are safe to run twice); if that fails too, or on a timeout,
    the error is raised (the next call opens a connection again). A connection to a
    server that turned read-only (a primary demoted by a fail-over) is closed too, so
    that the next call connects again, to whichever server the address leads to now."""
    # packed by hiredis (``Scripts._packed``): the arguments are str, bytes and int, which
    # it takes as they are, so redis-py's per-argument checks (twice the packing's own
    # time) are skipped; any other type goes through them
    packed = b"".join([_wire(connection, command) for command in commands])
    for attempt in (1, 2):
        try:
            connection.send_packed_command([packed])  # type: ignore[no-untyped-call]
            results: list[Any] = []
            read_only = False
            for _ in commands:
                try:
                    results.append(connection.read_response())
                except ResponseError as exc:
                    results.append(exc)
                    read_only = read_only or isinstance(exc, ReadOnlyError)
            if read_only:
                connection.disconnect()  # type: ignore[no-untyped-call]
            return results
        except redis.ConnectionError:
            connection.disconnect()  # type: ignore[no-untyped-call]
            if attempt == 2:
                raise
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise
    raise AssertionError("unreachable")


def _pack(command: tuple[Any, ...]) -> Command:
    """``command`` packed by hiredis, or as it is if an argument is not str, bytes, int or
    float (for redis-py to pack: ``_wire``)."""
    try:
        packed: bytes = hiredis.pack_command(command)
        return packed
    except TypeError:
        return command


def _wire(connection: Connection, command: Command) -> bytes:
    if isinstance(command, bytes):
        return command
    return b"".join(connection.pack_commands([command]))  # type: ignore[no-untyped-call]
