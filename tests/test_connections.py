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

import httpx2
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import WAIT, Gateway, MakeGateway
from tests.fake_upstream import Drop, Gate, Status, Text, answer

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


def counted_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Count the calls of the async method `owner.name` for the test's length: [count]."""
    calls = [0]
    method = getattr(owner, name)

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await method(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


async def events_of(gateway: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event of one native stream, read to its end."""
    resp = await gateway.client.post("/api/ai/generate-stream", json=body)
    async with asyncio.timeout(WAIT):
        wire = await resp.read()
    await gateway.settled()
    lines = wire.decode().splitlines()
    return [orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]


def without_ids(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("requestId", "elapsedMs", "streamId")}


async def test_later_streams_send_the_request_the_sdk_built_for_the_first(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream design note 9: the second and third requests (the SDK's request reused, each
    with its own body) carry exactly the first's headers, and a body encoded alike; only the
    first goes through the SDK's `post`."""
    posts = counted_calls(monkeypatch, openai.AsyncOpenAI, "post")
    body = {"prompt": "same", "maxTokens": 50, "temperature": 0.5}
    for _ in range(3):
        events = await events_of(gateway, body)
        assert events[-1]["type"] == "done"
        assert events[-1]["content"] == "Hello world"
    first, *later = gateway.fake.seen
    for seen in later:
        assert seen.headers == first.headers  # auth, x-stainless-*, content type and length
        assert seen.body == first.body
    other = await events_of(gateway, {"prompt": "another prompt", "maxTokens": 7})
    assert other[-1]["content"] == "Hello world"
    last = gateway.fake.seen[-1]
    assert last.body["max_completion_tokens"] == 7
    assert last.body["messages"][-1]["content"] == "another prompt"
    assert {k: v for k, v in last.headers.items() if k != "Content-Length"} == {
        k: v for k, v in first.headers.items() if k != "Content-Length"
    }
    assert posts == [1]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])  # not retried (`failover`)
async def test_a_status_on_a_reused_request_ends_as_on_the_sdks_own(
    gateway: Gateway, status: int
) -> None:
    """The first stream's error comes through the SDK's `post`; the third's through the reused
    request (the second, a success, prepared it): the same error event, the same counters."""
    gateway.fake.queue([Status(status)], answer("Hello", " world"), [Status(status)])
    sdk_error = await events_of(gateway, {"prompt": "hi"})
    assert (await events_of(gateway, {"prompt": "hi"}))[-1]["type"] == "done"
    reused_error = await events_of(gateway, {"prompt": "hi"})
    assert sdk_error[-1]["type"] == "error"
    assert [without_ids(e) for e in reused_error] == [without_ids(e) for e in sdk_error]
    kind = {400: "rejected", 401: "auth", 403: "auth", 404: "not_found", 422: "rejected"}
    assert gateway.sample("ai_stream_upstream_errors_total", kind=kind[status]) == 2


async def test_a_dropped_connection_on_a_reused_request_ends_as_on_the_sdks_own(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(upstream_max_retries=0)  # one try each: no backoff to wait out
    gateway.fake.queue([Drop()], answer("Hello", " world"), [Drop()])
    sdk_error = await events_of(gateway, {"prompt": "hi"})
    assert (await events_of(gateway, {"prompt": "hi"}))[-1]["type"] == "done"
    reused_error = await events_of(gateway, {"prompt": "hi"})
    assert sdk_error[-1]["type"] == "error"
    assert [without_ids(e) for e in reused_error] == [without_ids(e) for e in sdk_error]
    assert gateway.sample("ai_stream_upstream_errors_total", kind="connection") == 2


# --- the reused request sent to aiohttp straight (upstream design note 11) ---------------------


async def test_later_streams_go_to_aiohttp_without_the_http_client(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the first stream crosses httpx's client (the SDK's `post`); the later ones are
    handed to the SDK transport's aiohttp session as the transport would hand them."""
    sends = counted_calls(monkeypatch, httpx2.AsyncClient, "send")
    for _ in range(3):
        events = await events_of(gateway, {"prompt": "hi"})
        assert events[-1]["content"] == "Hello world"
    assert sends == [1]
    assert gateway.fake.connections == 1  # the transport's own pool carried all three


async def test_a_redirect_on_a_reused_request_is_followed_as_the_sdk_does(
    make_gateway: MakeGateway,
) -> None:
    """The SDK's client follows redirects; a reused request meeting one goes the SDK's way."""
    posts: list[tuple[str, dict[str, Any]]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        posts.append((request.path, body))
        if request.path == "/v1/chat/completions" and len(posts) > 1:
            raise web.HTTPTemporaryRedirect("/moved/v1/chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("Hel", "lo"):
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            await resp.write(b"data: %b\n\n" % orjson.dumps({"choices": [choice]}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/moved/v1/chat/completions", completions)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        gateway = await make_gateway(openai_base_url=f"http://127.0.0.1:{server.port}/v1")
        for prompt in ("one", "two", "three"):
            events = await events_of(gateway, {"prompt": prompt})
            assert events[-1]["type"] == "done"
            assert events[-1]["content"] == "Hello"
    finally:
        await server.close()
    # The second stream's redirect is not followed by aiohttp: the request goes again through
    # the SDK's client, which follows it, and so does every later stream's.
    assert [path for path, _ in posts] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/moved/v1/chat/completions",
        "/v1/chat/completions",
        "/moved/v1/chat/completions",
    ]
    assert posts[1][1] == posts[2][1] == posts[3][1]  # the same body, re-sent where it moved
    assert [body["messages"][-1]["content"] for _, body in posts[3::2]] == ["two", "three"]
