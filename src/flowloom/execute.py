"""Running the user code of one step: handlers, aggregators, conditions, foreach, forwarders.

No queue and no state here: a step's inputs go in, its output (or its chosen
branches) comes out, and a ``StepError`` says what the user's code did wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import inspect
import os
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .engine import unescape_key
from .errors import StepError
from .observe import CallSpan
from .plan import PASSTHROUGH, Step, StepKind
from .types import ErrorInfo, Options

__all__ = [
    "CANCEL_GRACE",
    "Caller",
    "NodeFailed",
    "Outcome",
    "StepError",
    "check_size",
    "error_info",
    "internal_error",
    "run_step",
    "to_bytes",
    "user_traceback",
]

CANCEL_GRACE = 1.0  # seconds a timed-out async handler has to run its cleanup once cancelled
TRACEBACK_LIMIT = 16_000  # characters of a traceback kept in a request's state
MESSAGE_LIMIT = 64_000  # characters of an error message kept in a request's state


class NodeFailed(Exception):
    """A node's handlers failed on ``data`` (the node's input); ``__cause__`` says why.
    ``stack``: where the handler was when its time ran out (a timeout), else ""."""

    def __init__(self, data: bytes, stack: str = "") -> None:
        super().__init__("node failed")
        self.data = data
        self.stack = stack


@dataclass(frozen=True, slots=True)
class Outcome:
    output: bytes  # a node's or join's output; a split's own input (passed to its join)
    branches: tuple[tuple[str, bytes], ...] | None = None  # a split's chosen branches


def check_size(outcome: Outcome, limit: int | None) -> Outcome:
    """``outcome``, unless a value in it is more than the backend holds in one (``limit``
    bytes): then a ``StepError``, as for any return value flowloom cannot take."""
    if limit is None:
        return outcome
    if len(outcome.output) > limit:
        raise StepError(
            f"the step returned {len(outcome.output):,} bytes: more than the backend "
            f"holds in one value (max_value {limit:,})"
        )
    for key, data in outcome.branches or ():
        if len(data) > limit:
            raise StepError(
                f"foreach item {key!r} holds {len(data):,} bytes: more than the backend "
                f"holds in one value (max_value {limit:,})"
            )
    return outcome


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
            result = fn(*args)
            if type(result) is bytes or not inspect.isawaitable(result):  # bytes: the usual
                return result
            return self.run(_awaited(result))
        with self.around(kind, fn):
            return self._call(fn, args)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        result = fn(*args)
        if type(result) is bytes or not inspect.isawaitable(result):
            return result
        return self.run(_awaited(result))

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
    attempt = None if step.timeout is None else _TimedAttempt(step.timeout, call.around)
    try:
        if attempt is None:
            return Outcome(_pipe(step, data, options, call))
        return Outcome(call.run(attempt.run(step, data, options)))
    except BaseException as exc:  # a SystemExit or CancelledError of the handler's too
        raise NodeFailed(data, attempt.stack if attempt else "") from exc


def _input(step: Step, inputs: Mapping[str, bytes | None], call: Caller) -> bytes:
    received: dict[str, bytes] = {}
    for slot in step.data_slots:
        data = inputs.get(slot)
        if data is None:
            raise StepError(f"input {slot!r} is missing")
        forwarder = step.forwarders.get(slot)
        if forwarder is not None:
            forwarded = call(forwarder, data, kind="forwarder")
            data = to_bytes(forwarded, f"forwarder of edge {slot!r}")
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
        if not key.isascii():
            try:
                key.encode()
            except UnicodeEncodeError:
                raise StepError(
                    f"foreach returned key {key!r}: not text UTF-8 can hold (a lone surrogate)"
                ) from None
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


class _TimedAttempt:
    """One attempt of a node with a timeout, run as a coroutine on the worker thread's loop.

    ``async`` handlers run on that loop, where the timeout cancels them; sync ones on a
    thread of their own, which nothing can stop. When the time is up, the handler's stack
    is kept for the error: where it was stuck is what its author needs to know.
    """

    def __init__(self, timeout: float, around: CallSpan | None = None) -> None:
        self.timeout = timeout
        self.around = around  # wraps each handler of a piped node (a tracing span)
        self.thread: threading.Thread | None = None  # the sync handler's thread, if running
        self.stack = ""  # where the handler was when the time ran out

    async def run(self, step: Step, data: bytes, options: Options) -> bytes:
        task = asyncio.ensure_future(self._pipe(step, data, options))
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if done:
            return task.result()
        self.stack = self._stack(task)
        task.cancel()
        task.add_done_callback(_retrieve)
        await asyncio.wait({task}, timeout=CANCEL_GRACE)  # its finally blocks run
        raise TimeoutError(f"timed out after {self.timeout:g}s")

    async def _pipe(self, step: Step, data: bytes, options: Options) -> bytes:
        around = self.around if len(step.handlers) > 1 else None
        for handler in step.handlers:
            with around("handler", handler) if around else contextlib.nullcontext():
                if inspect.iscoroutinefunction(handler):
                    result = await handler(data, options)
                else:
                    result = await self._in_thread(handler, data, options)
                    if inspect.isawaitable(result):
                        result = await result
            data = to_bytes(result, f"handler {getattr(handler, '__name__', handler)!r}")
        return data

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Call ``fn(*args)`` on a new daemon thread (in a copy of this context).

        Not the loop's executor: a handler that never returns would hold one of its few
        threads for ever; here it holds only its own.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()

        def settle(value: Any, error: BaseException | None) -> None:
            if future.done():  # cancelled: the attempt timed out
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
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, value, error)

        self.thread = threading.Thread(target=target, name="flowloom-timed-handler", daemon=True)
        self.thread.start()
        return future

    def _stack(self, task: asyncio.Task[bytes]) -> str:
        """The user code's frames of the running handler, formatted, with the error line."""
        thread, top = self.thread, None
        if thread is not None and thread.is_alive() and thread.ident is not None:
            top = _frame_of(thread.ident)
        if top is not None:  # a sync handler, on its thread
            frames = [frame for frame, _ in traceback.walk_stack(top)][::-1]
        else:  # async handlers, suspended
            frames = list(_awaiting(task.get_coro()))
        summary = _from_user_code(traceback.StackSummary.extract((f, f.f_lineno) for f in frames))
        if not summary:
            return ""
        return (
            "Stack of the handler when its time ran out (most recent call last):\n"
            + "".join(summary.format())
            + f"TimeoutError: timed out after {self.timeout:g}s\n"
        )


