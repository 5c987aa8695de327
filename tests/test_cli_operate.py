"""The commands for a running system against a real Redis and a `flowloom worker`
process: submit, requests, inspect, output, pause, resume, stop, workers — in text and
--json — and their errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from flowloom import FlowService, Status

pytestmark = pytest.mark.redis

APP = """
import os, time
from pathlib import Path
from flowloom import FlowService

fs = FlowService(redis_url=os.environ["APP_REDIS"], redis_prefix=os.environ["APP_PREFIX"])

def hello(wf, ctx):
    wf.dag.node("greet", lambda d, o: b"hi " + d + "".join(o.get("x", [])).encode())

def each(wf, ctx):
    items = wf.dag.foreach_branch(
        "items", lambda d: {k: k.encode() for k in d.decode().split(",")},
        aggregator=lambda r: b",".join(sorted(r.values())),
    )
    items.node("up", lambda d, o: d.upper())

def wait_for_flag(data, options):
    flag = Path(data.decode())
    while not flag.exists():
        time.sleep(0.02)
    return b"flag seen"

def gated(wf, ctx):
    wf.dag.node("wait", wait_for_flag).node("after", lambda d, o: d + b", after")
    wf.dag.edge("wait", "after")

def fail(data, options):
    if not Path(data.decode()).exists():
        raise ValueError("bad " + data.decode())
    return b"fixed"

def boom(wf, ctx):
    wf.dag.node("start", lambda d, o: d).node("fail", fail).edge("start", "fail")

def binary(wf, ctx):
    wf.dag.node("bytes", lambda d, o: bytes(range(256)))

def slow(wf, ctx):
    each = wf.dag.foreach_branch(
        "users", lambda d: {str(i): b"x" for i in range(6)}, aggregator=lambda r: b"%d" % len(r)
    )
    each.node("wait", lambda d, o: time.sleep(0.8) or d)  # two waves: several looks

for name, define in [("hello", hello), ("each", each), ("gated", gated), ("boom", boom),
                     ("binary", binary), ("slow", slow)]:
    fs.register(name, define)
