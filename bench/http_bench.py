"""HTTP workload: many concurrent ``POST /flow/myflow`` against a server on loopback.

    python bench/http_bench.py                       # embedded backend
    python bench/http_bench.py --backend redis       # Redis (db 9, a prefix of its own)
    python bench/http_bench.py --backend all --requests 5000 --concurrency 64

The server is a separate process (``flowloom.http.serve`` with a worker in it, as
``flowloom serve`` runs it; access log off) serving GoFlow's one-node ``myflow``.
The load generator is this process: ``--concurrency`` keep-alive connections
sending sync ``POST /flow/myflow`` calls, each answer checked (status 200 and the
flow's result), so a fast wrong answer never counts: with ``wrk`` (Debian package
``wrk``; ``--client wrk``, the default when it is installed: 2 threads, a Lua check of
every answer, each run ``--seconds`` long) or with httpx (``--client httpx``: each run
bounded by ``--requests`` and ``--max-seconds``; the Python client needs much more
CPU than wrk and, on 2 cores, caps the figure well below the server's).
``--pad N`` first writes N finished requests' worth of retained keys (Redis; deleted
after), to see whether state that grows over runs slows them. One warm-up run, then
``--runs`` timed runs. Prints requests/s (median, min, max
over the runs), the p50/p99 latency of the median run, and the server process's CPU
time per request (user + system, over all the runs: a figure that a busy machine
disturbs much less than the rates). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

SERVER = """
import sys
from flowloom import FlowService
from flowloom.http import serve

port, redis_url, prefix, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if redis_url:
    from flowloom.backends.redis import RedisBackend
    backend = RedisBackend(redis_url, prefix=prefix)
    fs = FlowService(redis_url=redis_url, backend=backend, worker_concurrency=concurrency)
else:
    fs = FlowService(worker_concurrency=concurrency)
fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: b'you said "%s"' % d))
fs._ensure_worker()
try:
    serve(fs, host="127.0.0.1", port=int(port), access_log=False, log_level="warning")
finally:
    fs.close()
    if redis_url:
        backend.purge()
"""


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = "hallo"
wrong = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status ~= 200 or body ~= 'you said "hallo"' then wrong = wrong + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("wrong") end
  io.write(string.format("wrong answers: %d\\n", total))
  io.write(string.format("p50 us: %d\\n", latency:percentile(50)))
  io.write(string.format("p99 us: %d\\n", latency:percentile(99)))
end
"""


