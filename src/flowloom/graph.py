"""Draw a flow definition (``Dag.definition()``) as Mermaid or Graphviz DOT text."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any

__all__ = ["to_dot", "to_mermaid"]

_KIND_LABEL = {"subdag": "sub-DAG", "conditional": "conditional", "foreach": "foreach"}


def _ident(path: str) -> str:
    return (
        "v_"
        + re.sub(r"[^A-Za-z0-9_]", "_", path)
        + "_"
        + format(zlib.crc32(path.encode()) % 10**6, "06d")
    )


def _inner(vertex: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The DAGs drawn inside a composite vertex, with a label suffix each."""
    kind = vertex["kind"]
    if kind == "conditional":
        return [(f"[{key}]", dag) for key, dag in vertex["branches"].items()]
    if kind == "foreach":
        return [("[*]", vertex["dag"])]
    if kind == "subdag":
        return [("", vertex["dag"])]
    return []


def _first_last(dag: Mapping[str, Any], path: str) -> tuple[list[str], str]:
    """Leaf node ids where a DAG starts and where it ends (for edges into clusters)."""
    names = [v["name"] for v in dag["vertices"]]
    targets = {e["to"] for e in dag["edges"]}
    sources = {e["from"] for e in dag["edges"]}
    firsts = [n for n in names if n not in targets]
    last = next((n for n in reversed(names) if n not in sources), names[-1])
    return [path + n for n in firsts], path + last


def to_mermaid(definition: Mapping[str, Any]) -> str:
    """``flowchart TD`` text; composite vertices are subgraphs, ordering edges dotted."""
    lines = ["flowchart TD"]
    _mermaid_dag(definition["dag"], "", lines, "  ")
    return "\n".join(lines) + "\n"


def _mermaid_dag(dag: Mapping[str, Any], path: str, lines: list[str], pad: str) -> None:
    for vertex in dag["vertices"]:
        vpath = path + vertex["name"]
        inner = _inner(vertex)
        if not inner:
            lines.append(f'{pad}{_ident(vpath)}["{vertex["name"]}"]')
            continue
        label = f"{vertex['name']} ({_KIND_LABEL[vertex['kind']]})"
        lines.append(f'{pad}subgraph {_ident(vpath)} ["{label}"]')
        for suffix, sub in inner:
            if vertex["kind"] == "conditional":
                lines.append(f'{pad}  subgraph {_ident(vpath + suffix)} ["{suffix}"]')
                _mermaid_dag(sub, f"{vpath}{suffix}/", lines, pad + "    ")
                lines.append(f"{pad}  end")
            else:
                _mermaid_dag(sub, f"{vpath}{suffix}/", lines, pad + "  ")
        lines.append(f"{pad}end")
    for edge in dag["edges"]:
        arrow = "-.->" if edge["kind"] == "ordering" else "-->"
        if edge.get("forwarder"):
            arrow = f'-- "{edge["forwarder"]}" -->'
        lines.append(f"{pad}{_ident(path + edge['from'])} {arrow} {_ident(path + edge['to'])}")


def to_dot(definition: Mapping[str, Any]) -> str:
    """A ``digraph``; composite vertices are clusters, ordering edges dashed."""
    lines = [f'digraph "{definition["name"]}" {{', "  compound=true;", "  node [shape=box];"]
    _dot_dag(definition["dag"], "", lines, "  ")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_dag(
    dag: Mapping[str, Any], path: str, lines: list[str], pad: str
) -> dict[str, tuple[list[str], str]]:
    ends: dict[str, tuple[list[str], str]] = {}
    for vertex in dag["vertices"]:
        vpath = path + vertex["name"]
        inner = _inner(vertex)
        if not inner:
            lines.append(f'{pad}{_ident(vpath)} [label="{vertex["name"]}"];')
            ends[vertex["name"]] = ([_ident(vpath)], _ident(vpath))
            continue
        label = f"{vertex['name']} ({_KIND_LABEL[vertex['kind']]})"
        lines.append(f"{pad}subgraph cluster_{_ident(vpath)} {{")
        lines.append(f'{pad}  label="{label}";')
        firsts: list[str] = []
        last = ""
        for suffix, sub in inner:
            if vertex["kind"] == "conditional":
                lines.append(f"{pad}  subgraph cluster_{_ident(vpath + suffix)} {{")
                lines.append(f'{pad}    label="{suffix}";')
                sub_ends = _dot_dag(sub, f"{vpath}{suffix}/", lines, pad + "    ")
                lines.append(f"{pad}  }}")
            else:
                sub_ends = _dot_dag(sub, f"{vpath}{suffix}/", lines, pad + "  ")
            sub_first, sub_last = _first_last(sub, "")
            for name in sub_first:
                firsts.extend(sub_ends[name][0])
            last = sub_ends[sub_last][1]
        lines.append(f"{pad}}}")
        ends[vertex["name"]] = (firsts, last)
    for edge in dag["edges"]:
        source, target = ends[edge["from"]][1], ends[edge["to"]][0]
        attrs = ["style=dashed"] if edge["kind"] == "ordering" else []
        if edge.get("forwarder"):
            attrs.append(f'label="{edge["forwarder"]}"')
        for t in target:
            suffix = f" [{', '.join(attrs)}]" if attrs else ""
            lines.append(f"{pad}{source} -> {t}{suffix};")
    return ends
