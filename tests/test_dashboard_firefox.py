"""The dashboard in a real headless Firefox (Debian's ``firefox-esr``, driven over its
own Marionette protocol) against a real ``flowloom serve``: the pages render, the flows
are drawn, a request's state and a failure's traceback show, and the page loads nothing
from any origin but the server's.

Firefox's own services (updates, telemetry, safe browsing...) are switched off in the
profile, and every connection that is not to 127.0.0.1 goes to a proxy on a closed
loopback port, so that the browser sends nothing off this machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dashboard_fixtures import Server, serve
from http_fixtures import free_port

FIREFOX = os.environ.get("FLOWLOOM_FIREFOX", "/usr/bin/firefox-esr")
WAIT = 15.0

PREFS = {
    "app.update.auto": False,
    "app.update.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.newtabpage.enabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.trr.mode": 5,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "services.settings.server": "http://127.0.0.1:1/",
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1",
    "network.proxy.http_port": 1,
    "network.proxy.ssl": "127.0.0.1",
    "network.proxy.ssl_port": 1,
    "network.proxy.no_proxies_on": "127.0.0.1",
    "network.proxy.allow_hijacking_localhost": False,
}


def firefox_or_skip() -> str:
    if Path(FIREFOX).exists():
        return FIREFOX
    if os.environ.get("CI") == "true":
        pytest.fail(f"{FIREFOX} is needed in CI (apt-get install firefox-esr)")
    pytest.skip(f"no {FIREFOX} (apt-get install firefox-esr)")


@pytest.fixture(scope="module")
def firefox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary = firefox_or_skip()
    marionette = pytest.importorskip("marionette_driver.marionette")
    profile = tmp_path_factory.mktemp("firefox-profile")
    port = free_port()
    prefs = {**PREFS, "marionette.port": port}
    (profile / "user.js").write_text(
        "".join(f'user_pref("{k}", {_js(v)});\n' for k, v in prefs.items())
    )
    process = subprocess.Popen(
        [binary, "--headless", "--marionette", "--no-remote", "--profile", str(profile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOZ_HEADLESS": "1"},
    )
    try:
        _wait_for_port(port, process)
        client = marionette.Marionette(host="127.0.0.1", port=port)
        client.start_session()
        client.set_window_rect(width=1360, height=900)
        yield client
        client.delete_session()
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve("embedded", sleep=0.2) as running:
        yield running


def test_every_page_renders_in_firefox(firefox: Any, server: Server) -> None:
    failed = server.execute("fails", b"c-42")
    done = server.execute("orders", b"order-7")
    server.wait_status("fails", failed, "failed")
    server.wait_status("orders", done, "completed")

    firefox.navigate(f"{server.url}/dashboard")
    status, flows = server.call("GET", "/flows")
    assert status == 200
    for flow in flows["flows"]:
        status, definition = server.call("GET", f"/flow/{flow}/definition")
        assert status == 200
        for name in _names(definition["dag"]):
            _eventually(firefox, f'section[data-flow="{flow}"] svg.graph', name)
    _collect_errors(firefox)

    firefox.navigate(f"{server.url}/dashboard#/requests")
    _eventually(firefox, "main", done)
    _eventually(firefox, "main", "completed")

    firefox.navigate(f"{server.url}/dashboard#/request/orders/{done}")
    _eventually(firefox, "main", "price 19.80")

    firefox.navigate(f"{server.url}/dashboard#/request/fails/{failed}")
    _eventually(firefox, "main", "LookupError: no customer 'c-42' in the ledger")
    _eventually(firefox, "main", "dashboard_app.py")  # the traceback names the file

    firefox.navigate(f"{server.url}/dashboard#/workers")
    _eventually(firefox, "main", "live workers")

    assert firefox.execute_script("return window.__flowloomErrors || []") == []
    loaded = firefox.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded, "the page loaded nothing: it did not run"
    assert [url for url in loaded if not url.startswith(server.url + "/")] == []


def _names(dag: dict[str, Any]) -> Iterator[str]:
    for vertex in dag["vertices"]:
        yield vertex["name"]
        if vertex["kind"] in ("subdag", "foreach"):
            yield from _names(vertex["dag"])
        elif vertex["kind"] == "conditional":
            for branch in vertex["branches"].values():
                yield from _names(branch)


def _collect_errors(firefox: Any) -> None:
    """From here on, note uncaught errors of the page (it stays loaded across its routes)."""
    firefox.execute_script(
        "window.__flowloomErrors = [];"
        "window.addEventListener('error', e => window.__flowloomErrors.push(String(e.message)));"
        "window.addEventListener('unhandledrejection',"
        " e => window.__flowloomErrors.push(String(e.reason)));"
    )


def _eventually(firefox: Any, selector: str, text: str) -> None:
    read: Callable[[], str] = lambda: firefox.execute_script(  # noqa: E731
        "const n = document.querySelector(arguments[0]); return n ? n.textContent : '';",
        script_args=[selector],
    )
    deadline = time.monotonic() + WAIT
    seen = ""
    while time.monotonic() < deadline:
        seen = read()
        if text in seen:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {selector} within {WAIT}s: {seen[:500]!r}")


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"firefox exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise AssertionError("firefox's Marionette port did not open within 60 s")


def _js(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value) + '"'