@dataclass
class Run:
    requests: int
    seconds: float
    errors: int
    latencies: list[float] = field(default_factory=list)
    p50_p99: tuple[float, float] | None = None  # ms, when the client measured them itself
    cpu: float = 0.0  # seconds of the server's CPU time during the run

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        if self.p50_p99 is not None:
            return self.p50_p99[0 if p == 50 else 1]
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, run: Callable[[], Run]) -> Run:
    before = cpu_seconds(pid)
    result = run()
    result.cpu = cpu_seconds(pid) - before
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(
    backend: str, redis_url: str, concurrency: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    prefix = f"flowloom-bench-http-{uuid.uuid4().hex[:8]}"
    url = redis_url if backend == "redis" else ""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), url, prefix, str(concurrency)],
        env={k: v for k, v in os.environ.items() if k != "FLOWLOOM_TOKEN"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the server did not start")


async def load(base: str, total: int, concurrency: int, max_seconds: float) -> Run:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + max_seconds

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def caller() -> None:
            nonlocal sent, errors
            while sent < total and time.monotonic() < deadline:
                sent += 1
                body = b"%d" % sent
                started = time.perf_counter()
                response = await client.post("/flow/myflow", content=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200 or response.content != b'you said "%s"' % body:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run(len(latencies), seconds, errors, latencies)


def wrk(base: str, concurrency: int, seconds: float) -> Run:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{concurrency}",
                f"-d{seconds:g}s",
                "-s",
                script.name,
                base + "/flow/myflow",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout

    def number(pattern: str) -> float:
        found = re.search(pattern, out)
        if found is None:
            raise SystemExit(f"unexpected wrk output:\n{out}")
        return float(found.group(1))

    total = int(number(r"(\d+) requests in"))
    wrong = int(number(r"wrong answers: (\d+)")) + int(
        re.search(r"Non-2xx or 3xx responses: (\d+)", out).group(1)  # type: ignore[union-attr]
        if "Non-2xx" in out
        else 0
    )
    p50, p99 = number(r"p50 us: (\d+)") / 1000, number(r"p99 us: (\d+)") / 1000
    return Run(total, number(r"requests in ([\d.]+)s"), wrong, p50_p99=(p50, p99))


def pad(redis_url: str, count: int) -> Callable[[], None]:
    """``count`` finished requests' worth of retained state in Redis (a hash with a TTL
    each, and a listing of a third of them), under a prefix of its own: does state that
    grows over runs (24 h of retention) slow them? Returns what deletes it again."""
    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = f"flowloom-bench-pad-{uuid.uuid4().hex[:8]}"
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        key = f"{prefix}:r:{{{n}}}"
        pipe.hset(key, mapping={"flow": "myflow", "status": "completed", "result": "x" * 16})
        pipe.pexpire(key, 86_400_000)
        if n % 3 == 0:
            pipe.zadd(f"{prefix}:requests", {str(n): n})
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()

    def unpad() -> None:
        batch = []
        for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
            batch.append(key)
            if len(batch) >= 5000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
        client.close()

    return unpad


def bench(backend: str, args: argparse.Namespace) -> None:
    unpad = pad(args.redis_url, args.pad) if backend == "redis" and args.pad else None
    process, base = start_server(backend, args.redis_url, args.worker_concurrency)
    try:
        if args.client == "wrk":
            wrk(base, args.concurrency, 1)
            runs = [
                measured(process.pid, lambda: wrk(base, args.concurrency, args.seconds))
                for _ in range(args.runs)
            ]
        else:
            asyncio.run(load(base, min(args.requests, 500), args.concurrency, args.max_seconds))
            runs = [
                measured(
                    process.pid,
                    lambda: asyncio.run(
                        load(base, args.requests, args.concurrency, args.max_seconds)
                    ),
                )
                for _ in range(args.runs)
            ]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if unpad is not None:
            unpad()
    errors = sum(r.errors for r in runs)
    rates = sorted(r.rate for r in runs)
    median = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
    print(
        f"{backend:<9} {statistics.median(rates):>7.0f} req/s"
        f" (min {rates[0]:.0f}, max {rates[-1]:.0f})"
        f"  p50 {median.percentile(50):6.2f} ms  p99 {median.percentile(99):6.2f} ms"
        f"  cpu {1e6 * sum(r.cpu for r in runs) / sum(r.requests for r in runs):4.0f} us/req"
        f"  [{median.requests} requests, {args.concurrency} connections,"
        f" {args.client}, {errors} wrong]"
    )
    if errors:
        raise SystemExit(f"{errors} wrong answers on {backend}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["embedded", "redis", "all"], default="embedded")
    parser.add_argument(
        "--client", choices=["wrk", "httpx"], default="wrk" if shutil.which("wrk") else "httpx"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run (default 5)")
    parser.add_argument("--requests", type=int, default=3000, help="per httpx run")
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (default 3)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per run (default 30)")
    parser.add_argument("--worker-concurrency", type=int, default=5, help="worker threads")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument(
        "--pad", type=int, default=0, help="retained requests' keys written first (Redis)"
    )
    args = parser.parse_args()
    if not (1 <= args.concurrency <= 1024 and 1 <= args.requests <= 10**6 and 1 <= args.runs <= 20):
        parser.error("concurrency 1-1024, requests 1-1000000, runs 1-20")
    if not 0 < args.seconds <= 60:
        parser.error("seconds: 0-60")
    print(f"POST /flow/myflow, {os.cpu_count()} cores, server and client on loopback")
    if args.client == "wrk" and args.concurrency < 2:
        parser.error("wrk needs --concurrency >= 2 (2 threads)")
    for backend in ["embedded", "redis"] if args.backend == "all" else [args.backend]:
        bench(backend, args)


if __name__ == "__main__":
    main()
