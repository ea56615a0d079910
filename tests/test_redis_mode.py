"""Limits shared through a real redis-server: several instances, one budget; a killed
instance's slot frees itself; Redis going away follows RATE_LIMIT_REDIS_FAILURE."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import API_KEY, WAIT, MakeGateway, RedisServer
from tests.fake_upstream import FakeUpstream, Gate, Text
from tests.process import service
from tests.test_process import read_events

NEVER = asyncio.Event


async def test_two_instances_share_one_budget(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    a = await make_gateway(redis_url=redis_server.url, rate_limit_rpm=2, rate_limit_concurrent=1)
    b = await make_gateway(redis_url=redis_server.url, rate_limit_rpm=2, rate_limit_concurrent=1)
    assert (await a.post("/api/ai/generate", {"prompt": "x"})).status == 200
    assert (await b.post("/api/ai/generate", {"prompt": "x"})).status == 200
    second = await a.post("/api/ai/generate", {"prompt": "x"})
    assert second.status == 429
    assert (await second.json())["error"]["message"].startswith(
        "Rate limit reached for requests per minute"
    )


async def test_an_open_stream_on_one_instance_holds_the_slot_for_all(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    a = await make_gateway(redis_url=redis_server.url, rate_limit_concurrent=1)
    b = await make_gateway(redis_url=redis_server.url, rate_limit_concurrent=1)
    gate = asyncio.Event()
    a.fake.queue([Text("a"), Gate(gate)])
    resp, frames = await a.stream({"prompt": "x"})
    await frames.event()
    refused = await b.post("/api/ai/generate-stream", {"prompt": "y"})
    assert refused.status == 429
    resp.close()
    await a.settled()
    again, rest = await b.stream({"prompt": "z"})
    assert again.status == 200
    await rest.rest()


async def test_a_killed_instances_slot_frees_itself_within_the_lease(
    make_gateway: MakeGateway, redis_server: RedisServer, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.queue([Text("a"), Gate(NEVER())])
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "REDIS_URL": redis_server.url,
        "RATE_LIMIT_CONCURRENT": "1",
        "RATE_LIMIT_LEASE_S": "1",
        "RATE_LIMIT_RPM": "0",
        "RATE_LIMIT_TPM": "0",
    }
    survivor = await make_gateway(
        redis_url=redis_server.url, rate_limit_concurrent=1, rate_limit_lease_s=1
    )
    async with service(env, tmp_path) as doomed, aiohttp.ClientSession() as session:
        held = await session.post(f"{doomed.url}/api/ai/generate-stream", json={"prompt": "x"})
        assert len(await read_events(held, 2)) == 2
        refused = await survivor.post("/api/ai/generate", {"prompt": "y"})
        assert refused.status == 429
        doomed.signal(signal.SIGKILL)
        await doomed.wait(WAIT)
    # time is the subject here: the lease TTL (1 s) must pass before the slot is free again
    statuses = []
    for _ in range(30):  # at most 3 s
        statuses.append((await survivor.post("/api/ai/generate", {"prompt": "y"})).status)
        if statuses[-1] != 429:
            break
        await asyncio.sleep(0.1)
    assert statuses[-1] == 200
    assert len(statuses) <= 15, statuses  # freed within the lease (1 s) and one renewal period


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_going_away_follows_the_policy_without_hanging(
    make_gateway: MakeGateway, redis_server: RedisServer, policy: str
) -> None:
    gateway = await make_gateway(
        redis_url=redis_server.url,
        rate_limit_rpm=600,
        rate_limit_concurrent=4,
        rate_limit_tpm=100_000,
        rate_limit_redis_failure=policy,
    )
    assert (await gateway.post("/api/ai/generate", {"prompt": "x"})).status == 200
    ready = await gateway.client.get("/health/ready")
    assert (await ready.json())["checks"]["redis"] == "ok"
    await redis_server.stop()
    async with asyncio.timeout(3):
        resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    if policy == "open":
        assert resp.status == 200
        assert "x-ratelimit-limit-requests" not in resp.headers
    else:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "overloaded"
    assert gateway.sample("ai_stream_limiter_errors_total") >= 1
    async with asyncio.timeout(3):
        ready = await gateway.client.get("/health/ready")
    assert ready.status == 503
    assert (await ready.json())["checks"]["redis"] == "Redis does not answer."
