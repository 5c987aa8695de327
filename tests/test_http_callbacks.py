"""Callbacks: where they may go, how many, how long, and that no receiver, however
slow, holds up the server or its shutdown. Traffic goes to loopback only: other
address ranges are checked through the classifying function and a stub resolver."""

from __future__ import annotations

import base64
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from flowloom import FlowService
from flowloom.http import create_app
from flowloom.http.addresses import Address, check, networks, refusal
from flowloom.http.callbacks import parse_url
from http_fixtures import AppClient, Gate, Receiver, ServerProcess, SilentReceiver, register_flows

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fs(gate: Gate) -> Iterator[FlowService]:
    with FlowService(worker_concurrency=4) as service:
        register_flows(service, gate)
        yield service
        gate.opened.set()


def client_for(fs: FlowService, **options: object) -> httpx.AsyncClient:
    return AppClient(create_app(fs, **options))  # type: ignore[arg-type]


@pytest.fixture
async def closed(fs: FlowService) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app that allows no internal address."""
    async with client_for(fs, wait_timeout=5) as client:
        yield client


# -- where a callback may go --------------------------------------------------------------------
LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:9/x",
    "http://127.1:9/x",
    "http://0x7f000001:9/x",
    "http://2130706433:9/x",
    "http://0177.0.0.1:9/x",  # octal: refused by the URL parser already
    "http://127.0.0.2:9/x",
    "http://[::1]:9/x",
    "http://[::ffff:127.0.0.1]:9/x",
    "http://localhost:9/x",
    "https://user:secret@127.0.0.1/x",
]


@pytest.mark.anyio
@pytest.mark.parametrize("url", LOOPBACK_SPELLINGS)
async def test_every_spelling_of_loopback_is_refused(
    closed: httpx.AsyncClient, fs: FlowService, url: str
) -> None:
    response = await closed.post("/flow/myflow", content=b"x", headers={"X-Callback-Url": url})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "loopback" in error or ("0177" in url and "Invalid IPv4" in error)
    assert "secret" not in response.text
    assert fs.requests("myflow") == []  # refused before anything ran


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url", ["http://0.0.0.0:9/", "http://0:9/", "http://[::]:9/"]
)  # resolved, never connected to
async def test_the_unspecified_address_is_refused(closed: httpx.AsyncClient, url: str) -> None:
    response = await closed.post("/flow/myflow", headers={"X-Callback-Url": url})
    assert response.status_code == 400
    assert "unspecified" in response.json()["error"]


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a00:1", "reserved"),  # NAT64 of 10.0.0.1
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_addresses_are_classified(address: str, kind: str | None) -> None:
    assert refusal(ipaddress.ip_address(address)) == kind


def test_the_allow_list_lets_named_networks_through() -> None:
    allow = networks("127.0.0.1, 10.0.0.0/8,fd00::/8")
    assert refusal(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert refusal(ipaddress.ip_address("127.0.0.2"), allow) == "loopback"
    assert refusal(ipaddress.ip_address("10.200.1.1"), allow) is None
    assert refusal(ipaddress.ip_address("::ffff:10.0.0.1"), allow) is None
    assert refusal(ipaddress.ip_address("fd00::5"), allow) is None
    assert refusal(ipaddress.ip_address("192.168.0.1"), allow) == "private"
    with pytest.raises(ValueError, match="does not appear"):
        networks("not-an-address")


def stub_resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[Address]:
        if host not in table:
            raise OSError("no such name")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


@pytest.mark.anyio
async def test_names_are_checked_by_every_address_they_resolve_to() -> None:
    resolve = stub_resolver(
        {
            "metadata.internal": ["169.254.169.254"],
            "mixed.example": ["93.184.216.34", "10.0.0.7"],
            "public.example": ["93.184.216.34", "2606:4700:4700::1111"],
        }
    )
    with pytest.raises(ValueError, match=r"link-local address 169\.254\.169\.254"):
        await check("metadata.internal", 80, (), resolve)
    with pytest.raises(ValueError, match=r"private address 10\.0\.0\.7"):
        await check("mixed.example", 80, (), resolve)
    with pytest.raises(ValueError, match="cannot resolve"):
        await check("nowhere.example", 80, (), resolve)
    assert await check("public.example", 80, (), resolve) == ipaddress.ip_address("93.184.216.34")


@pytest.mark.anyio
async def test_the_app_refuses_a_name_that_resolves_inside(fs: FlowService) -> None:
    app = create_app(fs)
    app.state.flowloom.callbacks.resolver = stub_resolver({"hooks.corp": ["10.9.8.7"]})
    async with AppClient(app) as client:
        response = await client.post(
            "/flow/myflow", headers={"X-Callback-Url": "https://hooks.corp/done"}
        )
    assert response.status_code == 400
    assert "private address 10.9.8.7" in response.json()["error"]


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/x",
        "http://",
        "http:///x",
        "ftp://example.com/",
        "http://a:99999/",
        "http://a:0/",
        "//example.com/x",
        "http://" + "a" * 2100 + ".example/",
    ],
)
def test_malformed_callback_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_url(url)


@pytest.mark.anyio
async def test_malformed_callback_url_is_400_not_500(closed: httpx.AsyncClient) -> None:
    for url in ["http://[::1/x", "http://", "http://a:99999/", "http://[::1]:x/"]:
        response = await closed.post("/flow/myflow", headers={"X-Callback-Url": url})
        assert response.status_code == 400, (url, response.text)


@pytest.mark.anyio
async def test_the_environment_allows_loopback(
    fs: FlowService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWLOOM_CALLBACK_ALLOW", "127.0.0.1")
    with Receiver() as receiver:
        async with client_for(fs) as client:
            response = await client.post(
                "/flow/myflow", content=b"env", headers={"X-Callback-Url": receiver.url}
            )
            assert response.status_code == 200
            delivery = await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
    assert delivery.body == b'you said "env"'


# -- how they are sent --------------------------------------------------------------------------
@pytest.mark.anyio
async def test_credentials_reach_the_receiver_but_never_the_log(
    fs: FlowService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Receiver(answer=503) as receiver:
        url = receiver.url.replace("http://", "http://alice:pa55word@") + "/in?token=t0ps3cret"
        async with client_for(fs, callback_allow="127.0.0.1") as client:
            api = client.app.state.flowloom
            api.callbacks.backoff = 0.05
            response = await client.post(
                "/flow/myflow", content=b"c", headers={"X-Callback-Url": url}
            )
            assert response.status_code == 200
            deliveries = [
                await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
                for _ in range(3)
            ]
            with anyio.fail_after(10):
                while api.callbacks.pending:
                    await anyio.sleep(0.01)
    expected = "Basic " + base64.b64encode(b"alice:pa55word").decode()
    assert all(d.headers["authorization"] == expected for d in deliveries)
    assert deliveries[0].path == "/in?token=t0ps3cret"
    assert "failed 3 times" in caplog.text
    assert "pa55word" not in caplog.text
    assert "alice" not in caplog.text
    assert "t0ps3cret" not in caplog.text
    record = fs.backend.record(response.headers["x-request-id"])
    assert record is not None
    assert "x-callback-url" not in record.headers  # not stored with the request


@pytest.mark.anyio
async def test_a_final_refusal_is_not_retried(fs: FlowService) -> None:
    with Receiver(answer=404) as receiver:
        async with client_for(fs, callback_allow="127.0.0.1") as client:
            api = client.app.state.flowloom
            api.callbacks.backoff = 0.01
            await client.post("/flow/myflow", headers={"X-Callback-Url": receiver.url})
            await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
            with anyio.fail_after(10):
                while api.callbacks.pending:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)
    assert receiver.received.empty()


@pytest.mark.anyio
async def test_pending_callbacks_are_capped(fs: FlowService, gate: Gate) -> None:
    with Receiver() as receiver:
        async with client_for(fs, callback_allow="127.0.0.1") as client:
            api = client.app.state.flowloom
            api.callbacks.max_pending = 2
            headers = {"X-Async": "true", "X-Callback-Url": receiver.url}
            for _ in range(2):
                assert (await client.post("/flow/gated", headers=headers)).status_code == 202
            refused = await client.post("/flow/gated", headers=headers)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert len(fs.requests("gated")) == 2  # the refused call ran nothing
            gate.opened.set()
            for _ in range(2):
                await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))
            with anyio.fail_after(10):
                while api.callbacks.pending:
                    await anyio.sleep(0.01)
            assert (await client.post("/flow/gated", headers=headers)).status_code == 202


@pytest.mark.anyio
async def test_a_callback_for_a_request_that_ended_already_is_sent(fs: FlowService) -> None:
    """The request ends before the callback is registered: it is sent all the same."""
    with Receiver() as receiver:
        async with client_for(fs, callback_allow="127.0.0.1") as client:
            for i in range(20):
                await client.post(
                    "/flow/myflow",
                    content=b"%d" % i,
                    headers={"X-Async": "true", "X-Callback-Url": receiver.url},
                )
            bodies = {
                (await anyio.to_thread.run_sync(lambda: receiver.received.get(timeout=10))).body
                for _ in range(20)
            }
    assert bodies == {b'you said "%d"' % i for i in range(20)}


# -- slow receivers hold up nothing --------------------------------------------------------------
def test_slow_receivers_hold_up_neither_the_server_nor_its_shutdown() -> None:
    with (
        SilentReceiver("silent") as silent,
        SilentReceiver("trickle") as trickle,
        ServerProcess({"callback_allow": "127.0.0.1"}) as server,
        httpx.Client(base_url=server.base, timeout=10) as client,
    ):
        for i in range(60):
            receiver = silent if i % 2 else trickle
            response = client.post(
                "/flow/myflow",
                content=b"%d" % i,
                headers={"X-Async": "true", "X-Callback-Url": receiver.url},
            )
            assert response.status_code == 202
        deadline = time.monotonic() + 10
        while silent.accepted + trickle.accepted < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert silent.accepted + trickle.accepted >= 16  # 16 in flight, the rest queued
        for _ in range(10):
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            assert client.get("/flows").json() == {"flows": ["myflow"]}
            ran = client.post("/flow/myflow", content=b"now")
            assert ran.content == b'you said "now"'
            assert time.monotonic() - started < 0.5
        taken, out, err = server.stop()
    assert server.process.returncode == 0, err
    assert "served" in out
    assert taken < 10  # the shutdown deadline (SHUTDOWN_TIMEOUT)
    assert "60 callback(s) not sent: the server stopped" in err
