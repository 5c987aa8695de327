"""Run the benchmark workloads and print a table: ``python -m bench --backend all``.

Systems, one after another in this invocation (never two at once, so they never
share the two cores):

- ``embedded``: ``FlowService()`` in this process;
- ``redis``: ``--workers`` flowloom worker processes (``python -m bench.worker``)
  on Redis db 12 (``--redis-url``), this process as the client;
- ``celery``: a Celery worker (prefork, ``--concurrency`` = the worker count,
  ``-O fair --without-gossip --without-mingle --without-heartbeat``) with Redis as
  broker and result backend on db 13 (``--celery-url``).

The Redis dbs of ``--redis-url`` and ``--celery-url`` are flushed before use: give
dedicated ones. See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import workloads
from .workloads import WORKLOADS, Sizes, Timing

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/12"
CELERY_URL = "redis://127.0.0.1:6379/13"
CELERY_OPTIONS = (
    "--pool=prefork",
    "-O",
    "fair",
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
)
# Targets from the issues: embedded vs Celery's figures (issue 2), Redis vs Celery (issue 3).
# (ratio flowloom/Celery wanted: at least this for throughput, at most this for ms/hop)
TARGETS = {
    "embedded": {"fanout": 20.0, "chain": 1 / 16, "dags": 20.0},
    "redis": {"fanout": 5.0, "chain": 1 / 5, "dags": 5.0},
}

Runner = Callable[[str, int], float]  # (workload, size) -> wall seconds of one checked run


@dataclass
class Row:
    system: str  # "embedded", "redis" or "celery"
    workers: int | None  # worker processes; None for the embedded backend
    timing: Timing

    @property
    def label(self) -> str:
        return {
            "embedded": "flowloom embedded",
            "redis": "flowloom redis",
            "celery": "celery prefork",
        }[self.system]


@dataclass
class Config:
    sizes: Sizes
    workloads: tuple[str, ...]
    runs: int
    timeout: float
    threads: int | None
    redis_url: str
    celery_url: str
    logs: Path

    def size(self, workload: str) -> int:
        return int(getattr(self.sizes, workload))


# -- running the workloads on one system ---------------------------------------------------
def measure_all(system: str, workers: int | None, runner: Runner, config: Config) -> list[Row]:
    rows = []
    for workload in config.workloads:
        size = config.size(workload)
        timing = workloads.measure(
            workload, size, lambda w=workload, s=size: runner(w, s), config.runs
        )
        row = Row(system, workers, timing)
        median, _, _ = timing.figures()
        where = f" ({workers} worker{'s' if workers != 1 else ''})" if workers else ""
        print(f"  {row.label}{where} {workload}: {median:,.4g} {timing.unit}", flush=True)
        rows.append(row)
    return rows


def flowloom_runner(fs: object, config: Config) -> Runner:
    from flowloom import FlowService

    assert isinstance(fs, FlowService)
    functions = {
        "fanout": workloads.run_fanout,
        "chain": workloads.run_chain,
        "dags": workloads.run_dags,
    }

    def run(workload: str, size: int) -> float:
        return functions[workload](fs, size, config.timeout)

    return run


def run_embedded(config: Config) -> list[Row]:
    from flowloom import FlowService

    options = {} if config.threads is None else {"worker_concurrency": config.threads}
    with FlowService(**options) as fs:  # type: ignore[arg-type]
        workloads.register(fs, config.sizes)
        return measure_all("embedded", None, flowloom_runner(fs, config), config)


def run_redis(workers: int, config: Config) -> list[Row]:
    from flowloom import FlowService

    flush(config.redis_url)
    command = [
        sys.executable,
        "-m",
        "bench.worker",
        "--redis-url",
        config.redis_url,
        "--chain-n",
        str(config.sizes.chain),
    ]
    if config.threads is not None:
        command += ["--threads", str(config.threads)]
    commands = [command] * workers
    with processes(commands, config.logs / f"redis-{workers}", {}):
        fs = FlowService(redis_url=config.redis_url)
        try:
            workloads.register(fs, config.sizes)
            return measure_all("redis", workers, flowloom_runner(fs, config), config)
        finally:
            fs.close()


def run_celery(workers: int, config: Config) -> list[Row]:
    os.environ["FLOWLOOM_BENCH_CELERY_URL"] = config.celery_url
    from . import celery_peer

    if config.celery_url != celery_peer.CELERY_URL:
        raise SystemExit("bench.celery_peer was imported with another --celery-url")
    flush(config.celery_url)
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_peer",
        "worker",
        *CELERY_OPTIONS,
        f"--concurrency={workers}",
        "--loglevel=WARNING",
    ]
    env = {"FLOWLOOM_BENCH_CELERY_URL": config.celery_url}
    functions = {
        "fanout": celery_peer.run_fanout,
        "chain": celery_peer.run_chain,
        "dags": celery_peer.run_dags,
    }

    def run(workload: str, size: int) -> float:
        return functions[workload](size, config.timeout)

    with processes([command], config.logs / f"celery-{workers}", env):
        if not celery_peer.ping(60.0):
            raise RuntimeError("the Celery worker did not answer within 60 s")
        return measure_all("celery", workers, run, config)


# -- processes and Redis ------------------------------------------------------------------------
def flush(url: str) -> None:
    """Empty the Redis db of ``url`` (only that db)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@contextmanager
