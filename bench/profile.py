"""Where the embedded backend's time goes: ``python -m bench.profile [--workload fanout]``.

Runs one workload in a loop on ``FlowService()`` in a child process for
``--seconds`` under ``py-spy record --gil`` (only the thread holding the GIL is
sampled, so the samples add up to the Python work done, whichever thread did it),
then prints, per workload:

- the phases of a task (claim, begin, the step's own code, the engine's transition,
  complete, the client's execute/result...) in microseconds per task and in share;
- the hottest lines (self time) in flowloom's own code, as file:line.

Microseconds per task are samples / rate / tasks run while sampled. py-spy must be
installed (``pip install py-spy``); it needs ptrace rights (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .workloads import WORKLOADS, Sizes

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent

# The first of these met walking a stack from its root names the phase of a sample.
PHASES = {
    "MemoryBackend.claim": "worker: claim (queue, condition wait/notify)",
    "MemoryBackend.begin": "worker: begin (mark running)",
    "run_step": "worker: run_step (inputs, user code, foreach/aggregate)",
    "after_output": "engine: after_output (deliveries)",
    "after_split": "engine: after_split (deliveries per branch)",
    "MemoryBackend.complete": "worker: complete (apply deliveries, queue tasks)",
    "FlowService.execute": "client: execute (record, engine.start, submit)",
    "FlowService.result": "client: result (wait, read)",
}
OUTER = {
    "Worker._loop": "worker: other (registry, context, options, dispatch)",
    "<module>": "client: other (bench loop, result checks)",
}
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def loop(workload: str, seconds: float, threads: int | None, sizes: Sizes) -> None:
    """The profiled child: run ``workload`` until ``seconds`` are up; report tasks run."""
    from flowloom import FlowService

    from . import workloads

    run = {"fanout": workloads.run_fanout, "chain": workloads.run_chain, "dags": workloads.run_dags}
    size = int(getattr(sizes, workload))
    options = {} if threads is None else {"worker_concurrency": threads}
    with FlowService(**options) as fs:  # type: ignore[arg-type]
        workloads.register(fs, sizes)
        run[workload](fs, size, 60.0)
        runs, wall, end = 0, 0.0, time.monotonic() + seconds
        while time.monotonic() < end:
            wall += run[workload](fs, size, 60.0)
            runs += 1
    tasks = runs * workloads.Timing(workload, size).tasks
    print(f"RESULT runs={runs} tasks={tasks} wall={wall:.6f}", flush=True)


def profile(workload: str, args: argparse.Namespace) -> str:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="flowloom-profile-") as tmp:
        raw = Path(tmp) / f"{workload}.txt"
        child = [sys.executable, "-m", "bench.profile", "--child", workload]
        child += ["--seconds", str(args.seconds), *_size_args(args)]
        if args.threads is not None:
            child += ["--threads", str(args.threads)]
        command = [pyspy, "record", "--gil", "--nonblocking", "-r", str(args.rate)]
        command += ["-f", "raw", "-o", str(raw), "--", *child]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        found = re.search(r"RESULT runs=(\d+) tasks=(\d+) wall=([\d.]+)", done.stdout)
        if found is None:
            raise SystemExit(f"the profiled run printed no result:\n{done.stdout}\n{done.stderr}")
        runs, tasks, wall = int(found[1]), int(found[2]), float(found[3])
        return report(workload, raw.read_text(), runs, tasks, wall, args)


def report(
    workload: str, raw: str, runs: int, tasks: int, wall: float, args: argparse.Namespace
) -> str:
    phases: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    for entry in raw.splitlines():
        stack, _, count = entry.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [FRAME.match(f) for f in stack.split(";")]
        names = [m["function"] if m else "?" for m in frames]
        n = int(count)
        total += n
        phases[_phase(names)] += n
        leaf = frames[-1]
        if leaf and "flowloom" in leaf["file"] and "bench" not in leaf["file"]:
            lines[f"{_short(leaf['file'])}:{leaf['line']} {leaf['function']}"] += n
    per_task = 1e6 / args.rate / max(tasks, 1)
    out = [
        f"== {workload}: {runs} runs, {tasks} tasks in {wall:.2f} s while sampled "
        f"({wall / max(tasks, 1) * 1e6:.1f} us of wall per task; "
        f"{total / args.rate / max(tasks, 1) * 1e6:.1f} us of GIL-held time per task)",
        f"{'us/task':>8} {'share':>6}  phase",
    ]
    for phase, n in phases.most_common():
        out.append(f"{n * per_task:8.2f} {100 * n / total:5.1f}%  {phase}")
    out.append(f"{'us/task':>8} {'share':>6}  hottest lines in flowloom (self time)")
    for line, n in lines.most_common(args.top):
        out.append(f"{n * per_task:8.2f} {100 * n / total:5.1f}%  {line}")
    return "\n".join(out)


def _phase(names: list[str]) -> str:
    for name in names:
        if name in PHASES:
            return PHASES[name]
    for name in names:
        if name in OUTER:
            return OUTER[name]
    return "other (start-up, imports, threads)"


def _short(path: str) -> str:
    marker = f"flowloom{os.sep}"
    return path[path.index(marker) :] if marker in path else path


def _size_args(args: argparse.Namespace) -> list[str]:
    return [
        "--fanout-n",
        str(args.fanout_n),
        "--chain-n",
        str(args.chain_n),
        "--dags-m",
        str(args.dags_m),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="how long to sample each workload"
    )
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument(
        "--threads", type=int, default=None, help="worker_concurrency (default: FlowService's)"
    )
    parser.add_argument("--top", type=int, default=15, help="how many hot lines to show")
    parser.add_argument("--fanout-n", type=int, default=Sizes.fanout)
    parser.add_argument("--chain-n", type=int, default=Sizes.chain)
    parser.add_argument("--dags-m", type=int, default=Sizes.dags)
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = Sizes(fanout=args.fanout_n, chain=args.chain_n, dags=args.dags_m)
    if args.child:
        loop(args.child, args.seconds, args.threads, sizes)
        return 0
    chosen = WORKLOADS if args.workload == "all" else (args.workload,)
    for workload in chosen:
        print(profile(workload, args), flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
