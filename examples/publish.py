"""Piped handlers, an ``async def`` handler, a forwarder edge and an ordering-only edge.

The ``publish`` flow tidies a draft, renders it, and publishes it only once the
spellcheck has passed:

    tidy (strip | collapse-spaces | capitalize)  --forwarder: words_of-->  spellcheck
         \\                                                                    :
          `--> render --> publish  <.. ordering only (no data) ...............'

- ``tidy`` pipes its input through three handlers in order, the last one ``async``;
- the edge ``tidy -> spellcheck`` carries the text through a forwarder that turns
  it into the JSON list of words the spellchecker takes;
- the edge ``spellcheck -> publish`` is ordering-only: publish waits for the
  spellcheck (and never runs if it fails) but gets its data from ``render`` alone.

    python examples/publish.py
    flowloom run examples/publish.py publish --data "  flowloom runs   workflows. "
"""

from __future__ import annotations

import asyncio
import json
import re

from flowloom import Context, FlowService, RequestFailed, Workflow

Options = dict[str, list[str]]

DICTIONARY = {"flowloom", "it", "on", "runs", "them", "workers", "workflows"}


def strip(data: bytes, options: Options) -> bytes:
    return data.strip()


def collapse_spaces(data: bytes, options: Options) -> bytes:
    return re.sub(rb"\s+", b" ", data)


async def capitalize_sentences(data: bytes, options: Options) -> bytes:
    await asyncio.sleep(0)  # stands in for a call to an async service
    sentences = re.split(rb"(?<=[.!?]) ", data)
    return b" ".join(s[:1].upper() + s[1:] for s in sentences)


def words_of(text: bytes) -> bytes:
    """Forwarder of the edge tidy -> spellcheck: the text as a JSON list of words."""
    return json.dumps(re.findall(r"[a-z]+", text.decode().lower())).encode()


def spellcheck(data: bytes, options: Options) -> bytes:
    words = json.loads(data)
    unknown = sorted({w for w in words if w not in DICTIONARY})
    if unknown:
        raise ValueError(f"unknown words: {', '.join(unknown)}")
    return f"{len(words)} words, all known".encode()


def render(data: bytes, options: Options) -> bytes:
    return b"<p>" + data + b"</p>"


def publish(data: bytes, options: Options) -> bytes:
    return b"published " + data


def define_publish(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("tidy", strip, collapse_spaces, capitalize_sentences)
    dag.node("spellcheck", spellcheck)
    dag.node("render", render)
    dag.node("publish", publish)
    dag.edge("tidy", "spellcheck", forwarder=words_of)
    dag.edge("tidy", "render")
    dag.edge("render", "publish")
    dag.edge("spellcheck", "publish", ordering_only=True)


fs = FlowService()
fs.register("publish", define_publish)


if __name__ == "__main__":
    with fs:
        draft = b"  flowloom runs   workflows.  it runs them on   workers. "
        print(fs.run("publish", draft, timeout=10).decode())
        try:
            fs.run("publish", b"flowloom runs workflowz", timeout=10)
        except RequestFailed as exc:
            print(f"not published: {exc}")
