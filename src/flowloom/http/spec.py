"""The OpenAPI 3.1 description of the API (``GET /openapi.json``), built from the
endpoint table (``endpoints``) and the response shapes (``shapes``).

It takes the app's settings, so the document describes exactly the app that serves
it: the bearer scheme only when a token is set, the signature header only when an
HMAC secret is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ..types import Status
from . import responses
from .api import Api
from .endpoints import Answer, Endpoint, Param, endpoint
from .settings import Settings
from .shapes import Error, schemas

__all__ = ["document"]

HEADERS: dict[str, Any] = {
    "X-Request-Id": {"description": "The request's id.", "schema": {"type": "string"}},
    "X-Request-Status": {
        "description": "The request's status.",
        "schema": {"$ref": "#/components/schemas/Status"},
    },
    "Location": {"description": "The request's state.", "schema": {"type": "string"}},
    "X-Trace-Id": {
        "description": "The request's OpenTelemetry trace id (32 hex digits).",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    },
}


def document(endpoints: Iterable[Endpoint], settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of an app with these settings serving ``endpoints``."""
    from .. import __version__

    shapes: set[Any] = {Error, Status}
    paths: dict[str, dict[str, Any]] = {}
    for served in endpoints:
        operation = _operation(served, settings, shapes)
        paths.setdefault(served.path, {})[served.method.lower()] = operation
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "flowloom",
            "version": __version__,
            "description": "Run, watch and control flowloom flows. See docs/http.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas(sorted(shapes, key=lambda s: getattr(s, "__name__", str(s)))),
            "headers": {
                name: HEADERS[name] for name in ("X-Request-Id", "X-Request-Status", "X-Trace-Id")
            },
        },
    }
    if settings.token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


SIGNATURE = Param(
    "X-Flowloom-Signature",
    "header",
    "`t=<unix seconds>,sha256=<hex>`: an HMAC of the timestamp, method, path, query, "
    "X-Callback-Url, X-Request-Id and body (see docs/http.md).",
    {"type": "string", "pattern": "^t=[0-9]+,sha256=[0-9a-f]{64}$"},
    required=True,
)


def _operation(served: Endpoint, settings: Settings, shapes: set[Any]) -> dict[str, Any]:
    answers = {code: a for code, a in served.answers.items() if a.when(settings)}
    params = [p for p in served.params if p.when(settings)]
    if settings.token and not served.public and 401 not in answers:
        answers[401] = Answer("Missing or wrong bearer token.", Error)
    if served.path != "/openapi.json":  # every other endpoint may read the backend
        answers.setdefault(503, Answer("The backend is unavailable: try again.", Error))
    signed = settings.hmac_secret and not settings.token and not served.public
    if signed and not served.checks_signature:
        answers[401] = Answer("Missing or wrong X-Flowloom-Signature.", Error)
        answers.setdefault(400, Answer("Malformed X-Flowloom-Signature.", Error))
        params.append(SIGNATURE)
    operation: dict[str, Any] = {
        "operationId": served.operation_id,
        "summary": served.summary,
        "responses": {
            str(code): _response(answer, settings, shapes)
            for code, answer in sorted(answers.items())
        },
    }
    if params:
        operation["parameters"] = [_param(p, settings) for p in params]
    if served.body is not None:
        schema = served.body(settings)
        operation["requestBody"] = {"required": False, "content": {"*/*": {"schema": schema}}}
    if served.public:
        operation["security"] = []
    return operation


def _param(param: Param, settings: Settings) -> dict[str, Any]:
    schema = param.schema(settings) if callable(param.schema) else param.schema
    described: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required,
        "description": param.description,
        "schema": dict(schema),
    }
    if param.example is not None:
        described["example"] = param.example
    return described


def _response(answer: Answer, settings: Settings, shapes: set[Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": answer.description.format(**asdict(settings))}
    if answer.body is bytes:
        binary = {"schema": {"type": "string", "format": "binary"}}
        response["content"] = {responses.BYTES: binary}
    elif answer.body is not None:
        bodies = answer.body if isinstance(answer.body, tuple) else (answer.body,)
        refs = [_schema(b, shapes) for b in bodies]
        schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
        response["content"] = {responses.JSON: {"schema": schema}}
    if answer.headers:
        response["headers"] = {
            name: (
                {"$ref": f"#/components/headers/{name}"} if name != "Location" else HEADERS[name]
            )
            for name in answer.headers
        }
    return response


def _schema(shape: Any, shapes: set[Any]) -> dict[str, Any]:
    name = getattr(shape, "__name__", None)
    if isinstance(shape, type) and name:
        shapes.add(shape)
        return {"$ref": f"#/components/schemas/{name}"}
    return {"type": "object"}  # a mapping: free-form JSON


@endpoint(
    "GET",
    "/openapi.json",
    "This document.",
    answers={200: Answer("The OpenAPI document.", dict[str, Any])},
)
async def openapi(api: Api, request: HTTPRequest) -> Response:
    return Response(api.spec, media_type=responses.JSON)
