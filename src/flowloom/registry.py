"""The flows a process knows: their latest plan by name, and every plan by version."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .context import Context
from .dag import Workflow, check_name
from .errors import DefinitionError, FlowloomError, FlowNotFound
from .plan import Plan, compile_workflow

__all__ = ["DefineWorkflow", "Registry"]

DefineWorkflow = Callable[[Workflow, Context], Any]


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, Plan] = {}
        self._versions: dict[tuple[str, str], Plan] = {}
        self.definitions: dict[str, DefineWorkflow] = {}

    def register(self, name: str, define_workflow: DefineWorkflow) -> Plan:
        """Define, check and compile a flow; ``DefinitionError`` if anything is wrong."""
        check_name(name, "flow")
        if not callable(define_workflow):
            raise DefinitionError(f"flow {name!r}: define_workflow must be callable")
        workflow = Workflow(name)
        try:
            returned = define_workflow(workflow, Context())
        except FlowloomError:
            raise
        except Exception as exc:
            raise DefinitionError(
                f"flow {name!r}: define_workflow raised {type(exc).__name__}: {exc}"
            ) from exc
        if returned is not None and not workflow.dag.vertices:
            raise DefinitionError(
                f"flow {name!r}: define_workflow returned a {type(returned).__name__} and left "
                "workflow.dag empty; it must fill workflow.dag in (e.g. "
                "workflow.dag.subdag('main', dag)) and return nothing"
            )
        plan = compile_workflow(workflow)
        with self._lock:
            self._latest[name] = plan
            self.definitions[name] = define_workflow
            self._versions[(name, plan.version)] = plan
        return plan

    def latest(self, name: str) -> Plan:
        plan = self._latest.get(name)
        if plan is None:
            raise FlowNotFound(f"no flow named {name!r} is registered")
        return plan

    def version(self, name: str, version: str) -> Plan | None:
        return self._versions.get((name, version))

    def names(self) -> list[str]:
        return sorted(self._latest)