_frames_lock = threading.Lock()


def _frame_of(ident: int) -> FrameType | None:
    """The top frame of the thread ``ident``. The garbage collector is off meanwhile:
    on CPython 3.11 a collection starting inside ``sys._current_frames`` (it allocates)
    that frees a ``threading.local`` deadlocks the whole process (later versions turn
    the collector off there themselves); the lock keeps two callers from turning it
    back on early."""
    with _frames_lock:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return sys._current_frames().get(ident)
        finally:
            if enabled:
                gc.enable()


def _awaiting(awaitable: object) -> Iterator[FrameType]:
    """The frames of a suspended coroutine and of the ones it awaits, outermost first."""
    while True:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            return
        yield frame
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a left-behind task's outcome as seen, so that asyncio does not log it."""
    if not task.cancelled():
        task.exception()


_OWN_CODE = (  # where the frames that lead to user code live: flowloom, asyncio, threading
    os.path.dirname(__file__) + os.sep,
    os.path.dirname(asyncio.__file__ or "asyncio") + os.sep,
    threading.__file__ or "threading",
)


def error_info(address: str, exc: BaseException, stack: str = "") -> ErrorInfo:
    """What a failed attempt at ``address`` records: where, which error, and the user
    code's traceback (``stack`` instead, for a timeout: where the handler was then)."""
    kind = "StepError" if isinstance(exc, StepError) else type(exc).__name__
    trace = _capped(stack) if stack else user_traceback(exc)
    return ErrorInfo(address, kind, _message(exc), trace)


def internal_error(address: str, exc: BaseException) -> ErrorInfo:
    """What a step records when flowloom itself failed running it: the whole traceback."""
    message = f"flowloom could not run this step: {type(exc).__name__}: {_message(exc)}"
    return ErrorInfo(
        address, "InternalError", message, _capped("".join(traceback.format_exception(exc)))
    )


def _message(exc: BaseException) -> str:
    """``str(exc)`` (``repr`` if empty), at most ``MESSAGE_LIMIT`` characters; never raises."""
    try:
        text = str(exc) or repr(exc)
    except Exception as broken:
        text = f"<{type(exc).__name__}: str() raised {type(broken).__name__}>"
    if len(text) <= MESSAGE_LIMIT:
        return text
    return f"{text[:MESSAGE_LIMIT]}... ({len(text) - MESSAGE_LIMIT} characters left out)"


def user_traceback(exc: BaseException) -> str:
    """The formatted traceback of the user code that raised ``exc`` ("" for a rule error).

    flowloom's own frames that lead to the user's code are left out (as are asyncio's and
    threading's); what the user's code called stays in. An error raised outside user
    code (a ``StepError``) has no user frames, and so no traceback.
    Tracebacks longer than ``TRACEBACK_LIMIT`` characters keep their start and their end.
    """
    if isinstance(exc, StepError):
        return ""
    formatted = traceback.TracebackException.from_exception(exc)
    chained: traceback.TracebackException | None = formatted
    seen: set[int] = set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.stack = _from_user_code(chained.stack)
        if chained is formatted and not chained.stack:
            return ""
        chained = chained.__cause__ or (
            None if chained.__suppress_context__ else chained.__context__
        )
    return _capped("".join(formatted.format()))


def _from_user_code(stack: traceback.StackSummary) -> traceback.StackSummary:
    """``stack`` without the leading frames of flowloom, asyncio and threading."""
    frames = list(stack)
    while frames and frames[0].filename.startswith(_OWN_CODE):
        frames.pop(0)
    return traceback.StackSummary.from_list(frames)


def _capped(text: str) -> str:
    if len(text) <= TRACEBACK_LIMIT:
        return text
    head, tail = TRACEBACK_LIMIT // 4, TRACEBACK_LIMIT * 3 // 4
    return f"{text[:head]}\n... ({len(text) - head - tail} characters left out) ...\n{text[-tail:]}"
