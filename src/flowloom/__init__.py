"""flowloom: distributed workflows as DAGs of plain Python tasks."""

import logging as _logging

from .context import Context
from .dag import Dag, Workflow
from .errors import (
    BackendRefused,
    BackendUnavailable,
    DefinitionError,
    DuplicateRequest,
    FlowloomError,
    FlowNotFound,
    InvalidRequest,
    NoOutput,
    NotRunning,
    Overloaded,
    RequestError,
    RequestFailed,
    RequestNotFound,
    RequestStopped,
    ResultTimeout,
    StepError,
)
from .service import FlowService
from .types import ErrorInfo, Request, RequestState, Status, VertexState

# A library configures no logging: an application that runs flows in its own process decides
# where records go. The blocking entry points (start*, flowloom.http.serve, the CLI) log to
# stderr through flowloom.logs.configure.
_logging.getLogger("flowloom").addHandler(_logging.NullHandler())

__version__ = "0.1.0.dev0"

__all__ = [
    "BackendRefused",
    "BackendUnavailable",
    "Context",
    "Dag",
    "DefinitionError",
    "DuplicateRequest",
    "ErrorInfo",
    "FlowNotFound",
    "FlowService",
    "FlowloomError",
    "InvalidRequest",
    "NoOutput",
    "NotRunning",
    "Overloaded",
    "Request",
    "RequestError",
    "RequestFailed",
    "RequestNotFound",
    "RequestState",
    "RequestStopped",
    "ResultTimeout",
    "Status",
    "StepError",
    "VertexState",
    "Workflow",
    "__version__",
]
