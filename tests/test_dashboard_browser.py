"""The dashboard in a real headless Chromium (Playwright) against a real ``flowloom serve``,
on the embedded backend and on Redis. Every test also checks that the page logged no
console error and sent no request to any host but the server (see ``page``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from dashboard_fixtures import Server, Watch, chromium_or_skip, screenshot, serve

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect
expect.set_options(timeout=15_000)  # a loaded machine may be slow

BACKENDS = ["embedded", pytest.param("redis", marks=pytest.mark.redis)]
WAIT = 15_000  # ms: how long an action may take on a loaded machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_or_skip()
    from dashboard_fixtures import CHROMIUM_ARGS

    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    with serve(request.param) as running:
        yield running


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    watch = Watch(server.url)
    page.on("console", watch.console)
    page.on("pageerror", watch.page_error)
    page.on("request", watch.request)
    yield page
    context.close()
    assert watch.errors == [], watch.errors
    assert watch.foreign == [], watch.foreign


def names(dag: dict[str, Any]) -> Iterator[str]:
    """Every vertex name of a definition's DAG, and every conditional key, at any depth."""
    for vertex in dag["vertices"]:
        yield vertex["name"]
        if vertex["kind"] in ("subdag", "foreach"):
            yield from names(vertex["dag"])
        elif vertex["kind"] == "conditional":
            for key, branch in vertex["branches"].items():
                yield f"[{key}]"
                yield from names(branch)


def shoot(server: Server, page: Any, name: str) -> None:
    if server.kind == "embedded":
        screenshot(page, name)


def request_page(page: Any, server: Server, flow: str, request_id: str) -> None:
    page.goto(f"{server.url}/dashboard#/request/{flow}/{request_id}")
    expect(page.locator("h1")).to_contain_text(request_id)


def test_flows_page_draws_every_vertex_of_every_flow(page: Any, server: Server) -> None:
    page.goto(f"{server.url}/dashboard")
    _, flows = server.call("GET", "/flows")
    assert flows["flows"] == ["fails", "fanout", "orders", "slow"]
    for flow in flows["flows"]:
        _, definition = server.call("GET", f"/flow/{flow}/definition")
        graph = page.locator(f'section[data-flow="{flow}"] svg.graph')
        expect(graph).to_be_visible()
        drawn = graph.locator("text").all_text_contents()
        for name in names(definition["dag"]):
            assert any(name == t or t.startswith(name + " ·") for t in drawn), (flow, name)
    orders = page.locator('section[data-flow="orders"] svg.graph')
    assert orders.locator(".edge.k-ordering").count() == 1
    expect(orders.locator(".edge-label")).to_have_text("↦ upper")
    expect(orders.locator(".cluster.k-conditional")).to_have_count(1)
    expect(orders.locator(".cluster.k-branch")).to_have_count(2)
    fanout = page.locator('section[data-flow="fanout"] svg.graph')
    expect(fanout.locator(".cluster.k-foreach .cluster-title")).to_contain_text("foreach")
    expect(fanout.locator(".cluster.k-subdag .cluster-title")).to_contain_text("sub-DAG")
    shoot(server, page, "flows")


def test_run_a_flow_from_the_form_and_watch_it_complete(page: Any, server: Server) -> None:
    page.goto(f"{server.url}/dashboard#/run/orders")
    page.fill("textarea[name=body]", "order-7: 1 x gadget, express")
    page.fill("textarea[name=query]", "lang=en")
    shoot(server, page, "run")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/request/orders/[0-9a-f]{32}$"))
    request_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("h1 .badge")).to_have_text("completed")
    assert server.state("orders", request_id)["status"] == "completed"
    expect(page.locator('.node[data-path="route[express]/courier"]')).to_have_class(
        re.compile(r"\bst-completed\b")
    )
    expect(page.locator('.node[data-path="route[standard]/post"]')).to_have_class(
        re.compile(r"\bst-none\b")
    )
    result = page.locator(".card", has=page.locator("h2", has_text="Result"))
    expect(result.locator("pre")).to_contain_text("shipped: shipped:")
    expect(page.locator(".gantt-row[data-vertex=confirm]")).to_be_visible()
    page.locator('.node[data-path="price"]').click()
    page.locator(".vertex-detail button", has_text="Output").click()
    expect(page.locator(".vertex-detail pre")).to_have_text("price 19.80")
    shoot(server, page, "request")


