"""A real redis-server killed and restarted empty on the same port while streams run, under both
RATE_LIMIT_REDIS_FAILURE policies: once Redis is back no request fails, and the concurrency
limit holds across the restart (the running streams' leases are re-created before anyone else
is admitted). Then the parts one by one: renewal re-creates a lost lease, a new run id holds
admissions, and a renewal never brings back a lease that was given back."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from prometheus_client import CollectorRegistry

from service import keys
from service.limits.accounts import Account, Limits
from service.limits.core import LimitConfig
from service.limits.redis_backend import LimiterRecovering, RedisLimiter
from service.metrics import create_metrics
from tests.conftest import WAIT, Frames, Gateway, MakeGateway, RedisServer
from tests.fake_upstream import Gate, Text

LIMIT = 3
T0 = 1_800_000_000.0


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

    ready = await b.client.get("/health/ready")
    assert (ready.status, (await ready.json())["checks"]["redis"]) == (200, "ok")
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


async def test_renewal_re_creates_a_lease_redis_lost(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(LimitConfig(concurrent=1, lease_s=10), redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        held = await limiter.admit("c", 1, T0)
        assert held.lease
        await raw.flushall()  # the data is gone, the server is the same
        assert (await limiter.admit("c", 1, T0)).allowed  # (what went wrong before renewal)
        await raw.flushall()
        await limiter.renew([("c", held.lease)], T0 + 1)
        assert await limiter.concurrent("c", T0 + 1) == 1
        assert not (await limiter.admit("c", 1, T0 + 1)).allowed
    finally:
        await raw.aclose()
        await limiter.aclose()


async def test_a_restarted_redis_holds_admissions_until_the_leases_are_back(
    redis_server: RedisServer,
) -> None:
    # time is the subject: the hold (one renew interval and a half) made short
    config = LimitConfig(rpm=1, concurrent=1, lease_s=10)
    limiter = RedisLimiter(config, redis_server.url, hold_s=0.3)
    try:
        held = await limiter.admit("c", 1, T0)
        assert held.lease
        # every pooled connection will be stale, and all of them meet the new server at once
        warm = await asyncio.gather(*(limiter.admit(f"w{i}", 1, T0) for i in range(12)))
        assert all(a.allowed for a in warm)
        await redis_server.restart()
        assert not limiter.restarted.is_set()
        tries = await asyncio.gather(
            *(limiter.admit("d", 1, T0) for _ in range(12)), return_exceptions=True
        )
        assert all(isinstance(t, LimiterRecovering) for t in tries), tries
        assert limiter.restarted.is_set()  # the app's upkeep re-registers at once
        waits = [t.wait_s for t in tries if isinstance(t, LimiterRecovering)]
        assert all(0 < w <= 0.3 for w in waits)
        # nothing was counted for them, not even by a try that reached the new server
        assert await limiter.concurrent("d", T0) == 0
        raw = aioredis.Redis.from_url(redis_server.url)
        assert not await raw.exists("aistream:{d}:rpm")
        await raw.aclose()
        # the renewal is not held: it re-creates the running stream's lease
        await limiter.renew([("c", held.lease)], T0)
        assert await limiter.concurrent("c", T0) == 1
        await asyncio.sleep(max(waits))  # the hold is the subject
        refused = await limiter.admit("c", 1, T0)
        assert (refused.allowed, refused.limit) == (False, "concurrency")  # its lease is back
        assert (await limiter.admit("d", 1, T0)).allowed
        # request logs were lost with the data: a client that spent its minute starts afresh
        assert (await limiter.admit("w0", 1, T0)).allowed
    finally:
        await limiter.aclose()


class EndsDuringRenewal(RedisLimiter):
    """A stream ends, its lease given back, while the renewal of that lease is on its way."""

    account: Account | None = None

    async def renew(self, leases: list[tuple[str, str]], now: float) -> None:
        if self.account is not None:
            await self.account.give_back()
        await super().renew(leases, now)  # lands after the release: re-creates the lease


async def test_a_lease_released_during_its_renewal_stays_released(
    redis_server: RedisServer,
) -> None:
    limiter = EndsDuringRenewal(LimitConfig(concurrent=1, lease_s=10), redis_server.url)
    limits = Limits(limiter, metrics=create_metrics(CollectorRegistry(), ()))
    try:
        admission = await limits.admit("c", 1)
        limiter.account = limits.open("c", admission)
        await limits.renew(limits.clock())
        assert await limiter.concurrent("c", limits.clock()) == 0
        assert (await limits.admit("c", 1)).allowed
    finally:
        await limiter.aclose()


class RenewsDuringRelease(RedisLimiter):
    """The upkeep's renewal starts while an ended stream's release is on its way."""

    limits: Limits | None = None

    async def release(self, client: str, lease: str) -> None:
        await super().release(client, lease)
        limits, self.limits = self.limits, None
        if limits is not None:
            await limits.renew(limits.clock())  # lands after the release


async def test_a_stream_that_is_settling_is_not_renewed(redis_server: RedisServer) -> None:
    limiter = RenewsDuringRelease(LimitConfig(concurrent=1, lease_s=10), redis_server.url)
    limits = Limits(limiter, metrics=create_metrics(CollectorRegistry(), ()))
    try:
        admission = await limits.admit("c", 1)
        account = limits.open("c", admission)  # open until its settlement is done
        limiter.limits = limits
        await account.settle(None)
        assert await limiter.concurrent("c", limits.clock()) == 0
    finally:
        await limiter.aclose()


async def test_streams_admitted_open_while_redis_was_down_count_once_it_is_back(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    gateway = await make_gateway(
        redis_url=redis_server.url,
        rate_limit_concurrent=2,
        rate_limit_lease_s=1.5,  # renewed every 0.5 s
        rate_limit_redis_failure="open",
    )
    tally, gate = Tally(), asyncio.Event()
    held = [await hold(gateway, gate, tally)]
    await redis_server.kill()
    held += [await hold(gateway, gate, tally) for _ in range(2)]  # unlimited, by the policy
    await redis_server.start()
    limits = gateway.client.app[keys.LIMITS]
    counts = []
    for _ in range(60):  # at most 3 s; the renew interval (0.5 s) is the subject
        counts.append(await limits.limiter.concurrent("ip:127.0.0.1", limits.clock()))
        if counts[-1] == 3:
            break
        await asyncio.sleep(0.05)
    assert counts[-1] == 3, counts
    refused = await gateway.post("/api/ai/generate-stream", {"prompt": "x"})
    assert refused.status == 429
    gate.set()
    for _, frames in held:
        await frames.rest()
