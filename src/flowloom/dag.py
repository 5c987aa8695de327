"""Workflow definitions: ``Dag`` and ``Workflow``, as users write them.

A definition only records what the user said. ``plan.compile_workflow`` checks it
and turns it into the immutable plan the engine runs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import DefinitionError
from .names import NAME
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

__all__ = ["Dag", "Workflow"]


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DefinitionError(
            f"{what} name must be 1-128 letters, digits, '_', '.' or '-' "
            f"(not starting with '.' or '-'), got {name!r}",
            name if isinstance(name, str) else None,
        )
    return name


def _check_callable(fn: object, what: str, vertex: str, params: tuple[str, ...] = ()) -> None:
    """``fn`` must be callable with the positional arguments ``params``, if it says."""
    if not callable(fn):
        raise DefinitionError(f"{what} must be callable, got {type(fn).__name__}", vertex)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins do not tell
        return
    try:
        signature.bind(*params)
    except TypeError as exc:
        raise DefinitionError(
            f"{what} {callable_name(fn)!r} must accept ({', '.join(params)}): {exc}", vertex
        ) from None


MAX_RETRIES = 1_000_000  # with the 300 s backoff cap, years of attempts


def _finite(value: object) -> bool:
    """An int or float that is a finite float (a 5,000-digit int is not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: object) -> str:
    """``repr(value)`` for a message: a huge int (which ``repr`` refuses) by its size."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length():,} bits"
    return repr(value)


def callable_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


@dataclass
class NodeSpec:
    name: str
    handlers: tuple[Handler, ...]
    aggregator: Aggregator | None = None
    retries: int = 0
    backoff: float = 0.5
    timeout: float | None = None
    on_failure: FailureHandler | None = None


@dataclass
class SubDagSpec:
    name: str
    source: Dag | Callable[[], Dag]


@dataclass
class ConditionalSpec:
    name: str
    condition: Condition
    branches: dict[str, Dag]
    aggregator: Aggregator | None = None


@dataclass
class ForEachSpec:
    name: str
    foreach: ForEach
    branch: Dag
    aggregator: Aggregator | None = None


VertexSpec = NodeSpec | SubDagSpec | ConditionalSpec | ForEachSpec


@dataclass(frozen=True)
class EdgeSpec:
    source: str
    target: str
    ordering_only: bool = False
    forwarder: Forwarder | None = None


@dataclass
class Dag:
    """A directed acyclic graph of vertices; ``Dag()`` makes one to embed as a sub-DAG.

    Vertices are nodes (``node``), sub-DAGs (``subdag``), conditional branches
    (``conditional_branch``) and foreach branches (``foreach_branch``); ``edge``
    connects two of them. Names are checked as they are added; the graph as a
    whole is checked when its workflow is registered.
    """

    vertices: dict[str, VertexSpec] = field(default_factory=dict)
    edges: list[EdgeSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        # (source, target) of each edge, to refuse a duplicate without a scan of ``edges``
        # (a scan per edge made defining a DAG quadratic in its edges: seconds for
        # 20,000); not a field: not compared, not exported
        self._pairs: set[tuple[str, str]] = {(e.source, e.target) for e in self.edges}

    def _add(self, spec: VertexSpec) -> None:
        check_name(spec.name, "vertex")
        if spec.name in self.vertices:
            raise DefinitionError(
                "duplicate vertex: a vertex of that name exists already", spec.name
            )
        self.vertices[spec.name] = spec

    def node(
        self,
        name: str,
        *handlers: Handler,
        aggregator: Aggregator | None = None,
        retries: int = 0,
        backoff: float = 0.5,
        timeout: float | None = None,
        on_failure: FailureHandler | None = None,
    ) -> Dag:
        """Add a node that pipes its input through ``handlers`` in order.

        A handler is ``(data: bytes, options: dict[str, list[str]]) -> bytes`` (sync or
        ``async``); ``str`` results are encoded as UTF-8 and ``None`` means ``b""``.
        ``aggregator(responses)`` merges the outputs of several parents, keyed by parent
        name. ``retries`` more attempts are made after a failure, waiting ``backoff``
        seconds doubled each time; ``timeout`` bounds each attempt in seconds.
        ``on_failure(error, data)`` runs when the node has failed for good: what it
        returns becomes the node's output; if it raises, the request fails.
        """
        if not handlers:
            raise DefinitionError("a node needs at least one handler", name)
        for handler in handlers:
            _check_callable(handler, "handler", name, ("data", "options"))
        if aggregator is not None:
            _check_callable(aggregator, "aggregator", name, ("responses",))
        if on_failure is not None:
            _check_callable(on_failure, "on_failure", name, ("error", "data"))
        if not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            raise DefinitionError(
                f"retries must be an int from 0 to {MAX_RETRIES:,}, got {_shown(retries)}", name
            )
        if not _finite(backoff) or backoff < 0:
            raise DefinitionError(
                f"backoff must be a finite number >= 0, got {_shown(backoff)}", name
            )
        if timeout is not None and (not _finite(timeout) or timeout <= 0):
            raise DefinitionError(
                f"timeout must be a finite number > 0, got {_shown(timeout)}", name
            )
        self._add(
            NodeSpec(name, handlers, aggregator, retries, float(backoff), timeout, on_failure)
        )
        return self

    def edge(
        self,
        source: str,
        target: str,
        *,
        ordering_only: bool = False,
        forwarder: Forwarder | None = None,
    ) -> Dag:
        """Connect ``source`` to ``target``: ``target`` runs after ``source`` and gets its output.

        ``ordering_only=True`` keeps the order but passes no data; ``forwarder(data)``
        transforms the data on its way along the edge.
        """
        for name in (source, target):
            check_name(name, "vertex")
        if ordering_only and forwarder is not None:
            raise DefinitionError(
                f"edge {source!r} -> {target!r} cannot be ordering-only and have a forwarder",
                target,
            )
        if forwarder is not None:
            _check_callable(forwarder, "forwarder", target, ("data",))
        pairs = self._pairs
        if len(pairs) != len(self.edges):  # edges added to the list by hand: known again
            pairs.clear()
            pairs.update((e.source, e.target) for e in self.edges)
        if (source, target) in pairs:
            raise DefinitionError(f"duplicate edge {source!r} -> {target!r}", target)
        self.edges.append(EdgeSpec(source, target, ordering_only, forwarder))
        pairs.add((source, target))
        return self

    def subdag(self, name: str, dag: Dag | Callable[[], Dag]) -> Dag:
        """Embed ``dag`` (or a zero-argument callable returning one) as the vertex ``name``.

        The vertex's input goes to the sub-DAG's first vertices; its output is the
        output of the sub-DAG's last vertex.
        """
        if not isinstance(dag, Dag):
            _check_callable(dag, "sub-DAG", name, ())
        self._add(SubDagSpec(name, dag))
        return self

    def conditional_branch(
        self,
        name: str,
        conditions: list[str],
        condition: Condition,
        aggregator: Aggregator | None = None,
    ) -> dict[str, Dag]:
        """Add a vertex that runs the branches whose keys ``condition(data)`` picks.

        Returns one empty ``Dag`` per key, to fill in. Picking no key passes the input
        on unchanged; picking one passes that branch's output on; picking several needs
        ``aggregator(outputs_by_key)``.
        """
        _check_callable(condition, "condition", name, ("data",))
        if aggregator is not None:
            _check_callable(aggregator, "aggregator", name, ("responses",))
        if isinstance(conditions, str) or not conditions:
            raise DefinitionError("a conditional branch needs a non-empty list of keys", name)
        branches: dict[str, Dag] = {}
        for key in conditions:
            check_name(key, f"condition key of {name!r}:")
            if key in branches:
                raise DefinitionError(f"duplicate condition key {key!r}", name)
            branches[key] = Dag()
        self._add(ConditionalSpec(name, condition, branches, aggregator))
        return dict(branches)

    def foreach_branch(
        self, name: str, foreach: ForEach, aggregator: Aggregator | None = None
    ) -> Dag:
        """Add a vertex that runs the returned ``Dag`` once per item of ``foreach(data)``.

        ``foreach`` returns ``{key: item_bytes}``; the items run in parallel, each with
        its own addresses (``name[key]/...``). ``aggregator(outputs_by_key)`` merges their
        outputs; without one the vertex passes its input on unchanged.
        """
        _check_callable(foreach, "foreach", name, ("data",))
        if aggregator is not None:
            _check_callable(aggregator, "aggregator", name, ("responses",))
        branch = Dag()
        self._add(ForEachSpec(name, foreach, branch, aggregator))
        return branch

    def definition(self) -> dict[str, Any]:
        """A JSON-able description of this DAG (vertices, edges, nested DAGs)."""
        return {
            "vertices": [_describe(spec) for spec in self.vertices.values()],
            "edges": [
                {
                    "from": e.source,
                    "to": e.target,
                    "kind": "ordering" if e.ordering_only else "data",
                    "forwarder": callable_name(e.forwarder) if e.forwarder else None,
                }
                for e in self.edges
            ],
        }


def resolve_subdag(spec: SubDagSpec) -> Dag:
    source = spec.source
    if isinstance(source, Dag):
        return source
    try:
        dag = source()
    except Exception as exc:
        raise DefinitionError(
            f"sub-DAG factory raised {type(exc).__name__}: {exc}", spec.name
        ) from exc
    if not isinstance(dag, Dag):
        raise DefinitionError(
            f"sub-DAG factory must return a Dag, got {type(dag).__name__}", spec.name
        )
    return dag


def _describe(spec: VertexSpec) -> dict[str, Any]:
    if isinstance(spec, NodeSpec):
        return {
            "name": spec.name,
            "kind": "node",
            "handlers": [callable_name(h) for h in spec.handlers],
            "aggregator": callable_name(spec.aggregator) if spec.aggregator else None,
            "retries": spec.retries,
            "timeout": spec.timeout,
        }
    if isinstance(spec, SubDagSpec):
        return {"name": spec.name, "kind": "subdag", "dag": resolve_subdag(spec).definition()}
    if isinstance(spec, ConditionalSpec):
        return {
            "name": spec.name,
            "kind": "conditional",
            "condition": callable_name(spec.condition),
            "aggregator": callable_name(spec.aggregator) if spec.aggregator else None,
            "branches": {k: d.definition() for k, d in spec.branches.items()},
        }
    return {
        "name": spec.name,
        "kind": "foreach",
        "foreach": callable_name(spec.foreach),
        "aggregator": callable_name(spec.aggregator) if spec.aggregator else None,
        "dag": spec.branch.definition(),
    }


class Workflow:
    """What ``define_workflow(workflow, context)`` fills in: the root ``dag``, hooks and
    the flow's options.

    ``keep_outputs`` (default True): keep every vertex instance's output with the
    request (for ``FlowService.output``, the CLI and the dashboard) for the whole
    retention. Set it to False and each output is dropped once its successors have
    consumed it: only the body and the result are kept, a large body is not kept over
    and over, and reading a vertex's output says that outputs are not kept.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._dag = Dag()
        self.failure_hooks: list[FailureHook] = []
        self.finally_hooks: list[FinallyHook] = []
        self.keep_outputs = True

    @property
    def dag(self) -> Dag:
        """The flow's root DAG."""
        return self._dag

    def on_failure(self, hook: FailureHook) -> FailureHook:
        """Call ``hook(error: ErrorInfo)`` when a request of this flow fails."""
        _check_callable(hook, "on_failure hook", self.name, ("error",))
        self.failure_hooks.append(hook)
        return hook

    def finally_(self, hook: FinallyHook) -> FinallyHook:
        """Call ``hook(status: Status)`` when a request ends: completed, failed or stopped."""
        _check_callable(hook, "finally hook", self.name, ("status",))
        self.finally_hooks.append(hook)
        return hook

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dag": self._dag.definition(),
            "keep_outputs": self.keep_outputs,
        }
