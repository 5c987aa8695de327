"""The command line's commands for a running system: submit, list, inspect, control and
retry requests, and list the workers, on Redis (``--redis-url``) or an app's own backend.

Exit status: 0 done; 1 the command was understood but failed (no such request, a
request that failed or cannot be paused any more); 2 a usage error, an app that does
not load, or a backend that does not answer."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import click
from redis.connection import parse_url
from rich.console import Console
from rich.live import Live
from rich.text import Text

from .apps import AppError, check_backend, load_app, use_backend
from .console import (
    bytes_json,
    inspect_view,
    progress_line,
    request_row_json,
    requests_table,
    workers_table,
)
from .errors import BackendUnavailable, FlowloomError, RequestFailed, ResultTimeout
from .progress import foreach_paths
from .service import FlowService
from .types import Request, Status

__all__ = [
    "Seconds", "commands", "read_request", "redis_url", "request_options", "wait_showing_progress",
]  # fmt: skip

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
PROGRESS_EVERY = 0.5  # seconds between two looks at a request's state for its progress line


if TYPE_CHECKING:  # generic for type checkers (and at run time from click 8.2 on)
    _FloatType = click.ParamType[float]
else:
    _FloatType = click.ParamType


class Seconds(_FloatType):
    """A number of seconds on the command line: 0 or more (``inf`` for ever), more than
    0 if ``positive``; NaN and words are usage errors, not tracebacks."""

    name = "seconds"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!s:.40} is not a number of seconds", param, ctx)
        if seconds != seconds:
            self.fail("NaN is not a number of seconds", param, ctx)
        if seconds < 0 or (self.positive and seconds == 0):
            self.fail(
                f"{value:.40} must be {'more than' if self.positive else 'at least'} 0", param, ctx
            )
        return seconds


def redis_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--redis-url``'s check: a URL redis-py takes, else a usage error (which does not
    repeat the URL: it may hold a password)."""
    if value is not None:
        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise click.BadParameter(f"not a Redis URL: {exc}") from None
    return value


class Failed(click.ClickException):
    """The command failed (one line, exit status 1)."""

    exit_code = 1


def _connection(command: F) -> F:
    command = click.option(
        "--app",
        "app",
        default=None,
        help="Use this app's backend (a file or module, as for `run`).",
    )(command)
    command = click.option(
        "--redis-prefix",
        default="flowloom",
        show_default=True,
        envvar="FLOWLOOM_REDIS_PREFIX",
        help="The prefix of every Redis key (with --redis-url).",
    )(command)
    command = click.option(
        "--redis-url",
        default=None,
        envvar="FLOWLOOM_REDIS_URL",
        callback=redis_url,
        help="The Redis of the running system (else FLOWLOOM_REDIS_URL, or --app's backend).",
    )(command)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")(command)


def _client(
    app: str | None, redis_url: str | None, redis_prefix: str, loaded: FlowService | None = None
) -> FlowService:
    """A service on the running system's backend, checked to answer; it runs no worker.
    ``loaded``: the app's service, when it is loaded already."""
    if app is not None:
        service = loaded or load_app(app).service
        if redis_url is not None:
            service.redis_url, service.redis_prefix = redis_url, redis_prefix
            use_backend(service, service._make_backend())
    elif redis_url is not None:
        service = FlowService(redis_url=redis_url, redis_prefix=redis_prefix)
    else:
        raise AppError("give --redis-url (or FLOWLOOM_REDIS_URL) or --app APP")
    if service.embedded:
        service.close()
        raise AppError(
            f"{app}'s backend is embedded (no redis_url): there is no running system to reach; "
            "pass --redis-url, or use `flowloom run`"
        )
    try:
        check_backend(service)
    except AppError:
        service.close()
        raise
    return service


