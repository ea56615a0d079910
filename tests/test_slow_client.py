"""A client that stops reading cannot make the server buffer without bound: the write deadline
ends its stream as `client_disconnect` and the upstream request is cancelled."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from tests.conftest import MakeGateway
from tests.fake_upstream import Repeat


@pytest.mark.parametrize("flush_ms", [0, 20], ids=["each-read", "flush-interval"])
async def test_a_client_that_stops_reading_is_cut_off(
    make_gateway: MakeGateway, flush_ms: int
) -> None:
    """With `STREAM_FLUSH_MS` too: the held frame's write blocks the pump as a frame does."""
    gateway = await make_gateway(
        write_timeout_s=0.3, heartbeat_interval_s=0.1, stream_flush_ms=flush_ms
    )
    gateway.fake.queue([Repeat("x" * 8000, 0.001)])  # about 8 MB/s of text
    server = gateway.client.server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (server.host, server.port))
    body = orjson.dumps({"prompt": "x"})
    request = (
        b"POST /api/ai/generate-stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    await loop.sock_sendall(sock, request)
    try:  # ... and never read another byte
        async with asyncio.timeout(10):
            await gateway.fake.arrived.wait()
            await gateway.fake.seen[0].ended.wait()
        await gateway.settled()
    finally:
        sock.close()
    assert gateway.fake.seen[0].cancelled
    assert gateway.outcomes() == {"client_disconnect": 1}
