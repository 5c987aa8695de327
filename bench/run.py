"""Run the benchmark workloads and print a table: ``python -m bench --backend all``.

Systems, one after another in this invocation (never two at once, so they never
share the two cores):

- ``embedded``: ``FlowService()`` in this process;
- ``redis``: ``--workers`` flowloom worker processes (``python -m bench.worker``)
  on Redis db 12 (``--redis-url``), this process as the client;
- ``embedded-observed``, ``redis-observed``: the same with tracing and metrics on
  (``--observability on|compare``), spans exported to ``bench.otlp_sink``;
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
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
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

# Issue 9: with tracing and metrics on, throughput may drop by at most this fraction.
OVERHEAD_LIMITS = {"embedded": 0.15, "redis": 0.10}

STALL_RETRIES = 5  # runs in a row Celery's get() may stall before giving up

Runner = Callable[[str, int], float]  # (workload, size) -> wall seconds of one checked run


@dataclass
class Row:
    system: str  # "embedded", "redis" or "celery"
    workers: int | None  # worker processes; None for the embedded backend
    timing: Timing

    @property
    def where(self) -> str:
        if self.workers is None:
            return self.label
        return f"{self.label} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    @property
    def label(self) -> str:
        return {
            "embedded": "flowloom embedded",
            "redis": "flowloom redis",
            "embedded-observed": "flowloom embedded, observed",
            "redis-observed": "flowloom redis, observed",
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
    interleave: bool
    stalls: list[str] = field(default_factory=list)
    otlp: str = ""  # the span sink's URL, when a system is observed

    def size(self, workload: str) -> int:
        return int(getattr(self.sizes, workload))


# -- the systems: each a context manager that yields a Runner -------------------------------
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


@contextmanager
def embedded(config: Config, observed: bool = False) -> Iterator[Runner]:
    from flowloom import FlowService

    options: dict[str, object] = {}
    if config.threads is not None:
        options["worker_concurrency"] = config.threads
    if observed:
        options.update(otlp_endpoint=config.otlp, enable_monitoring=True)
    with FlowService(**options) as fs:  # type: ignore[arg-type]
        workloads.register(fs, config.sizes)
        yield flowloom_runner(fs, config)


@contextmanager
def redis_workers(workers: int, config: Config, observed: bool = False) -> Iterator[Runner]:
    from flowloom import FlowService

    url = config.redis_url
    prefix = "flowloom-observed" if observed else "flowloom"  # both may share the db
    if observed:
        purge(url, prefix)
    else:
        flush(url)
    command = [
        sys.executable,
        "-m",
        "bench.worker",
        "--redis-url",
        url,
        "--chain-n",
        str(config.sizes.chain),
        "--prefix",
        prefix,
    ]
    if config.threads is not None:
        command += ["--threads", str(config.threads)]
    client: dict[str, object] = {"redis_prefix": prefix}
    if observed:
        command += ["--observe", config.otlp]
        client.update(otlp_endpoint=config.otlp, enable_monitoring=True)
    logs = config.logs / f"redis{'-observed' if observed else ''}-{workers}"
    with processes([command] * workers, logs, {}):
        fs = FlowService(redis_url=url, **client)  # type: ignore[arg-type]
        try:
            workloads.register(fs, config.sizes)
            yield flowloom_runner(fs, config)
        finally:
            fs.close()


@contextmanager
def celery_worker(workers: int, config: Config) -> Iterator[Runner]:
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
        for _ in range(STALL_RETRIES):
            try:
                return functions[workload](size, config.timeout)
            except celery_peer.Stalled as exc:
                config.stalls.append(f"celery {workers} worker(s) {workload}: {exc}")
                print(f"  celery: {exc}; run discarded and repeated", flush=True)
                celery_peer.release()
        raise RuntimeError(f"Celery's get() stalled {STALL_RETRIES} times in a row")

    with processes([command], config.logs / f"celery-{workers}", env):
        if not celery_peer.ping(60.0):
            raise RuntimeError("the Celery worker did not answer within 60 s")
        yield run


System = tuple[str, int | None]  # ("embedded" | "redis" | "celery", worker processes)


def session(system: System, config: Config) -> AbstractContextManager[Runner]:
    name, workers = system
    if name in ("embedded", "embedded-observed"):
        return embedded(config, observed=name == "embedded-observed")
    assert workers is not None
    if name in ("redis", "redis-observed"):
        return redis_workers(workers, config, observed=name == "redis-observed")
    return celery_worker(workers, config)


# -- measuring -------------------------------------------------------------------------------------
def measure_group(systems: list[System], config: Config) -> list[Row]:
    """Measure ``systems``: one after another, or, with ``config.interleave``, all
    started together and taking turns run by run, so that a change in the machine's
    load hits all of them alike."""
    rows: list[Row] = []
    if not config.interleave:
        for system in systems:
            with session(system, config) as runner:
                for workload in config.workloads:
                    rows.append(measure_one(system, runner, workload, config))
        return rows
    with ExitStack() as stack:
        runners = [(system, stack.enter_context(session(system, config))) for system in systems]
        for workload in config.workloads:
            size = config.size(workload)
            timings = []
            for _, runner in runners:
                runner(workload, size)  # warm-up
                timings.append(Timing(workload, size))
            for _ in range(config.runs):
                for (_, runner), timing in zip(runners, timings, strict=True):
                    timing.walls.append(runner(workload, size))
            for (system, _), timing in zip(runners, timings, strict=True):
                rows.append(report(Row(*system, timing)))
    return rows


def measure_one(system: System, runner: Runner, workload: str, config: Config) -> Row:
    size = config.size(workload)
    timing = workloads.measure(workload, size, lambda: runner(workload, size), config.runs)
    return report(Row(*system, timing))


def report(row: Row) -> Row:
    median, _, _ = row.timing.figures()
    print(f"  {row.where}  {row.timing.workload}: {median:,.4g} {row.timing.unit}", flush=True)
    return row


# -- processes and Redis ------------------------------------------------------------------------
def purge(url: str, prefix: str) -> None:
    """Delete the keys under ``prefix`` in the Redis db of ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


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
    order = {"embedded": 0, "embedded-observed": 1, "redis": 2, "redis-observed": 3, "celery": 4}
    for row in sorted(
        rows,
        key=lambda r: (WORKLOADS.index(r.timing.workload), r.workers or 0, order[r.system]),
    ):
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