def _ask(
    app: str | None, redis_url: str | None, redis_prefix: str, ask: Callable[[FlowService], T]
) -> T:
    """``ask(service)`` of a client service (see ``_client``), closed after; a flowloom
    error ends the command with its message."""
    with _client(app, redis_url, redis_prefix) as service:
        try:
            return ask(service)
        except FlowloomError as exc:
            raise _fail(exc) from exc


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def _console() -> Console:
    """The terminal's width when stdout is one; else wide enough that no row wraps (a row is
    a line for ``grep`` and ``awk``), and no colours."""
    wide = None if sys.stdout.isatty() else 100_000
    return Console(highlight=False, width=wide)


def request_options(command: F) -> F:
    """``--data``, ``--data-file`` and ``-q KEY=VALUE``: a request's body and query (read
    them with ``read_request``)."""
    for option in reversed(
        (
            click.option("--data", "-d", default="", help="The request body (text)."),
            click.option(
                "--data-file",
                type=click.File("rb"),
                help="Read the request body from a file ('-': stdin).",
            ),
            click.option(
                "--query",
                "-q",
                multiple=True,
                metavar="KEY=VALUE",
                help="A handler option; repeatable.",
            ),
        )
    ):
        command = option(command)
    return command


def read_request(data: str, data_file: IO[bytes] | None, query: tuple[str, ...]) -> Request:
    """The request of ``--data``/``--data-file`` and ``-q KEY=VALUE`` options."""
    body = data_file.read() if data_file is not None else data.encode()
    options: dict[str, list[str]] = {}
    for item in query:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--query")
        options.setdefault(key, []).append(value)
    return Request(body=body, query=options)


def wait_showing_progress(
    service: FlowService, flow: str, request_id: str, timeout: float
) -> bytes:
    """``service.result(...)``, showing a live progress line (vertices done, foreach items
    done) while it waits when stdout is a terminal; plain waiting when it is not."""
    if not sys.stdout.isatty():
        return service.result(flow, request_id, timeout=timeout)
    foreach = foreach_paths(service.definition(flow)) if flow in service.flows() else frozenset()
    until = time.monotonic() + timeout
    console = _console()
    with Live("", console=console, transient=True, refresh_per_second=4) as live:
        while True:
            left = until - time.monotonic()
            try:
                return service.result(flow, request_id, timeout=max(0.0, min(PROGRESS_EVERY, left)))
            except ResultTimeout:
                if left <= PROGRESS_EVERY:
                    raise ResultTimeout(request_id, timeout) from None
            state = service.state(flow, request_id)
            line = f"{request_id} {progress_line(state, foreach)}"
            live.update(Text(line, no_wrap=True, overflow="ellipsis"))


def _fail(exc: FlowloomError) -> click.ClickException:
    message = " ".join(str(exc).split())
    if isinstance(exc, BackendUnavailable):
        return AppError(message)
    return Failed(message)