"""
FAIL_LINE = (
    textwrap.dedent(APP).splitlines().index('        raise ValueError("bad " + data.decode())') + 1
)


@pytest.fixture
def app(tmp_path: Path, redis_url: str, redis_prefix: str, monkeypatch: Any) -> str:
    path = tmp_path / "opsapp.py"
    path.write_text(textwrap.dedent(APP))
    monkeypatch.setenv("APP_REDIS", redis_url)
    monkeypatch.setenv("APP_PREFIX", redis_prefix)
    return str(path)


@pytest.fixture
def worker(app: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowloom.cli", "worker", app, "-c", "4"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


@pytest.fixture
def cli(redis_url: str, redis_prefix: str, worker: object) -> Any:
    """``cli(command, *args)``: the command against the test Redis and prefix."""

    def run(command: str, *args: str) -> Result:
        where = ["--redis-url", redis_url, "--redis-prefix", redis_prefix]
        return CliRunner().invoke(main(), [command, *args, *where])

    return run


def main() -> Any:
    from flowloom.cli import main

    return main


def submit(app: str, *args: str) -> Result:
    return CliRunner().invoke(main(), ["submit", app, *args])


def wait_status(client: FlowService, flow: str, rid: str, status: Status) -> None:
    deadline = time.monotonic() + 30
    while client.state(flow, rid).status is not status:
        assert time.monotonic() < deadline, client.state(flow, rid)
        time.sleep(0.02)


@pytest.fixture
def client(redis_url: str, redis_prefix: str) -> Iterator[FlowService]:
    with FlowService(redis_url=redis_url, redis_prefix=redis_prefix) as service:
        yield service


def test_submit_prints_the_id_then_the_result(app: str, cli: Any, client: FlowService) -> None:
    queued = submit(app, "hello", "--data", "bob", "-q", "x=!", "--request-id", "r-1")
    assert (queued.exit_code, queued.stdout) == (0, "r-1\n")
    assert client.result("hello", "r-1", timeout=30) == b"hi bob!"
    waited = submit(app, "hello", "--data", "ann", "--wait")
    assert (waited.exit_code, waited.stdout) == (0, "hi ann\n")


def test_submit_json(app: str, cli: Any, client: FlowService) -> None:
    queued = submit(app, "hello", "-d", "x", "--json")
    assert queued.exit_code == 0
    answer = json.loads(queued.stdout)
    assert answer["flow"] == "hello"
    assert answer["status"] == "queued"
    assert client.result("hello", answer["request_id"], timeout=30) == b"hi x"
    waited = json.loads(submit(app, "each", "-d", "a,b", "--wait", "--json").stdout)
    assert waited["status"] == "completed"
    assert waited["result"] == "A,B"


def test_submit_wait_of_a_failing_request(app: str, cli: Any) -> None:
    failed = submit(app, "boom", "-d", "x", "--wait")
    assert failed.exit_code == 1
    lines = failed.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert f'opsapp.py", line {FAIL_LINE}, in fail' in failed.stderr
    assert lines[-1].endswith("failed at fail: ValueError: bad x")
    as_json = submit(app, "boom", "-d", "y", "--wait", "--json")
    assert as_json.exit_code == 1
    state = json.loads(as_json.stdout)
    assert state["status"] == "failed"
    assert state["error"]["type"] == "ValueError"
    assert "raise ValueError" in state["error"]["traceback"]


def test_submit_refuses_an_unknown_flow_and_a_bad_request(app: str, cli: Any) -> None:
    unknown = submit(app, "nope")
    assert unknown.exit_code == 2
    assert "no flow 'nope'" in unknown.stderr
    bad = submit(app, "hello", "--request-id", "has space")
    assert bad.exit_code == 1
    assert bad.stderr.startswith("Error: request id must be")
    bad_query = submit(app, "hello", "-q", "novalue")
    assert bad_query.exit_code == 2
    assert "expected KEY=VALUE" in bad_query.stderr


def test_requests_table_and_json(app: str, cli: Any, client: FlowService) -> None:
    assert cli("requests").stdout == "no requests\n"
    for rid in ("q-1", "q-2"):
        submit(app, "hello", "-d", rid, "--request-id", rid, "--wait")
    submit(app, "boom", "-d", "z", "--request-id", "q-3", "--wait")
    table = cli("requests")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["REQUEST", "FLOW", "STATUS"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["q-3", "boom", "failed"],
        ["q-2", "hello", "completed"],
        ["q-1", "hello", "completed"],
    ]
    assert "fail: ValueError" in lines[1]
    assert "1/1" in lines[2]
    only = json.loads(cli("requests", "hello", "--limit", "1", "--json").stdout)["requests"]
    assert [(r["request_id"], r["vertices_done"], r["vertices_total"]) for r in only] == [
        ("q-2", 1, 1)
    ]
    failed = json.loads(cli("requests", "--status", "failed", "--json").stdout)["requests"]
    assert [r["request_id"] for r in failed] == ["q-3"]
    assert failed[0]["error"]["message"] == "bad z"
    assert cli("requests", "--status", "done").exit_code == 2


def test_inspect_shows_vertices_error_and_traceback(app: str, cli: Any) -> None:
    submit(app, "boom", "-d", "v", "--request-id", "i-1", "--wait")
    shown = cli("inspect", "boom", "i-1")
    assert shown.exit_code == 0
    text = shown.stdout
    assert text.startswith("request i-1  flow boom  failed\n")
    rows = {
        line.split()[0]: line.split()
        for line in text.splitlines()
        if line[:5] in ("start", "fail ")
    }
    assert rows["start"][1:3] == ["completed", "1"]
    assert rows["fail"][1:3] == ["failed", "1"]
    assert "error at fail: ValueError: bad v" in text
    assert "Traceback (most recent call last):" in text
    assert 'raise ValueError("bad " + data.decode())' in text
    state = json.loads(cli("inspect", "boom", "i-1", "--json").stdout)
    assert state["status"] == "failed"
    assert state["vertices"]["fail"]["attempts"] == 1
    assert state["vertices"]["start"]["ended"] >= state["vertices"]["start"]["started"]


def test_inspect_lists_foreach_instances(app: str, cli: Any) -> None:
    submit(app, "each", "-d", "a,b/c", "--request-id", "e-1", "--wait")
    text = cli("inspect", "each", "e-1").stdout
    for address in ("items", "items[a]/up", "items[b%2Fc]/up"):
        assert any(line.split()[:2] == [address, "completed"] for line in text.splitlines())


def test_output_text_binary_and_json(app: str, cli: Any) -> None:
    submit(app, "each", "-d", "a,b", "--request-id", "o-1", "--wait")
    assert cli("output", "each", "o-1", "items[a]/up").stdout_bytes == b"A"
    assert cli("output", "each", "o-1", "items").stdout_bytes == b"A,B"
    assert json.loads(cli("output", "each", "o-1", "items[b]/up", "--json").stdout) == {
        "request_id": "o-1",
        "vertex": "items[b]/up",
        "output": "B",
    }
    submit(app, "binary", "--request-id", "o-2", "--wait")
    assert cli("output", "binary", "o-2", "bytes").stdout_bytes == bytes(range(256))
    raw = json.loads(cli("output", "binary", "o-2", "bytes", "--json").stdout)
    assert raw["output_base64"].startswith("AAECAwQF")
    missing = cli("output", "each", "o-1", "items[zz]/up")
    assert missing.exit_code == 1
    assert missing.stderr == "Error: request 'o-1' has no output for vertex 'items[zz]/up'\n"


def test_pause_resume_stop(app: str, cli: Any, client: FlowService, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    submit(app, "gated", "-d", str(flag), "--request-id", "p-1")
    wait_status(client, "gated", "p-1", Status.RUNNING)
    paused = cli("pause", "gated", "p-1")
    assert (paused.exit_code, paused.stdout) == (0, "p-1: paused\n")
    flag.touch()
    deadline = time.monotonic() + 30
    while client.state("gated", "p-1").vertices["wait"].status is not Status.COMPLETED:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # "after" would have run by now were the request not held
    assert "after" not in client.state("gated", "p-1").vertices
    resumed = json.loads(cli("resume", "gated", "p-1", "--json").stdout)
    assert resumed == {"request_id": "p-1", "flow": "gated", "status": "running"}
    assert client.result("gated", "p-1", timeout=30) == b"flag seen, after"

    submit(app, "gated", "-d", str(tmp_path / "never"), "--request-id", "p-2")
    wait_status(client, "gated", "p-2", Status.RUNNING)
    paused = json.loads(cli("pause", "gated", "p-2", "--json").stdout)
    assert paused == {"request_id": "p-2", "flow": "gated", "status": "paused"}
    assert cli("resume", "gated", "p-2").stdout == "p-2: running\n"
    stopped = json.loads(cli("stop", "gated", "p-2", "--json").stdout)
    assert stopped["status"] == "stopped"
    again = cli("stop", "gated", "p-2")
    assert again.exit_code == 1
    assert again.stderr.startswith("Error: ")
    assert len(again.stderr.splitlines()) == 1
    submit(app, "gated", "-d", str(tmp_path / "never"), "--request-id", "p-3")
    wait_status(client, "gated", "p-3", Status.RUNNING)
    assert cli("stop", "gated", "p-3").stdout == "p-3: stopped\n"
    assert client.state("gated", "p-3").status is Status.STOPPED
    (tmp_path / "never").touch()  # let the worker's threads go


def test_workers_table_and_json(app: str, cli: Any, client: FlowService) -> None:
    deadline = time.monotonic() + 30
    while not client.workers():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listed = cli("workers")
    assert listed.exit_code == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == [
        "WORKER",
        "HOST",
        "PID",
        "CONCURRENCY",
        "FLOWS",
        "LAST",
        "SEEN",
        "STATE",
    ]
    found = json.loads(cli("workers", "--json").stdout)["workers"]
    assert len(found) == 1
    assert found[0]["concurrency"] == 4
    assert sorted(found[0]["flows"]) == ["binary", "boom", "each", "gated", "hello", "slow"]
    assert row.split()[0] == found[0]["name"]
    assert str(found[0]["pid"]) in row.split()
    assert "hello@" in row
    assert row.split()[-1] == ("degraded" if found[0]["degraded"] else "ok")
    assert found[0]["degraded"] is False


def test_unknown_request_is_status_1(cli: Any) -> None:
    for command in (["inspect", "hello", "nope"], ["pause", "hello", "nope"]):
        result = cli(*command)
        assert result.exit_code == 1
        assert result.stderr == "Error: no request 'nope' of flow 'hello'\n"


def test_the_app_backend_serves_as_well(app: str, worker: object) -> None:
    submit(app, "hello", "-d", "a", "--request-id", "a-1", "--wait")
    result = CliRunner().invoke(main(), ["inspect", "hello", "a-1", "--app", app, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "completed"


def test_no_backend_named_is_a_usage_error(monkeypatch: Any) -> None:
    monkeypatch.delenv("FLOWLOOM_REDIS_URL", raising=False)
    result = CliRunner().invoke(main(), ["requests"])
    assert result.exit_code == 2
    assert result.stderr == "Error: give --redis-url (or FLOWLOOM_REDIS_URL) or --app APP\n"


def test_an_unreachable_redis_is_status_2(tmp_path: Path) -> None:
    from test_cli_worker import closed_port

    url = f"redis://127.0.0.1:{closed_port()}/0"
    out = subprocess.run(
        [sys.executable, "-m", "flowloom.cli", "workers", "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("Error: ")
    assert "127.0.0.1" in out.stderr


# -- the progress line ------------------------------------------------------------------------
SLOW_APP = """
import time
from flowloom import FlowService