def test_pause_and_resume_with_the_buttons(page: Any, server: Server) -> None:
    request_id = server.execute("slow", b"go")
    request_page(page, server, "slow", request_id)
    page.click("button[data-action=pause]")
    expect(page.locator("h1 .badge")).to_have_text("paused")
    assert server.state("slow", request_id)["status"] == "paused"
    shoot(server, page, "paused")
    page.click("button[data-action=resume]")
    expect(page.locator("h1 .badge")).not_to_have_text("paused")
    assert server.state("slow", request_id)["status"] in ("running", "completed")
    expect(page.locator("h1 .badge")).to_have_text("completed", timeout=30_000)
    assert server.state("slow", request_id)["status"] == "completed"
    expect(page.locator("button[data-action=pause]")).to_be_disabled()


def test_stop_with_the_button(page: Any, server: Server) -> None:
    request_id = server.execute("slow", b"go")
    request_page(page, server, "slow", request_id)
    page.click("button[data-action=stop]")
    expect(page.locator("h1 .badge")).to_have_text("stopped")
    assert server.state("slow", request_id)["status"] == "stopped"


def test_retry_with_the_button_goes_on_from_where_the_request_stopped(
    page: Any, server: Server
) -> None:
    request_id = server.execute("slow", b"go")
    request_page(page, server, "slow", request_id)
    expect(page.locator("button[data-action=retry]")).to_be_disabled()  # running: no retry
    page.click("button[data-action=stop]")
    expect(page.locator("h1 .badge")).to_have_text("stopped")
    page.click("button[data-action=retry]")
    expect(page.locator("h1 .badge")).not_to_have_text("stopped")
    expect(page.locator("h1 .badge")).to_have_text("completed", timeout=30_000)
    state = server.state("slow", request_id)
    assert state["status"] == "completed"
    assert len(state["retries"]) == 1
    expect(page.locator("button[data-action=retry]")).to_be_disabled()


def test_a_failed_request_shows_its_error_and_traceback(page: Any, server: Server) -> None:
    request_id = server.execute("fails", b"c-42")
    server.wait_status("fails", request_id, "failed")
    error = server.state("fails", request_id)["error"]
    request_page(page, server, "fails", request_id)
    box = page.locator(".error-box")
    expect(box).to_contain_text("LookupError")
    expect(box).to_contain_text("no customer 'c-42' in the ledger")
    expect(box.locator(".mono")).to_have_text("lookup")
    assert "load_customer" in error["traceback"]
    traceback = box.locator("pre.traceback")
    expect(traceback).to_contain_text("in load_customer")
    expect(traceback).to_contain_text("LookupError: no customer 'c-42' in the ledger")
    expect(page.locator('.node[data-path="lookup"]')).to_have_class(re.compile(r"\bst-failed\b"))
    expect(page.locator(".vertex-detail")).to_contain_text("LookupError")
    shoot(server, page, "failed")


def test_requests_list_filters_pages_and_updates_live(page: Any, server: Server) -> None:
    request_id = server.execute("slow", b"live")
    page.goto(f"{server.url}/dashboard#/requests?flow=slow")
    row = page.locator(f'tr[data-request="{request_id}"]')
    expect(row).to_have_attribute("data-status", re.compile("queued|running"))
    server.wait_status("slow", request_id, "completed", timeout=30)
    expect(row).to_have_attribute("data-status", "completed")  # no reload: a live update
    page.select_option("select[name=status]", "failed")
    expect(page).to_have_url(re.compile(r"status=failed"))
    expect(row).to_have_count(0)
    page.goto(f"{server.url}/dashboard#/requests")
    # a waiting assertion: the live table may be drawn again between two reads
    expect(page.locator(f'tr[data-request="{request_id}"] td:nth-child(2)')).to_have_text("slow")
    shoot(server, page, "requests")


def test_requests_list_pages_on_the_server(page: Any, server: Server) -> None:
    ids = [server.execute("orders", b"x", f"page-{server.kind}-{n:03d}") for n in range(55)]
    page.goto(f"{server.url}/dashboard#/requests?flow=orders")
    expect(page.locator("tbody tr")).to_have_count(50)
    expect(page.locator("tbody tr").first).to_have_attribute("data-request", ids[-1])
    page.click("text=Older →")
    expect(page).to_have_url(re.compile(r"offset=50"))
    rows = page.locator("tbody tr")
    expect(rows.first).to_have_attribute("data-request", re.compile("page-"))
    assert rows.count() >= 5