@click.command()
@click.argument("app")
@click.argument("flow")
@request_options
@click.option("--request-id", default=None, help="The request's id (default: a random one).")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=Seconds(), default=60.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--redis-url",
    default=None,
    envvar="FLOWLOOM_REDIS_URL",
    callback=redis_url,
    help="Use this Redis instead of the app's backend.",
)
@click.option("--redis-prefix", default=None, help="With --redis-url: the key prefix.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
def submit(
    app: str,
    flow: str,
    data: str,
    data_file: IO[bytes] | None,
    query: tuple[str, ...],
    request_id: str | None,
    wait: bool,
    timeout: float,
    redis_url: str | None,
    redis_prefix: str | None,
    as_json: bool,
) -> None:
    """Execute a request of FLOW on APP's backend (or --redis-url) for its workers to run;
    print its id, or with --wait its result."""
    loaded = load_app(app)
    loaded.check_flow(flow)
    request = read_request(data, data_file, query)
    prefix = redis_prefix or loaded.service.redis_prefix
    with _client(app, redis_url, prefix, loaded.service) as service:
        try:
            request_id = service.execute(
                flow, Request(body=request.body, request_id=request_id, query=request.query)
            )
        except FlowloomError as exc:
            raise _fail(exc) from exc
        if not wait:
            if as_json:
                _echo_json({"request_id": request_id, "flow": flow, "status": "queued"})
            else:
                click.echo(request_id)
            return
        try:
            result = wait_showing_progress(service, flow, request_id, timeout)
        except FlowloomError as exc:
            if as_json:
                _echo_json(service.state(flow, request_id).to_json())
            elif isinstance(exc, RequestFailed) and exc.error and exc.error.traceback:
                click.echo(exc.error.traceback.rstrip("\n"), err=True)
            raise _fail(exc) from exc
        if as_json:
            _echo_json(
                {"request_id": request_id, "flow": flow, "status": "completed"}
                | bytes_json("result", result)
            )
        else:
            click.echo(result.decode(errors="replace"))


@click.command()
@click.argument("flow", required=False)
@click.option(
    "--status", type=click.Choice([s.value for s in Status]), default=None, help="Only these."
)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@_connection
def requests(
    flow: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
    redis_url: str | None,
    redis_prefix: str,
    app: str | None,
) -> None:
    """List requests, newest first (of FLOW if given)."""
    wanted = Status(status) if status else None
    states = _ask(app, redis_url, redis_prefix, lambda s: s.requests(flow, wanted, 0, limit))
    if as_json:
        _echo_json({"requests": [request_row_json(s) for s in states]})
    elif states:
        _console().print(requests_table(states))
    else:
        click.echo("no requests")


@click.command()
@click.argument("flow")
@click.argument("request_id")
@_connection
def inspect(
    flow: str,
    request_id: str,
    as_json: bool,
    redis_url: str | None,
    redis_prefix: str,
    app: str | None,
) -> None:
    """Show a request: status, timings, each vertex instance, error and traceback."""
    state = _ask(app, redis_url, redis_prefix, lambda s: s.state(flow, request_id))
    if as_json:
        _echo_json(state.to_json())
    else:
        _console().print(inspect_view(state))


@click.command()
@click.argument("flow")
@click.argument("request_id")
@click.argument("vertex")
@_connection
def output(
    flow: str,
    request_id: str,
    vertex: str,
    as_json: bool,
    redis_url: str | None,
    redis_prefix: str,
    app: str | None,
) -> None:
    """Print the output of one vertex instance (by its address, as `inspect` lists them)."""
    data = _ask(app, redis_url, redis_prefix, lambda s: s.output(flow, request_id, vertex))
    if as_json:
        _echo_json({"request_id": request_id, "vertex": vertex} | bytes_json("output", data))
    else:
        click.echo(data, nl=False)  # bytes go out as they are


def _control(action: str, help_text: str) -> click.Command:
    @click.command(name=action, help=help_text)
    @click.argument("flow")
    @click.argument("request_id")
    @_connection
    def command(
        flow: str,
        request_id: str,
        as_json: bool,
        redis_url: str | None,
        redis_prefix: str,
        app: str | None,
    ) -> None:
        def act(service: FlowService) -> Status:
            return cast(Status, getattr(service, action)(flow, request_id))

        status = _ask(app, redis_url, redis_prefix, act)
        if as_json:
            _echo_json({"request_id": request_id, "flow": flow, "status": status.value})
        else:
            click.echo(f"{request_id}: {status.value}")

    return command


@click.command()
@_connection
def workers(as_json: bool, redis_url: str | None, redis_prefix: str, app: str | None) -> None:
    """List the live workers: name, host, pid, concurrency, flows and versions."""
    found = _ask(app, redis_url, redis_prefix, FlowService.workers)
    if as_json:
        _echo_json({"workers": found})
    elif found:
        _console().print(workers_table(found))
    else:
        click.echo("no live workers")


commands: list[click.Command] = [
    submit,
    requests,
    inspect,
    output,
    _control("pause", "Hold a request once its running tasks finish."),
    _control("resume", "Continue a paused request."),
    _control("stop", "End a request: nothing more of it runs."),
    _control(
        "retry",
        "Run a failed or stopped request again from where it ended: completed vertices "
        "keep their outputs, the others run again.",
    ),
    workers,
]
