"""Flows for the tracing and metrics tests, as a flowloom app (``flowloom worker``/``serve``).

- ``diamond``: ``a`` (two piped handlers) -> ``b`` and ``c`` -> ``d`` (aggregator);
  ``b`` makes a span of its own with the ordinary OpenTelemetry API (when installed).
- ``fanout``: a foreach over ``int(body)`` items, each doubled, then an aggregator.
- ``flaky``: ``wobble`` fails on its first attempt (retries=1), then succeeds.
- ``broken``: ``explode`` always raises ``ValueError``.
- ``picky``: a conditional branch that picks ``yes``.
- ``sleepy``: ``nap`` sleeps ``float(body)`` seconds on its first delivery only (it
  notes in the context that it began): a worker killed meanwhile leaves it to another.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flowloom import Context, FlowService, Workflow

try:
    from opentelemetry import trace
except ImportError:  # the app also runs without the otel extra
    trace = None  # type: ignore[assignment]


def upper(data: bytes, options: Any) -> bytes:
    return data.upper()


def exclaim(data: bytes, options: Any) -> bytes:
    return data + b"!"


def left(data: bytes, options: Any) -> bytes:
    if trace is not None:
        with trace.get_tracer("observed-app").start_as_current_span("user-work") as span:
            span.set_attribute("app.size", len(data))
            return b"L" + data
    return b"L" + data


def right(data: bytes, options: Any) -> bytes:
    return b"R" + data


def join(parents: dict[str, bytes]) -> bytes:
    return b"+".join(parents[k] for k in sorted(parents))


def diamond(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("a", upper, exclaim)
    dag.node("b", left)
    dag.node("c", right)
    dag.node("d", exclaim, aggregator=join)
    dag.edge("a", "b")
    dag.edge("a", "c")
    dag.edge("b", "d")
    dag.edge("c", "d")


def items(data: bytes) -> dict[str, bytes]:
    return {f"k{n}": b"%d" % n for n in range(int(data or b"0"))}


def double(data: bytes, options: Any) -> bytes:
    return b"%d" % (2 * int(data))


def collect(outputs: dict[str, bytes]) -> bytes:
    return json.dumps({k: v.decode() for k, v in sorted(outputs.items())}).encode()


def fanout(workflow: Workflow, context: Context) -> None:
    each = workflow.dag.foreach_branch("each", items, aggregator=collect)
    each.node("double", double)


def flaky(workflow: Workflow, context: Context) -> None:
    def wobble(data: bytes, options: Any) -> bytes:
        if context.get("tried") is None:
            context.set("tried", "yes")
            raise ConnectionError("first attempt fails")
        return data

    workflow.dag.node("wobble", wobble, retries=1, backoff=0.01)


def explode(data: bytes, options: Any) -> bytes:
    raise ValueError("explode: " + data.decode(errors="replace"))


def broken(workflow: Workflow, context: Context) -> None:
    workflow.dag.node("explode", explode)


def picky(workflow: Workflow, context: Context) -> None:
    branches = workflow.dag.conditional_branch("pick", ["yes", "no"], lambda d: ["yes"])
    branches["yes"].node("agree", exclaim)
    branches["no"].node("refuse", upper)


def sleepy(workflow: Workflow, context: Context) -> None:
    def nap(data: bytes, options: Any) -> bytes:
        if context.get("began") is None:
            context.set("began", "yes")
            time.sleep(float(data))
        return b"awake"

    workflow.dag.node("nap", nap)


FLOWS = {
    "diamond": diamond,
    "fanout": fanout,
    "flaky": flaky,
    "broken": broken,
    "picky": picky,
    "sleepy": sleepy,
}


def register(service: FlowService) -> FlowService:
    for name, define in FLOWS.items():
        service.register(name, define)
    return service


if os.environ.get("FLOWLOOM_OBS_REDIS_URL"):  # run as an app by the multi-process tests
    service = register(
        FlowService(
            redis_url=os.environ["FLOWLOOM_OBS_REDIS_URL"],
            redis_prefix=os.environ["FLOWLOOM_OBS_PREFIX"],
            worker_concurrency=3,
        )
    )
