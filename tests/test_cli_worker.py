"""`flowloom worker` and `flowloom serve` as an operator meets them: start-up checks,
the app's own backend, log lines, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowloom import FlowService, RequestFailed, Status
from flowloom.cli import STARTUP_CHECK, _configured, main
from flowloom.worker import backend_name
from test_redis_faults import eventually
from test_redis_resilience import PrivateRedis

APP = """
import os, time
from flowloom import FlowService
from flowloom.backends.redis import RedisBackend

backend = RedisBackend(os.environ["APP_REDIS"], prefix=os.environ["APP_PREFIX"])
fs = FlowService(backend=backend, token="app-token")  # no redis_url: the app's own backend

def handler(data, options):
    if data == b"boom":
        return {}["missing"]
    if data.startswith(b"sleep"):
        time.sleep(float(data[5:]))
    return b"pid %d" % os.getpid()

fs.register("f", lambda wf, ctx: wf.dag.node("n", handler))
"""
BOOM_LINE = 11  # the line of `return {}["missing"]` in APP


@pytest.fixture
def app(tmp_path: Path, redis_url: str, redis_prefix: str, monkeypatch: Any) -> str:
    path = tmp_path / "wapp.py"
    path.write_text(textwrap.dedent(APP))
    monkeypatch.setenv("APP_REDIS", redis_url)
    monkeypatch.setenv("APP_PREFIX", redis_prefix)
    return str(path)


@pytest.fixture
def client(app: str) -> Iterator[FlowService]:
    """A service on the app's backend (the same Redis and prefix), running no worker."""
    from flowloom.cli import load_service

    with load_service(app) as service:
        yield service


