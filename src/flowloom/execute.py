"""Running the user code of one step: handlers, aggregators, conditions, foreach, forwarders.

No queue and no state here: a step's inputs go in, its output (or its chosen
branches) comes out, and a ``StepError`` says what the user's code did wrong.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from .engine import unescape_key
from .errors import StepError
from .observe import CallSpan
from .plan import PASSTHROUGH, Step, StepKind
from .types import Options

__all__ = ["Caller", "NodeFailed", "Outcome", "StepError", "run_step", "to_bytes"]


class NodeFailed(Exception):
    """A node's handlers failed on ``data`` (the node's input); ``__cause__`` says why."""

    def __init__(self, data: bytes) -> None:
        super().__init__("node failed")
        self.data = data


@dataclass(frozen=True, slots=True)
class Outcome:
    output: bytes  # a node's or join's output; a split's own input (passed to its join)
    branches: tuple[tuple[str, bytes], ...] | None = None  # a split's chosen branches


def to_bytes(value: object, what: str) -> bytes:
    """A handler's return value as bytes: ``str`` is encoded as UTF-8, ``None`` is ``b""``."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if value is None:
        return b""
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise StepError(f"{what} returned {type(value).__name__}, expected bytes, str or None")


class Caller:
    """Calls user functions from a worker thread; ``async def`` ones run on a loop kept
    per thread. ``around(kind, fn)``, when given, wraps each call (a tracing span)."""

    def __init__(self, around: CallSpan | None = None) -> None:
        self._local = threading.local()
        self.around = around

    def __call__(self, fn: Callable[..., Any], *args: Any, kind: str = "") -> Any:
        """Call ``fn(*args)``; ``kind`` names the call for ``around`` ("": not wrapped)."""
        if self.around is None or not kind:
            return self._call(fn, args)
        with self.around(kind, fn):
            return self._call(fn, args)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            runner = getattr(self._local, "runner", None)
            if runner is None:
                runner = self._local.runner = asyncio.Runner()
            return runner.run(_awaited(result), context=contextvars.copy_context())
        return result

    def close(self) -> None:
        runner = getattr(self._local, "runner", None)
        if runner is not None:
            runner.close()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def run_step(
    step: Step, inputs: Mapping[str, bytes | None], options: Options, call: Caller
) -> Outcome:
    if step.kind is StepKind.JOIN:
        return Outcome(_join(step, inputs, call))
    data = _input(step, inputs, call)
    if step.kind is StepKind.SPLIT:
        return Outcome(data, _split(step, data, call))
    try:
        if step.timeout is None:
            return Outcome(_pipe(step, data, options, call))
        return Outcome(
            _with_timeout(lambda: _pipe_alone(step, data, options, call.around), step.timeout)
        )
    except Exception as exc:
        raise NodeFailed(data) from exc


def _input(step: Step, inputs: Mapping[str, bytes | None], call: Caller) -> bytes:
    received: dict[str, bytes] = {}
    for slot in step.data_slots:
        data = inputs.get(slot)
        if data is None:
            raise StepError(f"input {slot!r} is missing")
        forwarder = step.forwarders.get(slot)
        if forwarder is not None:
            data = to_bytes(call(forwarder, data, kind="forwarder"), f"forwarder of edge {slot!r}")
        received[slot] = data
    if step.aggregator is not None:
        return to_bytes(call(step.aggregator, received, kind="aggregator"), "aggregator")
    if len(received) == 1:
        return next(iter(received.values()))
    return b""


def _pipe(step: Step, data: bytes, options: Options, call: Caller) -> bytes:
    kind = "handler" if len(step.handlers) > 1 else ""  # one handler: the vertex's span is its
    for handler in step.handlers:
        data = to_bytes(
            call(handler, data, options, kind=kind),
            f"handler {getattr(handler, '__name__', handler)!r}",
        )
    return data


def _pipe_alone(step: Step, data: bytes, options: Options, around: CallSpan | None) -> bytes:
    call = Caller(around)
    try:
        return _pipe(step, data, options, call)
    finally:
        call.close()


def _split(step: Step, data: bytes, call: Caller) -> tuple[tuple[str, bytes], ...]:
    if step.condition is not None:
        keys = call(step.condition, data, kind="condition")
        if isinstance(keys, str) or not isinstance(keys, list | tuple | set | frozenset):
            raise StepError(f"condition returned {type(keys).__name__}, expected a list of keys")
        chosen: dict[str, bytes] = {}
        for key in keys:
            if key not in step.branches:
                known = ", ".join(map(repr, step.branches))
                raise StepError(f"condition returned unknown key {key!r} (known: {known})")
            chosen[key] = data
        return tuple(chosen.items())
    assert step.foreach is not None
    items = call(step.foreach, data, kind="foreach")
    if not isinstance(items, Mapping):
        raise StepError(f"foreach returned {type(items).__name__}, expected a dict of key -> bytes")
    branches = []
    for key, value in items.items():
        if not isinstance(key, str):
            raise StepError(
                f"foreach returned key {key!r} of type {type(key).__name__}, expected str"
            )
        branches.append((key, to_bytes(value, f"foreach item {key!r}")))
    return tuple(branches)


def _join(step: Step, inputs: Mapping[str, bytes | None], call: Caller) -> bytes:
    passthrough = inputs.get(PASSTHROUGH) or b""
    outputs = {
        unescape_key(slot): data or b"" for slot, data in inputs.items() if slot != PASSTHROUGH
    }
    if step.aggregator is not None:
        return to_bytes(call(step.aggregator, outputs, kind="aggregator"), "aggregator")
    if step.branch == "foreach":
        return passthrough
    if len(outputs) > 1:
        raise StepError(
            f"picked several branches ({', '.join(map(repr, outputs))}) but has no aggregator"
        )
    return next(iter(outputs.values())) if outputs else passthrough


def _with_timeout(fn: Callable[[], bytes], timeout: float) -> bytes:
    """Run ``fn`` in a thread of its own and give up after ``timeout`` seconds.

    Python cannot kill a thread: a handler that overruns goes on in the background,
    and its result is thrown away.
    """
    future: Future[bytes] = Future()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            future.set_result(context.run(fn))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="flowloom-timed-handler", daemon=True).start()
    try:
        return future.result(timeout)
    except FutureTimeout:
        raise TimeoutError(f"timed out after {timeout:g}s") from None
