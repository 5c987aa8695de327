"""The flows the dashboard tests serve: ``flowloom serve tests/apps/dashboard_app.py``.

Every construct a graph must draw (data and ordering-only edges, a forwarder, an
aggregator, a sub-DAG, a conditional branch, a foreach), a slow flow to pause and
resume, a failing one (with a traceback) and a wide foreach. Configured by environment
variables: ``DASH_REDIS_URL`` and ``DASH_PREFIX`` (Redis; embedded without),
``DASH_TOKEN`` (a bearer token) and ``DASH_SLEEP`` (seconds each step of ``slow`` takes).
"""

from __future__ import annotations

import json
import os
import time

from flowloom import Context, Dag, FlowService, Workflow

Options = dict[str, list[str]]
SLEEP = float(os.environ.get("DASH_SLEEP", "1.0"))


def parse(data: bytes, options: Options) -> bytes:
    return data.strip() or b"order-1: 2 x widget"


def price(data: bytes, options: Options) -> bytes:
    return b"price 19.80"


def reserve(data: bytes, options: Options) -> bytes:
    return data + b" reserved"


def audit(data: bytes, options: Options) -> bytes:
    return b"audited"


def upper(data: bytes) -> bytes:
    return data.upper()


def merge(responses: dict[str, bytes]) -> bytes:
    return b"; ".join(responses[k] for k in sorted(responses))


def pick_route(data: bytes) -> list[str]:
    return ["express"] if b"EXPRESS" in data.upper() else ["standard"]


def ship(data: bytes, options: Options) -> bytes:
    return b"shipped: " + data


def define_orders(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("parse", parse)
    dag.node("price", price)
    dag.node("reserve", reserve)
    dag.node("audit", audit)
    dag.node("confirm", ship, aggregator=merge)
    dag.edge("parse", "price")
    dag.edge("parse", "reserve", forwarder=upper)
    dag.edge("parse", "audit")
    dag.edge("price", "confirm")
    dag.edge("reserve", "confirm")
    dag.edge("audit", "confirm", ordering_only=True)
    routes = dag.conditional_branch("route", ["express", "standard"], pick_route)
    routes["express"].node("courier", ship)
    routes["standard"].node("post", ship).node("track", ship)
    routes["standard"].edge("post", "track")
    dag.edge("confirm", "route")


def each_line(data: bytes) -> dict[str, bytes]:
    count = int(data or b"3")
    return {f"item-{n}": str(n).encode() for n in range(count)}


def check(data: bytes, options: Options) -> bytes:
    return data + b" checked"


def score(data: bytes, options: Options) -> bytes:
    return data + b" scored"


def count(outputs: dict[str, bytes]) -> bytes:
    return json.dumps({"items": len(outputs)}).encode()


def verify() -> Dag:
    sub = Dag()
    sub.node("check", check).node("score", score)
    sub.edge("check", "score")
    return sub


def define_fanout(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("start", lambda data, options: data)
    items = dag.foreach_branch("items", each_line, aggregator=count)
    items.subdag("verify", verify)
    dag.edge("start", "items")


def nap(data: bytes, options: Options) -> bytes:
    time.sleep(SLEEP)
    return data + b"."


def define_slow(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("first", nap).node("second", nap).node("third", nap)
    dag.edge("first", "second")
    dag.edge("second", "third")


def load_customer(customer: str) -> dict[str, str]:
    raise LookupError(f"no customer {customer!r} in the ledger")


def lookup(data: bytes, options: Options) -> bytes:
    return json.dumps(load_customer(data.decode())).encode()


def define_fails(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("prepare", lambda data, options: data).node("lookup", lookup)
    workflow.dag.edge("prepare", "lookup")


fs = FlowService(
    redis_url=os.environ.get("DASH_REDIS_URL") or None,
    redis_prefix=os.environ.get("DASH_PREFIX", "flowloom"),
    token=os.environ.get("DASH_TOKEN") or None,
    enable_monitoring=True,
    worker_concurrency=8,
)
fs.register("orders", define_orders)
fs.register("fanout", define_fanout)
fs.register("slow", define_slow)
fs.register("fails", define_fails)