def processes(commands: list[list[str]], log_prefix: Path, env: dict[str, str]) -> Iterator[None]:
    """Start ``commands`` (from the repository root), yield, then stop them: SIGTERM,
    and SIGKILL to the process group of any that has not exited after 20 seconds."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    environ = {**os.environ, **env, "PYTHONPATH": _pythonpath()}
    try:
        for i, command in enumerate(commands):
            log = log_prefix.with_name(f"{log_prefix.name}-{i}.log")
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=environ,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append((proc, log))
        time.sleep(0.5)
        for proc, log in started:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.args)} exited: see {log}")  # type: ignore[arg-type]
        yield
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in started:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _pythonpath() -> str:
    current = os.environ.get("PYTHONPATH")
    return f"{ROOT}{os.pathsep}{current}" if current else str(ROOT)


def redis_backend_exists() -> bool:
    return importlib.util.find_spec("flowloom.backends.redis") is not None


# -- the table ------------------------------------------------------------------------------------
def ratio_for(row: Row, rows: list[Row]) -> float | None:
    """flowloom/Celery for a flowloom row: against Celery with as many worker processes,
    or, for the embedded backend, against Celery's best configuration measured (most
    processes)."""
    peers = [r for r in rows if r.system == "celery" and r.timing.workload == row.timing.workload]
    if row.system == "celery" or not peers:
        return None
    if row.workers is None:
        peer = max(peers, key=lambda r: r.workers or 0)
    else:
        matching = [r for r in peers if r.workers == row.workers]
        if not matching:
            return None
        peer = matching[0]
    return row.timing.figures()[0] / peer.timing.figures()[0]


def target_text(row: Row, ratio: float | None) -> str:
    target = TARGETS.get(row.system, {}).get(row.timing.workload)
    if target is None or ratio is None:
        return ""
    if row.timing.higher_is_better:
        return f">= {target:g}x: {'met' if ratio >= target else 'MISSED'}"
    return f"<= 1/{1 / target:g}: {'met' if ratio <= target else 'MISSED'}"


def table(rows: list[Row]) -> str:
    header = (
        "system",
        "workers",
        "workload",
        "median",
        "worst",
        "best",
        "unit",
        "flowloom/Celery",
        "target",
    )
    lines = [header]
    for row in rows:
        median, worst, best = row.timing.figures()
        ratio = ratio_for(row, rows)
        lines.append(
            (
                row.label,
                "-" if row.workers is None else str(row.workers),
                row.timing.workload,
                _number(median),
                _number(worst),
                _number(best),
                row.timing.unit,
                "" if ratio is None else f"{ratio:.3g}",
                target_text(row, ratio),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {3, 4, 5, 7}
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def to_json(rows: list[Row], config: Config, command: str) -> dict[str, object]:
    return {
        "command": command,
        "sizes": {w: config.size(w) for w in WORKLOADS},
        "runs": config.runs,
        "rows": [
            {
                "system": row.system,
                "workers": row.workers,
                "workload": row.timing.workload,
                "size": row.timing.size,
                "unit": row.timing.unit,
                "walls": row.timing.walls,
                "median": row.timing.figures()[0],
                "flowloom_over_celery": ratio_for(row, rows),
            }
            for row in rows
        ],
    }


# -- the command line ------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the workloads of shared/workloads.md on flowloom and Celery.",
    )
    parser.add_argument(
        "--backend",
        choices=("embedded", "redis", "celery", "all"),
        default="all",
        help="which system(s) to measure (default: all)",
    )
    parser.add_argument(
        "--workers", default="1,2", help="worker process counts for redis and celery"
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="a subset of fanout,chain,dags"
    )
    parser.add_argument("--fanout-n", type=int, default=Sizes.fanout, help="items of the fan-out")
    parser.add_argument("--chain-n", type=int, default=Sizes.chain, help="hops of the chain")
    parser.add_argument("--dags-m", type=int, default=Sizes.dags, help="requests of the 4-node DAG")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (>= 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="flowloom worker_concurrency (default: FlowService's)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--redis-url", default=REDIS_URL, help="flowloom's Redis db (flushed!)")
    parser.add_argument(
        "--celery-url", default=CELERY_URL, help="Celery's broker and result db (flushed!)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures to this file"
    )
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.redis_url.rstrip("/") == args.celery_url.rstrip("/"):
        parser.error("--redis-url and --celery-url must be different dbs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    worker_counts = [int(w) for w in str(args.workers).split(",") if w]
    config = Config(
        sizes=Sizes(fanout=args.fanout_n, chain=args.chain_n, dags=args.dags_m),
        workloads=tuple(w for w in WORKLOADS if w in args.workloads.split(",")),
        runs=args.runs,
        timeout=args.timeout,
        threads=args.threads,
        redis_url=args.redis_url,
        celery_url=args.celery_url,
        logs=Path(tempfile.mkdtemp(prefix="flowloom-bench-")),
    )
    systems = ("embedded", "redis", "celery") if args.backend == "all" else (args.backend,)
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    sizes = config.sizes
    print(
        f"{command}\nfanout N={sizes.fanout}, chain N={sizes.chain}, dags M={sizes.dags}; "
        f"1 warm-up + {config.runs} timed runs each; worker logs in {config.logs}",
        flush=True,
    )
    rows: list[Row] = []
    skipped: list[str] = []
    if "embedded" in systems:
        rows += run_embedded(config)
    if "redis" in systems:
        if redis_backend_exists():
            for workers in worker_counts:
                rows += run_redis(workers, config)
        elif args.backend == "redis":
            raise SystemExit("flowloom.backends.redis does not exist yet")
        else:
            skipped.append("redis (flowloom.backends.redis does not exist yet)")
    if "celery" in systems:
        for workers in worker_counts:
            rows += run_celery(workers, config)
    print()
    print(table(rows))
    dags = [r for r in rows if r.timing.workload == "dags"]
    for row in dags:
        where = "" if row.workers is None else f" ({row.workers} workers)"
        print(f"dags on {row.label}{where}: {row.timing.requests_per_s():,.0f} requests/s")
    for what in skipped:
        print(f"skipped: {what}")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(rows, config, command), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
