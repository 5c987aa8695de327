"""The JSON bodies the API answers with, declared once: ``encode`` writes them and
``schemas`` describes them in the OpenAPI document (both through msgspec).

``RequestState`` (and its ``VertexState`` and ``ErrorInfo``) are the dataclasses of
``flowloom.types``: the HTTP state is exactly what ``FlowService.state`` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from ..types import ErrorInfo, RequestState, Status

__all__ = [
    "Accepted",
    "Control",
    "Error",
    "Flows",
    "Health",
    "Outcome",
    "RequestList",
    "RequestSummary",
    "Workers",
    "encode",
    "schemas",
    "summary",
]


class Error(msgspec.Struct):
    """What was wrong with the call."""

    error: str


class Accepted(msgspec.Struct):
    """The request is not done: its id, its status, and the path of its state."""

    request_id: str
    flow: str
    status: Status
    state: str


class Outcome(msgspec.Struct, omit_defaults=True):
    """A request that ended without a result: failed (``error`` says where and why) or
    stopped."""

    request_id: str
    flow: str
    status: Status
    error: ErrorInfo | None = None


class Control(msgspec.Struct, omit_defaults=True):
    """The request's status after pause, resume, stop or retry (with ``error`` if the
    action did not apply: it had ended already, or, for a retry, had not failed or
    stopped)."""

    request_id: str
    flow: str
    status: Status
    error: str | None = None


class Flows(msgspec.Struct):
    flows: list[str]


class Workers(msgspec.Struct):
    workers: list[dict[str, Any]]


class Health(msgspec.Struct, omit_defaults=True):
    """``ok`` with the kind of backend, or ``unavailable``."""

    status: Literal["ok", "unavailable"]
    backend: Literal["embedded", "redis"] | None = None


class RequestSummary(msgspec.Struct):
    """A request's state without its vertices."""

    request_id: str
    flow: str
    status: Status
    created: float
    ended: float | None
    error: ErrorInfo | None
    trace_id: str | None
    retries: list[float]  # when it was retried (epoch seconds), oldest first


class RequestList(msgspec.Struct):
    """One page of a flow's requests (``flow`` None: of every flow), newest first;
    ``next_offset`` while there may be more."""

    flow: str | None
    status: Status | None
    offset: int
    limit: int
    next_offset: int | None
    requests: list[RequestSummary]


def summary(state: RequestState) -> RequestSummary:
    return RequestSummary(
        request_id=state.request_id,
        flow=state.flow,
        status=state.status,
        created=state.created,
        ended=state.ended,
        error=state.error,
        trace_id=state.trace_id,
        retries=list(state.retries),
    )


def _enc_hook(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode(body: object) -> bytes:
    """``body`` (a shape above, a ``RequestState``, or plain JSON data) as JSON."""
    return _encoder.encode(body)


SHAPES: tuple[Any, ...] = (
    Error,
    Accepted,
    Outcome,
    Control,
    Flows,
    Workers,
    Health,
    RequestList,
    RequestState,
)


def schemas(shapes: Iterable[Any] = SHAPES) -> dict[str, Any]:
    """The JSON schemas of ``shapes`` (and every type they use), by name, for
    ``#/components/schemas``."""
    _, components = msgspec.json.schema_components(
        tuple(shapes), ref_template="#/components/schemas/{name}"
    )
    return components
