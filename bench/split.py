"""Where a task's time goes on Redis: ``python -m bench.split --redis-url URL``.

Runs each workload ``--runs`` times on ``--workers`` flowloom worker processes
(``python -m bench.worker``) and prints, per task:

- the CPU time of the worker processes (Python: the steps, the engine, redis-py),
  of this client process (execute, result), and of the Redis server;
- Redis's own figures from ``INFO commandstats``: calls of each command per task and
  the microseconds Redis spent in them (a script's inner commands are counted both
  on their own and inside ``evalsha``).

Figures are differences of snapshots taken before and after the runs, so the server
must serve nobody else meanwhile: give it a private ``redis-server`` (e.g. ``redis-server
--port 21001 --save '' --appendonly no``). The db of ``--redis-url`` is flushed. The
workers' CPU is read from ``/proc`` (Linux only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .run import flush, processes
from .workloads import WORKLOADS, Sizes, register, run_chain, run_dags, run_fanout

__all__ = ["main"]

RUNNERS = {"fanout": run_fanout, "chain": run_chain, "dags": run_dags}


def tasks_of(workload: str, sizes: Sizes) -> int:
    """Tasks one run of ``workload`` runs (as the benchmark counts them)."""
    return {"fanout": sizes.fanout + 2, "chain": sizes.chain, "dags": 4 * sizes.dags}[workload]


def cpu_of(pid: int) -> float:
    """Seconds of CPU process ``pid`` and its threads used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(client: object) -> tuple[dict[str, tuple[int, int]], float]:
    """Per command (calls, usec) and the server's CPU seconds."""
    import redis

    assert isinstance(client, redis.Redis)
    stats = client.info("commandstats")
    commands = {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
    }
    cpu = client.info("cpu")
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure(args: argparse.Namespace, workload: str) -> None:
    import redis

    from flowloom import FlowService

    sizes = Sizes(fanout=args.fanout_n, chain=args.chain_n, dags=args.dags_m)
    flush(args.redis_url)
    command = [sys.executable, "-m", "bench.worker", "--redis-url", args.redis_url]
    command += ["--chain-n", str(sizes.chain)]
    log = Path(args.logs) / f"split-{workload}"
    with processes([command] * args.workers, log, {}):
        workers = worker_pids(args.redis_url, args.workers)
        fs = FlowService(redis_url=args.redis_url)
        client = redis.Redis.from_url(args.redis_url)
        try:
            register(fs, sizes)
            RUNNERS[workload](fs, getattr(sizes, workload), 300.0)  # warm-up
            before = snapshot(client), [cpu_of(p) for p in workers], time.process_time()
            wall = 0.0
            for _ in range(args.runs):
                wall += RUNNERS[workload](fs, getattr(sizes, workload), 300.0)
            after = snapshot(client), [cpu_of(p) for p in workers], time.process_time()
        finally:
            fs.close()
            client.close()
    tasks = tasks_of(workload, sizes) * args.runs
    (commands0, redis0), workers0, client0 = before
    (commands1, redis1), workers1, client1 = after
    us = 1e6 / tasks
    print(f"\n{workload}: {tasks} tasks, {args.workers} worker process(es)")
    print(f"  wall per task            {wall * us:8.1f} us")
    print(f"  workers' CPU per task    {(sum(workers1) - sum(workers0)) * us:8.1f} us")
    print(f"  client's CPU per task    {(client1 - client0) * us:8.1f} us")
    print(f"  Redis CPU per task       {(redis1 - redis0) * us:8.1f} us")
    print("  Redis commands per task  calls  usec")
    rows = []
    for name, (calls, usec) in commands1.items():
        calls0, usec0 = commands0.get(name, (0, 0))
        if calls > calls0:
            rows.append((usec - usec0, calls - calls0, name))
    for usec, calls, name in sorted(rows, reverse=True):
        print(f"    {name:22} {calls / tasks:6.2f} {usec / tasks:6.2f}")


def worker_pids(url: str, count: int) -> list[int]:
    """The pids of the ``count`` live workers, from their heartbeats."""
    from flowloom import FlowService

    fs = FlowService(redis_url=url)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [int(str(w["pid"])) for w in fs.workers()]
            if len(pids) >= count:
                return pids
            time.sleep(0.1)
    finally:
        fs.close()
    raise RuntimeError("the workers did not come up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split")
    parser.add_argument("--redis-url", required=True, help="a private server's db (flushed!)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fanout-n", type=int, default=Sizes.fanout)
    parser.add_argument("--chain-n", type=int, default=Sizes.chain)
    parser.add_argument("--dags-m", type=int, default=Sizes.dags)
    parser.add_argument("--logs", default="/tmp")
    args = parser.parse_args(argv)
    for workload in args.workloads.split(","):
        measure(args, workload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
