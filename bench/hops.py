"""A chain hop on Redis, two trees side by side: ``python -m bench.hops MODE ...``.

On this shared 2-core machine the same command moves by 2x from one minute to the next,
so two versions of flowloom are compared taking turns chain by chain, and the figure is
the median of the per-chain ratios:

- ``replay --trees BASE,NEW``: Redis's side of a hop alone. A client drives the
  ``submit``, ``begin`` and ``complete`` scripts of each tree (``src/flowloom/backends/
  redis/lua`` of each) as a worker's hops would (each completion claiming the next task,
  with the arguments a real hop sends), chains of ``--chain-n`` hops, the trees' scripts
  loaded on one server; ``EVALSHA`` microseconds per hop from ``INFO commandstats``.
- ``pair --trees BASE=PYTHON,NEW=PYTHON --workload chain``: the whole thing. Each tree's
  ``bench.worker`` processes (run by that tree's ``PYTHON``, from that tree) serve a db
  of their own on one server; this process runs a workload on one tree, then on the
  other, ``--pairs`` times.

Give it a private ``redis-server`` (``--port``): its dbs 0-2 are flushed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .run import flush
from .workloads import Sizes, register, run_chain, run_dags, run_fanout

__all__ = ["main"]

P = "flowloom"  # the default key prefix
CONSUMER = "bench-hops"


def _scripts(client: Any, tree: Path) -> dict[str, str]:
    lua = tree / "src/flowloom/backends/redis/lua"
    head = (lua / "common.lua").read_text() + (lua / "request.lua").read_text()
    return {
        name: client.script_load(head + (lua / f"{name}.lua").read_text())
        for name in ("submit", "begin", "complete")
    }


def _keys(request_id: str) -> list[str]:
    r = f"{P}:r:{{{request_id}}}"
    parts = ("", ":v", ":i", ":s", ":h", ":c", ":e", ":o")
    return [r + part for part in parts] + [f"{P}:tasks", f"{P}:expiries", f"{P}:delayed"]


def _data(n: int) -> str:
    return f"{n:016d}"


def _receipt(reply: Any) -> bytes:
    """The claimed task's entry id, from a claim's reply (flat, or nested as before)."""
    if isinstance(reply[0], list):  # {entries, began, facts}
        assert reply[1][0] == 1, reply
        return bytes(reply[0][0][0])
    assert reply[2] == 1, reply  # id, blob, began, facts
    return bytes(reply[0])


def replay_chain(client: Any, sha: dict[str, str], hops: int) -> None:
    """One request of ``hops`` hops, by the scripts alone, as ``bench.worker`` runs it."""
    rid = uuid.uuid4().hex
    keys = _keys(rid)
    client.evalsha(
        sha["submit"], 13, *keys, f"{P}:requests", f"{P}:flow:{{chain}}", rid, "chain", "v1",
        _data(0), "{}", "{}", repr(time.time()), "0", "", "workers", "", "0", "1", "hop-0",
        "hop-0", "", "", "d" + _data(0), "1",
    )  # fmt: skip
    entries = client.xreadgroup("workers", CONSUMER, {f"{P}:tasks": ">"}, count=1)
    receipt = entries[0][1][0][0]
    client.evalsha(sha["begin"], 11, *keys, rid, "workers", receipt, "hop-0", "hop-0", "1")
    for n in range(hops):
        args = [rid, "workers", receipt, f"hop-{n}", f"hop-{n}"]
        if n == hops - 1:
            args += ["r", "1", _data(n + 1), "86400000", CONSUMER, "4", "", "0"]
        else:
            nxt = f"hop-{n + 1}"
            args += ["d" + _data(n + 1), "0", "", "86400000", CONSUMER, "4", "", "1", nxt, nxt]
            args += ["", f"hop-{n}", "d" + _data(n + 1), "1"]
        reply = client.evalsha(sha["complete"], 11, *keys, *args)
        if n < hops - 1:
            receipt = _receipt(reply)
    assert client.hget(keys[0], "status") == b"completed"


def replay(args: argparse.Namespace) -> None:
    import redis

    client = redis.Redis(port=args.port, db=0)
    client.flushdb()
    client.xgroup_create(f"{P}:tasks", "workers", id="0", mkstream=True)
    trees = [Path(t) for t in args.trees.split(",")]
    shas = [_scripts(client, tree) for tree in trees]

    def usec() -> int:
        return int(client.info("commandstats")["cmdstat_evalsha"]["usec"])

    for sha in shas:
        replay_chain(client, sha, args.chain_n)  # warm-up
    per: list[list[float]] = [[] for _ in trees]
    for k in range(args.pairs):
        for j in range(len(trees)) if k % 2 == 0 else reversed(range(len(trees))):
            before = usec()
            replay_chain(client, shas[j], args.chain_n)
            per[j].append((usec() - before) / args.chain_n)
    client.flushdb()
    for j, tree in enumerate(trees):
        ratios = [a / b for a, b in zip(per[j], per[0], strict=True)]
        print(
            f"{tree}: evalsha {statistics.median(per[j]):.2f} us per hop (median, min "
            f"{min(per[j]):.2f}); over {trees[0].name}, median of paired ratios "
            f"{statistics.median(ratios):.3f}"
        )


def pair(args: argparse.Namespace) -> None:
    from flowloom import FlowService

    sizes = Sizes(chain=args.chain_n)
    trees = [t.split("=", 1) for t in args.trees.split(",")]
    procs: list[subprocess.Popen[bytes]] = []
    services = []
    runs: dict[str, Callable[[FlowService], float]] = {
        "chain": lambda fs: run_chain(fs, sizes.chain, 60) / sizes.chain * 1e3,
        "dags": lambda fs: 4 * sizes.dags / run_dags(fs, sizes.dags, 60),
        "fanout": lambda fs: (sizes.fanout + 2) / run_fanout(fs, sizes.fanout, 60),
    }
    run = runs[args.workload]
    try:
        for db, (tree, python) in enumerate(trees, start=1):
            url = f"redis://127.0.0.1:{args.port}/{db}"
            flush(url)
            command = [python, "-m", "bench.worker", "--redis-url", url]
            command += ["--chain-n", str(sizes.chain)]
            for _ in range(args.workers):
                procs.append(subprocess.Popen(command, cwd=tree, stderr=subprocess.DEVNULL))
            fs = FlowService(redis_url=url)
            register(fs, sizes)
            services.append(fs)
        time.sleep(2)
        for fs in services:
            run(fs)  # warm-up
        per: list[list[float]] = [[] for _ in trees]
        for k in range(args.pairs):
            for j in (0, 1) if k % 2 == 0 else (1, 0):
                per[j].append(run(services[j]))
    finally:
        for fs in services:
            fs.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    unit = "ms per hop" if args.workload == "chain" else "tasks/s"
    ratios = [b / a for a, b in zip(per[0], per[1], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"{args.workload}, {args.workers} worker(s), {args.pairs} pairs: {trees[0][0]} "
        f"{statistics.median(per[0]):.4g} {unit}, {trees[1][0]} {statistics.median(per[1]):.4g} "
        f"(medians); second over first, median of paired ratios {statistics.median(ratios):.3f} "
        f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hops")
    parser.add_argument("mode", choices=["replay", "pair"])
    parser.add_argument("--port", type=int, required=True, help="a private redis-server's")
    parser.add_argument("--trees", required=True, help="replay: A,B; pair: A=PYTHON,B=PYTHON")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--chain-n", type=int, default=Sizes.chain)
    parser.add_argument("--workload", choices=["chain", "dags", "fanout"], default="chain")
    parser.add_argument("--workers", type=int, default=1, help="pair: processes per tree")
    args = parser.parse_args(argv)
    if args.mode == "replay":
        replay(args)
    else:
        pair(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
