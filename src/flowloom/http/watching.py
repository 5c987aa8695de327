"""The endpoints for watching many requests at once (the dashboard reads them):

    GET /requests                                    requests of every flow, newest first
    GET /flow/{name}/requests/{id}/steps             progress per vertex
    GET /flow/{name}/requests/{id}/instances?vertex= one page of one vertex's instances
    GET /queue                                       tasks waiting for a worker

A request with a 10,000-item foreach has tens of thousands of vertex instances: its
``steps`` answer has one line per vertex of the definition, with counts by status, and
``instances`` pages through the instances of one vertex.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from .. import progress
from ..names import NAME
from ..types import RequestState, Status, VertexState
from . import inputs, responses
from .api import Api, call
from .endpoints import Answer, Param, endpoint
from .routes import ID_PARAM, MAX_LIMIT, NAME_PARAM, REQUEST_HEADERS
from .shapes import Error, RequestList, RequestSummary, summary

__all__ = ["Instances", "Progress", "Queue"]

MAX_VERTEX = 4096  # characters of a vertex path


class Progress(RequestSummary):
    """A request's summary, and how far each vertex it has reached has come: its
    instances counted by status (``{"completed": 987, "failed": 3}``)."""

    steps: list[progress.VertexProgress]


class Instances(msgspec.Struct):
    """One page of the instances of one vertex, earliest started first; ``total``
    counts them all, ``next_offset`` is set while there are more."""

    request_id: str
    vertex: str
    status: Status | None
    offset: int
    limit: int
    total: int
    next_offset: int | None
    instances: list[VertexState]


class Queue(msgspec.Struct):
    """Tasks queued that no worker has taken yet, retries waiting for their time, and
    tasks held by paused requests (each None if the backend cannot tell)."""

    ready: int | None
    delayed: int | None
    held: int | None


def _paging(limit: int, what: str) -> tuple[Param, ...]:
    return (
        Param(
            "status",
            "query",
            f"Only {what} in this status.",
            {"$ref": "#/components/schemas/Status"},
        ),
        Param(
            "offset",
            "query",
            f"How many {what} to skip.",
            {"type": "integer", "minimum": 0, "maximum": 10**9},
        ),
        Param(
            "limit",
            "query",
            f"At most this many {what} (default {limit}).",
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        ),
    )


def _only(request: HTTPRequest, known: set[str]) -> None:
    unknown = set(request.query_params) - known
    if unknown:
        raise inputs.BadInput(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")


@endpoint(
    "GET",
    "/requests",
    "The requests of every flow (or of `flow`), newest first.",
    params=(
        Param(
            "flow",
            "query",
            "Only this flow's requests.",
            {"type": "string", "pattern": f"^{NAME.pattern}$"},
        ),
        *_paging(50, "requests"),
    ),
    answers={
        200: Answer("One page of requests.", RequestList),
        400: Answer("Malformed query.", Error),
    },
)
async def all_requests(api: Api, request: HTTPRequest) -> Response:
    _only(request, {"flow", "status", "offset", "limit"})
    params = request.query_params
    flow = params.get("flow")
    if flow is not None and not NAME.fullmatch(flow):
        raise inputs.BadInput(400, f"invalid flow name {flow!r}")
    status = inputs.status_filter(params.get("status"))
    offset = inputs.integer(params.get("offset"), "offset", 0, 0, 10**9)
    limit = inputs.integer(params.get("limit"), "limit", 50, 1, MAX_LIMIT)
    found = await call(api.service.requests, flow, status, offset, limit)
    page = RequestList(
        flow=flow,
        status=status,
        offset=offset,
        limit=limit,
        next_offset=offset + len(found) if len(found) == limit else None,
        requests=[summary(s) for s in found],
    )
    return responses.json(page)


async def _state(api: Api, request: HTTPRequest) -> tuple[RequestState, frozenset[str]]:
    """The request's state, and the foreach vertices of its flow's definition."""
    name, request_id = inputs.flow_name(request), inputs.request_id(request)
    state = await call(api.service.state, name, request_id)
    try:
        definition = await call(api.service.definition, name)
    except inputs.BadInput:
        return state, frozenset()  # a client that has not registered the flow
    return state, progress.foreach_paths(definition)


@endpoint(
    "GET",
    "/flow/{name}/requests/{request_id}/steps",
    "The request's summary and its progress per vertex (instances counted by status).",
    params=(NAME_PARAM, ID_PARAM),
    answers={
        200: Answer("The progress.", Progress, REQUEST_HEADERS),
        400: Answer("Malformed flow name, request id or query.", Error),
        404: Answer("No such flow or request.", Error),
    },
)
async def steps(api: Api, request: HTTPRequest) -> Response:
    _only(request, set())
    state, foreach = await _state(api, request)
    fields = msgspec.structs.asdict(summary(state))
    body = Progress(**fields, steps=progress.progress(state, foreach))
    return responses.json(body, request_id=state.request_id, status=state.status)


@endpoint(
    "GET",
    "/flow/{name}/requests/{request_id}/instances",
    "One page of the instances of one vertex, earliest started first.",
    params=(
        NAME_PARAM,
        ID_PARAM,
        Param(
            "vertex",
            "query",
            "The vertex path, as in `steps` (`items[]/check`).",
            {"type": "string", "minLength": 1, "maxLength": MAX_VERTEX},
            required=True,
        ),
        *_paging(100, "instances"),
    ),
    answers={
        200: Answer("One page of instances.", Instances, REQUEST_HEADERS),
        400: Answer("Malformed flow name, request id or query.", Error),
        404: Answer("No such flow or request.", Error),
    },
)
async def instances(api: Api, request: HTTPRequest) -> Response:
    _only(request, {"vertex", "status", "offset", "limit"})
    params = request.query_params
    vertex = params.get("vertex")
    if not vertex or len(vertex) > MAX_VERTEX:
        raise inputs.BadInput(400, "give the vertex path as ?vertex=PATH")
    status = inputs.status_filter(params.get("status"))
    offset = inputs.integer(params.get("offset"), "offset", 0, 0, 10**9)
    limit = inputs.integer(params.get("limit"), "limit", 100, 1, MAX_LIMIT)
    state, foreach = await _state(api, request)
    found = progress.instances(state, foreach, vertex, status)
    body = Instances(
        request_id=state.request_id,
        vertex=vertex,
        status=status,
        offset=offset,
        limit=limit,
        total=len(found),
        next_offset=offset + limit if offset + limit < len(found) else None,
        instances=found[offset : offset + limit],
    )
    return responses.json(body, request_id=state.request_id, status=state.status)


@endpoint(
    "GET",
    "/queue",
    "Tasks waiting: ready for a worker, delayed retries, held by paused requests.",
    answers={200: Answer("The queue's depth.", Queue)},
)
async def queue(api: Api, request: HTTPRequest) -> Response:
    depth = await call(api.service.backend.depth)
    body = Queue(ready=depth.get("ready"), delayed=depth.get("delayed"), held=depth.get("held"))
    return responses.json(body)
