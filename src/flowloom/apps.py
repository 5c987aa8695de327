"""Loading an application for the command line: a Python file or module holding a
``FlowService``, or a ``flows`` dict of name -> define_workflow."""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import click

from .backends import Backend, MemoryBackend
from .errors import BackendRefused, FlowloomError
from .service import FlowService
from .worker import backend_name

__all__ = [
    "STARTUP_CHECK",
    "App",
    "AppError",
    "check_backend",
    "load_app",
    "load_service",
    "use_backend",
]

STARTUP_CHECK = 10.0  # seconds the command line waits for the backend to answer at start-up


class AppError(click.ClickException):
    """The application cannot be loaded or used as asked: one line, exit status 2."""

    exit_code = 2


@dataclass
class App:
    """A loaded application: its service, and the flows of its ``flows`` dict that could
    not be registered (name -> why), the others being usable."""

    source: str
    service: FlowService
    broken: dict[str, str] = field(default_factory=dict)

    def check_flow(self, flow: str) -> None:
        """``AppError`` unless ``flow`` is registered, saying why when it failed to load."""
        if flow in self.broken:
            raise AppError(f"{self.source}: {self.broken[flow]}")
        known = self.service.flows()
        if flow not in known:
            raise AppError(f"no flow {flow!r} (flows: {', '.join(known) or 'none'})")


def load_service(app: str) -> FlowService:
    """Load ``PATH.py`` or ``package.module``, optionally ``:attribute``, and find its
    ``FlowService`` (or a ``flows`` dict of name -> define_workflow, registered on a new one)."""
    return load_app(app).service


def load_app(app: str) -> App:
    """As ``load_service``, telling on stderr of each flow of a ``flows`` dict that does not
    load (the others are registered)."""
    target, _, attribute = app.partition(":") if not Path(app).exists() else (app, "", "")
    module = _load_module(target)
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, FlowService):
            raise AppError(f"{target}:{attribute} is not a FlowService")
        return App(target, found)
    services = [v for v in vars(module).values() if isinstance(v, FlowService)]
    if len(services) == 1:
        return App(target, services[0])
    if len(services) > 1:
        raise AppError(f"{target} holds several FlowService objects: name one as {target}:NAME")
    flows = getattr(module, "flows", None)
    if not isinstance(flows, dict) or not flows:
        raise AppError(f"{target} defines no FlowService and no `flows` dict")
    loaded = App(target, FlowService())
    for name, define in flows.items():
        try:
            loaded.service.register(name, define)
        except FlowloomError as exc:
            loaded.broken[str(name)] = str(exc)
            click.echo(f"flowloom: {target}: not loaded: {exc}", err=True)
    return loaded


def _load_module(target: str) -> ModuleType:
    try:
        return _import(target)
    except AppError:
        raise
    except FlowloomError as exc:
        where = _where(target, exc)
        raise AppError(f"{target}{' at ' + where if where else ''}: {exc}") from exc
    except Exception as exc:
        where = _where(target, exc)
        raise AppError(
            f"could not load {target}{' at ' + where if where else ''}: {type(exc).__name__}: {exc}"
        ) from exc


def _where(target: str, exc: BaseException) -> str:
    """``file:line`` of the app's own code where ``exc`` was raised (or a syntax error is)."""
    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}"
    name = Path(target).name if target.endswith(".py") else target.replace(".", os.sep)
    frames = traceback.extract_tb(exc.__traceback__)
    return next((f"{f.filename}:{f.lineno}" for f in reversed(frames) if name in f.filename), "")


def _import(app: str) -> ModuleType:
    path = Path(app)
    if app.endswith(".py") or path.exists():
        if not path.is_file():
            raise AppError(f"no such file: {app}")
        spec = importlib.util.spec_from_file_location(f"flowloom_app_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise AppError(f"cannot load {app} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # as `python -m` does: the current directory first
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(app)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (app == exc.name or app.startswith(exc.name + ".")):
            raise AppError(
                f"no module or file {app!r} (looked in {os.getcwd()} and on the import path)"
            ) from exc
        raise


def use_backend(service: FlowService, backend: Backend) -> None:
    """Give ``service`` (which has started nothing yet) ``backend`` instead of its own."""
    previous, service.backend = service.backend, backend
    service.embedded = isinstance(backend, MemoryBackend)
    previous.close()


def check_port(host: str, port: int, what: str) -> None:
    """``FlowloomError`` (``cannot WHAT on HOST:PORT: why``) unless ``host:port`` can be
    listened on now: a port taken, or a host that is not this machine's, is told before
    anything starts."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # a name that resolves
        with socket.create_server((host, port)):
            pass
    except OSError as exc:  # the errno's own words: the message names the address again
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        raise FlowloomError(f"cannot {what} on {host}:{port}: {reason or exc}") from exc


def check_backend(service: FlowService, wait: bool = False) -> None:
    """``AppError`` (exit status 2, one line) unless the backend answers within
    ``STARTUP_CHECK`` seconds. ``wait`` (a worker's or server's start): a backend not
    reachable yet (Redis still starting beside the worker, as containers started
    together do) is tried again every half second meanwhile, said once on stderr; one
    that refuses what flowloom needs (``BackendRefused``) is not waited for. Else (a
    command run by hand) the first failure is the answer."""
    where = backend_name(service.backend)
    deadline = time.monotonic() + STARTUP_CHECK
    told = False
    while True:
        error = _ping(service, deadline - time.monotonic())
        if error is None:
            return
        if isinstance(error, _NoAnswer):
            raise AppError(f"the backend at {where} did not answer within {STARTUP_CHECK:g}s")
        if (
            not wait
            or isinstance(error, BackendRefused)
            or time.monotonic() + RETRY_EVERY >= deadline
        ):
            break
        if not told:  # before logging is configured: the check's lines are its own
            told = True
            click.echo(
                f"flowloom: the backend at {where} does not answer yet ({_one_line(error)}); "
                f"trying again for up to {STARTUP_CHECK:g}s",
                err=True,
            )
        time.sleep(RETRY_EVERY)
    if isinstance(error, FlowloomError):
        raise AppError(_one_line(error))
    cause = f"{type(error).__name__}: {_one_line(error)}"
    raise AppError(f"cannot reach the backend at {where}: {cause}")


RETRY_EVERY = 0.5  # seconds between the start-up check's attempts


class _NoAnswer(Exception):
    """The backend's ping did not return in time (it hangs)."""


def _ping(service: FlowService, timeout: float) -> BaseException | None:
    """Ping the backend on a thread of its own, waiting up to ``timeout`` seconds: the
    error it raised, ``_NoAnswer()`` if it did not return, or None."""
    answer: list[BaseException | None] = []

    def ping() -> None:
        try:
            service.backend.ping()
        except Exception as exc:
            answer.append(exc)
        else:
            answer.append(None)

    thread = threading.Thread(target=ping, name="flowloom-startup-check", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    return answer[0] if answer else _NoAnswer()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line, whatever the cause says
