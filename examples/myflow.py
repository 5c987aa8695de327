"""GoFlow's first flow: one node that answers what it was told.

    python examples/myflow.py                          # runs a sample on the embedded backend
    flowloom run examples/myflow.py myflow --data hallo

With ``FlowService(redis_url=...)`` and ``fs.start()`` the same definition serves
``curl -d hallo localhost:8080/flow/myflow``.
"""

from __future__ import annotations

from flowloom import Context, FlowService, Workflow


def do_something(data: bytes, options: dict[str, list[str]]) -> bytes:
    return b'you said "%s"' % data


def define_workflow(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("test", do_something)


fs = FlowService()
fs.register("myflow", define_workflow)


if __name__ == "__main__":
    with fs:
        print(fs.run("myflow", b"hallo", timeout=10).decode())
