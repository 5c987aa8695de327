"""A Redis user restricted by ACL rules: a worker or server whose user lacks a command,
key or channel flowloom needs refuses to start, naming what is missing (before, it
started and ran nothing, a refusal logged once a minute); a user allowed exactly what
the check asks for runs flows of every kind, and every operation on them.

A Redis server of the test's own (ports 7100-7199), with ACL users of its own."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from flowloom import BackendRefused, Context, FlowService, RequestFailed, Status
from flowloom.backends.redis import RedisBackend
from flowloom.backends.redis.access import commands, name, refused, script_commands
from flowloom.backends.redis.keys import KeyLayout
from test_cli_worker import flowloom
from test_redis_faults import eventually
from test_redis_resilience import PrivateRedis, free_port

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

PREFIX = "acl"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    made = PrivateRedis(tmp_path, aof=False)
    made.start()
    yield made
    made.close()


def user(server: PrivateRedis, name: str, *rules: str) -> str:
    """A user of ``server`` with password ``pw`` and ``rules``; its URL."""
    admin = redis.Redis(port=server.port)
    try:
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    finally:
        admin.close()
    return f"redis://{name}:pw@127.0.0.1:{server.port}/0"


def exactly_what_is_checked() -> list[str]:
    """ACL rules allowing the commands ``commands`` lists and nothing else, on the keys
    and channel under ``PREFIX``."""
    rules = ["-@all", f"~{PREFIX}:*", f"&{PREFIX}:*"]
    for command in commands(KeyLayout.of(PREFIX)):
        rules.append("+" + name(command).lower().replace(" ", "|"))
    return rules


def test_every_command_the_scripts_send_is_checked() -> None:
    checked = {name(command) for command in commands(KeyLayout.of(PREFIX))}
    sent = script_commands()
    # the parse finds them: called directly, through a helper, with a subcommand
    assert {"HSET", "XADD", "PERSIST", "XGROUP DELCONSUMER", "XINFO CONSUMERS"} <= sent
    assert sent <= checked, f"not checked: {sorted(sent - checked)}"


def flows(fs: FlowService) -> None:
    def diamond(workflow: Any, context: Context) -> None:
        dag = workflow.dag
        dag.node("a", lambda data, options: data + b"a")
        dag.node("b", lambda data, options: data + b"b")
        dag.node("c", lambda data, options: data + b"c")
        dag.node(
            "d",
            lambda data, options: data + b"d",
            aggregator=lambda o: b"|".join(sorted(o.values())),
        )
        dag.edge("a", "b")
        dag.edge("a", "c")
        dag.edge("b", "d")
        dag.edge("c", "d")

    def each(workflow: Any, context: Context) -> None:
        split = workflow.dag.foreach_branch(
            "each",
            lambda data: {f"k{n}": b"%d" % n for n in range(int(data))},
            lambda outputs: b"%d" % sum(int(v) for v in outputs.values()),
        )
        split.node("double", lambda data, options: b"%d" % (2 * int(data)))

    def slow(workflow: Any, context: Context) -> None:
        def step(data: bytes, options: Any) -> bytes:
            context.set("seen", data)
            time.sleep(0.3)
            return data

        workflow.dag.node("s1", step)
        workflow.dag.node("s2", step)
        workflow.dag.edge("s1", "s2")

    calls = {"n": 0}

    def flaky(workflow: Any, context: Context) -> None:
        def once(data: bytes, options: Any) -> bytes:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("first time")
            return b"ok"

        workflow.dag.node("f", once)

    fs.register("diamond", diamond)
    fs.register("each", each)
    fs.register("slow", slow)
    fs.register("flaky", flaky)


def test_a_user_allowed_exactly_what_is_checked_runs_every_kind_of_flow(
    server: PrivateRedis,
) -> None:
    """The check's list is complete: with every other command refused, requests of each
    construct run, and pause, resume, stop, retry, listings, context, workers and queue
    depth work (each a refusal if the list lacked one of their commands)."""
    url = user(server, "worker", *exactly_what_is_checked())
    backend = RedisBackend(url, prefix=PREFIX, retry_for=1.0)
    backend.ping()  # checked: nothing refused
    with FlowService(worker_concurrency=2, backend=backend) as fs:
        flows(fs)
        fs._ensure_worker()
        assert fs.run("diamond", b"x", timeout=30) == b"xab|xac" + b"d"
        assert fs.run("each", b"50", timeout=30) == b"%d" % sum(2 * n for n in range(50))

        held = fs.execute("slow", b"p")
        time.sleep(0.1)
        assert fs.pause("slow", held) == Status.PAUSED
        assert fs.resume("slow", held) in (Status.RUNNING, Status.QUEUED)
        assert fs.result("slow", held, timeout=30) == b"p"
        assert fs.state("slow", held).status == Status.COMPLETED

        stopped = fs.execute("slow", b"q")
        time.sleep(0.1)
        assert fs.stop("slow", stopped) == Status.STOPPED

        failed = fs.execute("flaky", b"")
        with pytest.raises(RequestFailed):
            fs.result("flaky", failed, timeout=30)
        fs.retry("flaky", failed)
        assert fs.result("flaky", failed, timeout=30) == b"ok"

        listed = {r.request_id for r in fs.requests()}
        assert {held, stopped, failed} <= listed
        assert [w["name"] for w in fs.workers()]
        assert set(backend.depth()) == {"ready", "delayed", "held"}
        assert backend.context_get(held, "seen") == b"b" + b"p"  # tagged: bytes
        backend.sweep()


def test_a_server_whose_user_has_exactly_what_is_checked_answers_over_http(
    server: PrivateRedis, tmp_path: Path
) -> None:
    """``flowloom serve`` (its event loop's own connection, subscription and submits,
    and its worker) with the same user: sync and async executes, state, listings."""
    url = user(server, "web", *exactly_what_is_checked())
    backend = f"backend=RedisBackend({url!r}, prefix={PREFIX!r})"
    with served(tmp_path, backend) as http:
        request_id = runs_myflow(http, 1)
        listed = http.get("/flow/myflow/requests").json()
        assert request_id in {r["request_id"] for r in listed["requests"]}


@contextlib.contextmanager
def served(tmp_path: Path, service_options: str) -> Iterator[httpx.Client]:
    """``flowloom serve`` of an app whose ``FlowService(SERVICE_OPTIONS)`` serves
    ``myflow`` (``b"<BODY>"``), on a free port of 127.0.0.1, once it answers; a client
    of it. Its output is checked at the end: no traceback, no refusal by Redis."""
    app = tmp_path / "app.py"
    app.write_text(
        "from flowloom import FlowService\n"
        "from flowloom.backends.redis import RedisBackend\n"
        f"fs = FlowService({service_options})\n"
        "fs.register('myflow', lambda wf, ctx: wf.dag.node('n', lambda d, o: b'<' + d + b'>'))\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowloom.cli", "serve", f"{app}:fs", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _healthy(f"{base}/health"), 30, "the server answers")
        with httpx.Client(base_url=base, timeout=30) as http:
            yield http
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "Traceback" not in out, out
    assert "refused" not in out, out


def runs_myflow(http: httpx.Client, count: int) -> str:
    """``count`` sync executes of ``myflow`` answered with their result, then an async one
    that completes; its request id."""
    for n in range(count):
        answer = http.post("/flow/myflow", content=b"%d" % n)
        assert (answer.status_code, answer.content) == (200, b"<%d>" % n)
    queued = http.post("/flow/myflow", content=b"later", headers={"X-Async": "true"})
    assert queued.status_code == 202
    request_id: str = queued.json()["request_id"]
    eventually(
        lambda: http.get(f"/flow/myflow/requests/{request_id}").json()["status"] == "completed",
        10,
        "the async request completes",
    )
    return request_id


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        (["-evalsha"], "EVALSHA"),  # refused before the check can run
        (["-xadd"], "XADD"),  # sent inside the scripts only
        (["-xgroup|create", "-blmove"], "BLMOVE, XGROUP CREATE"),
        (["-@pubsub"], "SUBSCRIBE, PUBLISH"),
    ],
)
def test_a_user_lacking_a_command_is_refused_at_the_check_naming_it(
    server: PrivateRedis, rules: list[str], named: str
) -> None:
    url = user(server, "lacking", f"~{PREFIX}:*", f"&{PREFIX}:*", "+@all", *rules)
    backend = RedisBackend(url, prefix=PREFIX, retry_for=0.5)
    try:
        with pytest.raises(BackendRefused) as caught:
            backend.ping()
    finally:
        backend.close()
    assert f"refuses its user 'lacking' commands flowloom needs: {named} " in str(caught.value)
    assert ":pw@" not in str(caught.value)


def test_keys_or_channel_outside_the_users_patterns_are_refused(server: PrivateRedis) -> None:
    """Each command on a key or the channel under the prefix is refused, in the check's
    order; under a prefix the patterns allow, nothing is."""
    url = user(server, "elsewhere", "~other:*", "&other:*", "+@all")
    client = redis.Redis.from_url(url)
    try:
        on_keys = [name(c) for c in commands(KeyLayout.of(PREFIX)) if _touches(c)]
        assert {"HSET", "XADD", "SUBSCRIBE", "PUBLISH", "XGROUP CREATE"} <= set(on_keys)
        assert refused(client, KeyLayout.of(PREFIX)) == on_keys
        assert refused(client, KeyLayout.of("other")) == []
    finally:
        client.close()


def _touches(command: tuple[str, ...]) -> bool:
    """Whether ``command`` names a key or channel under ``PREFIX``."""
    return any(word.startswith(f"{PREFIX}:") for word in command[1:])


def test_script_load_refused_is_named_when_redis_lacks_the_check(server: PrivateRedis) -> None:
    admin = redis.Redis(port=server.port)
    admin.script_flush()
    admin.close()
    url = user(server, "noload", f"~{PREFIX}:*", f"&{PREFIX}:*", "+@all", "-script|load")
    assert refused(redis.Redis.from_url(url), KeyLayout.of(PREFIX)) == ["SCRIPT LOAD"]


def test_the_check_runs_again_until_it_passes(server: PrivateRedis) -> None:
    """A refused ping is not remembered: once the user is granted what it lacked (no
    restart), the next ping passes."""
    url = user(server, "later", f"~{PREFIX}:*", f"&{PREFIX}:*", "+@all", "-hset")
    backend = RedisBackend(url, prefix=PREFIX, retry_for=0.5)
    try:
        with pytest.raises(BackendRefused, match="HSET"):
            backend.ping()
        user(server, "later", f"~{PREFIX}:*", f"&{PREFIX}:*", "+@all")
        backend.ping()
    finally:
        backend.close()


def test_flowloom_worker_with_a_refused_user_exits_at_once_naming_the_command(
    server: PrivateRedis, tmp_path: Path
) -> None:
    url = user(server, "noscripts", f"~{PREFIX}:*", f"&{PREFIX}:*", "+@all", "-@scripting")
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            f"""
            from flowloom import FlowService
            from flowloom.backends.redis import RedisBackend

            fs = FlowService(backend=RedisBackend({url!r}, prefix={PREFIX!r}))
            fs.register("myflow", lambda wf, ctx: wf.dag.node("n", lambda d, o: d))
            """
        )
    )
    for command in ("worker", "serve"):
        done = flowloom(command, f"{app}:fs", *(["--port", "0"] if command == "serve" else []))
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("Error: Redis at redis://noscripts:***@"), lines
        assert "commands flowloom needs: EVALSHA " in lines[-1]
        assert "Traceback" not in done.stderr


def test_the_docs_grant_exactly_what_is_checked() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "redis.md").read_text()
    grant = doc[doc.index("ACL SETUSER flowloom") :]
    grant = grant[: grant.index("```")]
    listed = {word[1:] for word in grant.split() if word.startswith("+")}
    checked = {name(c).lower().replace(" ", "|") for c in commands(KeyLayout.of("flowloom"))}
    assert listed == checked
