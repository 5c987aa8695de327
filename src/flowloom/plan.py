"""Compile a workflow definition into a validated, immutable plan.

The plan is made of *steps*, the units a worker runs:

- a node is one ``RUN`` step, addressed by its path (``verify-image/face-detect``);
- a conditional or foreach vertex is a ``SPLIT`` step (run the condition or the
  foreach, start the branches) and a ``JOIN`` step (combine the branch outputs);
- a sub-DAG has no step of its own: its vertices are laid into the enclosing DAG,
  its first vertices taking the sub-DAG's inputs and its last vertex its outputs.

Every step knows its successors (``targets``) and how many inputs it waits for
(``needed``), so finishing a step costs a few lookups, never a walk of the graph.
Inside a foreach branch, addresses carry the item key: ``users[u42]/mark-profile``;
``template`` has a ``{n}`` placeholder for the key of the n-th enclosing foreach.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .dag import (
    ConditionalSpec,
    Dag,
    EdgeSpec,
    ForEachSpec,
    NodeSpec,
    SubDagSpec,
    Workflow,
    resolve_subdag,
)
from .errors import DefinitionError
from .types import (
    Aggregator,
    Condition,
    FailureHandler,
    FailureHook,
    FinallyHook,
    ForEach,
    Forwarder,
    Handler,
)

__all__ = [
    "END",
    "PASSTHROUGH",
    "SCOPE_INPUT",
    "Plan",
    "Step",
    "StepKind",
    "Target",
    "compile_workflow",
]

END = "!end"  # the pseudo-step that receives the flow's result
SCOPE_INPUT = ""  # the input slot of a DAG's first vertices
PASSTHROUGH = "^"  # the join slot holding the branch vertex's own input
MAX_NESTING = 100  # levels of sub-DAGs and branches inside one another


class StepKind(enum.Enum):
    RUN = "run"
    SPLIT = "split"
    JOIN = "join"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a step's output goes: ``step``'s input ``slot``; ``pop`` leaves a foreach item."""

    step: str
    slot: str
    data: bool = True
    pop: bool = False


@dataclass(frozen=True, eq=False)
class Step:
    id: str
    kind: StepKind
    vertex: str  # the vertex path without item keys, e.g. "users[]/mark-profile"
    template: str  # the address, with "{n}" for the n-th foreach key
    targets: tuple[Target, ...] = ()
    needed: int = 1  # inputs to wait for; -1 for a join, whose count the split sets
    data_slots: tuple[str, ...] = (SCOPE_INPUT,)
    forwarders: Mapping[str, Forwarder] = field(default_factory=dict)
    handlers: tuple[Handler, ...] = ()
    aggregator: Aggregator | None = None
    retries: int = 0
    backoff: float = 0.0
    timeout: float | None = None
    on_failure: FailureHandler | None = None
    condition: Condition | None = None
    foreach: ForEach | None = None
    branches: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # key -> entry steps
    join: str = ""  # for a split: its join step
    branch: str = ""  # for a split or join: "conditional" or "foreach"

    def address(self, keys: tuple[str, ...]) -> str:
        return self.template.format(*keys) if keys else self.template

    def instance(self, keys: tuple[str, ...]) -> str:
        """A unique id of one run of this step: its address, plus ``:split``/``:join``."""
        return self.names(keys)[0]

    def names(self, keys: tuple[str, ...]) -> tuple[str, str]:
        """The instance id and the address of one run of this step, formatted once."""
        address = self.template.format(*keys) if keys else self.template
        if self.kind is StepKind.RUN:
            return address, address
        return f"{address}:{self.kind.value}", address


@dataclass(frozen=True, eq=False)
class Plan:
    name: str
    version: str
    steps: Mapping[str, Step]
    entries: tuple[str, ...]
    failure_hooks: tuple[FailureHook, ...]
    finally_hooks: tuple[FinallyHook, ...]
    definition: Mapping[str, object]
    keep_outputs: bool = True  # False: each output is dropped once consumed

    @property
    def has_hooks(self) -> bool:
        return bool(self.failure_hooks or self.finally_hooks)


def compile_workflow(workflow: Workflow) -> Plan:
    """Check ``workflow`` and compile it; raises ``DefinitionError`` naming the vertex."""
    if not isinstance(workflow.keep_outputs, bool):
        raise DefinitionError(
            f"keep_outputs must be True or False, got {workflow.keep_outputs!r}", workflow.name
        )
    compiler = _Compiler()
    scope = compiler.scope(workflow.dag, "", "", 0, (), f"workflow {workflow.name!r}")
    compiler.set_inputs(scope.entries, 1, (SCOPE_INPUT,), {})
    compiler.targets[scope.exit].append(Target(END, ""))
    steps = {sid: compiler.freeze(sid) for sid in compiler.steps}
    plan = Plan(
        name=workflow.name,
        version="",
        steps=MappingProxyType(steps),
        entries=tuple(scope.entries),
        failure_hooks=tuple(workflow.failure_hooks),
        finally_hooks=tuple(workflow.finally_hooks),
        definition=workflow.definition(),
        keep_outputs=workflow.keep_outputs,
    )
    return dataclasses.replace(plan, version=version_of(plan))


