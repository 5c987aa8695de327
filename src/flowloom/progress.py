"""A request's progress per vertex: its vertex instances grouped by the vertex they run.

A foreach of 10,000 items has 10,000 instances of each vertex in its branch
(``users[u1]/check``, ``users[u2]/check``, ...); a page showing the request wants one
line per vertex of the definition (``users[]/check``: "9,987 done, 3 failed") and the
instances of one vertex a page at a time. Vertex paths are written as in the plan:
foreach item keys become ``[]``, conditional branch keys stay (``check[pass]/notify``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .types import RequestState, Status, VertexState

__all__ = ["VertexProgress", "foreach_paths", "instances", "progress", "vertex_path"]

# One address segment: a vertex name, optionally with a branch or item key. Item keys
# are URL-quoted in addresses, and names and condition keys hold no '/', '[' or ']'.
_SEGMENT = re.compile(r"([^/\[\]]+)(?:\[([^/\[\]]*)\])?")


@dataclass
class VertexProgress:
    """How far the instances of one vertex have come."""

    vertex: str
    instances: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    attempts: int = 0

    def add(self, state: VertexState) -> None:
        self.instances += 1
        self.counts[state.status.value] = self.counts.get(state.status.value, 0) + 1
        self.attempts += state.attempts
        if state.started is not None and (self.started is None or state.started < self.started):
            self.started = state.started
        if state.ended is not None and (self.ended is None or state.ended > self.ended):
            self.ended = state.ended

    def to_json(self) -> dict[str, Any]:
        return {
            "vertex": self.vertex,
            "instances": self.instances,
            "counts": dict(self.counts),
            "started": self.started,
            "ended": self.ended,
            "attempts": self.attempts,
        }


def foreach_paths(definition: Mapping[str, Any]) -> frozenset[str]:
    """The paths of the foreach vertices of a flow definition (``Dag.definition()``)."""
    found: set[str] = set()

    def walk(dag: Mapping[str, Any], prefix: str) -> None:
        for vertex in dag["vertices"]:
            path = prefix + vertex["name"]
            kind = vertex["kind"]
            if kind == "foreach":
                found.add(path)
                walk(vertex["dag"], path + "[]/")
            elif kind == "subdag":
                walk(vertex["dag"], path + "/")
            elif kind == "conditional":
                for key, branch in vertex["branches"].items():
                    walk(branch, f"{path}[{key}]/")

    walk(definition["dag"], "")
    return frozenset(found)


def vertex_path(address: str, foreach: frozenset[str]) -> str:
    """The vertex an instance address runs: ``users[u42]/check`` -> ``users[]/check``
    when ``users`` is a foreach (an address it cannot read is its own vertex)."""
    path = ""
    for part in address.split("/"):
        match = _SEGMENT.fullmatch(part)
        if match is None:
            return address
        name, key = match.groups()
        path += name
        if key is not None:
            path += "[]" if path in foreach else f"[{key}]"
        path += "/"
    return path[:-1]


def progress(state: RequestState, foreach: frozenset[str]) -> list[VertexProgress]:
    """One ``VertexProgress`` per vertex the request has reached, in the order reached."""
    by_vertex: dict[str, VertexProgress] = {}
    for address, vertex_state in state.vertices.items():
        path = vertex_path(address, foreach)
        entry = by_vertex.get(path)
        if entry is None:
            entry = by_vertex[path] = VertexProgress(path)
        entry.add(vertex_state)
    return list(by_vertex.values())


def instances(
    state: RequestState,
    foreach: frozenset[str],
    vertex: str,
    status: Status | None = None,
) -> list[VertexState]:
    """The instances of ``vertex`` (optionally with ``status``), earliest started first."""
    chosen: Iterable[VertexState] = (
        v
        for a, v in state.vertices.items()
        if vertex_path(a, foreach) == vertex and (status is None or v.status is status)
    )
    return sorted(chosen, key=_start_order)


def _start_order(state: VertexState) -> tuple[bool, float, str]:
    return (state.started is None, state.started or 0.0, state.address)
