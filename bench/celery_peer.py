"""The peer system: the same three workloads on Celery, Redis broker and Redis result backend.

The tasks mirror flowloom's (``shared/workloads.md``): ``fanout`` is ``source``
replacing itself with ``chord(group(item.s(x) for x in items), aggregate.s())``;
``chain`` is ``chain(hop.s(x0), hop.s(), ...)``; ``dags`` is
``chain(a.s(i), chord([b.s(), c.s()], d.s()))`` per request. Payloads, summaries and
checks are the ones of ``workloads.py``.

The worker is started by ``bench.run`` as
``celery -A bench.celery_peer worker --pool=prefork --concurrency=N -O fair
--without-gossip --without-mingle --without-heartbeat``; the broker and result
backend URL comes from ``FLOWLOOM_BENCH_CELERY_URL`` (default Redis db 13).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from celery import Celery, chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeout

from .workloads import (
    check_chain,
    check_dag,
    check_fanout,
    dag_join,
    fanout_summary,
    payload,
    tag,
)
from .workloads import hop as hop_payload

__all__ = ["CELERY_URL", "Stalled", "app", "run_chain", "run_dags", "run_fanout"]

CELERY_URL = os.environ.get("FLOWLOOM_BENCH_CELERY_URL", "redis://127.0.0.1:6379/13")

app = Celery("flowloom_bench_peer", broker=CELERY_URL, backend=CELERY_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


# -- fanout ------------------------------------------------------------------------------------
@app.task(bind=True, name="bench.source")
def source(self: Any, data: bytes) -> Any:
    items = [payload(i) for i in range(int(data))]
    return self.replace(chord(group(item.s(x) for x in items), aggregate.s()))


@app.task(name="bench.item")
def item(data: bytes) -> bytes:
    return data


@app.task(name="bench.aggregate")
def aggregate(outputs: list[bytes]) -> bytes:
    return fanout_summary((None, value) for value in outputs)


# -- chain -------------------------------------------------------------------------------------
@app.task(name="bench.hop")
def hop(data: bytes) -> bytes:
    return hop_payload(data)


# -- dags --------------------------------------------------------------------------------------
@app.task(name="bench.a")
def a(data: bytes) -> bytes:
    return data


@app.task(name="bench.b")
def b(data: bytes) -> bytes:
    return tag(b"b", data)


@app.task(name="bench.c")
def c(data: bytes) -> bytes:
    return tag(b"c", data)


@app.task(name="bench.d")
def d(outputs: list[bytes]) -> bytes:
    if len(outputs) != 2:
        return b"x" * 16
    return dag_join(outputs[0], outputs[1])


# -- one timed run of each workload --------------------------------------------------------------
def run_fanout(n: int, timeout: float) -> float:
    start = time.perf_counter()
    pending = source.delay(payload(n))
    [result] = collect([pending], start + timeout)
    wall = time.perf_counter() - start
    release()
    check_fanout(result, n)
    return wall


def run_chain(n: int, timeout: float) -> float:
    canvas = chain(hop.s(payload(0)), *(hop.s() for _ in range(n - 1)))
    start = time.perf_counter()
    pending = canvas.apply_async()
    [result] = collect([pending], start + timeout)
    wall = time.perf_counter() - start
    release()
    check_chain(result, n)
    return wall


def run_dags(m: int, timeout: float) -> float:
    canvases = [chain(a.s(payload(i)), chord([b.s(), c.s()], d.s())) for i in range(m)]
    start = time.perf_counter()
    pending = [canvas.apply_async() for canvas in canvases]
    results = collect(pending, start + timeout)
    wall = time.perf_counter() - start
    release()
    for i, result in enumerate(results):
        check_dag(result, i)
    return wall


class Stalled(Exception):
    """``AsyncResult.get()`` kept waiting for a result the backend already holds.

    Celery's Redis result backend hears of results over pub/sub; now and then it
    misses one and ``get()`` waits until its timeout although the task succeeded
    (seen here in about one dags run in ten). ``bench.run`` discards such a run and
    repeats it, and says how often that happened.
    """


def collect(pending: list[Any], deadline: float, patience: float = 3.0) -> list[Any]:
    """The results of ``pending``, the way a Celery user waits for them (``get()``),
    raising ``Stalled`` if ``get()`` is still waiting ``patience`` seconds after the
    backend holds the result."""
    results = []
    for result in pending:
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no result for {result.id} in time")
            try:
                results.append(result.get(timeout=min(patience, remaining)))
                break
            except CeleryTimeout:
                if app.backend.get_task_meta(result.id)["status"] != "SUCCESS":
                    continue
                try:
                    results.append(result.get(timeout=patience))
                    break
                except CeleryTimeout:
                    raise Stalled(f"get() missed the result of task {result.id}") from None
    return results


def release() -> None:
    """Stop waiting for every result this process still tracks.

    Celery keeps the results of a canvas's inner tasks (a chain's earlier tasks, a
    chord's header, under other objects with the same ids) subscribed until they are
    garbage; unsubscribing then at interpreter exit fails noisily. Called after each
    timed run, outside the timing.
    """
    backend = app.backend
    for mapping in backend._pending_results:
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                backend.remove_pending_result(result)
    gc.collect()


def ping(timeout: float) -> bool:
    """True once a worker answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.control.ping(timeout=0.5):
            return True
    return False