def version_of(plan: Plan) -> str:
    """A digest of everything in ``plan`` that decides how it runs.

    Every field of every step goes in (names, edges, retries, backoff, timeouts, ...),
    and every function by its qualified name, as do the hooks: the same definition gives
    the same version in every process, and changing anything but the body of a function
    gives a new one. Not the module's name: one app file is ``__main__`` in one process,
    ``flowloom_app_NAME`` under the CLI and ``NAME`` when imported.
    """
    described = {
        "name": plan.name,
        "entries": list(plan.entries),
        "steps": {sid: _plain(plan.steps[sid]) for sid in sorted(plan.steps)},
        "failure_hooks": _plain(plan.failure_hooks),
        "finally_hooks": _plain(plan.finally_hooks),
    }
    if not plan.keep_outputs:  # named only when set: the versions of other plans stay
        described["keep_outputs"] = False
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data, functions by name (never by ``repr``: an address
    would differ from process to process)."""
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return _code_name(value)


def _code_name(fn: object) -> str:
    if isinstance(fn, functools.partial):
        return (
            f"functools.partial({_code_name(fn.func)}, {len(fn.args)} args, {sorted(fn.keywords)})"
        )
    if hasattr(fn, "__func__"):  # a bound method: its function's name
        fn = fn.__func__
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(qualname, str):
        return qualname
    return f"{type(fn).__qualname__}()"  # a callable object: its class


@dataclass
class _Scope:
    entries: list[str]
    exit: str


@dataclass
class _Vertex:
    entries: list[str]
    exit: str


class _Compiler:
    def __init__(self) -> None:
        self.steps: dict[str, dict[str, object]] = {}
        self.targets: defaultdict[str, list[Target]] = defaultdict(list)

    def add(self, sid: str, **fields: object) -> str:
        self.steps[sid] = {"id": sid, **fields}
        return sid

    def set_inputs(
        self,
        entries: list[str],
        needed: int,
        data_slots: tuple[str, ...],
        forwarders: dict[str, Forwarder],
    ) -> None:
        for sid in entries:
            self.steps[sid].update(
                needed=needed, data_slots=data_slots, forwarders=MappingProxyType(forwarders)
            )

    def freeze(self, sid: str) -> Step:
        fields = self.steps[sid]
        return Step(targets=tuple(self.targets[sid]), **fields)  # type: ignore[arg-type]

    def scope(
        self,
        dag: Dag,
        path: str,
        template: str,
        depth: int,
        stack: tuple[int, ...],
        where: str,
    ) -> _Scope:
        if id(dag) in stack:
            raise DefinitionError(f"{where} contains itself", where)
        if len(stack) > MAX_NESTING:
            raise DefinitionError(
                f"{where} is nested {len(stack)} levels deep: at most {MAX_NESTING} are taken",
                path.rstrip("/"),
            )
        stack = (*stack, id(dag))
        if not dag.vertices:
            raise DefinitionError(f"{where} is empty: it needs at least one vertex", where)
        order = _check_graph(dag, where)
        vertices = {name: self.vertex(dag, name, path, template, depth, stack) for name in order}
        entries: list[str] = []
        incoming_of: dict[str, list[EdgeSpec]] = {}  # in the order the edges were added
        for edge in dag.edges:
            incoming_of.setdefault(edge.target, []).append(edge)
        for name in order:
            incoming = incoming_of.get(name, [])
            vertex = vertices[name]
            if not incoming:
                entries.extend(vertex.entries)
                continue
            data = tuple(e.source for e in incoming if not e.ordering_only)
            forwarders = {e.source: e.forwarder for e in incoming if e.forwarder is not None}
            self.set_inputs(vertex.entries, len(incoming), data, forwarders)
            for e in incoming:
                for sid in vertex.entries:
                    target = Target(sid, e.source, data=not e.ordering_only)
                    self.targets[vertices[e.source].exit].append(target)
        sink = order[-1]
        return _Scope(entries, vertices[sink].exit)

    def vertex(
        self, dag: Dag, name: str, path: str, template: str, depth: int, stack: tuple[int, ...]
    ) -> _Vertex:
        spec = dag.vertices[name]
        vpath, vtemplate = path + name, template + name
        if isinstance(spec, NodeSpec):
            sid = self.add(
                vpath,
                kind=StepKind.RUN,
                vertex=vpath,
                template=vtemplate,
                handlers=spec.handlers,
                aggregator=spec.aggregator,
                retries=spec.retries,
                backoff=spec.backoff,
                timeout=spec.timeout,
                on_failure=spec.on_failure,
            )
            return _Vertex([sid], sid)
        if isinstance(spec, SubDagSpec):
            sub = resolve_subdag(spec)
            scope = self.scope(
                sub, vpath + "/", vtemplate + "/", depth, stack, f"sub-DAG {vpath!r}"
            )
            return _Vertex(scope.entries, scope.exit)
        join = self.add(
            f"{vpath}:join",
            kind=StepKind.JOIN,
            vertex=vpath,
            template=vtemplate,
            needed=-1,
            data_slots=(),
            aggregator=spec.aggregator,
            branch="conditional" if isinstance(spec, ConditionalSpec) else "foreach",
        )
        branches: dict[str, tuple[str, ...]] = {}
        if isinstance(spec, ConditionalSpec):
            for key, branch in spec.branches.items():
                where = f"branch {key!r} of conditional {vpath!r}"
                prefix = f"[{key}]/"
                scope = self.branch(branch, vpath + prefix, vtemplate + prefix, depth, stack, where)
                self.targets[scope.exit].append(Target(join, key))
                branches[key] = tuple(scope.entries)
            split_fields: dict[str, object] = {"condition": spec.condition}
        else:
            assert isinstance(spec, ForEachSpec)
            where = f"branch of foreach {vpath!r}"
            scope = self.branch(
                spec.branch, vpath + "[]/", f"{vtemplate}[{{{depth}}}]/", depth + 1, stack, where
            )
            self.targets[scope.exit].append(Target(join, "", pop=True))
            branches[""] = tuple(scope.entries)
            split_fields = {"foreach": spec.foreach}
        split = self.add(
            f"{vpath}:split",
            kind=StepKind.SPLIT,
            vertex=vpath,
            template=vtemplate,
            branches=MappingProxyType(branches),
            join=join,
            branch=self.steps[join]["branch"],
            **split_fields,
        )
        return _Vertex([split], join)

    def branch(
        self, dag: Dag, path: str, template: str, depth: int, stack: tuple[int, ...], where: str
    ) -> _Scope:
        scope = self.scope(dag, path, template, depth, stack, where)
        self.set_inputs(scope.entries, 1, (SCOPE_INPUT,), {})
        return scope


def _check_graph(dag: Dag, where: str) -> list[str]:
    """Check the edges of one DAG and return its vertices in topological order."""
    successors: dict[str, list[str]] = {name: [] for name in dag.vertices}
    indegree = dict.fromkeys(dag.vertices, 0)
    data_in: dict[str, int] = dict.fromkeys(dag.vertices, 0)
    for edge in dag.edges:
        for end in (edge.source, edge.target):
            if end not in dag.vertices:
                raise DefinitionError(
                    f"edge {edge.source!r} -> {edge.target!r} names an unknown vertex in {where}",
                    end,
                )
        if edge.source == edge.target:
            raise DefinitionError("cycle: an edge from the vertex to itself", edge.source)
        successors[edge.source].append(edge.target)
        indegree[edge.target] += 1
        data_in[edge.target] += not edge.ordering_only
    order = [name for name, degree in indegree.items() if degree == 0]
    remaining = dict(indegree)
    for name in order:
        for succ in successors[name]:
            remaining[succ] -= 1
            if remaining[succ] == 0:
                order.append(succ)
    if len(order) < len(dag.vertices):
        stuck = [n for n in dag.vertices if remaining[n] > 0]
        raise DefinitionError(f"cycle among {', '.join(map(repr, stuck))} in {where}", stuck[0])
    for name, spec in dag.vertices.items():
        _check_inputs(name, spec, data_in[name])
    sinks = [name for name in order if not successors[name]]
    if len(sinks) > 1:
        raise DefinitionError(
            f"{where} has several last vertices ({', '.join(map(repr, sinks))}); "
            "its output would be ambiguous: join them in one vertex with an aggregator",
            sinks[0],
        )
    order.remove(sinks[0])
    order.append(sinks[0])
    return order


def _check_inputs(name: str, spec: object, data_in: int) -> None:
    if isinstance(spec, NodeSpec):
        if data_in > 1 and spec.aggregator is None:
            raise DefinitionError(
                f"{data_in} data edges lead in but the node has no aggregator to merge them", name
            )
        if data_in == 0 and spec.aggregator is not None:
            raise DefinitionError("the node has an aggregator but no data edge leads in", name)
    elif data_in > 1:
        raise DefinitionError(
            f"{data_in} data edges lead into this sub-DAG or branch vertex; merge them in a node "
            "with an aggregator first",
            name,
        )