class Worker:
    """`flowloom worker APP ARGS...` as a process; its stderr goes to a file."""

    def __init__(self, app: str, *args: str, tmp: Path) -> None:
        self.log = tmp / f"worker-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flowloom.cli", "worker", app, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text(), re.MULTILINE)
            if found:
                return found
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{self.text()}")

    def stop(self) -> float:
        """SIGTERM; how long the process took to end."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def flowloom(*args: str) -> subprocess.CompletedProcess[str]:
    """``flowloom ARGS...`` run to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "flowloom.cli", *args], capture_output=True, text=True, timeout=60
    )


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (from this suite's private range)."""
    for port in range(7290, 7200, -1):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise AssertionError("no closed port in 7200-7290")


# -- start-up ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["worker"], ["serve", "--no-worker"]])
def test_an_unreachable_backend_is_one_line_and_status_2(tmp_path: Path, command: list[str]):
    path = tmp_path / "app.py"
    path.write_text(
        "from flowloom import FlowService\n"
        "fs = FlowService()\nfs.register('f', lambda wf, ctx: wf.dag.node('n', print))\n"
    )
    url = f"redis://127.0.0.1:{closed_port()}/0"
    started = time.monotonic()
    out = flowloom(*command, str(path), "--redis-url", url)
    took = time.monotonic() - started
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr  # that it waits, then that it gave up
    assert lines[0].startswith(f"flowloom: the backend at {url} does not answer yet (")
    assert lines[0].endswith(f"); trying again for up to {STARTUP_CHECK:g}s")
    assert lines[1].startswith("Error: ")
    assert url.rsplit("/", 1)[0] in lines[1]
    assert "Connection refused" in lines[1]
    # tried for the whole check (Redis may be starting beside it), not beyond it
    assert STARTUP_CHECK - 1 <= took < STARTUP_CHECK + 5


@pytest.mark.redis
def test_a_worker_started_before_redis_waits_for_it(tmp_path: Path) -> None:
    """Containers started together: Redis answers two seconds after the worker starts;
    the worker waits for it (before: it exited at once with status 2) and runs requests."""
    server = PrivateRedis(tmp_path, aof=False)
    path = tmp_path / "app.py"
    path.write_text(
        "from flowloom import FlowService\n"
        f"fs = FlowService(redis_url={server.url!r})\n"
        "fs.register('f', lambda wf, ctx: wf.dag.node('n', lambda d, o: d + b'!'))\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "flowloom.cli", "worker", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(2)
        assert worker.poll() is None, worker.communicate()[0]
        server.start()
        with FlowService(redis_url=server.url) as client:
            eventually(client.workers, 20, "the worker is listed")
            assert client.run("f", b"up", timeout=30) == b"up!"
    finally:
        worker.terminate()
        out = worker.communicate(timeout=30)[0]
        server.close()
    assert worker.returncode == 0, out
    assert out.count("does not answer yet") == 1, out
    assert not any(line.startswith("Error: ") for line in out.splitlines()), out


def test_worker_refuses_an_app_without_redis_url(tmp_path: Path):
    path = tmp_path / "app.py"
    path.write_text(
        "from flowloom import FlowService\n"
        "fs = FlowService()\nfs.register('f', lambda wf, ctx: wf.dag.node('n', print))\n"
    )
    for args in ([], ["--processes", "2"], ["-c", "3"]):
        result = CliRunner().invoke(main, ["worker", str(path), *args])
        assert result.exit_code == 2
        assert "has no redis_url" in result.stderr
        assert "would serve nobody" in result.stderr
        assert "Traceback" not in result.output


def test_the_command_line_keeps_the_apps_backend_and_settings(tmp_path: Path):
    path = tmp_path / "keep.py"
    path.write_text(
        "from flowloom import FlowService\nfrom flowloom.backends import MemoryBackend\n"
        "BACKEND = MemoryBackend(retention=5)\n"
        "fs = FlowService(backend=BACKEND, token='secret', otlp_endpoint='http://127.0.0.1:4318')\n"
        "fs.register('f', lambda wf, ctx: wf.dag.node('n', print))\n"
    )
    service = _configured(str(path), None, 3, 9000, "::1")
    module = sys.modules["flowloom_app_keep"]
    assert service.backend is module.BACKEND
    assert (service.worker_concurrency, service.port, service.host) == (3, 9000, "::1")
    assert (service.token, service.otlp_endpoint) == ("secret", "http://127.0.0.1:4318")
    service.close()


@pytest.mark.redis
def test_redis_url_on_the_command_line_replaces_only_the_backend(tmp_path: Path, redis_url: str):
    path = tmp_path / "swap.py"
    path.write_text(
        "from flowloom import FlowService\n"
        "fs = FlowService(token='secret', worker_concurrency=7)\n"
        "fs.register('f', lambda wf, ctx: wf.dag.node('n', print))\n"
    )
    service = _configured(str(path), redis_url, None, None, None)
    try:
        assert not service.embedded
        assert getattr(service.backend, "url", None) == redis_url
        assert (service.token, service.worker_concurrency, service.flows()) == ("secret", 7, ["f"])
    finally:
        service.close()


def test_backend_names_in_log_lines_hide_passwords():
    class Named:
        def __init__(self, url: str) -> None:
            self.url = url

    def name(url: str) -> str:
        return backend_name(Named(url))  # type: ignore[arg-type]

    assert name("redis://user:s3cret@db.local:6380/2") == "redis://user:***@db.local:6380/2"
    assert name("redis://:s3cret@db.local/0") == "redis://:***@db.local/0"
    assert name("rediss://db.local:6380/0") == "rediss://db.local:6380/0"
    assert "s3cret" not in name("redis://u:s3cret@[::1]:6379/0")


# -- a running worker -------------------------------------------------------------------------
@pytest.mark.redis
def test_worker_uses_the_apps_backend_and_logs_what_it_does(
    app: str, client: FlowService, tmp_path: Path
):
    worker = Worker(app, "-c", "2", "--log-level", "debug", tmp=tmp_path)
    try:
        started = worker.wait_for(
            r"worker (\S+) starting: backend (\S+), concurrency 2, flows (.*)$"
        )
        name, url, flows = started.groups()
        assert url == os.environ["APP_REDIS"]
        assert flows == f"f@{client.registry.latest('f').version}"
        # the request reaches the worker through the app's RedisBackend (not a new embedded one)
        assert client.run("f", b"x", timeout=30) == b"pid %d" % worker.proc.pid
        rid = client.execute("f", b"boom")
        with pytest.raises(RequestFailed):
            client.result("f", rid, timeout=30)
        worker.wait_for(
            rf"ERROR flowloom.worker: request {rid} \(flow f\): n failed: KeyError: 'missing'; "
            "the request fails$"
        )
        worker.wait_for(rf"DEBUG flowloom.worker: request {rid}: traceback of n:$")
        worker.wait_for(rf'^  File "{re.escape(app)}", line {BOOM_LINE}, in handler$')
        assert worker.stop() < 10
        assert worker.proc.returncode == 0
        assert re.search(rf"INFO flowloom.worker: worker {name} stopped$", worker.text(), re.M)
    finally:
        worker.kill()


@pytest.mark.redis
def test_sigterm_grace_is_one_deadline_for_every_running_task(
    app: str, client: FlowService, tmp_path: Path
):
    """Five tasks that outlast the grace: the worker ends after 10 s, not 5 x 10 s."""
    worker = Worker(app, "-c", "5", tmp=tmp_path)
    try:
        worker.wait_for(r"starting: backend")
        ids = [client.execute("f", b"sleep60") for _ in range(5)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [client.state("f", rid).vertices.get("n") for rid in ids]
            if all(v is not None and v.status is Status.RUNNING for v in states):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the five tasks did not all start:\n{worker.text()}")
        took = worker.stop()
        assert 9 < took < 10 + 8, worker.text()  # one 10 s deadline; two would be 20 s
        assert "stopped with 5 task(s) still running after 10s" in worker.text()
        assert "traceback of" not in worker.text()  # DEBUG lines are off by default
    finally:
        worker.kill()


@pytest.mark.redis
def test_log_level_warning_keeps_only_warnings_and_errors(
    app: str, client: FlowService, tmp_path: Path
):
    worker = Worker(app, "--log-level", "warning", tmp=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not client.workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.workers(), worker.text()
        rid = client.execute("f", b"boom")
        with pytest.raises(RequestFailed):
            client.result("f", rid, timeout=30)
        worker.wait_for(rf"ERROR flowloom.worker: request {rid} \(flow f\): n failed")
        assert worker.stop() < 10
    finally:
        worker.kill()
    text = worker.text()
    assert "INFO" not in text
    assert "starting:" not in text
    assert "traceback of" not in text


@pytest.mark.parametrize(
    ("command", "taken"),
    [(["worker"], 0), (["worker", "--processes", "2"], 1), (["serve", "--port", "0"], 0)],
    ids=["worker", "second-process", "serve"],
)
def test_a_metrics_port_in_use_is_one_line_and_status_2(
    app: str, command: list[str], taken: int
) -> None:
    """The metrics port (or, with --processes K, the port of one of the K processes) is
    taken: the command says which, in one line, and starts nothing."""
    holder = _listening(free_below=taken)
    try:
        port = holder.getsockname()[1] - taken
        out = flowloom(*command, app, "--metrics-port", str(port))
    finally:
        holder.close()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert error == [
        f"Error: cannot serve metrics on 127.0.0.1:{port + taken}: Address already in use"
    ], out.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])  # the latter: no one's (TEST-NET-1)
def test_an_address_the_server_cannot_listen_on_is_one_line_and_status_2(
    app: str, host: str
) -> None:
    """A port that is taken, or a host that is not this machine's: said in one line
    before anything starts (no worker started and stopped, no server log)."""
    holder = _listening(free_below=0)
    try:
        port = holder.getsockname()[1]
        out = flowloom("serve", app, "--host", host, "--port", str(port))
    finally:
        holder.close()
    assert out.returncode == 2, out.stderr
    why = "Address already in use" if host == "127.0.0.1" else "Cannot assign requested address"
    assert out.stderr.strip().splitlines()[-1] == f"Error: cannot listen on {host}:{port}: {why}"
    assert "worker" not in out.stderr, out.stderr  # nothing started
    assert "Traceback" not in out.stderr, out.stderr


def _listening(free_below: int) -> socket.socket:
    """A socket listening on a port of 127.0.0.1 whose ``free_below`` ports below are free."""
    while True:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        below = [socket.socket() for _ in range(free_below)]
        try:
            for n, probe in enumerate(below, 1):
                probe.bind(("127.0.0.1", port - n))
            return sock
        except OSError:
            sock.close()
        finally:
            for probe in below:
                probe.close()


CRASHING = """
import logging, os, sys, time
from flowloom import FlowService
from flowloom.processes import run_worker_processes

class Crashing(FlowService):
    def start_worker(self):  # a child that fails at once, every time
        with open(sys.argv[2], "a") as starts:
            starts.write(f"{time.monotonic()}\\n")
        os._exit(3)

logging.basicConfig(level=logging.INFO)
run_worker_processes(Crashing(redis_url=sys.argv[1]), 2)
"""


def test_worker_processes_that_keep_failing_are_started_again_less_and_less_often(
    tmp_path: Path, redis_url: str
) -> None:
    """A crash loop: children that end at once are started again after 1 s, then 2,
    then 4 (not every second for ever), and a SIGTERM ends the supervisor at once even
    while a restart is due."""
    starts = tmp_path / "starts"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING, redis_url, str(starts)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(5.0)  # starts at 0, 1, 3 (then 7) for each of the two slots
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
        assert time.monotonic() - stopped < 2, output  # not after the 4 s wait
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    waits = [float(w) for w in re.findall(r"starting another in ([0-9.]+)s", output)]
    assert sorted(waits) == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0], output
    assert len(starts.read_text().split()) == 6  # 3 a slot, not 5 or more
