"""Every ```python block of the README and docs/ runs as pasted.

The blocks of one file run in order, in one namespace, as a reader pasting them into
one interpreter would (a later block may use what an earlier one defined). A block
right after one of these HTML comments is treated so:

- ``<!-- docs-test: redis -->``: runs against the test Redis (its
  ``redis://localhost:6379/0`` replaced by it, under a key prefix of its own);
- ``<!-- docs-test: worker -->``: a worker's ``app.py``: runs as ``python app.py``, in a
  process of its own, for the rest of the file (on the test Redis), and here too (where
  it is not ``__main__``);
- ``<!-- docs-test: excerpt examples/FILE.py -->``: lines taken from an example, which
  tests/test_examples.py runs: every line must be in that file;
- ``<!-- docs-test: skip REASON -->``: only compiled.

Every ``FlowService`` a file's blocks made is closed afterwards, every worker stopped,
and the HTTP endpoint table put back as it was.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowloom import FlowService

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: (\w+) ?([^>]*?) ?-->\n)?```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[tuple[str, str, str, int]]:
    """(marker, its argument, code, line) of each python block of a Markdown file."""
    text = path.read_text()
    return [
        (m.group(1) or "", m.group(2) or "", m.group(3), text[: m.start(3)].count("\n") + 1)
        for m in BLOCK.finditer(text)
    ]


def test_the_docs_have_python_blocks_and_few_are_skipped() -> None:
    found = [(path, b) for path in DOCS for b in blocks(path)]
    assert len(found) >= 20
    skipped = [(path.name, line) for path, (marker, *_, line) in found if marker == "skip"]
    assert len(skipped) <= 3, skipped


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(
    path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flowloom.http import endpoints

    monkeypatch.chdir(ROOT)  # blocks name files as from the repository's root
    table = list(endpoints.ENDPOINTS)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for marker, argument, code, line in blocks(path):
            source = "\n" * (line - 1) + code  # tracebacks point at the Markdown's lines
            compile(source, str(path), "exec")
            if marker == "skip":
                continue
            if marker == "excerpt":
                example = (ROOT / argument).read_text()
                missing = [x for x in code.splitlines() if x.strip() not in example]
                assert not missing, (path.name, line, argument, missing)
                continue
            if marker in ("redis", "worker"):
                url = request.getfixturevalue("redis_url")
                prefix = request.getfixturevalue("redis_prefix")
                source = source.replace(
                    'redis_url="redis://localhost:6379/0"',
                    f'redis_url="{url}", redis_prefix="{prefix}"',
                )
                assert prefix in source
            if marker == "worker":
                app = tmp_path / "app.py"
                app.write_text(source)
                workers.append(subprocess.Popen([sys.executable, str(app)]))
            exec(compile(source, str(path), "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, FlowService):
                value.close()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
        endpoints.ENDPOINTS[:] = table


def test_the_workers_sample_of_the_http_doc_has_the_real_fields() -> None:
    import json

    text = (ROOT / "docs/http.md").read_text()
    sample = text.split("$ curl -s localhost:8080/workers\n", 1)[1].split("\n", 1)[0]
    (documented,) = json.loads(sample)["workers"]
    with FlowService() as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        fs.run("myflow", b"", timeout=10)
        (real,) = fs.workers()
    assert list(documented) == list(real)
    assert {k: type(v) for k, v in documented.items()} == {k: type(v) for k, v in real.items()}
