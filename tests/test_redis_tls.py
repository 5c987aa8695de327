"""Redis over TLS (``rediss://``, as managed Redis services offer it): a worker, a client
and ``flowloom serve`` (whose event loop leaves a TLS connection's submits and
subscription to the ordinary way) run flows; a certificate the client does not trust is
refused at the start-up check, naming the cause.

A TLS redis-server of the test's own (ports 7100-7199) with a certificate made here."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowloom import BackendUnavailable, FlowService
from flowloom.backends.redis import RedisBackend
from test_cli_worker import flowloom
from test_redis_access import runs_myflow, served
from test_redis_faults import eventually
from test_redis_resilience import free_port

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


class TlsRedis:
    """A redis-server listening for TLS only, with a certificate authority of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self._certificates()
        self.port = free_port()
        command = [
            "redis-server", "--port", "0", "--tls-port", str(self.port),
            "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
            "--appendonly", "no", "--tls-auth-clients", "no",
            "--tls-cert-file", str(tmp_path / "server.crt"),
            "--tls-key-file", str(tmp_path / "server.key"),
            "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}"
        eventually(self._answers, 10, "the TLS Redis answers")

    def _certificates(self) -> None:
        """A certificate authority and a server certificate for 127.0.0.1 it signed."""

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                "-out", "ca.crt", "-days", "2", "-subj", "/CN=flowloom test CA")  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
                "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
        (self.dir / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "server.crt", "-days", "2",
                "-extfile", "ext.cnf")  # fmt: skip

    def _answers(self) -> bool:
        backend = RedisBackend(self.url, retry_for=0.1)
        try:
            backend.ping()
            return True
        except BackendUnavailable:
            return False
        finally:
            backend.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    yield server
    server.close()


def diamond(workflow: object, context: object) -> None:
    dag = workflow.dag  # type: ignore[attr-defined]
    dag.node("a", lambda d, o: d + b"a")
    dag.node("b", lambda d, o: d + b"b")
    dag.node("c", lambda d, o: d + b"c")
    dag.node("d", lambda d, o: d, aggregator=lambda outputs: b"|".join(sorted(outputs.values())))
    for source, target in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
        dag.edge(source, target)


def test_a_worker_and_a_client_run_flows_over_tls(tls: TlsRedis) -> None:
    with (
        FlowService(backend=RedisBackend(tls.url), worker_concurrency=2) as worker,
        FlowService(backend=RedisBackend(tls.url)) as client,
    ):
        worker.register("diamond", diamond)
        worker._ensure_worker()
        client.register("diamond", diamond)
        ids = [client.execute("diamond", b"%d" % n) for n in range(20)]
        for n, request_id in enumerate(ids):
            assert client.result("diamond", request_id, timeout=30) == b"%dab|%dac" % (n, n)
        assert [w["name"] for w in client.workers()]


def test_flowloom_serve_answers_over_tls(tls: TlsRedis, tmp_path: Path) -> None:
    with served(tmp_path, f"redis_url={tls.url!r}") as http:
        runs_myflow(http, 10)


def test_a_certificate_not_trusted_is_refused_at_start_naming_the_cause(
    tls: TlsRedis, tmp_path: Path
) -> None:
    untrusted = tls.url.split("?")[0]  # the system's authorities only
    app = tmp_path / "app.py"
    app.write_text(
        "from flowloom import FlowService\n"
        f"fs = FlowService(redis_url={untrusted!r})\n"
        "fs.register('myflow', lambda wf, ctx: wf.dag.node('n', lambda d, o: d))\n"
    )
    done = flowloom("worker", f"{app}:fs")
    assert done.returncode == 2, done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
