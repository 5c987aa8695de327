"""What the Redis user must be allowed to do, checked before a worker or server starts.

A Redis user restricted by ACL rules (``ACL SETUSER``; a managed Redis often has such
users, and some forbid scripts) may lack a command, key or channel flowloom needs.
Nothing then works, yet Redis answers: a worker would start and run nothing, each
refusal told once a minute. ``refused`` asks Redis, in one script, which of the commands
flowloom sends (by itself and inside its scripts) this user may not run on flowloom's
keys and channel (``redis.acl_check_cmd``, Redis 7 and later; an older Redis is not
asked). Nothing is written.
"""

from __future__ import annotations

import re

import redis

from .keys import GROUP, KeyLayout
from .scripts import SOURCES

__all__ = ["commands", "name", "refused", "script_commands"]

# which of the commands in ARGV (each as its count of words, then its words) the user may
# not run: their positions (1-based); false when Redis cannot tell (before Redis 7)
_CHECK = """
if not redis.acl_check_cmd then return false end
local refused, i, n = {}, 1, 0
while i <= #ARGV do
  n = n + 1
  local count = tonumber(ARGV[i])
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(ARGV, i + 1, i + count))
  if not (ok and allowed) then refused[#refused + 1] = n end
  i = i + count + 1
end
return refused
"""


def commands(keys: KeyLayout) -> list[tuple[str, ...]]:
    """Each command flowloom sends, once, with arguments of the shape it sends them
    (keys and channel under ``keys.prefix``, where an ACL's key patterns apply)."""
    r = keys.request("access-check")
    return [
        # sent by the client
        ("PING",),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVALSHA", "0" * 40, "0"),
        ("SUBSCRIBE", keys.ended),
        ("MULTI",),
        ("EXEC",),
        ("BLMOVE", r.ended, r.ended, "RIGHT", "LEFT", "0"),
        ("GET", keys.held),
        ("MGET", keys.worker("access-check")),
        ("SET", keys.worker("access-check"), "v", "PX", "1000"),
        ("SCAN", "0"),
        ("XLEN", keys.tasks),
        ("ZCARD", keys.delayed),
        ("ZREVRANGE", keys.requests, "0", "-1"),
        # sent inside the scripts (and some by the client too)
        ("DECRBY", keys.held, "1"),
        ("DEL", r.held),
        ("EXISTS", r.request),
        ("HDEL", r.vertices, "f"),
        ("HEXISTS", r.instances, "f"),
        ("HGET", r.request, "f"),
        ("HGETALL", r.context),
        ("HINCRBY", r.request, "f", "1"),
        ("HLEN", r.outputs),
        ("HMGET", r.request, "f"),
        ("HSCAN", r.vertices, "0"),
        ("HSET", r.request, "f", "v"),
        ("HSETNX", r.instances, "f", "v"),
        ("INCR", keys.held),
        ("LRANGE", r.held, "0", "-1"),
        ("PERSIST", r.request),
        ("PEXPIRE", r.request, "1000"),
        ("PTTL", r.request),
        ("PUBLISH", keys.ended, "m"),
        ("RPUSH", r.held, "v"),
        ("SADD", r.inputs, "m"),
        ("SMEMBERS", r.inputs),
        ("SREM", r.inputs, "m"),
        ("TIME",),
        ("UNLINK", r.outputs),
        ("XACK", keys.tasks, GROUP, "0-1"),
        ("XADD", keys.tasks, "*", "t", "v"),
        ("XAUTOCLAIM", keys.tasks, GROUP, "c", "0", "0-0"),
        ("XCLAIM", keys.tasks, GROUP, "c", "0", "0-1"),
        ("XDEL", keys.tasks, "0-1"),
        ("XGROUP", "CREATE", keys.tasks, GROUP, "$", "MKSTREAM"),
        ("XGROUP", "DELCONSUMER", keys.tasks, GROUP, "c"),
        ("XINFO", "CONSUMERS", keys.tasks, GROUP),
        ("XPENDING", keys.tasks, GROUP),
        ("XRANGE", keys.tasks, "-", "+"),
        ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", keys.tasks, ">"),
        ("ZADD", keys.requests, "1", "m"),
        ("ZRANGE", keys.expiries, "0", "-1"),
        ("ZRANGEBYSCORE", keys.delayed, "-inf", "+inf"),
        ("ZREM", keys.requests, "m"),
    ]


def script_commands() -> set[str]:
    """The commands named in the scripts' sources (``redis.call('X'``, and the first
    argument of their helpers that call a command given by name), as ``name`` names
    them."""
    called = re.compile(r"(?:redis\.p?call|chunked|each_inputs)\('([A-Za-z]+)'(?:, '([A-Za-z]+)')?")
    return {
        name((command.upper(), sub.upper()))
        for source in SOURCES.values()
        for command, sub in called.findall(source)
    }


def refused(client: redis.Redis, keys: KeyLayout) -> list[str]:
    """The commands (with their subcommand: ``SCRIPT LOAD``) of ``commands(keys)`` that
    Redis refuses this client's user, first those it refuses outright (running the check
    needs ``EVALSHA``, and ``SCRIPT LOAD`` when Redis lacks the script). Empty when all
    are allowed or when Redis cannot tell; connection errors are raised."""
    wanted = commands(keys)
    args: list[str] = []
    for command in wanted:
        args += [str(len(command)), *command]
    try:
        found = client.register_script(_CHECK)(args=args)
    except redis.exceptions.NoPermissionError as exc:
        word = re.search(r"run the '([^']+)' command", str(exc))
        return [word.group(1).upper().replace("|", " ") if word else str(exc)]
    if not isinstance(found, list):
        return []
    return [name(wanted[int(n) - 1]) for n in found]


def name(command: tuple[str, ...]) -> str:
    """``SCRIPT LOAD`` for a command with subcommands, else its name (``HSET``): as an
    ACL rule names it (``+script|load``, ``+hset``)."""
    head = command[0]
    return f"{head} {command[1]}" if head in ("SCRIPT", "XGROUP", "XINFO") else head
