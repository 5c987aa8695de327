"""Retries, a timeout with a fallback, workflow hooks and the per-request context store.

The ``checkout`` flow takes an order (``order-1001: 3 x widget``):

    reserve-stock --> charge-card --------.
                \\                          +--> confirm (aggregator)
                 `--> quote-shipping -----'

- ``reserve-stock`` keeps the order and its reservation in the request's context
  (``context.set``); ``confirm`` and the hooks read them back (``context.get``);
- ``charge-card`` talks to a flaky payment gateway that is busy twice before it
  answers: ``retries=3`` with ``backoff`` rides that out; with the query
  ``card=declined`` it fails every attempt, and so does the request;
- ``quote-shipping`` asks a carrier that is too slow for its ``timeout``: its
  ``on_failure`` handler falls back to a flat rate, and the flow goes on;
- ``workflow.on_failure`` raises an alert when a request fails, and
  ``workflow.finally_`` releases the reservation of a request that did not
  complete; both write to ``JOURNAL`` (a stand-in for alerts and logs).

``main`` also pauses, resumes and stops requests.

    python examples/checkout.py
    flowloom run examples/checkout.py checkout --data "order-1001: 3 x widget"
"""

from __future__ import annotations

import time

from flowloom import (
    Context,
    ErrorInfo,
    FlowService,
    Request,
    RequestFailed,
    RequestStopped,
    Status,
    Workflow,
)

Options = dict[str, list[str]]

JOURNAL: dict[str, list[str]] = {}  # request id -> what the hooks did


def define_checkout(workflow: Workflow, context: Context) -> None:
    # The handlers close over ``context``: whichever request they run for, it is that
    # request's id, query and key/value store they see.

    def reserve_stock(data: bytes, options: Options) -> bytes:
        order_id = data.decode().split(":")[0].strip()
        context.set("order", {"id": order_id, "reservation": "R-" + order_id.split("-")[-1]})
        return data

    def charge_card(data: bytes, options: Options) -> bytes:
        attempt = context.get("charge-attempts", 0) + 1
        context.set("charge-attempts", attempt)
        if options.get("card") == ["declined"]:
            raise PermissionError("card declined")
        if attempt < 3:
            raise ConnectionError(f"payment gateway busy (attempt {attempt})")
        return f"charged on attempt {attempt}".encode()

    def quote_shipping(data: bytes, options: Options) -> bytes:
        time.sleep(1.0)  # the carrier's API is slow today: the timeout gives up first
        return b"express shipping 9.90"

    def flat_rate(error: BaseException, data: bytes) -> bytes:
        return f"flat-rate shipping 4.90 (quote failed: {type(error).__name__})".encode()

    def collect(responses: dict[str, bytes]) -> bytes:
        return responses["charge-card"] + b", " + responses["quote-shipping"]

    def confirm(data: bytes, options: Options) -> bytes:
        order = context.get("order")
        return f"{order['id']} confirmed ({order['reservation']}): ".encode() + data

    dag = workflow.dag
    dag.node("reserve-stock", reserve_stock)
    dag.node("charge-card", charge_card, retries=3, backoff=0.05)
    dag.node("quote-shipping", quote_shipping, timeout=0.2, on_failure=flat_rate)
    dag.node("confirm", confirm, aggregator=collect)
    dag.edge("reserve-stock", "charge-card")
    dag.edge("reserve-stock", "quote-shipping")
    dag.edge("charge-card", "confirm")
    dag.edge("quote-shipping", "confirm")

    @workflow.on_failure
    def alert(error: ErrorInfo) -> None:
        note = f"alert: {error.vertex} failed: {error.type}: {error.message}"
        JOURNAL.setdefault(context.request_id, []).append(note)

    @workflow.finally_
    def release_reservation(status: Status) -> None:
        notes = JOURNAL.setdefault(context.request_id, [])
        order = context.get("order")
        if status is not Status.COMPLETED and order is not None:
            notes.append(f"released {order['reservation']}")
        notes.append(f"ended {status}")


def journal(request_id: str, timeout: float = 5.0) -> list[str]:
    """What the hooks wrote for a request. They run just after the request ends, so
    this waits (up to ``timeout`` seconds) for the finally hook's last entry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notes = JOURNAL.get(request_id, [])
        if notes and notes[-1].startswith("ended "):
            break
        time.sleep(0.01)
    return list(JOURNAL.get(request_id, []))


def completed(request_id: str) -> set[str]:
    """The vertices of a request that have completed so far."""
    vertices = fs.state("checkout", request_id).vertices
    return {address for address, v in vertices.items() if v.status is Status.COMPLETED}


fs = FlowService()
fs.register("checkout", define_checkout)


def main() -> None:
    # run = execute + result: the gateway is busy twice, the third attempt charges.
    rid = fs.execute("checkout", Request(body=b"order-1001: 3 x widget"))
    print(fs.result("checkout", rid, timeout=10).decode())
    charge = fs.state("checkout", rid).vertices["charge-card"]
    print(f"charge-card: {charge.status}, {charge.attempts} attempts")
    print(f"hooks: {journal(rid)}")

    # A declined card fails every attempt: the request fails, the hooks clean up.
    declined = Request(body=b"order-1002: 1 x gizmo", query={"card": "declined"})
    rid = fs.execute("checkout", declined)
    try:
        fs.result("checkout", rid, timeout=10)
    except RequestFailed as exc:
        print(f"failed: {exc}")
    print(f"hooks: {journal(rid)}")

    # Pause holds the request once its running tasks are done; resume goes on.
    rid = fs.execute("checkout", b"order-1003: 2 x sprocket")
    print(f"paused: {fs.pause('checkout', rid)}, state: {fs.state('checkout', rid).status}")
    time.sleep(0.3)
    print(f"resumed: {fs.resume('checkout', rid)}")
    print(fs.result("checkout", rid, timeout=10).decode())

    # Stop ends a request for good (here once the stock is reserved).
    rid = fs.execute("checkout", b"order-1004: 5 x cog")
    while "reserve-stock" not in completed(rid):
        time.sleep(0.01)
    print(f"stopped: {fs.stop('checkout', rid)}")
    try:
        fs.result("checkout", rid, timeout=10)
    except RequestStopped as exc:
        print(f"no result: {exc}")
    print(f"hooks: {journal(rid)}")


if __name__ == "__main__":
    with fs:
        main()
