"""How the server writes its answers (``serve``'s httptools protocol): an answer's head
and body in one write to the socket, a streamed body's chunks as they come; and how it
tells the app that a call's whole body has arrived."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.server import ServerState

from flowloom.http.inputs import BODY_RECEIVED
from flowloom.http.server import _header_timeout_protocol

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


class Transport(asyncio.Transport):
    """A connection's socket, recording each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def plain(request: Request) -> Response:
    return Response(b"you said " + await request.body())


async def streamed(request: Request) -> StreamingResponse:
    async def chunks() -> Any:
        yield b"one"
        await asyncio.sleep(0.05)
        yield b"two"

    return StreamingResponse(chunks())


async def marked(request: Request) -> Response:
    """Whether the body had arrived whole when the call began, then the body."""
    whole = bool(request.scope.get(BODY_RECEIVED))
    return Response(b"%d " % whole + await request.body())


def connection() -> tuple[asyncio.Protocol, Transport]:
    app = Starlette(
        routes=[
            Route("/plain", plain, methods=["POST"]),
            Route("/stream", streamed),
            Route("/marked", marked, methods=["POST"]),
        ]
    )
    config = uvicorn.Config(app, http=_header_timeout_protocol(10.0), log_level="warning")
    config.load()
    protocol_class: Any = config.http_protocol_class
    protocol: asyncio.Protocol = protocol_class(
        config=config, server_state=ServerState(), app_state={}
    )
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not answered")


async def test_an_answers_head_and_body_leave_in_one_write() -> None:
    protocol, transport = connection()
    for n in range(2):  # and the next call on the same connection
        transport.writes.clear()
        protocol.data_received(b"POST /plain HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhallo")
        await until(lambda: transport.writes)
        await asyncio.sleep(0.05)
        assert len(transport.writes) == 1, (n, transport.writes)
        head, _, body = transport.writes[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == b"you said hallo"
    protocol.connection_lost(None)


async def test_a_streamed_bodys_chunks_leave_as_they_come() -> None:
    protocol, transport = connection()
    protocol.data_received(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    await until(lambda: b"one" in b"".join(transport.writes))
    assert b"two" not in b"".join(transport.writes)  # written before the second is made
    await until(lambda: b"0\r\n\r\n" in b"".join(transport.writes))
    protocol.connection_lost(None)


async def test_a_body_that_came_with_the_head_is_marked_whole() -> None:
    protocol, transport = connection()
    protocol.data_received(b"POST /marked HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhallo")
    await until(lambda: transport.writes)
    assert transport.writes[0].endswith(b"\r\n\r\n1 hallo")
    # a body still on its way is not: the app reads it under its deadline
    transport.writes.clear()
    protocol.data_received(b"POST /marked HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nha")
    await asyncio.sleep(0.05)
    protocol.data_received(b"llo")
    await until(lambda: transport.writes)
    assert transport.writes[0].endswith(b"\r\n\r\n0 hallo")
    protocol.connection_lost(None)
