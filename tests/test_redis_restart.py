"""A real redis-server killed and restarted empty on the same port while streams run, under both
RATE_LIMIT_REDIS_FAILURE policies: once Redis is back no request fails, and the concurrency
limit holds across the restart (the running streams' leases are re-created before anyone else
is admitted)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest
from aiohttp import ClientResponse

from tests.conftest import WAIT, Frames, Gateway, MakeGateway, RedisServer
from tests.fake_upstream import Gate, Text

LIMIT = 3


@dataclass
class Tally:
    """Streams of the limited client running at once (admitted and not yet ended), and every
    answer's status after Redis came back."""

    running: int = 0
    most: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def opened(self) -> None:
        self.running += 1
        self.most = max(self.most, self.running)

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


async def attempt(gateway: Gateway, tally: Tally) -> None:
    """One stream of the limited client: counted as running from its 200 to its end."""
    resp = await gateway.post("/api/ai/generate-stream", {"prompt": "x"})
    tally.statuses[resp.status] += 1
    if resp.status == 200:
        tally.opened()
        await Frames(resp).rest()
        tally.running -= 1


async def other_client(gateway: Gateway, tally: Tally, n: int) -> None:
    """A request of another client (through the trusted local proxy), within its limits."""
    headers = {"X-Forwarded-For": f"198.51.100.{n}"}
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"}, headers=headers)
    tally.statuses[resp.status] += 1


Held = tuple[ClientResponse, Frames]


async def hold(gateway: Gateway, gate: asyncio.Event, tally: Tally) -> Held:
    gateway.fake.queue([Text("a"), Gate(gate)])
    resp, frames = await gateway.stream({"prompt": "x"})
    assert resp.status == 200
    tally.opened()
    await frames.event()
    return resp, frames


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_redis_restart_mid_stream_fails_nothing_and_keeps_the_concurrency_limit(
    make_gateway: MakeGateway, redis_server: RedisServer, policy: str
) -> None:
    settings = {
        "redis_url": redis_server.url,
        "rate_limit_concurrent": LIMIT,
        "rate_limit_rpm": 0,
        "rate_limit_tpm": 0,
        "rate_limit_lease_s": 1.5,  # renewed every 0.5 s
        "rate_limit_redis_failure": policy,
    }
    a, b = await make_gateway(**settings), await make_gateway(**settings)
    tally = Tally()
    gate = asyncio.Event()
    held = [await hold(a, gate, tally) for _ in range(LIMIT)]
    # Fill both instances' connection pools: after the restart every pooled connection is stale.
    warm = Tally()
    await asyncio.gather(*(attempt(g, warm) for g in (a, b) for _ in range(8)))
    assert warm.statuses == {429: 16}

    await redis_server.restart()  # healthy (and empty) from here on

    async with asyncio.timeout(WAIT):
        for _ in range(3):
            await asyncio.gather(
                *(attempt(g, tally) for g in (a, b) for _ in range(4)),
                *(other_client(g, tally, n) for g in (a, b) for n in range(2)),
            )
    figures = {"statuses": dict(tally.statuses), "most running": tally.most}
    assert tally.failed == 0, figures
    assert tally.most == LIMIT, figures
    assert tally.statuses == {429: 24, 200: 12}, figures

    gate.set()
    for _, frames in held:
        await frames.rest()
        tally.running -= 1
    await a.settled()
    again = asyncio.Event()
    held = [await hold(g, again, tally) for g in (b, a, b)]
    refused = await a.post("/api/ai/generate-stream", {"prompt": "x"})
    assert refused.status == 429
    assert tally.most == LIMIT
    again.set()
    for _, frames in held:
        await frames.rest()
