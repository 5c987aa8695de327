"""What `execute` accepts as a request: bodies as bytes or str, queries of str values."""

from __future__ import annotations

import pytest

from flowloom import FlowService, InvalidRequest, Request


@pytest.fixture
def fs():
    with FlowService() as service:
        service.register(
            "echo",
            lambda wf, ctx: wf.dag.node(
                "n", lambda d, o: d + b"|" + ",".join(f"{k}={v}" for k, v in o.items()).encode()
            ),
        )
        yield service


@pytest.mark.parametrize(
    "request_",
    ["héllo", b"h\xc3\xa9llo", Request(body="héllo"), Request(body=b"h\xc3\xa9llo")],
)
def test_str_and_bytes_bodies_are_the_same(fs: FlowService, request_: object) -> None:
    assert fs.run("echo", request_, timeout=10) == "héllo|".encode()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"n": 1}, "query value of 'n' must be a str or a list of str, got 1"),
        ({"n": [1]}, "query value of 'n' must be a str or a list of str, got [1]"),
        ({"n": b"x"}, "query value of 'n' must be a str or a list of str, got b'x'"),
        ({"n": None}, "query value of 'n' must be a str or a list of str, got None"),
        ({1: "x"}, "query keys must be str, got 1"),
        ([("n", "1")], "query must be a mapping of str to str or list of str, got list"),
        ("n=1", "query must be a mapping of str to str or list of str, got str"),
    ],
)
def test_a_bad_query_is_a_clear_invalid_request(
    fs: FlowService, query: object, message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        fs.execute("echo", Request(query=query))  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert fs.requests() == []  # nothing was queued


def test_good_queries(fs: FlowService) -> None:
    got = fs.run("echo", Request(body=b"", query={"a": "1", "b": ["2", "3"], "c": ("4",)}))
    assert got == b"|a=['1'],b=['2', '3'],c=['4']"


@pytest.mark.parametrize("body", [1, None, ["x"], bytearray(b"x")])
def test_a_body_of_another_type_is_refused(fs: FlowService, body: object) -> None:
    with pytest.raises(InvalidRequest, match="request body must be bytes or str"):
        fs.execute("echo", Request(body=body))  # type: ignore[arg-type]
