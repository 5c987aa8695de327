"""A real ``flowloom serve`` (a subprocess) and a real headless Chromium for the
dashboard tests (test_dashboard_browser.py).

Chromium is Debian's (``apt-get install chromium``; Playwright's own browser download is
not used). Without it the browser tests are skipped, except under CI (``CI=true``),
where they fail. ``FLOWLOOM_SCREENSHOTS=DIR`` makes the tests write their screenshots
(``dashboard-*.png``) into ``DIR`` (the docs use ``docs/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from http_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "dashboard_app.py"
CHROMIUM = os.environ.get("FLOWLOOM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REDIS_URL = os.environ.get("FLOWLOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@dataclass
class Server:
    """A running ``flowloom serve`` of tests/apps/dashboard_app.py."""

    url: str
    kind: str
    process: subprocess.Popen[bytes]
    token: str | None = None
    prefix: str | None = None

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One API call: (status, JSON body or bytes)."""
        headers = dict(headers or {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, raw, kind = answer.status, answer.read(), answer.headers["content-type"]
        except urllib.error.HTTPError as exc:
            status, raw, kind = exc.code, exc.read(), exc.headers["content-type"]
        return status, json.loads(raw) if "json" in (kind or "") else raw

    def execute(self, flow: str, body: bytes = b"", request_id: str | None = None) -> str:
        headers = {"X-Async": "true"}
        if request_id:
            headers["X-Request-Id"] = request_id
        status, answer = self.call("POST", f"/flow/{flow}", body, headers)
        assert status == 202, answer
        request_id = answer["request_id"]
        assert isinstance(request_id, str)
        return request_id

    def state(self, flow: str, request_id: str) -> dict[str, Any]:
        status, answer = self.call("GET", f"/flow/{flow}/requests/{request_id}")
        assert status == 200, answer
        assert isinstance(answer, dict)
        return answer

    def wait_status(self, flow: str, request_id: str, wanted: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.state(flow, request_id)["status"]
            if status == wanted:
                return
            time.sleep(0.05)
        raise AssertionError(f"{request_id} is {status}, not {wanted}, after {timeout}s")


@contextlib.contextmanager
def serve(
    kind: str,
    *,
    token: str | None = None,
    sleep: float = 1.5,
    app: Path = APP,
    options: tuple[str, ...] = (),
    environment: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``flowloom serve APP`` on a free loopback port, on ``kind`` ("embedded" or "redis")."""
    port = free_port()
    env = {**os.environ, "DASH_SLEEP": str(sleep), "PYTHONUNBUFFERED": "1", **(environment or {})}
    env.pop("FLOWLOOM_TOKEN", None)
    prefix = None
    if token:
        env["DASH_TOKEN"] = token
    if kind == "redis":
        prefix = f"fltest-dash-{uuid.uuid4().hex[:10]}"
        env.update(DASH_REDIS_URL=REDIS_URL, DASH_PREFIX=prefix)
    process = subprocess.Popen(
        [sys.executable, "-m", "flowloom.cli", "serve", str(app), "--port", str(port), *options],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Server(f"http://127.0.0.1:{port}", kind, process, token, prefix)
    try:
        _wait_until_up(server)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        if prefix:
            _drop_prefix(prefix)
        assert b"Traceback" not in err, err.decode(errors="replace")


def _wait_until_up(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            err = server.process.stderr.read() if server.process.stderr else b""
            raise AssertionError(f"flowloom serve exited: {err.decode(errors='replace')}")
        with contextlib.suppress(OSError):
            if server.call("GET", "/health")[0] == 200:
                return
        time.sleep(0.1)
    raise AssertionError("flowloom serve did not answer within 30 s")


def _drop_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


def chromium_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is needed in CI (apt-get install chromium)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@dataclass
class Watch:
    """What a page did that it must not: console errors, uncaught exceptions, and
    requests to any origin but the server's."""

    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def page_error(self, error: Any) -> None:
        self.errors.append(f"uncaught: {error}")

    def request(self, request: Any) -> None:
        url: str = request.url
        if not (url.startswith(self.origin + "/") or url.startswith(("data:", "blob:"))):
            self.foreign.append(url)


def screenshot(page: Any, name: str) -> None:
    """Save a full-page screenshot as DIR/dashboard-NAME.png when FLOWLOOM_SCREENSHOTS=DIR."""
    folder = os.environ.get("FLOWLOOM_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"), full_page=True)
