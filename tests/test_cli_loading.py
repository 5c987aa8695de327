"""Loading an app for the command line: the import path, errors that name the file and
the flow, a `flows` dict whose flows load one by one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowloom import DefinitionError, FlowService
from flowloom.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_module_in_the_current_directory_loads(tmp_path: Path) -> None:
    (tmp_path / "cwdapp.py").write_text(
        "flows = {'echo': lambda wf, ctx: wf.dag.node('n', lambda d, o: d + b'!')}\n"
    )
    # the console script, not `python -m` (which would put the directory on the path itself)
    script = Path(sys.executable).parent / "flowloom"
    run = subprocess.run(
        [str(script), "run", "cwdapp", "echo", "--data", "hi"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hi!\n"


def test_an_unknown_module_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "no_such_app_here", "f")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: no module or file 'no_such_app_here' (looked in ")
    assert len(result.stderr.splitlines()) == 1


def test_a_broken_flow_of_a_flows_dict_leaves_the_others_usable(tmp_path: Path) -> None:
    path = tmp_path / "several.py"
    path.write_text(
        textwrap.dedent(
            """
            def good(wf, ctx):
                wf.dag.node("n", lambda d, o: b"good " + d)

            def cyclic(wf, ctx):
                wf.dag.node("a", lambda d, o: d).node("b", lambda d, o: d)
                wf.dag.edge("a", "b").edge("b", "a")

            def raises(wf, ctx):
                raise RuntimeError("no config")

            flows = {"good": good, "cyclic": cyclic, "raises": raises}
            """
        )
    )
    listed = invoke("flows", str(path))
    assert listed.exit_code == 0
    assert listed.stdout == "good\n"
    warnings = listed.stderr.splitlines()
    assert len(warnings) == 2
    assert all(w.startswith(f"flowloom: {path}: not loaded: ") for w in warnings)
    assert "'cyclic'" in warnings[0]
    assert "cycle" in warnings[0]
    assert "flow 'raises': define_workflow raised RuntimeError: no config" in warnings[1]
    ran = invoke("run", str(path), "good", "--data", "x")
    assert (ran.exit_code, ran.stdout) == (0, "good x\n")
    bad = invoke("run", str(path), "raises")
    assert bad.exit_code == 2
    assert bad.stderr.splitlines()[-1] == (
        f"Error: {path}: flow 'raises': define_workflow raised RuntimeError: no config"
    )


def test_a_failing_register_in_the_file_names_the_file_line_and_flow(tmp_path: Path) -> None:
    path = tmp_path / "reg.py"
    path.write_text(
        "from flowloom import FlowService\n"
        "fs = FlowService()\n"
        "fs.register('ok', lambda wf, ctx: wf.dag.node('n', lambda d, o: d))\n"
        "fs.register('bad', lambda wf, ctx: wf.dag.node('a', print).edge('a', 'b'))\n"
    )
    result = invoke("flows", str(path))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"Error: {path} at {path}:4: ")
    assert "unknown vertex in workflow 'bad'" in line


def test_define_workflow_returning_a_dag_says_so() -> None:
    from flowloom import Dag

    def define(workflow, context):
        dag = Dag()
        dag.node("n", lambda d, o: d)
        return dag

    with FlowService() as fs, pytest.raises(DefinitionError) as caught:
        fs.register("returns", define)
    assert str(caught.value).startswith(
        "flow 'returns': define_workflow returned a Dag and left workflow.dag empty"
    )
    assert "workflow is empty" not in str(caught.value)


def test_define_workflow_may_return_what_it_built_on_workflow_dag() -> None:
    with FlowService() as fs:  # a lambda returns dag.node(...)'s Dag: the flow is filled
        fs.register("chained", lambda wf, ctx: wf.dag.node("n", lambda d, o: d + b"."))
        assert fs.run("chained", b"x", timeout=10) == b"x."


def test_serve_says_where_it_listens_and_how_to_listen_everywhere(tmp_path: Path) -> None:
    import signal
    import socket
    import time

    def free(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    port = next(p for p in range(7790, 7700, -1) if free(p))
    path = tmp_path / "served.py"
    path.write_text("flows = {'echo': lambda wf, ctx: wf.dag.node('n', lambda d, o: d)}\n")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowloom.cli", "serve", str(path), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "serving on" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    line = next(x for x in log.read_text().splitlines() if "serving on" in x)
    assert line.endswith(
        f"flowloom: serving on http://127.0.0.1:{port} "
        "(this machine only; --host 0.0.0.0 listens on every interface)"
    )


def test_running_system_commands_refuse_an_embedded_app(tmp_path: Path) -> None:
    path = tmp_path / "embedded.py"
    path.write_text("flows = {'echo': lambda wf, ctx: wf.dag.node('n', lambda d, o: d)}\n")
    for args in (["submit", str(path), "echo"], ["requests", "--app", str(path)]):
        result = invoke(*args)
        assert result.exit_code == 2
        assert result.stderr == (
            f"Error: {path}'s backend is embedded (no redis_url): there is no running system "
            "to reach; pass --redis-url, or use `flowloom run`\n"
        )
