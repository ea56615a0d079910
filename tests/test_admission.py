"""MAX_STREAMS under a burst: 100 requests arrive together on real sockets while the admitted
streams are held open (the upstream paused on an event); exactly MAX_STREAMS are admitted on
every route, with limits in process and in a real Redis, the rest get 503 `overloaded` with
`Retry-After`, and every slot is back once the streams end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse

from service import keys
from tests.conftest import WAIT, Gateway, MakeGateway
from tests.fake_upstream import Gate, answer

CAP = 20
BURST = 100


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    body: dict[str, Any] | None
    streams: bool  # the admitted get their headers before the upstream answers
    upstream: bool  # the admitted call the upstream


PROBE = "/api/ai/stream-probe?count=100&interval_ms=500"  # open for 50 s unless closed
ROUTES = {
    "generate": Route("POST", "/api/ai/generate", {"prompt": "x"}, False, True),
    "generate_stream": Route("POST", "/api/ai/generate-stream", {"prompt": "x"}, True, True),
    "chat": Route("POST", "/api/v1/ai/chat", {"message": "x"}, False, True),
    "chat_stream": Route("POST", "/api/v1/ai/chat/stream", {"message": "x"}, True, True),
    "stream_probe": Route("GET", PROBE, None, True, False),
}


async def send(gw: Gateway, route: Route, path: str | None = None) -> ClientResponse:
    return await gw.client.request(route.method, path or route.path, json=route.body)


async def upstream_calls(gw: Gateway, count: int) -> None:
    """Wait (bounded) until the upstream has received `count` requests."""
    async with asyncio.timeout(WAIT):
        while len(gw.fake.seen) < count:
            gw.fake.arrived.clear()
            await gw.fake.arrived.wait()


async def until_settled_in(gw: Gateway, route: Route, pending: list[asyncio.Task[Any]]) -> None:
    """Wait (bounded) until every request of the burst is answered or, on a JSON route, known to
    be admitted (it reached the upstream, where it waits)."""

    def settled() -> bool:
        answered = sum(p.done() for p in pending)
        return answered + (0 if route.streams else len(gw.fake.seen)) >= BURST

    async with asyncio.timeout(WAIT * 2):
        while not settled():
            gw.fake.arrived.clear()
            arrival = asyncio.create_task(gw.fake.arrived.wait())
            try:
                waiting = [p for p in pending if not p.done()]
                await asyncio.wait([*waiting, arrival], return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrival.cancel()


@pytest.mark.parametrize("name", ROUTES)
async def test_max_streams_holds_under_a_burst_and_every_slot_comes_back(
    make_gateway: MakeGateway, limit_store: str | None, name: str
) -> None:
    route = ROUTES[name]
    # Limits on (and in Redis when `limit_store` says so): admission awaits the limit store.
    gw = await make_gateway(max_streams=CAP, redis_url=limit_store, rate_limit_concurrent=1000)
    gate = asyncio.Event()
    gw.fake.default = [Gate(gate), *answer("ok")]
    pending = [asyncio.create_task(send(gw, route)) for _ in range(BURST)]
    try:
        await until_settled_in(gw, route, pending)
        answered = [p.result() for p in pending if p.done()]
        refused = [r for r in answered if r.status == 503]
        admitted = sum(r.status == 200 for r in answered) + len(pending) - len(answered)
        assert (admitted, len(refused)) == (CAP, BURST - CAP)
        for resp in refused:
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "overloaded"
        assert len(gw.client.app[keys.LIVE]) == CAP
        if route.upstream:
            await upstream_calls(gw, CAP)
            assert len(gw.fake.seen) == CAP
        # The held streams end; every slot is given back and a new request is admitted.
        gate.set()
        async with asyncio.timeout(WAIT * 2):
            rest = [await p for p in pending]
        for resp in rest:
            if resp.status == 200:
                if route.upstream:
                    await resp.read()
                else:
                    resp.close()
    finally:
        gate.set()
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await gw.settled()
    assert len(gw.client.app[keys.LIVE]) == 0
    again = await send(gw, route, route.path.replace("count=100", "count=1"))
    assert again.status == 200
    await again.read()
    if route.upstream:
        assert len(gw.fake.seen) == CAP + 1
