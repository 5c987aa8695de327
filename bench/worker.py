"""A flowloom worker process for the Redis figures: ``python -m bench.worker --redis-url URL``.

Registers the benchmark flows (the chain with ``--chain-n`` nodes) and runs
``FlowService.start_worker()`` until SIGTERM or SIGINT. ``bench.run`` starts and
stops these processes itself.
"""

from __future__ import annotations

import argparse

from flowloom import FlowService

from .workloads import Sizes, register


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--chain-n", type=int, default=Sizes.chain)
    parser.add_argument("--threads", type=int, default=None, help="worker_concurrency")
    parser.add_argument("--prefix", default="flowloom", help="the Redis key prefix")
    parser.add_argument(
        "--observe", metavar="OTLP_URL", default=None, help="trace to OTLP_URL, keep metrics"
    )
    args = parser.parse_args(argv)
    options: dict[str, object] = (
        {} if args.threads is None else {"worker_concurrency": args.threads}
    )
    if args.observe:
        options.update(otlp_endpoint=args.observe, enable_monitoring=True)
    fs = FlowService(redis_url=args.redis_url, redis_prefix=args.prefix, **options)  # type: ignore[arg-type]
    register(fs, Sizes(chain=args.chain_n))
    fs.start_worker()


if __name__ == "__main__":
    main()