def overhead(rows: list[Row]) -> list[str]:
    """Throughput observed / plain for each observed row, against its limit."""
    lines = []
    for row in rows:
        if not row.system.endswith("-observed"):
            continue
        plain_system = row.system.removesuffix("-observed")
        plain = [
            r
            for r in rows
            if r.system == plain_system
            and r.workers == row.workers
            and r.timing.workload == row.timing.workload
        ]
        if not plain:
            continue
        observed_figure, plain_figure = row.timing.figures()[0], plain[0].timing.figures()[0]
        ratio = (
            observed_figure / plain_figure
            if row.timing.higher_is_better
            else plain_figure / observed_figure
        )
        limit = OVERHEAD_LIMITS[plain_system]
        verdict = "met" if ratio >= 1 - limit else "MISSED"
        lines.append(
            f"observed/plain throughput, {plain[0].where} {row.timing.workload}: {ratio:.3f} "
            f"(at least {1 - limit:.2f} wanted: {verdict})"
        )
    return lines


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def to_json(rows: list[Row], config: Config, command: str) -> dict[str, object]:
    return {
        "command": command,
        "sizes": {w: config.size(w) for w in WORKLOADS},
        "runs": config.runs,
        "celery_stalls": config.stalls,
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
    parser.add_argument(
        "--observability",
        choices=("off", "on", "compare"),
        default="off",
        help="flowloom with tracing and metrics on; compare: both, taking turns (default: off)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="measure one system after another instead of taking turns run by run",
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
        interleave=not args.sequential,
    )
    names = ["embedded", "redis", "celery"] if args.backend == "all" else [args.backend]
    skipped: list[str] = []
    if "redis" in names and not redis_backend_exists():
        if args.backend == "redis":
            raise SystemExit("flowloom.backends.redis does not exist yet")
        names.remove("redis")
        skipped.append("redis (flowloom.backends.redis does not exist yet)")
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    sizes = config.sizes
    mode = "interleaved run by run" if config.interleave else "one system after another"
    print(
        f"{command}\nfanout N={sizes.fanout}, chain N={sizes.chain}, dags M={sizes.dags}; "
        f"1 warm-up + {config.runs} timed runs each, {mode}; load average {_load()}; "
        f"worker logs in {config.logs}",
        flush=True,
    )
    rows: list[Row] = []
    with _span_sink(config, args.observability):
        for i, workers in enumerate(worker_counts):
            group: list[System] = [("embedded", None)] if "embedded" in names and i == 0 else []
            group += [(name, workers) for name in names if name != "embedded"]
            rows += measure_group(_observed(group, args.observability), config)
    print()
    print(table(rows))
    for line in overhead(rows):
        print(line)
    dags = [r for r in rows if r.timing.workload == "dags"]
    for row in dags:
        print(f"dags on {row.where}: {row.timing.requests_per_s():,.0f} requests/s")
    if config.stalls:
        print(
            f"Celery's AsyncResult.get() missed a finished result {len(config.stalls)} time(s): "
            "those runs were discarded and repeated (see bench/celery_peer.py, Stalled)"
        )
    for what in skipped:
        print(f"skipped: {what}")
    print(f"load average at the end: {_load()}")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(rows, config, command), indent=2) + "\n")
    return 0


def _observed(group: list[System], observability: str) -> list[System]:
    if observability == "off":
        return group
    out: list[System] = []
    for name, workers in group:
        if name == "celery":
            out.append((name, workers))
            continue
        if observability == "compare":
            out.append((name, workers))
        out.append((f"{name}-observed", workers))
    return out


@contextmanager
def _span_sink(config: Config, observability: str) -> Iterator[None]:
    if observability == "off":
        yield
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config.otlp = f"http://127.0.0.1:{port}"
    with processes(
        [[sys.executable, "-m", "bench.otlp_sink", str(port)]], config.logs / "sink", {}
    ):
        yield


if __name__ == "__main__":
    sys.exit(main())
