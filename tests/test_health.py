"""Liveness, readiness (cached upstream check, 503 from the start of shutdown) and the drain."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any

from prometheus_client import CollectorRegistry

from service import keys
from service.app import create_app
from service.upstream import CompletionRequest, UpstreamStream
from tests.conftest import WAIT, Gateway, MakeGateway, RedisServer, make_settings
from tests.fake_upstream import Gate, Text, answer


async def test_liveness_and_readiness(gateway: Gateway) -> None:
    live = await gateway.client.get("/health")
    assert (live.status, await live.json()) == (200, {"status": "ok"})
    ready = await gateway.client.get("/health/ready")
    assert (ready.status, await ready.json()) == (
        200,
        {"status": "ok", "checks": {"upstream": "ok", "conversations": "ok"}},
    )


async def test_readiness_names_an_unreachable_upstream(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(openai_base_url="http://127.0.0.1:9/v1")
    ready = await gateway.client.get("/health/ready")
    assert ready.status == 503
    body = await ready.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["upstream"] == "The connection to the model server failed."


async def test_shutdown_fails_readiness_refuses_new_streams_and_drains(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(shutdown_drain_s=30)
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Gate(gate), *answer("b")])
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    await frames.event()
    draining = asyncio.create_task(gateway.client.app.shutdown())
    await asyncio.sleep(0)  # one turn of the loop: the shutdown task starts and marks draining
    assert gateway.client.app[keys.LIVE].draining
    ready = await gateway.client.get("/health/ready")
    assert ready.status == 503
    assert (await ready.json())["checks"]["shutdown"] == "the server is shutting down"
    refused = await gateway.post("/api/ai/generate-stream", {"prompt": "y"})
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["code"] == "server_shutdown"
    assert not draining.done()
    gate.set()
    events = await frames.rest()
    assert events[-1]["type"] == "done"
    async with asyncio.timeout(WAIT):
        await draining
    assert gateway.outcomes() == {"completed": 1}


class BrokenCheck:
    """An upstream whose readiness check fails in a way nobody planned for."""

    def __init__(self) -> None:
        self.checks = 0

    def stream(self, request: CompletionRequest) -> AbstractAsyncContextManager[UpstreamStream]:
        raise NotImplementedError

    async def check(self) -> None:
        self.checks += 1
        raise RuntimeError("not an UpstreamError")

    async def aclose(self) -> None:
        pass


async def test_a_check_that_raises_is_a_503_naming_it_never_a_500(aiohttp_client: Any) -> None:
    upstream = BrokenCheck()
    app = create_app(make_settings(), upstream=upstream, registry=CollectorRegistry())
    client = await aiohttp_client(app)
    for _ in range(2):  # the second answer comes from the cache
        ready = await client.get("/health/ready")
        assert ready.status == 503
        assert await ready.json() == {
            "status": "unavailable",
            "checks": {"upstream": "The check failed unexpectedly.", "conversations": "ok"},
        }
    assert upstream.checks == 1


async def test_readiness_checks_every_store_and_names_an_unreachable_one(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    gateway = await make_gateway(redis_url=redis_server.url)
    ready = await gateway.client.get("/health/ready")
    assert (ready.status, await ready.json()) == (
        200,
        {"status": "ok", "checks": {"upstream": "ok", "redis": "ok", "conversations": "ok"}},
    )
    await redis_server.kill()
    ready = await gateway.client.get("/health/ready")
    assert ready.status == 503
    assert await ready.json() == {
        "status": "unavailable",
        "checks": {
            "upstream": "ok",
            "redis": "Redis does not answer.",
            "conversations": "The conversation store does not answer.",
        },
    }


async def test_a_store_that_accepts_and_never_answers_is_named_within_its_check_bound(
    make_gateway: MakeGateway,
) -> None:
    """A Redis address that takes connections and says nothing (a hung server): readiness names
    both store checks after their 1 s bound, not after the client's 2 s socket timeout."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gateway = await make_gateway(redis_url=f"redis://127.0.0.1:{port}/0")
        loop = asyncio.get_running_loop()
        started = loop.time()
        ready = await gateway.client.get("/health/ready")
        elapsed = loop.time() - started
        assert ready.status == 503
        assert await ready.json() == {
            "status": "unavailable",
            "checks": {
                "upstream": "ok",
                "redis": "Redis does not answer.",
                "conversations": "The conversation store does not answer.",
            },
        }
        assert elapsed < 1.9  # both checks run at once, each cut at 1 s
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
