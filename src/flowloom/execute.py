"""Running the user code of one step: handlers, aggregators, conditions, foreach, forwarders.

No queue and no state here: a step's inputs go in, its output (or its chosen
branches) comes out, and a ``StepError`` says what the user's code did wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import threading
import traceback
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from .engine import unescape_key
from .errors import StepError
from .observe import CallSpan
from .plan import PASSTHROUGH, Step, StepKind
from .types import Options

__all__ = [
    "CANCEL_GRACE",
    "Caller",
    "NodeFailed",
    "Outcome",
    "StepError",
    "run_step",
    "to_bytes",
    "user_traceback",
]

CANCEL_GRACE = 1.0  # seconds a timed-out async handler has to run its cleanup once cancelled
TRACEBACK_LIMIT = 16_000  # characters of a traceback kept in a request's state


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
            return self.run(_awaited(result))
        return result

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` to its end on this thread's loop."""
        runner = getattr(self._local, "runner", None)
        if runner is None:
            runner = self._local.runner = asyncio.Runner()
        return runner.run(coroutine, context=contextvars.copy_context())

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
        piped = _pipe_async(step, data, options, call.around)
        return Outcome(call.run(_within(piped, step.timeout)))
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


async def _pipe_async(
    step: Step, data: bytes, options: Options, around: CallSpan | None = None
) -> bytes:
    """``_pipe`` for a node with a timeout: ``async`` handlers run on this loop, where the
    timeout can cancel them; sync ones on a thread of their own, which nothing can stop."""
    traced = around is not None and len(step.handlers) > 1
    for handler in step.handlers:
        with around("handler", handler) if traced else contextlib.nullcontext():  # type: ignore[misc]
            if inspect.iscoroutinefunction(handler):
                result = await handler(data, options)
            else:
                result = await _in_thread(handler, data, options)
                if inspect.isawaitable(result):
                    result = await result
        data = to_bytes(result, f"handler {getattr(handler, '__name__', handler)!r}")
    return data


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


async def _within(coroutine: Coroutine[Any, Any, bytes], timeout: float) -> bytes:
    """Await ``coroutine`` for at most ``timeout`` seconds, then cancel it.

    A cancelled handler gets ``CANCEL_GRACE`` seconds to run its ``finally`` blocks; one
    that ignores the cancellation is left behind (on this thread's loop) and its result
    thrown away.
    """
    task = asyncio.ensure_future(coroutine)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        return task.result()
    task.cancel()
    task.add_done_callback(_retrieve)
    await asyncio.wait({task}, timeout=CANCEL_GRACE)
    raise TimeoutError(f"timed out after {timeout:g}s")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a left-behind task's outcome as seen, so that asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Call ``fn(*args)`` on a new daemon thread (in a copy of this context).

    Not the loop's executor: a handler that never returns would hold one of its few
    threads for ever; here it holds only its own.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: the caller timed out
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def target() -> None:
        try:
            value, error = context.run(fn, *args), None
        except BaseException as exc:
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=target, name="flowloom-timed-handler", daemon=True).start()
    return future


_OWN_CODE = (  # where the frames that lead to user code live: flowloom, asyncio, threading
    os.path.dirname(__file__) + os.sep,
    os.path.dirname(asyncio.__file__ or "asyncio") + os.sep,
    threading.__file__ or "threading",
)


def user_traceback(exc: BaseException) -> str:
    """The formatted traceback of the user code that raised ``exc`` ("" for a rule error).

    flowloom's own frames that lead to the user's code are left out (as are asyncio's and
    threading's); what the user's code called stays in. An error raised outside user
    code (a ``StepError``, a timeout) has no user frames, and so no traceback.
    Tracebacks longer than ``TRACEBACK_LIMIT`` characters keep their start and their end.
    """
    if isinstance(exc, StepError):
        return ""
    formatted = traceback.TracebackException.from_exception(exc)
    chained: traceback.TracebackException | None = formatted
    seen: set[int] = set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        frames = list(chained.stack)
        while frames and frames[0].filename.startswith(_OWN_CODE):
            frames.pop(0)
        chained.stack = traceback.StackSummary.from_list(frames)
        if chained is formatted and not frames:
            return ""
        chained = chained.__cause__ or (
            None if chained.__suppress_context__ else chained.__context__
        )
    text = "".join(formatted.format())
    if len(text) <= TRACEBACK_LIMIT:
        return text
    head, tail = TRACEBACK_LIMIT // 4, TRACEBACK_LIMIT * 3 // 4
    return f"{text[:head]}\n... ({len(text) - head - tail} characters left out) ...\n{text[-tail:]}"
