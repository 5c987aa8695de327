"""The flowloom command, run through click's runner and as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowloom.cli import load_service, main

ROOT = Path(__file__).resolve().parent.parent

APP = """
from flowloom import FlowService, Dag

fs = FlowService()

def define(wf, ctx):
    dag = wf.dag
    dag.node("greet", lambda d, o: b"hi " + d + b" " + ",".join(o.get("lang", [])).encode())
    each = dag.foreach_branch("each", lambda d: {"a": d, "b/c": d}, aggregator=lambda r: b"+".join(sorted(r.values())))
    each.node("upper", lambda d, o: d.upper())
    dag.edge("greet", "each", forwarder=lambda d: d)

def broken(wf, ctx):
    wf.dag.node("x", lambda d, o: 1 / 0)

fs.register("hello", define)
fs.register("broken", broken)
"""


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(APP))
    return str(path)


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_run_prints_result(app):
    result = invoke("run", app, "hello", "--data", "bob", "-q", "lang=en", "-q", "lang=fr")
    assert result.exit_code == 0, result.output
    assert result.stdout == "HI BOB EN,FR+HI BOB EN,FR\n"


def test_run_with_timings_lists_every_vertex(app):
    result = invoke("run", app, "hello", "--data", "x", "--timings")
    assert result.exit_code == 0, result.output
    for address in ["greet", "each", "each[a]/upper", "each[b%2Fc]/upper"]:
        assert f" {address}\n" in result.stderr
    assert "completed" in result.stderr


def test_run_reads_body_from_file(app, tmp_path):
    body = tmp_path / "body.txt"
    body.write_bytes(b"file")
    result = invoke("run", app, "hello", "--data-file", str(body))
    assert result.stdout.startswith("HI FILE")


def test_failed_request_is_reported(app):
    result = invoke("run", app, "broken", "--timings")
    assert result.exit_code == 2
    assert "ZeroDivisionError" in result.stderr
    assert "failed" in result.stderr


def test_failed_request_shows_the_traceback_of_the_user_code(app):
    result = invoke("run", app, "broken")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert f'File "{app}", line 14, in <lambda>' in result.stderr
    assert 'wf.dag.node("x", lambda d, o: 1 / 0)' in result.stderr
    assert lines[-2] == "ZeroDivisionError: division by zero"
    assert lines[-1].startswith("Error: request ")
    assert lines[-1].endswith(" failed at x: ZeroDivisionError: division by zero")
    assert "flowloom" not in result.stderr.replace(app, "")  # no frames of flowloom itself


def test_run_is_local_even_for_an_app_on_redis(tmp_path):
    path = tmp_path / "onredis.py"
    path.write_text(
        "from flowloom import FlowService\n"
        "fs = FlowService(redis_url='redis://127.0.0.1:1/0')\n"  # nothing listens there
        "fs.register('f', lambda wf, ctx: wf.dag.node('n', lambda d, o: d + b'!'))\n"
    )
    started = time.monotonic()
    result = invoke("run", str(path), "f", "--data", "local")
    assert result.exit_code == 0, result.output
    assert result.stdout == "local!\n"
    assert time.monotonic() - started < 5


def test_unknown_flow(app):
    result = invoke("run", app, "nope")
    assert result.exit_code == 2
    assert "no flow 'nope' (flows: broken, hello)" in result.stderr


@pytest.mark.parametrize(
    ("command", "option", "value", "says"),
    [
        (["run", "{app}", "hello"], "--timeout", "nan", "NaN is not a number of seconds"),
        (["run", "{app}", "hello"], "--timeout", "soon", "soon is not a number of seconds"),
        (["run", "{app}", "hello"], "--timeout", "-1", "-1 must be at least 0"),
        (["submit", "{app}", "hello", "--wait"], "--timeout", "nan", "NaN is not a number"),
        (["serve", "{app}"], "--header-timeout", "nan", "NaN is not a number of seconds"),
        (["serve", "{app}"], "--header-timeout", "0", "0 must be more than 0"),
    ],
)
def test_a_bad_number_of_seconds_is_a_usage_error(app, command, option, value, says):
    result = invoke(*(part.format(app=app) for part in command), option, value)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"Invalid value for '{option}': {says}" in result.stderr


@pytest.mark.parametrize("command", [["worker", "{app}"], ["serve", "{app}"], ["requests"]])
@pytest.mark.parametrize("url", ["notaurl", "redis://:s3cret@host:notaport/0"])
def test_a_redis_url_that_is_not_one_is_a_usage_error(app, command, url):
    result = invoke(*(part.format(app=app) for part in command), "--redis-url", url)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Invalid value for '--redis-url': not a Redis URL" in result.stderr
    assert "s3cret" not in result.output


def test_a_timeout_of_inf_waits_for_the_result(app):
    result = invoke("run", app, "hello", "--data", "x", "--timeout", "inf")
    assert result.exit_code == 0, result.output
    assert result.stdout == "HI X +HI X \n"


def test_flows_lists_names(app):
    assert invoke("flows", app).stdout == "broken\nhello\n"


def test_graph_formats(app):
    mermaid = invoke("graph", app, "hello").stdout
    assert mermaid.startswith("flowchart TD\n")
    assert '["each (foreach)"]' in mermaid
    assert '["upper"]' in mermaid
    dot = invoke("graph", app, "hello", "--format", "dot").stdout
    assert dot.startswith('digraph "hello" {')
    assert 'label="each (foreach)"' in dot
    assert "->" in dot
    assert '"kind": "foreach"' in invoke("graph", app, "hello", "--format", "json").stdout


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("def broken(:\n", ["SyntaxError", "app.py:1"]),
        ("import no_such_module_here\n", ["ModuleNotFoundError", "no_such_module_here"]),
        (
            "from flowloom import FlowService\nfs = FlowService()\n"
            "fs.register('f', lambda wf, ctx: wf.dag.node('a', print).edge('a', 'b'))\n",
            ["unknown vertex"],
        ),
        ("x = 1\n", ["defines no FlowService"]),
    ],
)
def test_errors_in_user_file_are_readable(tmp_path, source, words):
    path = tmp_path / "app.py"
    path.write_text(source)
    result = invoke("run", str(path), "f")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr


def test_flows_dict_and_module_attribute(tmp_path, monkeypatch):
    (tmp_path / "flowsmod.py").write_text(
        "flows = {'echo': lambda wf, ctx: wf.dag.node('n', lambda d, o: d)}\n"
        "from flowloom import FlowService\n"
        "a = FlowService()\nb = FlowService()\n"
        "b.register('other', lambda wf, ctx: wf.dag.node('n', lambda d, o: b'B'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "several FlowService" in invoke("flows", "flowsmod").stderr
    assert invoke("run", "flowsmod:b", "other").stdout == "B\n"


def test_missing_file():
    result = invoke("run", "nowhere/app.py", "f")
    assert result.exit_code == 2
    assert "no such file" in result.stderr


def test_console_script_runs_the_readme_example():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowloom.cli",
            "run",
            str(ROOT / "examples/myflow.py"),
            "myflow",
            "--data",
            "hallo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == 'you said "hallo"\n'


def test_worker_processes_from_the_command_line(tmp_path, redis_url, redis_prefix, monkeypatch):
    import os
    import signal

    app = tmp_path / "wapp.py"
    app.write_text(
        "import os\nfrom flowloom import FlowService\n"
        "fs = FlowService(redis_url=os.environ['APP_REDIS'], redis_prefix=os.environ['APP_PREFIX'])\n"
        "fs.register('pid', lambda wf, ctx: wf.dag.foreach_branch('each', lambda d: {str(i): d for i in range(40)},"
        " aggregator=lambda r: ','.join(sorted(set(v.decode() for v in r.values())))).node('n', lambda d, o: str(os.getpid())))\n"
    )
    env = {**os.environ, "APP_REDIS": redis_url, "APP_PREFIX": redis_prefix}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowloom.cli", "worker", str(app), "--processes", "2", "-c", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        monkeypatch.setenv("APP_REDIS", redis_url)
        monkeypatch.setenv("APP_PREFIX", redis_prefix)
        with load_service(str(app)) as client:  # the same definitions as the workers'
            deadline = time.monotonic() + 30
            while len(client.workers()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(client.workers()) == 2
            pids = client.run("pid", b"", timeout=30).decode().split(",")
            assert len(pids) >= 1
            assert all(int(p) != proc.pid for p in pids)  # the items ran in the forked children
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()


@pytest.mark.parametrize(
    ("app_says", "flag", "on"),
    [
        (None, None, True),  # serve/worker keep metrics by default
        (False, None, False),  # the app's explicit choice wins over the default
        (True, None, True),
        (False, True, True),  # an explicit flag wins over the app
        (True, False, False),
        (None, False, False),
    ],
)
def test_the_monitoring_flag_defers_to_the_app_unless_given(app_says, flag, on):
    from flowloom import FlowService
    from flowloom.cli import _monitor

    with FlowService(enable_monitoring=app_says) as fs:
        _monitor(fs, flag, None)
        assert fs.enable_monitoring is on


def test_an_app_that_turns_monitoring_off_keeps_it_off_under_the_cli(tmp_path):
    app = tmp_path / "quiet.py"
    app.write_text(
        "from flowloom import FlowService\n"
        "fs = FlowService(enable_monitoring=False)\n"
        "fs.register('echo', lambda wf, ctx: wf.dag.node('echo', lambda d, o: d))\n"
    )
    from flowloom.cli import _configured, _monitor

    service = _configured(str(app), None, None, None, None)
    try:
        _monitor(service, None, None)
        assert service.metrics is None
    finally:
        service.close()
