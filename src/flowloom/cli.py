"""The ``flowloom`` command: run, draw, serve and work flows from a Python file or module."""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import IO

import click

from . import logs
from .apps import (
    STARTUP_CHECK,
    AppError,
    check_backend,
    check_port,
    load_app,
    load_service,
    use_backend,
)
from .backends import MemoryBackend
from .errors import FlowloomError, RequestFailed
from .graph import to_dot, to_mermaid
from .http.server import DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_LIMIT_CONCURRENCY
from .http.settings import DEFAULT_BODY_TIMEOUT
from .operate import (
    Seconds,
    commands,
    read_request,
    redis_url,
    request_options,
    wait_showing_progress,
)
from .processes import run_worker_processes
from .service import FlowService

__all__ = ["STARTUP_CHECK", "load_service", "main"]

log = logging.getLogger("flowloom.cli")


def _configured(
    app: str, redis_url: str | None, concurrency: int | None, port: int | None, host: str | None
) -> FlowService:
    """The app's service with the command line's settings: its own backend (whatever it
    is) unless ``--redis-url`` names another, and every other setting of its own."""
    service = load_service(app)
    if port is not None:
        service.port = port
    if host is not None:
        service.host = host
    if concurrency is not None:
        service.worker_concurrency = concurrency
    if redis_url is not None:
        service.redis_url = redis_url
        use_backend(service, service._make_backend())
    return service


def _monitor(service: FlowService, monitoring: bool | None, metrics_port: int | None) -> None:
    """Metrics on unless the app said otherwise: ``--monitoring/--no-monitoring`` when
    given, else the app's own ``enable_monitoring`` when it set one, else on."""
    if monitoring is not None:
        service.enable_monitoring = monitoring
    elif service.enable_monitoring is None:
        service.enable_monitoring = True
    if metrics_port is not None:
        service.metrics_port = metrics_port


_LOG_LEVEL = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Log from this level up, on stderr (debug: with the tracebacks of failures).",
)
_MONITORING = click.option(
    "--monitoring/--no-monitoring",
    default=None,
    help="Keep Prometheus metrics (needs the otel extra); serve also serves the dashboard. "
    "Default: the app's enable_monitoring if it sets it, else on.",
)
_METRICS_PORT = click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the metrics on this port too, without token (K processes: PORT..PORT+K-1).",
)


@click.group()
@click.version_option(package_name="flowloom")
def main() -> None:
    """flowloom: run workflows written as DAGs of Python functions."""


@main.command()
@click.argument("app")
@click.argument("flow")
@request_options
@click.option("--timeout", type=Seconds(), default=60.0, show_default=True, help="Seconds to wait.")
@click.option("--timings", is_flag=True, help="Also print each vertex's status and timings.")
def run(
    app: str,
    flow: str,
    data: str,
    data_file: IO[bytes] | None,
    query: tuple[str, ...],
    timeout: float,
    timings: bool,
) -> None:
    """Run one request of FLOW from APP on the embedded backend and print its result.

    The request runs here, in this process, whatever backend the app uses (a Redis
    the app names is not touched)."""
    loaded = load_app(app)
    loaded.check_flow(flow)
    service = loaded.service
    if not service.embedded:
        use_backend(service, MemoryBackend(retention=service.retention))
    request = read_request(data, data_file, query)
    with service:
        try:
            request_id = service.execute(flow, request)
        except FlowloomError as exc:  # a bad request, an unreachable backend
            raise AppError(str(exc)) from exc
        try:
            result = wait_showing_progress(service, flow, request_id, timeout)
        except FlowloomError as exc:
            if timings:
                _print_timings(service, flow, request_id)
            if isinstance(exc, RequestFailed) and exc.error and exc.error.traceback:
                click.echo(exc.error.traceback.rstrip("\n"), err=True)
            raise AppError(str(exc)) from exc
        click.echo(result.decode(errors="replace"))
        if timings:
            _print_timings(service, flow, request_id)


def _print_timings(service: FlowService, flow: str, request_id: str) -> None:
    state = service.state(flow, request_id)
    click.echo(f"request {request_id}: {state.status.value}", err=True)
    origin = state.created
    for vertex in sorted(state.vertices.values(), key=lambda v: (v.started or 0, v.address)):
        start = f"{((vertex.started or origin) - origin) * 1000:8.2f}ms"
        took = f"{((vertex.ended or vertex.started or 0) - (vertex.started or 0)) * 1000:8.2f}ms"
        error = f"  {vertex.error.type}: {vertex.error.message}" if vertex.error else ""
        click.echo(
            f"  {vertex.status.value:9} start {start} took {took}  {vertex.address}{error}",
            err=True,
        )


