"""What the command line shows of a running system: tables of requests and workers, a
request's view, its progress line, and the JSON forms of the same (pure: no I/O)."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .progress import vertex_path
from .types import RequestState, Status

__all__ = [
    "bytes_json",
    "inspect_view",
    "progress_line",
    "request_row_json",
    "requests_table",
    "workers_table",
]

_STYLE = {
    Status.QUEUED: "dim",
    Status.RUNNING: "cyan",
    Status.PAUSED: "yellow",
    Status.COMPLETED: "green",
    Status.FAILED: "bold red",
    Status.STOPPED: "magenta",
}


def bytes_json(name: str, data: bytes) -> dict[str, str]:
    """``{name: text}`` if ``data`` is UTF-8, else ``{name + "_base64": ...}``: nothing lost."""
    try:
        return {name: data.decode()}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode()}


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _took(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = max(0.0, end - start)
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _counts(state: RequestState) -> tuple[int, int]:
    done = sum(1 for v in state.vertices.values() if v.status is Status.COMPLETED)
    return done, len(state.vertices)


def _cells(*values: str | Text) -> list[Text]:
    """Table cells as plain text: ``items[a]/up`` is an address, not rich markup."""
    return [v if isinstance(v, Text) else Text(v) for v in values]


def _status(status: Status) -> Text:
    return Text(status.value, style=_STYLE[status])


def request_row_json(state: RequestState) -> dict[str, Any]:
    """One request of ``flowloom requests --json``: its state without the vertices, with
    how many vertex instances it has reached and completed."""
    row = state.to_json()
    row.pop("vertices")
    row["vertices_done"], row["vertices_total"] = _counts(state)
    return row


def requests_table(states: list[RequestState]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("REQUEST", "FLOW", "STATUS", "CREATED", "TOOK", "VERTICES", "ERROR"):
        table.add_column(column, overflow="fold")
    for state in states:
        done, total = _counts(state)
        error = f"{state.error.vertex}: {state.error.type}" if state.error else ""
        table.add_row(
            *_cells(
                state.request_id,
                state.flow,
                _status(state.status),
                _when(state.created),
                _took(state.created, state.ended),
                f"{done}/{total}",
                error,
            )
        )
    return table


def workers_table(workers: Sequence[Mapping[str, object]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WORKER", "HOST", "PID", "CONCURRENCY", "FLOWS", "LAST SEEN", "STATE"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for worker in workers:
        versions = worker.get("versions")
        flows = worker.get("flows")
        named = (
            [f"{n}@{v}" for n, v in versions.items()]
            if isinstance(versions, Mapping)
            else [str(f) for f in flows]
            if isinstance(flows, list)
            else []
        )
        seen = worker.get("last_seen")
        table.add_row(
            *_cells(
                str(worker.get("name", "")),
                str(worker.get("host", "")),
                str(worker.get("pid", "")),
                str(worker.get("concurrency", "")),
                ", ".join(named),
                f"{now - seen:.0f}s ago" if isinstance(seen, int | float) else "-",
                Text("degraded", style="bold red") if worker.get("degraded") else "ok",
            )
        )
    return table


def inspect_view(state: RequestState) -> RenderableType:
    """A request as ``flowloom inspect`` shows it: status and timings, one row per vertex
    instance in the order they started, then the error and its traceback."""
    done, total = _counts(state)
    head = Text.assemble(
        ("request ", "bold"),
        state.request_id,
        "  flow ",
        state.flow,
        "  ",
        _status(state.status),
        f"\ncreated {_when(state.created)}  ended {_when(state.ended)}  "
        f"took {_took(state.created, state.ended)}  vertices {done}/{total} completed",
    )
    if state.trace_id:
        head.append(f"\ntrace {state.trace_id}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("VERTEX", "STATUS", "ATTEMPTS", "START", "TOOK", "ERROR"):
        table.add_column(column, overflow="fold")
    ordered = sorted(
        state.vertices.values(), key=lambda v: (v.started is None, v.started or 0.0, v.address)
    )
    for vertex in ordered:
        start = "-" if vertex.started is None else f"+{_took(state.created, vertex.started)}"
        error = f"{vertex.error.type}: {vertex.error.message}" if vertex.error else ""
        table.add_row(
            *_cells(
                vertex.address,
                _status(vertex.status),
                str(vertex.attempts),
                start,
                _took(vertex.started, vertex.ended),
                error,
            )
        )
    parts: list[RenderableType] = [head, table]
    failure = state.error
    if failure is not None:
        parts.append(
            Text(f"error at {failure.vertex}: {failure.type}: {failure.message}", style="bold red")
        )
        if failure.traceback:
            parts.append(Text(failure.traceback.rstrip("\n")))
    return Group(*parts)


def progress_line(state: RequestState, foreach: frozenset[str]) -> str:
    """``running: 12/40 vertices done; users: 9/30 items done``: the vertex instances
    reached so far and, per foreach vertex, its items whose every instance completed."""
    done, total = _counts(state)
    line = f"{state.status.value}: {done}/{total} vertices done"
    items: dict[str, dict[str, bool]] = {}  # foreach path -> item instance -> all completed
    for address, vertex in state.vertices.items():
        prefix = ""
        for part in address.split("/")[:-1]:
            prefix = f"{prefix}/{part}" if prefix else part
            if "[" in part and vertex_path(prefix, foreach).endswith("[]"):
                path = vertex_path(prefix, foreach)[:-2]
                finished = items.setdefault(path, {})
                finished[prefix] = finished.get(prefix, True) and vertex.status is Status.COMPLETED
    for path, finished in items.items():
        line += f"; {path}: {sum(finished.values())}/{len(finished)} items done"
    return line
