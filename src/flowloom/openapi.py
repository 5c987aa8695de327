"""The OpenAPI 3.1 description of the HTTP API (``GET /openapi.json``), written by hand.

``spec`` takes the app's settings, so the document describes exactly the app that
serves it: the bearer scheme only when a token is set, the signature header only when
an HMAC secret is set. ``tests/test_http.py`` checks that it names every route.
"""

from __future__ import annotations

from typing import Any

from .dag import NAME
from .service import REQUEST_ID
from .types import Status

__all__ = ["spec"]

JSON = "application/json"
BYTES = "application/octet-stream"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": _ref(schema)}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> dict[str, Any]:
    return _json(description, "Error")


REQUEST_HEADERS = {
    "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"},
    "X-Request-Status": {"$ref": "#/components/headers/X-Request-Status"},
}

NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The flow's name.",
    "schema": {"type": "string", "pattern": f"^{NAME.pattern}$"},
    "example": "myflow",
}
ID_PARAM = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "description": "The request's id.",
    "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
    "example": "order-1001",
}


PAGE_PARAMS = [
    {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": [s.value for s in Status]},
    },
    {
        "name": "offset",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "maximum": 10**9},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
]


def _wait_header(limit: float, default: str) -> dict[str, Any]:
    return {
        "name": "X-Wait",
        "in": "header",
        "required": False,
        "description": f"Seconds to wait for the result (0 to {limit:g}; default {default}).",
        "schema": {"type": "number", "minimum": 0, "maximum": limit},
    }


def _outcome(accepted: str) -> dict[str, Any]:
    """The answers of execute and result: the result, or where the request stands."""
    return {
        "200": {
            "description": "The request completed: its result's bytes.",
            "headers": REQUEST_HEADERS,
            "content": {BYTES: {"schema": {"type": "string", "format": "binary"}}},
        },
        "202": _json(
            accepted,
            "Accepted",
            {
                **REQUEST_HEADERS,
                "Location": {"description": "The request's state.", "schema": {"type": "string"}},
            },
        ),
        "404": _error("No such flow or request."),
        "409": {
            "description": "The request was stopped (or, on execute, its id is taken).",
            "content": {JSON: {"schema": {"anyOf": [_ref("Outcome"), _ref("Error")]}}},
        },
        "424": _json("The request failed: `error` says where and why.", "Outcome"),
    }


def _control(verb: str, what: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": verb,
            "summary": what,
            "parameters": [NAME_PARAM, ID_PARAM],
            "responses": {
                "200": _json("The request's status now.", "Control", REQUEST_HEADERS),
                "400": _error("Malformed flow name or request id."),
                "404": _error("No such flow or request."),
                "409": _json("The request has ended already.", "Control"),
            },
        }
    }


