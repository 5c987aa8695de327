"""The dashboard at scale: 100,000 requests in the list, a 10,000-item foreach.

    python bench/dashboard_scale.py                        # embedded backend
    python bench/dashboard_scale.py --backend redis        # Redis (a prefix of its own)
    python bench/dashboard_scale.py --requests 20000 --items 2000

Fills a service with ``--requests`` finished requests of a one-node flow and runs
one request whose foreach has ``--items`` items (a two-vertex sub-DAG each), serves
it (``flowloom.http.serve`` in a thread of this process, dashboard on), then drives
Debian's headless Chromium (``/usr/bin/chromium``, through Playwright) over loopback:
the time until the request list shows its first page, its last page (the oldest 50)
and the foreach request's page shows its progress, and the same pages' API calls
alone. Each figure is the median of ``--runs`` loads.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable

from flowloom import FlowService, Request
from flowloom.backends import RequestRecord

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def items(data: bytes) -> dict[str, bytes]:
    return {f"item-{n}": b"%d" % n for n in range(int(data))}


def define_fanout(workflow, context):  # type: ignore[no-untyped-def]
    each = workflow.dag.foreach_branch("items", items, aggregator=lambda r: b"%d" % len(r))
    each.node("check", lambda d, o: d).node("score", lambda d, o: d)
    each.edge("check", "score")


def fill(fs: FlowService, count: int) -> None:
    """``count`` finished one-node requests, written straight to the backend (running
    100,000 flows would take minutes and measure the worker, not the dashboard)."""
    from flowloom import engine

    plan = fs.registry.latest("noop")
    created = time.time() - count
    for n in range(count):
        record = RequestRecord(f"r{n:06d}", "noop", plan.version, b"", {}, created=created + n)
        fs.backend.submit(record, engine.start(plan, b""))
    fs._ensure_worker()  # runs them: they end completed, as real ones do


def wait_all(fs: FlowService, count: int) -> None:
    while fs.backend.queue_depth()["ready"]:
        time.sleep(0.2)
    while fs.requests("noop", None, 0, 1)[0].status.value != "completed":
        time.sleep(0.2)


def median_time(fn: Callable[[], None], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as answer:
        answer.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()

    prefix = f"flowloom-bench-dash-{uuid.uuid4().hex[:8]}"
    options = (
        {"redis_url": args.redis_url, "redis_prefix": prefix} if args.backend == "redis" else {}
    )
    fs = FlowService(enable_monitoring=True, worker_concurrency=4, **options)  # type: ignore[arg-type]
    fs.register("noop", lambda wf, ctx: wf.dag.node("noop", lambda d, o: d))
    fs.register("fanout", define_fanout)
    try:
        began = time.perf_counter()
        fill(fs, args.requests)
        wait_all(fs, args.requests)
        print(f"{args.requests:,} requests made in {time.perf_counter() - began:.1f} s")
        began = time.perf_counter()
        fs.run("fanout", Request(body=b"%d" % args.items, request_id="big"), timeout=600)
        print(f"a {args.items:,}-item foreach ran in {time.perf_counter() - began:.1f} s")
        measure(fs, args)
    finally:
        fs.close()
        if args.backend == "redis":
            from flowloom.backends.redis import RedisBackend

            leftovers = RedisBackend(args.redis_url, prefix=prefix)
            leftovers.purge()
            leftovers.close()


def measure(fs: FlowService, args: argparse.Namespace) -> None:
    from playwright.sync_api import expect, sync_playwright

    from flowloom.http import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ready = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(fs, "127.0.0.1", port),
        kwargs={"ready": ready.set, "access_log": False, "log_level": "warning"},
        daemon=True,
    )
    thread.start()
    ready.wait(30)
    base = f"http://127.0.0.1:{port}"
    last = max(0, args.requests - 50)
    api = {
        "first page of requests": f"{base}/requests?limit=50",
        f"oldest page (offset {last:,})": f"{base}/requests?limit=50&offset={last}",
        "foreach progress (steps)": f"{base}/flow/fanout/requests/big/steps",
        "one page of its instances": (
            f"{base}/flow/fanout/requests/big/instances?vertex=items[]/check&limit=100"
        ),
    }
    for name, url in api.items():
        print(f"API  {name:34} {median_time(lambda u=url: get(u), args.runs) * 1000:8.1f} ms")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        expect.set_options(timeout=120_000)

        def requests_page(offset: int) -> Callable[[], None]:
            def load() -> None:
                page.goto(f"{base}/dashboard#/requests?offset={offset}")
                page.reload()
                expect(page.locator("tbody tr[data-request]")).to_have_count(50)

            return load

        def foreach_page() -> None:
            page.goto(f"{base}/dashboard#/request/fanout/big")
            page.reload()
            detail = page.locator('.node[data-path="items[]/check"] .node-detail')
            expect(detail).to_have_text(f"{args.items}/{args.items} done")

        pages = {
            "requests, first page": requests_page(0),
            f"requests, oldest page (offset {last:,})": requests_page(last),
            f"request with a {args.items:,}-item foreach": foreach_page,
        }
        for name, load in pages.items():
            print(f"page {name:34} {median_time(load, args.runs) * 1000:8.1f} ms")
        browser.close()


if __name__ == "__main__":
    main()
