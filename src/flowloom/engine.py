"""Pure state transitions: what becomes ready when a step finishes.

The engine does no I/O and runs no user code. Given the plan and what a step
produced, it returns the deliveries to make: each hands data (or, for an
ordering-only edge, nothing) to one input slot of a step instance. A backend
applies them atomically; a step instance whose slots are all filled is ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from .plan import END, PASSTHROUGH, SCOPE_INPUT, Plan, Step

__all__ = [
    "START",
    "Delivery",
    "Transition",
    "after_output",
    "after_split",
    "escape_key",
    "retry_delay",
    "start",
    "start_task",
    "unescape_key",
]


START = "!start"  # the step id of the task that starts a request queued by a client


@dataclass(frozen=True, slots=True)
class Delivery:
    """Put ``data`` into ``slot`` of the instance ``instance`` of ``step`` (at ``keys``).

    The instance is ready once it holds ``needed`` slots; a ``needed`` of -1 means
    "as an earlier delivery to the same instance said".
    """

    instance: str
    step: str
    keys: tuple[str, ...]
    slot: str
    data: bytes | None
    needed: int


@dataclass(frozen=True, slots=True)
class Transition:
    deliveries: tuple[Delivery, ...]
    finished: bool = False  # the flow's last step finished: ``result`` is its output
    result: bytes = b""
    keep_output: bool = True  # keep the step's output with the request (``keep_outputs``)


def escape_key(key: str) -> str:
    """A foreach item key as it appears in addresses: URL-quoted, so '/' '[' ']' stay unique."""
    return quote(key, safe="")


def unescape_key(key: str) -> str:
    return unquote(key)


def start(plan: Plan, body: bytes) -> Transition:
    """The deliveries that start a request: its body to each of the flow's first steps."""
    return Transition(
        tuple(_deliver(plan.steps[sid], (), SCOPE_INPUT, body) for sid in plan.entries)
    )


def start_task(body: bytes) -> Transition:
    """What a client without the flow's definition queues: one ``START`` task with the
    body, which a worker holding the plan expands (``start``) into the first steps."""
    return Transition((Delivery(START, START, (), SCOPE_INPUT, body, 1),))


def after_output(plan: Plan, step: Step, keys: tuple[str, ...], output: bytes) -> Transition:
    """A node or a join produced ``output``: hand it to the step's successors."""
    deliveries: list[Delivery] = []
    keep = plan.keep_outputs
    for target in step.targets:
        if target.step == END:
            return Transition(tuple(deliveries), True, output, keep)
        if target.pop:
            deliveries.append(_deliver(plan.steps[target.step], keys[:-1], keys[-1], output))
        else:
            data = output if target.data else None
            deliveries.append(_deliver(plan.steps[target.step], keys, target.slot, data))
    return Transition(tuple(deliveries), keep_output=keep)


def after_split(
    plan: Plan,
    step: Step,
    keys: tuple[str, ...],
    passthrough: bytes,
    branches: Sequence[tuple[str, bytes]],
) -> Transition:
    """A condition or foreach chose ``branches`` (key, input): start each of them.

    The join waits for every branch plus the passthrough of the split's own input.
    """
    join = plan.steps[step.join]
    deliveries = [
        Delivery(join.instance(keys), join.id, keys, PASSTHROUGH, passthrough, len(branches) + 1)
    ]
    foreach = step.foreach is not None
    for key, data in branches:
        entries = step.branches[""] if foreach else step.branches[key]
        child_keys = (*keys, escape_key(key)) if foreach else keys
        for sid in entries:
            deliveries.append(_deliver(plan.steps[sid], child_keys, SCOPE_INPUT, data))
    return Transition(tuple(deliveries))


def _deliver(step: Step, keys: tuple[str, ...], slot: str, data: bytes | None) -> Delivery:
    return Delivery(step.instance(keys), step.id, keys, slot, data, step.needed)


def retry_delay(attempt: int, backoff: float, cap: float = 300.0) -> float:
    """Seconds to wait before attempt ``attempt + 1``: ``backoff`` doubled per failed attempt."""
    return float(min(cap, backoff * 2.0 ** min(attempt - 1, 64)))  # 2 ** 1024: no float
