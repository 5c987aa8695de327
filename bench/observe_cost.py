"""Where observability's time goes: ``python -m bench.observe_cost`` (Linux).

Runs one workload on the embedded backend in three services of this process, taking
turns run by run (so that the machine's load hits them alike):

- ``plain``: no observer;
- ``metrics``: metrics only;
- ``in-process``: tracing and metrics, the spans dropped where the exporter process
  would get them (no exporter process: what the hooks and the recorder's thread cost);
- ``observed``: tracing and metrics, the spans exported over OTLP to ``bench.otlp_sink``.

and prints, per task (medians over the rounds): the wall time, the CPU time of the
worker threads, of the recorder's thread (``flowloom-spans``), of the other threads,
of the exporter process and of the sink, the time the worker threads waited for a CPU
(runnable, not running: another process or thread had it) and the garbage collector's
time; then ``plain / mode`` per round. From ``/proc/*/task/*/schedstat``.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from flowloom import FlowService
from flowloom.tracing import Tracing

from . import workloads
from .calls import RUNS, Discard
from .workloads import Sizes

__all__ = ["main"]

MODES = ("plain", "metrics", "in-process", "observed")


def _schedstat(pid: int | str, tids: Iterable[str] | None = None) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of ``pid``'s threads (``tids``)."""
    running = waiting = 0
    for tid in tids if tids is not None else os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                on_cpu, queued, _ = stat.read().split()
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        running += int(on_cpu)
        waiting += int(queued)
    return running, waiting


def _sample(exporter: int | None, sink: int) -> dict[str, float]:
    """Cumulative figures (ns) of this process's threads by role, the exporter, the sink."""
    roles: dict[str, list[str]] = {"workers": [], "spans": [], "others": []}
    for thread in threading.enumerate():
        role = "others"
        if thread.name.startswith("flowloom-worker"):
            role = "workers"
        elif thread.name == "flowloom-spans":
            role = "spans"
        roles[role].append(str(thread.native_id))
    figures: dict[str, float] = {}
    for role, tids in roles.items():
        figures[role], waited = _schedstat("self", tids)
        if role == "workers":
            figures["workers waiting"] = waited
    figures["exporter"] = _schedstat(exporter)[0] if exporter else 0
    figures["sink"] = _schedstat(sink)[0]
    figures["gc"] = _GC[0]
    return figures


_GC = [0.0, 0.0]  # collections' time (ns), the start of the current one


def _timed_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _GC[1] = time.perf_counter_ns()
    else:
        _GC[0] += time.perf_counter_ns() - _GC[1]


def _service(mode: str, endpoint: str, threads: int) -> tuple[FlowService, int | None]:
    options: dict[str, Any] = {"worker_concurrency": threads}
    if mode != "plain":
        options["enable_monitoring"] = True
    if mode in ("in-process", "observed"):
        options["otlp_endpoint"] = endpoint
    fs = FlowService(**options)
    fs.__enter__()
    tracing = next((o for o in fs.observers.all if isinstance(o, Tracing)), None)
    if tracing is None:
        return fs, None
    sink: Any = tracing.recorder.sink
    if mode == "in-process":
        tracing.recorder.sink = Discard()
        sink.close(10)
        return fs, None
    return fs, sink.process.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.observe_cost", description=__doc__)
    parser.add_argument("--workload", choices=sorted(RUNS), default="chain")
    parser.add_argument("-n", type=int, default=2000, help="items, hops or requests")
    parser.add_argument("--rounds", type=int, default=15, help="runs of each mode (>= 3)")
    parser.add_argument("--threads", type=int, default=5, help="worker_concurrency")
    args = parser.parse_args(argv)
    run = RUNS[args.workload]
    tasks = {"fanout": args.n + 2, "chain": args.n, "dags": 4 * args.n}[args.workload]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(port)])
    gc.callbacks.append(_timed_gc)
    services = {m: _service(m, f"http://127.0.0.1:{port}", args.threads) for m in MODES}
    try:
        for fs, _ in services.values():
            workloads.register(fs, Sizes(fanout=args.n, chain=args.n, dags=args.n))
            run(fs, args.n, 300.0)  # warm-up
        results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode, (fs, exporter) in services.items():
                before = _sample(exporter, sink.pid)
                wall = run(fs, args.n, 300.0)
                after = _sample(exporter, sink.pid)
                figures = {k: (after[k] - before[k]) / 1000 / tasks for k in after}
                results[mode].append({"wall": wall * 1e6 / tasks, **figures})
    finally:
        for fs, _ in services.values():
            fs.__exit__(None, None, None)
        sink.kill()
        sink.wait()
    print(
        f"python -m bench.observe_cost {' '.join(sys.argv[1:] if argv is None else argv)}: "
        f"µs per task, medians of {args.rounds} rounds; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    keys = list(results["plain"][0])
    print(f"{'':12}" + "".join(f"{k:>17}" for k in keys))
    for mode in MODES:
        medians = [statistics.median(r[k] for r in results[mode]) for k in keys]
        print(f"{mode:12}" + "".join(f"{v:17.1f}" for v in medians))
    for mode in MODES[1:]:
        ratios = [
            p["wall"] / o["wall"] for p, o in zip(results["plain"], results[mode], strict=True)
        ]
        print(f"plain/{mode} throughput per round: median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