def test_workers_page_shows_the_live_worker_and_the_queue(page: Any, server: Server) -> None:
    page.goto(f"{server.url}/dashboard#/workers")
    row = page.locator("tbody tr[data-worker]")
    expect(row).to_have_count(1)
    cells = row.first.locator("td")
    expect(cells.nth(2)).to_have_text(str(server.process.pid))
    expect(cells.nth(3)).to_contain_text("orders")
    expect(cells.nth(4)).to_have_text("8")
    expect(cells.nth(5)).to_contain_text("ago")
    for name in ("ready", "delayed", "held"):
        expect(page.locator(f"[data-queue={name}]")).to_have_text(re.compile(r"^\d+$"))
    shoot(server, page, "workers")


def test_a_wide_foreach_is_summarised_and_paged(page: Any, server: Server) -> None:
    """10,000 items on the embedded backend (its 20,000 tasks run in about a second);
    1,000 on Redis, where they take seconds on a loaded machine."""
    items = 10_000 if server.kind == "embedded" else 1_000
    status, answer = server.call(
        "POST", "/flow/fanout", b"%d" % items, {"X-Request-Id": "big-foreach", "X-Wait": "30"}
    )
    assert status == 200, answer
    full_state = []
    page.on(
        "request",
        lambda r: full_state.append(r.url) if r.url.endswith("/requests/big-foreach") else None,
    )
    request_page(page, server, "fanout", "big-foreach")
    check = page.locator('.node[data-path="items[]/verify/check"]')
    expect(check.locator(".node-detail")).to_have_text(f"{items}/{items} done")
    expect(page.locator(".gantt-row[data-vertex='items[]/verify/check']")).to_contain_text(
        f"\u00d7{items}"
    )
    check.click()
    detail = page.locator(".vertex-detail")
    expect(detail.locator(".pager .muted")).to_have_text(f"1\u2013100 of {items:,}")
    expect(detail.locator(".instances .gantt-row")).to_have_count(100)
    detail.locator("button", has_text="Next →").click()
    expect(detail.locator(".pager .muted")).to_have_text(f"101\u2013200 of {items:,}")
    assert full_state == []  # only summaries and pages, never the whole state
    shoot(server, page, "foreach")


def test_with_a_token_the_page_asks_for_it_and_keeps_it_out_of_urls(browser: Any) -> None:
    token = "dashboard-test-token-7f3a"
    with serve("embedded", token=token) as server:
        context = browser.new_context(viewport={"width": 1100, "height": 700})
        page = context.new_page()
        watch = Watch(server.url)
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        page.on("console", watch.console)
        page.on("pageerror", watch.page_error)
        page.on("request", watch.request)
        page.goto(f"{server.url}/dashboard")
        expect(page.locator("form.login")).to_be_visible()
        page.fill("input[name=token]", "wrong")
        page.click("form.login button")
        expect(page.locator("form.login .error")).to_have_text("Wrong token.")
        # the browser logs the login's 401 answer; that is the only error allowed
        assert len(watch.errors) == 1, watch.errors
        assert "401" in watch.errors.pop()
        shoot(server, page, "login")
        page.fill("input[name=token]", token)
        page.click("form.login button")
        expect(page.locator("h1")).to_have_text("Flows (4)")
        page.goto(f"{server.url}/dashboard#/requests")
        expect(page.locator("h1")).to_have_text("Requests")
        cookies = context.cookies()
        assert [c["name"] for c in cookies] == ["flowloom_session"]
        assert cookies[0]["httpOnly"]
        assert cookies[0]["sameSite"] == "Strict"
        assert token not in cookies[0]["value"]
        assert all(token not in url for url in urls), urls
        page.click("#signout")
        expect(page.locator("form.login")).to_be_visible()
        assert context.cookies() == []
        expect(page.locator("#signout")).to_be_hidden()
        context.close()
        assert watch.errors == [], watch.errors
        assert watch.foreign == [], watch.foreign


def test_the_trace_id_links_to_the_configured_trace_ui(browser: Any) -> None:
    template = "http://127.0.0.1:16686/trace/{trace_id}"  # never opened: only linked
    with serve("embedded", environment={"FLOWLOOM_TRACE_URL": template}) as server:
        page = browser.new_page()
        watch = Watch(server.url)
        page.on("console", watch.console)
        page.on("request", watch.request)
        request_id = server.execute("orders", b"x")
        server.wait_status("orders", request_id, "completed")
        trace_id = server.state("orders", request_id)["trace_id"]
        assert trace_id
        request_page(page, server, "orders", request_id)
        link = page.locator("dl.facts a", has_text=trace_id)
        expect(link).to_have_attribute("href", template.format(trace_id=trace_id))
        page.close()
        assert watch.errors == []
        assert watch.foreign == []