fs = FlowService(worker_concurrency=2)

def define(wf, ctx):
    wf.dag.node("first", lambda d, o: d)
    each = wf.dag.foreach_branch(
        "users", lambda d: {str(i): b"x" for i in range(6)}, aggregator=lambda r: b"%d" % len(r)
    )
    each.node("slow", lambda d, o: time.sleep(0.4) or d)
    wf.dag.edge("first", "users")

fs.register("slow", define)
"""


def run_in_terminal(args: list[str], tmp_path: Path) -> str:
    """Run the command with a pseudo-terminal as stdout; everything it wrote there."""
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "200"}  # the line whole, not cut at 80
    proc = subprocess.Popen(
        args, stdout=secondary, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env
    )
    os.close(secondary)
    written = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        written += chunk
    os.close(primary)
    assert proc.wait(60) == 0
    return written.decode(errors="replace")


def test_run_shows_a_progress_line_on_a_terminal_only(tmp_path: Path) -> None:
    path = tmp_path / "slowapp.py"
    path.write_text(textwrap.dedent(SLOW_APP))
    args = [sys.executable, "-m", "flowloom.cli", "run", str(path), "slow"]
    on_terminal = run_in_terminal(args, tmp_path)
    assert "running: " in on_terminal
    assert " vertices done; users: " in on_terminal
    assert "/6 items done" in on_terminal
    assert on_terminal.rstrip().endswith("6")
    piped = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert piped.stdout == "6\n"  # nothing but the result


def test_progress_line_counts_vertices_and_foreach_items() -> None:
    from flowloom.console import progress_line
    from flowloom.types import RequestState, VertexState

    def vertex(address: str, status: Status) -> VertexState:
        return VertexState(address, status)

    done, running = Status.COMPLETED, Status.RUNNING
    vertices = [
        vertex("first", done),
        vertex("users", running),
        vertex("users[a]/check", done),
        vertex("users[a]/mail", done),
        vertex("users[b]/check", done),
        vertex("users[b]/mail", running),
        vertex("users[c]/check", running),
        vertex("users[a]/inner", done),
        vertex("users[a]/inner[x]/n", done),
        vertex("users[a]/inner[y]/n", done),
        vertex("users[c]/inner", running),
        vertex("users[c]/inner[x]/n", running),
    ]
    state = RequestState("r", "f", running, 0.0, vertices={v.address: v for v in vertices})
    line = progress_line(state, frozenset({"users", "users[]/inner"}))
    assert line == (
        "running: 7/12 vertices done; users: 1/3 items done; users[]/inner: 2/3 items done"
    )


def test_workers_table_marks_a_degraded_worker() -> None:
    from rich.console import Console

    from flowloom.console import workers_table

    console = Console(width=300, record=True)
    rows = [
        {"name": "a-1", "flows": ["f"], "versions": {"f": "v1"}, "degraded": True},
        {"name": "b-2", "flows": ["f"], "degraded": False, "last_seen": time.time()},
    ]
    console.print(workers_table(rows))
    lines = console.export_text().splitlines()
    assert lines[1].split()[0] == "a-1"
    assert lines[1].split()[-1] == "degraded"
    assert "f@v1" in lines[1]
    assert lines[2].split()[-1] == "ok"
    assert " f " in lines[2]


def test_submit_wait_shows_a_progress_line_on_a_terminal(
    app: str, worker: object, tmp_path: Path
) -> None:
    args = [sys.executable, "-m", "flowloom.cli", "submit", app, "slow", "--wait"]
    on_terminal = run_in_terminal(args, tmp_path)
    assert " vertices done; users: " in on_terminal
    assert "/6 items done" in on_terminal
    assert on_terminal.rstrip().endswith("6")


def test_retry_goes_on_from_the_failure(
    app: str, cli: Any, client: FlowService, tmp_path: Path
) -> None:
    flag = tmp_path / "fixed"
    failed = submit(app, "boom", "-d", str(flag), "--request-id", "t-1", "--wait")
    assert failed.exit_code == 1
    flag.touch()  # what made it fail is fixed
    retried = cli("retry", "boom", "t-1")
    assert (retried.exit_code, retried.stdout) == (0, "t-1: running\n")
    assert client.result("boom", "t-1", timeout=30) == b"fixed"
    state = client.state("boom", "t-1")
    assert state.vertices["start"].attempts == 1  # completed before: not run again
    again = cli("retry", "boom", "t-1", "--json")
    assert again.exit_code == 1  # completed: nothing to retry
    assert again.stderr.startswith("Error: ")
    submit(app, "boom", "-d", str(tmp_path / "no"), "--request-id", "t-2", "--wait")
    (tmp_path / "no").touch()
    as_json = json.loads(cli("retry", "boom", "t-2", "--json").stdout)
    assert as_json == {"request_id": "t-2", "flow": "boom", "status": "running"}
    assert client.result("boom", "t-2", timeout=30) == b"fixed"
