"""The endpoints of the API: run, watch and control flows.

    POST /flow/{name}                                run a flow (GoFlow's ``curl -d hallo``)
    GET  /flows                                      registered flows
    GET  /flow/{name}/definition                     a flow's definition
    GET  /flow/{name}/requests                       its requests, newest first (paged)
    GET  /flow/{name}/requests/{id}                  one request's state
    GET  /flow/{name}/requests/{id}/result           its result
    GET  /flow/{name}/requests/{id}/output?vertex=A  one vertex instance's output
    POST /flow/{name}/requests/{id}/pause|resume|stop|retry
    GET  /workers, /health

Each handler is described where it is defined (``endpoint``): that one description
makes both its route and its part of the OpenAPI document.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any, Literal

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ..errors import NotRunning
from ..names import NAME, REQUEST_ID
from ..types import Request, RequestState, Status
from . import inputs, responses
from .api import Api, call, http_errors
from .auth import check_body_signature, check_request_signature
from .callbacks import Target
from .endpoints import Answer, Param, endpoint
from .settings import Settings
from .shapes import Accepted, Control, Error, Flows, Health, Outcome, RequestList, Workers, summary
from .waiting import new_request_id

__all__: list[str] = []

log = logging.getLogger("flowloom.http")

MAX_LIMIT = 1000
# Never stored with a request: they are credentials, not input.
PRIVATE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-hub-signature",
        "x-hub-signature-256",
        "x-flowloom-signature",
        "x-callback-url",
    }
)

REQUEST_HEADERS = ("X-Request-Id", "X-Request-Status")
RUN_HEADERS = (*REQUEST_HEADERS, "X-Trace-Id")
RETRY = {"Retry-After": "1"}
NAME_PARAM = Param(
    "name",
    "path",
    "The flow's name.",
    {"type": "string", "pattern": f"^{NAME.pattern}$"},
    required=True,
    example="myflow",
)
ID_PARAM = Param(
    "request_id",
    "path",
    "The request's id.",
    {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
    required=True,
    example="order-1001",
)


def _wait_param(default: str) -> Param:
    return Param(
        "X-Wait",
        "header",
        f"Seconds to wait for the result (0 to the server's limit; default {default}).",
        lambda s: {"type": "number", "minimum": 0, "maximum": s.wait_timeout},
    )


def _outcomes(accepted: str, headers: tuple[str, ...] = REQUEST_HEADERS) -> dict[int, Answer]:
    """The answers of execute and result: the result, or where the request stands."""
    return {
        200: Answer("The request completed: its result's bytes.", bytes, headers),
        202: Answer(accepted, Accepted, (*headers, "Location")),
        404: Answer("No such flow or request.", Error),
        409: Answer("The request was stopped (or, on execute, its id is taken).", (Outcome, Error)),
        424: Answer("The request failed: `error` says where and why.", Outcome, headers),
    }


def _signed(settings: Settings) -> bool:
    return settings.hmac_secret is not None


SIGNATURE_PARAM = Param(
    "X-Flowloom-Signature",
    "header",
    "`t=<unix seconds>,sha256=<hex>`: an HMAC of the timestamp, method, path, query, "
    "X-Callback-Url, X-Request-Id and body (see docs/http.md).",
    {"type": "string", "pattern": "^t=[0-9]+,sha256=[0-9a-f]{64}$"},
    when=_signed,
)


def _callbacks(settings: Settings) -> bool:
    return settings.callbacks


# -- running a flow ----------------------------------------------------------------------------
@endpoint(
    "POST",
    "/flow/{name}",
    "Run the flow with the body as input and the query as options.",
    params=(
        NAME_PARAM,
        Param(
            "X-Async",
            "header",
            "`true`: answer 202 with the request id at once.",
            {"type": "string", "enum": ["true", "false", "1", "0"]},
        ),
        Param(
            "X-Request-Id",
            "header",
            "The id to give the request (default: a new random one).",
            {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
        ),
        Param(
            "X-Wait",
            "header",
            "Seconds to wait for the result (0 to the server's limit; default that limit).",
            lambda s: {"type": "number", "minimum": 0, "maximum": s.wait_timeout},
        ),
        Param(
            "traceparent",
            "header",
            "A W3C trace context (`00-TRACEID-SPANID-FLAGS`): the request's trace becomes a "
            "child of the caller's. An invalid one is ignored, as the W3C spec asks.",
            {"type": "string"},
        ),
        Param(
            "X-Callback-Url",
            "header",
            "An http(s) URL to POST the final answer to when it ends; its host must "
            "resolve to public addresses (or ones the operator allows).",
            {
                "type": "string",
                "format": "uri",
                # printable ASCII, as any header value: a host (no "/", "?" or "#"), then
                # the path and query
                "pattern": "^https?://[\\x21\\x22\\x24-\\x2e\\x30-\\x3e\\x40-\\x7e]+[\\x21-\\x7e]*$",
                "maxLength": 2048,
            },
            when=_callbacks,
        ),
        SIGNATURE_PARAM,
        Param(
            "X-Hub-Signature",
            "header",
            "`sha1=<hex>`: GoFlow's HMAC of the body only (or `X-Hub-Signature-256: "
            "sha256=<hex>`).",
            {"type": "string", "pattern": "^sha1=[0-9a-f]{40}$"},
            when=_signed,
        ),
    ),
    body=lambda s: {"type": "string", "format": "binary", "maxLength": s.max_body},
    answers={
        **_outcomes("Not done within the wait (or `X-Async`): the request id.", RUN_HEADERS),
        400: Answer("Malformed flow name, header or query, or a refused callback URL.", Error),
        401: Answer("Missing or wrong signature.", Error, when=_signed),
        408: Answer("The body went {body_timeout:g} seconds without a byte arriving.", Error),
        413: Answer("The body is over {max_body} bytes.", Error),
        429: Answer("Too many requests or callbacks pending: try again later.", Error),
        503: Answer(
            "The backend is unavailable. The request may still run once it answers: "
            "send it again with the X-Request-Id answered here (409 if it was taken).",
            Error,
            ("X-Request-Id",),
        ),
    },
    checks_signature=True,
)
async def execute(api: Api, request: HTTPRequest) -> Response:
    """Run a flow. The request's id is known before anything reaches the backend, so
    that a 503 can name it: a submit a frozen backend held may still run when it wakes,
    and the caller can only retry it safely under the same id."""
    request_id = inputs.optional_request_id(request.headers.get("x-request-id"))
    if request_id is None:
        request_id = new_request_id()
    try:
        return await _execute(api, request, request_id)
    except inputs.BadInput as exc:
        if exc.status == 503:
            exc.headers["X-Request-Id"] = request_id
        raise


async def _execute(api: Api, request: HTTPRequest, request_id: str) -> Response:
    settings = api.settings
    name = inputs.flow_name(request)
    headers = request.headers
    run_async = inputs.flag(headers.get("x-async"), "X-Async")
    wait = inputs.seconds(headers.get("x-wait"), "X-Wait", settings.wait_timeout)
    query = inputs.query_options(request.scope.get("query_string", b""))
    body = await inputs.read_body(request, settings)
    if settings.hmac_secret is not None:
        if "x-flowloom-signature" in headers:
            await check_signature(api, request, body)
        else:
            check_body_signature(headers, body, settings.hmac_secret)
    callback = await _callback(api, headers.get("x-callback-url"))
    kept = {k: v for k, v in headers.items() if k not in PRIVATE_HEADERS}
    # with tracing on, this server's span for the call is the request's parent
    with api.service.observers.http_span(f"POST /flow/{name}", kept.get("traceparent")) as parent:
        if parent is not None:
            kept["traceparent"] = parent
        flow_request = Request(body=body, request_id=request_id, query=query, headers=kept)
        result: bytes | None = None
        if run_async or wait == 0:
            with http_errors():
                record = await api.waiter.submit(name, flow_request)
            status = Status.QUEUED
        else:
            with http_errors():
                record, status, result = await api.waiter.execute(name, flow_request, wait)
    request_id = record.request_id
    if callback is not None:
        api.callbacks.start(name, request_id, callback, status)
    trace = record.trace[:32]
    if result is not None:  # the trace's header made with the others
        return responses.result(request_id, result, trace)
    if run_async:
        answer = responses.accepted(name, request_id, status)
    else:
        answer = await api.answer(name, request_id, status)
    if trace:
        answer.headers["X-Trace-Id"] = trace
    return answer


async def _callback(api: Api, value: str | None) -> Target | None:
    """The checked target of ``X-Callback-Url``: 400 if it is refused, 429 if too many
    callbacks are pending."""
    if value is None:
        return None
    if not api.settings.callbacks:
        raise inputs.BadInput(400, "X-Callback-Url: callbacks are disabled on this server")
    if api.callbacks.full():
        raise inputs.BadInput(
            429, "too many callbacks are pending: try again later", {"Retry-After": "1"}
        )
    try:
        return await api.callbacks.target(value)
    except ValueError as exc:
        raise inputs.BadInput(400, f"X-Callback-Url: {exc}") from None


async def check_signature(api: Api, request: HTTPRequest, body: bytes) -> None:
    """``X-Flowloom-Signature`` must sign this very call (see ``auth``)."""
    assert api.settings.hmac_secret is not None
    raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
    check_request_signature(
        api.settings.hmac_secret,
        request.method,
        raw_path.decode("latin-1"),
        request.scope.get("query_string", b"").decode("latin-1"),
        request.headers,
        body,
    )


# -- watching a request ------------------------------------------------------------------------
@endpoint(
    "GET",
    "/flow/{name}/requests/{request_id}",
    "The request's status, timings, error and vertex states.",
    params=(NAME_PARAM, ID_PARAM),
    answers={
        200: Answer("The state.", RequestState, REQUEST_HEADERS),
        400: Answer("Malformed flow name or request id.", Error),
        404: Answer("No such flow or request.", Error),
    },
)
async def state(api: Api, request: HTTPRequest) -> Response:
    name, request_id = inputs.flow_name(request), inputs.request_id(request)
    found = await call(api.service.state, name, request_id)
    return responses.json(found, request_id=request_id, status=found.status)


@endpoint(
    "GET",
    "/flow/{name}/requests/{request_id}/result",
    "The request's result (waiting up to X-Wait seconds for it).",
    params=(NAME_PARAM, ID_PARAM, _wait_param("0")),
    answers={
        **_outcomes("Not done yet: where the request stands."),
        400: Answer("Malformed flow name, request id or X-Wait.", Error),
    },
)
async def result(api: Api, request: HTTPRequest) -> Response:
    name, request_id = inputs.flow_name(request), inputs.request_id(request)
    wait = inputs.seconds(request.headers.get("x-wait"), "X-Wait", api.settings.wait_timeout, 0)
    found = await call(api.service.state, name, request_id)
    with http_errors():
        status = await api.waiter.wait(request_id, wait, found.status)
    return await api.answer(name, request_id, status)


@endpoint(
    "GET",
    "/flow/{name}/requests/{request_id}/output",
    "The output of one completed vertex instance of the request.",
    params=(
        NAME_PARAM,
        ID_PARAM,
        Param(
            "vertex",
            "query",
            "The vertex instance's address, as in the state.",
            {"type": "string", "minLength": 1},
            required=True,
        ),
    ),
    answers={
        200: Answer("The output's bytes.", bytes),
        400: Answer("Malformed flow name, request id or query.", Error),
        404: Answer("No such flow, request, or output of that vertex.", Error),
    },
)
async def output(api: Api, request: HTTPRequest) -> Response:
    name, request_id = inputs.flow_name(request), inputs.request_id(request)
    params = request.query_params
    unknown = set(params) - {"vertex"}
    if unknown or not params.get("vertex"):
        raise inputs.BadInput(400, "give the vertex address as ?vertex=ADDRESS, only")
    found = await call(api.service.output, name, request_id, params["vertex"])
    return Response(found, media_type=responses.BYTES)


@endpoint(
    "GET",
    "/flow/{name}/requests",
    "The flow's requests, newest first.",
    params=(
        NAME_PARAM,
        Param(
            "status",
            "query",
            "Only requests in this status.",
            {"$ref": "#/components/schemas/Status"},
        ),
        Param(
            "offset",
            "query",
            "How many requests to skip.",
            {"type": "integer", "minimum": 0, "maximum": 10**9},
        ),
        Param(
            "limit",
            "query",
            "At most this many requests (default 50).",
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        ),
    ),
    answers={
        200: Answer("One page of requests.", RequestList),
        400: Answer("Malformed flow name or query.", Error),
        404: Answer("No such flow.", Error),
    },
)
async def requests(api: Api, request: HTTPRequest) -> Response:
    name = inputs.flow_name(request)
    params = request.query_params
    unknown = set(params) - {"status", "offset", "limit"}
    if unknown:
        raise inputs.BadInput(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    status = inputs.status_filter(params.get("status"))
    offset = inputs.integer(params.get("offset"), "offset", 0, 0, 10**9)
    limit = inputs.integer(params.get("limit"), "limit", 50, 1, MAX_LIMIT)
    await call(api.service.definition, name)
    found = await call(api.service.requests, name, status, offset, limit)
    page = RequestList(
        flow=name,
        status=status,
        offset=offset,
        limit=limit,
        next_offset=offset + len(found) if len(found) == limit else None,
        requests=[summary(s) for s in found],
    )
    return responses.json(page)


# -- controlling a request ---------------------------------------------------------------------
def _control_answers() -> dict[int, Answer]:
    return {
        200: Answer("The request's status now.", Control, REQUEST_HEADERS),
        400: Answer("Malformed flow name or request id.", Error),
        404: Answer("No such flow or request.", Error),
        409: Answer("The request has ended already.", Control),
    }


async def _control(
    api: Api, request: HTTPRequest, action: Callable[[str, str], Status]
) -> Response:
    name, request_id = inputs.flow_name(request), inputs.request_id(request)
    try:
        status = await call(action, name, request_id)
    except NotRunning as exc:
        found = await call(api.service.state, name, request_id)
        body = Control(request_id, name, found.status, str(exc))
        return responses.json(body, code=409, request_id=request_id, status=found.status)
    return responses.json(Control(request_id, name, status), request_id=request_id, status=status)


@endpoint(
    "POST",
    "/flow/{name}/requests/{request_id}/pause",
    "Hold the request once its running tasks finish.",
    params=(NAME_PARAM, ID_PARAM),
    answers=_control_answers(),
)
async def pause(api: Api, request: HTTPRequest) -> Response:
    return await _control(api, request, api.service.pause)


@endpoint(
    "POST",
    "/flow/{name}/requests/{request_id}/resume",
    "Continue a paused request.",
    params=(NAME_PARAM, ID_PARAM),
    answers=_control_answers(),
)
async def resume(api: Api, request: HTTPRequest) -> Response:
    return await _control(api, request, api.service.resume)


@endpoint(
    "POST",
    "/flow/{name}/requests/{request_id}/stop",
    "End the request; nothing more of it runs.",
    params=(NAME_PARAM, ID_PARAM),
    answers=_control_answers(),
)
async def stop(api: Api, request: HTTPRequest) -> Response:
    return await _control(api, request, api.service.stop)


@endpoint(
    "POST",
    "/flow/{name}/requests/{request_id}/retry",
    "Go on with a failed or stopped request from where it ended, under the same id: "
    "completed vertices keep their outputs; the failed ones (and those queued or held "
    "when it ended) run again.",
    params=(NAME_PARAM, ID_PARAM),
    answers={
        200: Answer("The request runs again.", Control, REQUEST_HEADERS),
        400: Answer("Malformed flow name or request id.", Error),
        404: Answer(
            "No such flow or request, or the flow's version it runs is not registered any more.",
            Error,
        ),
        409: Answer("The request is not failed or stopped (running, or completed).", Control),
    },
)
async def retry(api: Api, request: HTTPRequest) -> Response:
    return await _control(api, request, api.service.retry)


# -- the service ---------------------------------------------------------------------------------
@endpoint("GET", "/flows", "The registered flows.", answers={200: Answer("Their names.", Flows)})
async def flows(api: Api, request: HTTPRequest) -> Response:
    return responses.json(Flows(await call(api.service.flows)))


@endpoint(
    "GET",
    "/flow/{name}/definition",
    "The flow's definition: its vertices and edges.",
    params=(NAME_PARAM,),
    answers={
        200: Answer("The definition.", dict[str, Any]),
        400: Answer("Malformed flow name.", Error),
        404: Answer("No such flow.", Error),
    },
)
async def definition(api: Api, request: HTTPRequest) -> Response:
    name = inputs.flow_name(request)
    return responses.json(dict(await call(api.service.definition, name)))


@endpoint("GET", "/workers", "The live workers.", answers={200: Answer("The workers.", Workers)})
async def workers(api: Api, request: HTTPRequest) -> Response:
    found = await call(api.service.workers)
    return responses.json(Workers([dict(w) for w in found]))


@endpoint(
    "GET",
    "/health",
    "Whether the server and its backend answer (never needs a token).",
    public=True,
    answers={
        200: Answer("Healthy.", Health),
        503: Answer("The backend does not answer.", Health),
    },
)
async def health(api: Api, request: HTTPRequest) -> Response:
    """Up or down within about a second. Only a caller with the token (or any caller
    when none is set) learns the kind of backend; nobody learns its address."""
    up = await api.ping()
    token = api.settings.token
    given = request.headers.get("authorization", "")
    trusted = token is None or hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    kind: Literal["embedded", "redis"] = "embedded" if api.service.embedded else "redis"
    backend = kind if trusted else None
    if not up:
        return responses.json(Health("unavailable", backend), code=503, headers=RETRY)
    return responses.json(Health("ok", backend))