@main.command()
@click.argument("app")
@click.argument("flow")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot", "json"]),
    default="mermaid",
    show_default=True,
)
def graph(app: str, flow: str, fmt: str) -> None:
    """Print FLOW's definition as Mermaid, Graphviz DOT or JSON."""
    loaded = load_app(app)
    loaded.check_flow(flow)
    service = loaded.service
    definition = service.definition(flow)
    if fmt == "json":
        click.echo(json.dumps(definition, indent=2))
    else:
        click.echo(to_mermaid(definition) if fmt == "mermaid" else to_dot(definition), nl=False)
    service.close()


@main.command()
@click.argument("app")
def flows(app: str) -> None:
    """List the flows APP registers."""
    service = load_service(app)
    for name in service.flows():
        click.echo(name)
    service.close()


@main.command()
@click.argument("app")
@click.option("--host", default=None, help="Interface to bind (default: the service's, 127.0.0.1).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (default: the service's, 8080).",
)
@click.option(
    "--redis-url",
    default=None,
    callback=redis_url,
    help="Use this Redis instead of the app's backend.",
)
@click.option(
    "--worker/--no-worker",
    default=True,
    show_default=True,
    help="Also run a worker in this process.",
)
@_LOG_LEVEL
@click.option(
    "--limit-concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_LIMIT_CONCURRENCY,
    show_default=True,
    help="Open connections (or running calls) past which calls get 503.",
)
@click.option(
    "--keep-alive",
    type=click.IntRange(min=1),
    default=DEFAULT_KEEP_ALIVE,
    show_default=True,
    help="Seconds an idle connection stays open.",
)
@click.option(
    "--header-timeout",
    type=Seconds(positive=True),
    default=DEFAULT_HEADER_TIMEOUT,
    show_default=True,
    help="Seconds a client has to send a request's head before its connection is closed.",
)
@click.option(
    "--body-timeout",
    type=Seconds(positive=True),
    default=DEFAULT_BODY_TIMEOUT,
    show_default=True,
    help="Seconds a request's body may go without a byte arriving before it gets 408.",
)
@click.option(
    "--forwarded-allow-ips",
    default="",
    help="Comma-separated proxy addresses whose X-Forwarded-For is trusted (default: none).",
)
@_MONITORING
@_METRICS_PORT
def serve(
    app: str,
    host: str | None,
    port: int | None,
    redis_url: str | None,
    worker: bool,
    log_level: str,
    limit_concurrency: int,
    keep_alive: int,
    header_timeout: float,
    body_timeout: float,
    forwarded_allow_ips: str,
    monitoring: bool | None,
    metrics_port: int | None,
) -> None:
    """Serve APP's flows over HTTP (and run a worker unless --no-worker)."""
    service = _configured(app, redis_url, None, port, host)
    _monitor(service, monitoring, metrics_port)
    check_backend(service, wait=True)
    logs.configure(log_level.upper())  # after the check: its failure is one line, no log
    options = {
        "limit_concurrency": limit_concurrency,
        "keep_alive": keep_alive,
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "forwarded_allow_ips": [ip.strip() for ip in forwarded_allow_ips.split(",") if ip.strip()],
    }
    try:
        if service.port:  # taken, or not this machine's address: say so before starting
            check_port(service.host, service.port, "listen")
        log.info("flowloom: serving on http://%s", _listening(service.host, service.port))
        if worker:
            service.start(**options)
        else:
            service.start_server(**options)
    except FlowloomError as exc:
        raise AppError(str(exc)) from exc


def _listening(host: str, port: int) -> str:
    """``HOST:PORT``, and who can reach it: loopback only, or every interface."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return f"{where} (this machine only; --host 0.0.0.0 listens on every interface)"
    return f"{where}"


@main.command()
@click.argument("app")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Tasks run at once per process.",
)
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to fork (needs Redis); each runs --concurrency tasks.",
)
@click.option(
    "--redis-url",
    default=None,
    callback=redis_url,
    help="Use this Redis instead of the app's backend.",
)
@_LOG_LEVEL
@_MONITORING
@_METRICS_PORT
def worker(
    app: str,
    concurrency: int | None,
    processes: int,
    redis_url: str | None,
    log_level: str,
    monitoring: bool | None,
    metrics_port: int | None,
) -> None:
    """Run a worker for APP's flows until SIGINT/SIGTERM (SIGTERM lets running tasks
    finish, for 10 s at most)."""
    service = _configured(app, redis_url, concurrency, None, None)
    _monitor(service, monitoring, metrics_port)
    if service.embedded:
        service.close()
        raise AppError(
            f"{app} has no redis_url: its backend is embedded, and a worker in a process of "
            "its own would serve nobody; give the FlowService a redis_url (or a backend) or "
            "pass --redis-url (or run `flowloom serve`, which runs a worker beside the server)"
        )
    check_backend(service, wait=True)
    logs.configure(log_level.upper())  # after the check: its failure is one line, no log
    try:
        run_worker_processes(service, processes)
    except FlowloomError as exc:
        raise AppError(str(exc)) from exc


for _command in commands:
    main.add_command(_command)

if __name__ == "__main__":
    main()