def spec(
    *, auth: bool, hmac: bool, callbacks: bool, max_body: int, wait_timeout: float
) -> dict[str, Any]:
    """The OpenAPI document of an app with these settings."""
    from . import __version__

    execute_params: list[dict[str, Any]] = [
        NAME_PARAM,
        {
            "name": "X-Async",
            "in": "header",
            "required": False,
            "description": "`true`: answer 202 with the request id at once.",
            "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
        },
        {
            "name": "X-Request-Id",
            "in": "header",
            "required": False,
            "description": "The id to give the request (default: a new random one).",
            "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
        },
        _wait_header(wait_timeout, f"{wait_timeout:g}"),
    ]
    if callbacks:
        execute_params.append(
            {
                "name": "X-Callback-Url",
                "in": "header",
                "required": False,
                "description": "An http(s) URL to POST the final answer to when it ends.",
                "schema": {"type": "string", "format": "uri", "pattern": "^https?://"},
            }
        )
    if hmac:
        execute_params.append(
            {
                "name": "X-Hub-Signature",
                "in": "header",
                "required": True,
                "description": "`sha1=<hex>` or `sha256=<hex>`: an HMAC of the body.",
                "schema": {"type": "string", "pattern": "^sha(1|256)=[0-9a-f]+$"},
            }
        )
    execute_responses = _outcome("Not done within the wait (or `X-Async`): the request id.")
    execute_responses.update(
        {
            "400": _error("Malformed flow name, header or query string."),
            "413": _error(f"The body is over {max_body} bytes."),
        }
    )
    if hmac:
        execute_responses["401"] = _error("Missing or wrong X-Hub-Signature.")
    result_responses = _outcome("Not done yet: where the request stands.")
    result_responses["400"] = _error("Malformed flow name, request id or X-Wait.")

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "flowloom",
            "version": __version__,
            "description": "Run, watch and control flowloom flows. See docs/http.md.",
        },
        "paths": {
            "/flow/{name}": {
                "post": {
                    "operationId": "execute",
                    "summary": "Run the flow with the body as input and the query as options.",
                    "parameters": execute_params,
                    "requestBody": {
                        "required": False,
                        "content": {
                            "*/*": {
                                "schema": {
                                    "type": "string",
                                    "format": "binary",
                                    "maxLength": max_body,
                                }
                            }
                        },
                    },
                    "responses": execute_responses,
                }
            },
            "/flows": {
                "get": {
                    "operationId": "flows",
                    "summary": "The registered flows.",
                    "responses": {"200": _json("Their names.", "Flows")},
                }
            },
            "/flow/{name}/definition": {
                "get": {
                    "operationId": "definition",
                    "summary": "The flow's definition: its vertices and edges.",
                    "parameters": [NAME_PARAM],
                    "responses": {
                        "200": _json("The definition.", "Definition"),
                        "400": _error("Malformed flow name."),
                        "404": _error("No such flow."),
                    },
                }
            },
            "/flow/{name}/requests": {
                "get": {
                    "operationId": "requests",
                    "summary": "The flow's requests, newest first.",
                    "parameters": [
                        NAME_PARAM,
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": [s.value for s in Status]},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 10**9},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {
                        "200": _json("One page of requests.", "RequestList"),
                        "400": _error("Malformed flow name or query."),
                        "404": _error("No such flow."),
                    },
                }
            },
            "/flow/{name}/requests/{request_id}": {
                "get": {
                    "operationId": "state",
                    "summary": "The request's status, timings, error and vertex states.",
                    "parameters": [NAME_PARAM, ID_PARAM],
                    "responses": {
                        "200": _json("The state.", "RequestState", REQUEST_HEADERS),
                        "400": _error("Malformed flow name or request id."),
                        "404": _error("No such flow or request."),
                    },
                }
            },
            "/flow/{name}/requests/{request_id}/result": {
                "get": {
                    "operationId": "result",
                    "summary": "The request's result (waiting up to X-Wait seconds for it).",
                    "parameters": [NAME_PARAM, ID_PARAM, _wait_header(wait_timeout, "0")],
                    "responses": result_responses,
                }
            },
            "/flow/{name}/requests/{request_id}/output": {
                "get": {
                    "operationId": "output",
                    "summary": "The output of one completed vertex instance of the request.",
                    "parameters": [
                        NAME_PARAM,
                        ID_PARAM,
                        {
                            "name": "vertex",
                            "in": "query",
                            "required": True,
                            "description": "The vertex instance's address, as in the state.",
                            "schema": {"type": "string", "minLength": 1},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The output's bytes.",
                            "content": {BYTES: {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "400": _error("Malformed flow name, request id or query."),
                        "404": _error("No such flow, request, or output of that vertex."),
                    },
                }
            },
            "/flow/{name}/requests/{request_id}/pause": _control(
                "pause", "Hold the request once its running tasks finish."
            ),
            "/flow/{name}/requests/{request_id}/resume": _control(
                "resume", "Continue a paused request."
            ),
            "/flow/{name}/requests/{request_id}/stop": _control(
                "stop", "End the request; nothing more of it runs."
            ),
            "/requests": {
                "get": {
                    "operationId": "all_requests",
                    "summary": "The requests of every flow (or of `flow`), newest first.",
                    "parameters": [
                        {
                            "name": "flow",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "pattern": f"^{NAME.pattern}$"},
                        },
                        *PAGE_PARAMS,
                    ],
                    "responses": {
                        "200": _json("One page of requests.", "RequestList"),
                        "400": _error("Malformed query."),
                    },
                }
            },
            "/flow/{name}/requests/{request_id}/steps": {
                "get": {
                    "operationId": "steps",
                    "summary": "The request's summary and its progress per vertex "
                    "(instances of foreach branches counted by status).",
                    "parameters": [NAME_PARAM, ID_PARAM],
                    "responses": {
                        "200": _json("The progress.", "Progress", REQUEST_HEADERS),
                        "400": _error("Malformed flow name, request id or query."),
                        "404": _error("No such flow or request."),
                    },
                }
            },
            "/flow/{name}/requests/{request_id}/instances": {
                "get": {
                    "operationId": "instances",
                    "summary": "One page of the instances of one vertex, earliest started first.",
                    "parameters": [
                        NAME_PARAM,
                        ID_PARAM,
                        {
                            "name": "vertex",
                            "in": "query",
                            "required": True,
                            "description": "The vertex path, as in `steps` (`items[]/check`).",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 4096},
                        },
                        *PAGE_PARAMS,
                    ],
                    "responses": {
                        "200": _json("One page of instances.", "Instances", REQUEST_HEADERS),
                        "400": _error("Malformed flow name, request id or query."),
                        "404": _error("No such flow or request."),
                    },
                }
            },
            "/queue": {
                "get": {
                    "operationId": "queue",
                    "summary": "Tasks waiting for a worker: ready, and retries delayed.",
                    "responses": {"200": _json("The queue's depth.", "Queue")},
                }
            },
            "/workers": {
                "get": {
                    "operationId": "workers",
                    "summary": "The live workers.",
                    "responses": {"200": _json("The workers.", "Workers")},
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether the server and its backend answer (never needs a token).",
                    "security": [],
                    "responses": {
                        "200": _json("Healthy.", "Health"),
                        "503": _json("The backend does not answer.", "Health"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": _schemas(), "headers": _headers()},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        for path in document["paths"].values():
            for operation in path.values():
                if operation.get("security") != []:
                    operation["responses"]["401"] = _error("Missing or wrong bearer token.")
    return document


def _headers() -> dict[str, Any]:
    return {
        "X-Request-Id": {"description": "The request's id.", "schema": {"type": "string"}},
        "X-Request-Status": {
            "description": "The request's status.",
            "schema": {"type": "string", "enum": [s.value for s in Status]},
        },
    }


def _schemas() -> dict[str, Any]:
    status = {"type": "string", "enum": [s.value for s in Status]}
    time_or_null = {"type": ["number", "null"]}
    error_or_null = {"oneOf": [_ref("ErrorInfo"), {"type": "null"}]}
    summary = {
        "request_id": {"type": "string"},
        "flow": {"type": "string"},
        "status": status,
        "created": {"type": "number"},
        "ended": time_or_null,
        "error": error_or_null,
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "ErrorInfo": {
            "type": "object",
            "required": ["vertex", "type", "message"],
            "properties": {
                "vertex": {"type": "string"},
                "type": {"type": "string"},
                "message": {"type": "string"},
            },
        },
        "VertexState": {
            "type": "object",
            "required": ["address", "status", "started", "ended", "attempts", "error"],
            "properties": {
                "address": {"type": "string"},
                "status": status,
                "started": time_or_null,
                "ended": time_or_null,
                "attempts": {"type": "integer"},
                "error": error_or_null,
            },
        },
        "RequestSummary": {
            "type": "object",
            "required": list(summary),
            "properties": summary,
        },
        "RequestState": {
            "type": "object",
            "required": [*summary, "vertices"],
            "properties": {
                **summary,
                "vertices": {"type": "object", "additionalProperties": _ref("VertexState")},
            },
        },
        "RequestList": {
            "type": "object",
            "required": ["flow", "status", "offset", "limit", "next_offset", "requests"],
            "properties": {
                "flow": {"type": ["string", "null"]},
                "status": {"oneOf": [status, {"type": "null"}]},
                "offset": {"type": "integer"},
                "limit": {"type": "integer"},
                "next_offset": {"type": ["integer", "null"]},
                "requests": {"type": "array", "items": _ref("RequestSummary")},
            },
        },
        "Accepted": {
            "type": "object",
            "required": ["request_id", "flow", "status", "state"],
            "properties": {
                "request_id": {"type": "string"},
                "flow": {"type": "string"},
                "status": status,
                "state": {"type": "string", "description": "The path of the request's state."},
            },
        },
        "Outcome": {
            "type": "object",
            "required": ["request_id", "status"],
            "properties": {
                "request_id": {"type": "string"},
                "flow": {"type": "string"},
                "status": status,
                "error": error_or_null,
            },
        },
        "Control": {
            "type": "object",
            "required": ["request_id", "status"],
            "properties": {
                "request_id": {"type": "string"},
                "flow": {"type": "string"},
                "status": status,
                "error": {"type": "string"},
            },
        },
        "Progress": {
            "type": "object",
            "required": [*summary, "steps"],
            "properties": {
                **summary,
                "steps": {"type": "array", "items": _ref("VertexProgress")},
            },
        },
        "VertexProgress": {
            "type": "object",
            "required": ["vertex", "instances", "counts", "started", "ended", "attempts"],
            "properties": {
                "vertex": {"type": "string"},
                "instances": {"type": "integer"},
                "counts": {
                    "type": "object",
                    "description": "Instances by status.",
                    "additionalProperties": {"type": "integer"},
                },
                "started": time_or_null,
                "ended": time_or_null,
                "attempts": {"type": "integer"},
            },
        },
        "Instances": {
            "type": "object",
            "required": ["vertex", "offset", "limit", "total", "next_offset", "instances"],
            "properties": {
                "request_id": {"type": "string"},
                "vertex": {"type": "string"},
                "status": {"oneOf": [status, {"type": "null"}]},
                "offset": {"type": "integer"},
                "limit": {"type": "integer"},
                "total": {"type": "integer"},
                "next_offset": {"type": ["integer", "null"]},
                "instances": {"type": "array", "items": _ref("VertexState")},
            },
        },
        "Queue": {
            "type": "object",
            "required": ["ready", "delayed"],
            "properties": {"ready": {"type": "integer"}, "delayed": {"type": "integer"}},
        },
        "Flows": {
            "type": "object",
            "required": ["flows"],
            "properties": {"flows": {"type": "array", "items": {"type": "string"}}},
        },
        "Definition": {"type": "object", "description": "The flow's vertices and edges."},
        "Workers": {
            "type": "object",
            "required": ["workers"],
            "properties": {"workers": {"type": "array", "items": {"type": "object"}}},
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "backend": {"type": "string"},
                "error": {"type": "string"},
            },
        },
    }
