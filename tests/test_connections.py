"""The gateway's TCP connections, as the time to first token depends on them: one upstream
connection carries stream after stream (no new handshake per stream), and both the client's and
the upstream's sockets send small writes at once (`TCP_NODELAY`: no Nagle wait behind an
unacknowledged frame). README, Performance ("The time to first token at light load").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import WAIT, Gateway
from tests.fake_upstream import Gate, Text, answer

USER = [{"role": "user", "content": "hi"}]
# (path, body) for each route that calls the upstream: native SSE, native JSON, OpenAI's stream
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "generate_stream": ("/api/ai/generate-stream", {"prompt": "hi"}),
    "generate": ("/api/ai/generate", {"prompt": "hi"}),
    "openai_stream": (
        "/v1/chat/completions",
        {"model": "test-model", "messages": USER, "stream": True},
    ),
}


@contextlib.contextmanager
def socket_named(
    *, local: tuple[str, int] | None = None, peer: tuple[str, int] | None = None
) -> Iterator[socket.socket]:
    """This process's TCP socket with that local or peer address, as a duplicate (its options
    are the socket's own: a duplicate shares them)."""
    found: socket.socket | None = None
    for name in os.listdir("/proc/self/fd"):  # bounded: the process's descriptors
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket, or already closed
        try:
            if (
                sock.family == socket.AF_INET
                and sock.type == socket.SOCK_STREAM
                and (local is None or sock.getsockname() == local)
                and (peer is None or sock.getpeername() == peer)
            ):
                found, sock = sock, None  # type: ignore[assignment]
                break
        except OSError:
            pass  # a listening or unconnected socket has no peer
        finally:
            if sock is not None:
                sock.close()
    assert found is not None, f"no socket with local {local} and peer {peer}"
    try:
        yield found
    finally:
        found.close()


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_streams_one_after_another_share_one_upstream_connection(
    gateway: Gateway, route: str
) -> None:
    path, body = ROUTES[route]
    for _ in range(3):
        resp = await gateway.client.post(path, json=body)
        assert resp.status == 200
        async with asyncio.timeout(WAIT):
            wire = await resp.read()
        assert b"Hello" in wire
        assert b" world" in wire
        await gateway.settled()
    peers = [seen.peer for seen in gateway.fake.seen]
    assert len(peers) == 3
    assert peers[0] is not None
    assert peers == [peers[0]] * 3  # each answer was read to its end: the connection went back
    assert gateway.fake.connections == 1


async def test_client_and_upstream_sockets_send_small_writes_at_once(gateway: Gateway) -> None:
    gate = asyncio.Event()
    gateway.fake.queue([Text("Hi"), Gate(gate), *answer(" there")])
    resp, frames = await gateway.stream({"prompt": "hi"})
    assert (await frames.event())["type"] == "start"
    assert (await frames.event())["delta"] == "Hi"  # the upstream request is open meanwhile
    assert resp.connection is not None
    assert resp.connection.transport is not None
    client_end = resp.connection.transport.get_extra_info("sockname")
    upstream_end = gateway.fake.seen[0].peer
    assert upstream_end is not None
    with socket_named(peer=client_end) as accepted, socket_named(local=upstream_end) as upstream:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    gate.set()
    assert (await frames.event())["delta"] == " there"
    done = await frames.event()
    assert done["type"] == "done"
    assert done["content"] == "Hi there"
