"""Limits and access at the HTTP edge: 429s, quota headers, slots freed on every outcome, the
mid-stream token cut, API keys, forwarded addresses and CORS."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from service import keys
from service.errors import Outcome
from tests.conftest import WAIT, Gateway, MakeGateway
from tests.fake_upstream import Gate, Repeat, Status, answer

NEVER = asyncio.Event


async def concurrent(gateway: Gateway, client: str = "ip:127.0.0.1") -> int:
    limits = gateway.client.app[keys.LIMITS]
    count: int = await limits.limiter.concurrent(client, limits.clock())
    return count


async def test_rpm_3_admits_3_in_a_row_then_429_with_retry_after_and_no_upstream_call(
    make_gateway: MakeGateway, limit_store: str | None
) -> None:
    gateway = await make_gateway(rate_limit_rpm=3, redis_url=limit_store)
    answers = [await gateway.post("/api/ai/generate", {"prompt": "x"}) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-limit-requests"] for a in answers] == ["3"] * 3
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    # the next slot frees when the first request leaves the minute
    assert [a.headers["x-ratelimit-reset-requests"] for a in answers] == ["1m0s"] * 3
    refused = await gateway.post("/api/ai/generate-stream", {"prompt": "x"})
    assert refused.status == 429
    assert 59 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    body = await refused.json()
    assert body["error"]["code"] == "rate_limited"
    assert "requests per minute" in body["error"]["message"]
    assert len(gateway.fake.seen) == 3
    assert gateway.sample("ai_stream_rate_limited_total", limit="requests") == 1


async def test_a_burst_of_2n_at_once_admits_exactly_n_across_instances(
    make_gateway: MakeGateway, limit_store: str | None
) -> None:
    n = 10
    # with Redis, three instances share the budget; in process, one instance has it all
    count = 3 if limit_store else 1
    gateways = [await make_gateway(rate_limit_rpm=n, redis_url=limit_store) for _ in range(count)]
    answers = await asyncio.gather(
        *(gateways[i % count].post("/api/ai/generate", {"prompt": "x"}) for i in range(2 * n))
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * n + [429] * n
    remaining = sorted(
        int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status == 200
    )
    assert remaining == list(range(n))  # each admission took its own slot
    assert all(a.headers["Retry-After"] for a in answers if a.status == 429)


async def test_streams_carry_the_token_quota_headers(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(rate_limit_tpm=60_000)
    resp, frames = await gateway.stream({"prompt": "x" * 400})
    assert resp.headers["x-ratelimit-limit-tokens"] == "60000"
    remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert 60_000 - 200 < remaining < 60_000 - 100  # the prompt estimate was reserved
    await frames.rest()


@pytest.mark.parametrize("ending", ["done", "error", "timeout", "disconnect", "shutdown"])
async def test_a_concurrency_slot_is_free_at_once_however_the_stream_ends(
    make_gateway: MakeGateway, ending: str
) -> None:
    gateway = await make_gateway(rate_limit_concurrent=1, first_token_timeout_s=0.2)
    gate = asyncio.Event()
    script: dict[str, list[Any]] = {
        "done": [Gate(gate), *answer("a")],
        "error": [Gate(gate), Status(400)],
        "timeout": [Gate(NEVER())],
        "disconnect": [Gate(NEVER())],
        "shutdown": [Gate(NEVER())],
    }
    gateway.fake.queue(script[ending])
    resp, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    assert await concurrent(gateway) == 1
    refused = await gateway.post("/api/ai/generate-stream", {"prompt": "y"})
    assert refused.status == 429
    assert (await refused.json())["error"]["message"].endswith("retry after the Retry-After delay.")
    if ending == "disconnect":
        resp.close()
    elif ending == "shutdown":
        async with asyncio.timeout(WAIT):
            await gateway.client.app[keys.LIVE].drain(0)
    else:
        gate.set()
        await frames.rest()
    await gateway.settled()
    assert await concurrent(gateway) == 0
    if ending != "shutdown":
        again, rest = await gateway.stream({"prompt": "z"})
        assert again.status == 200
        assert (await rest.rest())[-1]["type"] == "done"


async def test_running_out_of_tokens_mid_stream_ends_it_and_cancels_the_upstream(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(rate_limit_tpm=600, rate_limit_charge_interval_s=0.05)
    gateway.fake.queue([Repeat("tok", 0.002)])
    resp, frames = await gateway.stream({"prompt": "x"})
    budget = int(resp.headers["x-ratelimit-remaining-tokens"])  # after the prompt's reserve
    events = [await frames.event(), *await frames.rest()]
    error = events[-1]
    assert (error["type"], error["code"], error["reason"]) == (
        "error",
        "rate_limited",
        "rate_limited",
    )
    relayed = sum(e["delta"].count("tok") for e in events if e["type"] == "content")
    refill = 10 * error["elapsedMs"] / 1000  # 600 a minute
    # overshoot bound: what one stream relays in about one charge interval (~500 tok/s x 0.05 s),
    # doubled for scheduling slack
    assert budget <= relayed <= budget + refill + 50
    async with asyncio.timeout(1):
        await gateway.fake.seen[0].ended.wait()
    await gateway.settled()
    assert gateway.outcomes() == {Outcome.RATE_LIMITED.value: 1}
    assert gateway.sample("ai_stream_rate_limited_total", limit="tokens") == 1
    refused = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "rate_limited"


@pytest.mark.parametrize(
    ("path", "body", "route"),
    [
        ("/api/ai/generate", {"prompt": "x"}, "generate"),
        ("/api/v1/ai/chat", {"message": "x"}, "chat"),
    ],
)
async def test_a_token_budget_cut_on_a_json_route_is_429_with_retry_after(
    make_gateway: MakeGateway, path: str, body: dict[str, str], route: str
) -> None:
    gateway = await make_gateway(rate_limit_tpm=600, rate_limit_charge_interval_s=0.05)
    gateway.fake.queue([Repeat("tok", 0.002)])
    cut = await gateway.post(path, body)
    assert cut.status == 429
    assert (await cut.json())["error"]["code"] == "rate_limited"
    # when the budget is back above zero: the overdraft (a few tens of tokens) at 10 a second
    assert 1 <= int(cut.headers["Retry-After"]) <= 30
    await gateway.settled()
    assert gateway.outcomes(route) == {Outcome.RATE_LIMITED.value: 1}


async def test_api_keys_guard_the_api_and_never_reach_the_logs(make_gateway: MakeGateway) -> None:
    secret = "sk-gateway-key-123456"
    gateway = await make_gateway(api_keys=(secret, "another-key"), rate_limit_rpm=60)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": secret}):
            refused = await gateway.post("/api/ai/generate", {"prompt": "x"}, headers=headers)
            assert refused.status == 401
            assert refused.headers["WWW-Authenticate"] == "Bearer"
            assert (await refused.json())["error"]["code"] == "unauthorized"
        ok = await gateway.post(
            "/api/ai/generate", {"prompt": "x"}, headers={"Authorization": f"Bearer {secret}"}
        )
        assert ok.status == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "60"
    for path in ("/health", "/health/ready", "/metrics"):
        assert (await gateway.client.get(path)).status == 200
    assert gateway.fake.seen[0].headers["Authorization"] != f"Bearer {secret}"
    assert secret not in repr(logs)
    assert any(entry.get("key_id") for entry in logs)


@pytest.mark.parametrize(("trusted", "shared"), [(("127.0.0.1",), False), (("10.9.9.9",), True)])
async def test_forwarded_addresses_are_believed_only_from_trusted_proxies(
    make_gateway: MakeGateway, trusted: tuple[str, ...], shared: bool
) -> None:
    gateway = await make_gateway(rate_limit_rpm=1, trusted_proxies=trusted)
    first = await gateway.post(
        "/api/ai/generate", {"prompt": "x"}, headers={"X-Forwarded-For": "198.51.100.1"}
    )
    second = await gateway.post(
        "/api/ai/generate", {"prompt": "x"}, headers={"X-Forwarded-For": "198.51.100.2"}
    )
    assert first.status == 200
    assert second.status == (429 if shared else 200)


async def test_one_address_written_several_ways_gets_one_budget(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(rate_limit_rpm=2)
    spellings = ["1.2.3.4", "::ffff:1.2.3.4", "[::FFFF:1.2.3.4]:443", " 1.2.3.4:80 "]
    statuses = [
        (
            await gateway.post("/api/ai/generate", {"prompt": "x"}, headers={"X-Forwarded-For": s})
        ).status
        for s in spellings
    ]
    assert statuses == [200, 200, 429, 429]
    other = await gateway.post(
        "/api/ai/generate", {"prompt": "x"}, headers={"X-Forwarded-For": "1.2.3.5"}
    )
    assert other.status == 200


async def test_cors_allows_listed_origins_only(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(rate_limit_rpm=60)
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    allowed = await gateway.client.options(
        "/api/ai/generate-stream", headers={"Origin": "http://localhost:3300", **preflight}
    )
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://localhost:3300"
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    refused = await gateway.client.options(
        "/api/ai/generate-stream", headers={"Origin": "https://evil.example", **preflight}
    )
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
    answer_ = await gateway.post(
        "/api/ai/generate", {"prompt": "x"}, headers={"Origin": "http://127.0.0.1:3300"}
    )
    assert answer_.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3300"
    exposed = {
        h.strip().lower() for h in answer_.headers["Access-Control-Expose-Headers"].split(",")
    }
    assert {"x-request-id", "retry-after", "x-ratelimit-remaining-requests"} <= exposed


async def test_a_finished_stream_costs_exactly_its_usage(
    make_gateway: MakeGateway, limit_store: str | None
) -> None:
    gateway = await make_gateway(rate_limit_tpm=600, redis_url=limit_store)  # 10 tokens a second
    gateway.fake.queue(answer("a", "b", prompt=7), answer("c", prompt=7))
    first = await gateway.post("/api/ai/generate", {"prompt": "x"})
    second = await gateway.post("/api/ai/generate", {"prompt": "x"})
    spent = int(first.headers["x-ratelimit-remaining-tokens"]) - int(
        second.headers["x-ratelimit-remaining-tokens"]
    )
    # the first answer's usage (7 prompt + 2 completion) replaced its reserve; refill between
    # the two requests is a fraction of a token
    assert spent in (8, 9)
