"""One behaviour suite for both limiter backends (in-process and a real Redis), on an injected
clock, plus the pure arithmetic and the access rules as tables."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from service.limits.access import Access, canonical_address, key_id
from service.limits.core import (
    Admission,
    LimitConfig,
    Limiter,
    MemoryLimiter,
    Quota,
    duration,
    quota_headers,
    sliding_log,
)
from service.limits.redis_backend import RedisLimiter
from tests.conftest import RedisServer, start_redis

T0 = 1_800_000_000.0


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory"
        return
    server = await start_redis()
    request.node.redis = server
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
async def make(backend: str) -> AsyncIterator[object]:
    made: list[Limiter] = []

    def build(**config: float) -> Limiter:
        limits = LimitConfig(**config)  # type: ignore[arg-type]
        limiter: Limiter = (
            MemoryLimiter(limits) if backend == "memory" else RedisLimiter(limits, backend)
        )
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.aclose()


async def test_a_fresh_client_sends_its_n_at_once_then_waits_for_the_oldest(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make(rpm=3)
    results = [await limiter.admit("c", 1, T0 + i) for i in range(4)]  # at T0, T0+1, T0+2, T0+3
    assert [r.allowed for r in results] == [True, True, True, False]
    # remaining counts down from the limit; reset is when the oldest request leaves the window
    assert [(r.requests.remaining, r.requests.reset_s) for r in results] == [
        (2, 60.0),
        (1, 59.0),
        (0, 58.0),
        (0, 57.0),
    ]
    refused = results[-1]
    assert (refused.limit, refused.retry_after_s) == ("requests", 57.0)
    assert not (await limiter.admit("c", 1, T0 + 59.999)).allowed
    again = await limiter.admit("c", 1, T0 + 60)  # the first request left the window
    assert (again.allowed, again.requests.remaining, again.requests.reset_s) == (True, 0, 1.0)
    assert not (await limiter.admit("c", 1, T0 + 60.5)).allowed
    assert (await limiter.admit("other", 1, T0)).allowed  # clients are separate


@pytest.mark.parametrize("rpm", [1, 3, 120])
async def test_no_60_second_window_ever_holds_more_than_n(make, rpm: int) -> None:  # type: ignore[no-untyped-def]
    limiter = make(rpm=rpm)
    arrivals = random.Random(rpm)
    now, allowed = T0, []
    for _ in range(rpm * 8):
        now += arrivals.expovariate(rpm / 20)  # three times the allowed rate, in bursts
        if (await limiter.admit("c", 1, now)).allowed:
            allowed.append(now)
    worst = max(sum(1 for t in allowed if start <= t < start + 60) for start in allowed)
    assert worst == rpm  # never more, and the whole allowance is usable
    # a fresh client may send its N at once
    burst = [await limiter.admit("fresh", 1, now) for _ in range(rpm + 1)]
    assert [r.allowed for r in burst] == [True] * rpm + [False]
    assert [r.requests.remaining for r in burst[:rpm]] == list(range(rpm - 1, -1, -1))


async def test_the_redis_log_holds_at_most_n_entries_and_expires_when_idle(
    redis_server: RedisServer,
) -> None:
    limiter = RedisLimiter(LimitConfig(rpm=5), redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for i in range(40):
            await limiter.admit("c", 1, T0 + i * 5)
            assert await raw.zcard("aistream:{c}:rpm") <= 5
        assert 0 < await raw.pttl("aistream:{c}:rpm") <= 61_000  # gone a minute after the last
    finally:
        await raw.aclose()
        await limiter.aclose()


async def test_concurrency_leases(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make(concurrent=2, lease_s=10)
    a, b = await limiter.admit("c", 1, T0), await limiter.admit("c", 1, T0)
    assert a.lease
    assert b.lease
    assert a.lease != b.lease
    refused = await limiter.admit("c", 1, T0)
    assert (refused.allowed, refused.limit) == (False, "concurrency")
    assert await limiter.concurrent("c", T0) == 2
    await limiter.release("c", a.lease)
    assert (await limiter.admit("c", 1, T0)).allowed


async def test_a_refusal_consumes_nothing_from_the_other_limits(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make(rpm=2, concurrent=1, tpm=600, lease_s=60)
    first = await limiter.admit("c", 100, T0)
    assert first.allowed
    assert first.tokens == Quota(600, 500, 10.0)
    refused = await limiter.admit("c", 100, T0 + 10)  # the request is fine, the lease is not
    assert refused.limit == "concurrency"
    assert refused.tokens is not None
    assert refused.tokens.remaining == 600  # refilled, and nothing reserved for the refusal
    assert refused.requests == Quota(2, 1, 50.0)  # nor a request spent
    await limiter.release("c", first.lease)
    assert (await limiter.admit("c", 100, T0 + 10)).allowed  # its request slot was not spent
    assert not (await limiter.admit("c", 100, T0 + 10)).allowed


async def test_tokens_reserve_charge_overdraw_and_refill(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make(tpm=600)  # ten a second
    assert (await limiter.admit("c", 100, T0)).tokens == Quota(600, 500, 10.0)
    assert await limiter.charge({"c": 450}, T0) == {"c": 50.0}
    assert await limiter.charge({"c": 100}, T0) == {"c": -50.0}
    refused = await limiter.admit("c", 100, T0)
    assert (refused.allowed, refused.limit, refused.retry_after_s) == (False, "tokens", 15.0)
    assert (await limiter.admit("c", 100, T0 + 15)).allowed
    # a prompt larger than the whole bucket reserves a full bucket, not forever refused
    assert (await limiter.admit("big", 10_000, T0)).tokens == Quota(600, 0, 60.0)


async def test_limits_off_admit_everything(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make()
    result = await limiter.admit("c", 10**9, T0)
    assert result == Admission(True)


async def test_a_lease_nobody_renews_expires_and_renewal_keeps_it(
    redis_server: RedisServer,
) -> None:
    limiter = RedisLimiter(LimitConfig(concurrent=1, lease_s=2), redis_server.url)
    try:
        held = await limiter.admit("c", 1, T0)
        assert not (await limiter.admit("c", 1, T0 + 1.9)).allowed
        await limiter.renew([("c", held.lease or "")], T0 + 1.9)
        assert not (await limiter.admit("c", 1, T0 + 3.5)).allowed  # renewed until T0 + 3.9
        assert (await limiter.admit("c", 1, T0 + 4.0)).allowed  # its instance died: freed
    finally:
        await limiter.aclose()


async def test_memory_keeps_at_most_n_request_times_per_client() -> None:
    limiter = MemoryLimiter(LimitConfig(rpm=5))
    for i in range(40):
        await limiter.admit("c", 1, T0 + i * 5)
        assert len(limiter._clients["c"].stamps) <= 5  # the bound is the subject


async def test_memory_evicts_idle_clients() -> None:
    limiter = MemoryLimiter(LimitConfig(rpm=60, tpm=600), sweep_every_s=10)
    for i in range(100):
        await limiter.admit(f"c{i}", 10, T0)
    assert len(limiter) == 100
    await limiter.admit("late", 10, T0 + 61)  # after a full refill everyone else is idle
    assert len(limiter) == 1


@pytest.mark.parametrize(
    ("stamps", "now", "allowed", "remaining", "reset", "retry"),
    [
        ([], 100.0, True, 2, 60.0, 0.0),  # fresh: the first of three
        ([100.0], 100.0, True, 1, 60.0, 0.0),
        ([100.0, 100.0], 100.0, True, 0, 60.0, 0.0),  # the third at once is still admitted
        ([100.0, 100.0, 100.0], 100.0, False, 0, 60.0, 60.0),
        ([100.0, 130.0, 150.0], 159.5, False, 0, 0.5, 0.5),  # the oldest leaves at 160
        ([100.0, 130.0], 159.5, True, 0, 0.5, 0.0),
        ([130.0, 150.0], 160.0, True, 0, 30.0, 0.0),  # (100 left the window at 160 exactly)
        ([100.0, 101.0, 102.0, 103.0], 120.0, False, 0, 41.0, 41.0),  # over (a lowered limit)
    ],
)
def test_sliding_log_table(
    stamps: list[float], now: float, allowed: bool, remaining: int, reset: float, retry: float
) -> None:
    ok, quota, retry_after = sliding_log(stamps, now, 3)
    assert (ok, quota.limit, quota.remaining, quota.reset_s, retry_after) == (
        allowed,
        3,
        remaining,
        reset,
        retry,
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.25, "250ms"), (0.0, "0ms"), (1.0, "1s"), (59.4, "59s"), (90, "1m30s")]
)
def test_duration_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_quota_headers_only_for_limits_that_are_on() -> None:
    admission = Admission(True, requests=Quota(60, 9, 1.0))
    assert quota_headers(admission) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "1s",
    }


def test_api_keys() -> None:
    access = Access.build(["k-one", "k-two"], [])
    assert access.auth_required
    assert access.authenticate("Bearer k-two") == key_id("k-two")
    for header in (None, "", "Bearer", "Bearer k-three", "Basic k-one", "bearer k-one", "k-one"):
        assert access.authenticate(header) is None
    assert "k-one" not in repr(access)
    assert not Access.build([], []).auth_required


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # not a proxy of ours: header ignored
        ("127.0.0.1", "1.2.3.4", "1.2.3.4"),
        ("127.0.0.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),  # the leftmost part is the client's word
        ("127.0.0.1", "1.2.3.4, 10.0.0.7", "1.2.3.4"),  # an inner trusted proxy is skipped
        ("127.0.0.1", "garbage, 1.2.3.4", "1.2.3.4"),
        ("127.0.0.1", "1.2.3.4, garbage", "127.0.0.1"),
        ("::1", "2001:db8::5", "2001:db8::5"),
        ("127.0.0.1", "10.0.0.7", "10.0.0.7"),  # only proxies: the last one seen
        ("127.0.0.1", " [::FFFF:1.2.3.4]:443 ", "1.2.3.4"),  # one spelling for one address
        ("::ffff:127.0.0.1", "1.2.3.4", "1.2.3.4"),  # a dual-stack socket's peer is trusted too
        ("::ffff:203.0.113.9", "1.2.3.4", "203.0.113.9"),
        ("127.0.0.1", "1.2.3.4:http", "127.0.0.1"),  # unparsable: the peer
        ("127.0.0.1", "1.2.3.4, ", "127.0.0.1"),
        ("127.0.0.1", "garbage, 10.0.0.7", "10.0.0.7"),  # the nearest proxy that said it
    ],
)
def test_client_address(peer: str, xff: str | None, client: str) -> None:
    access = Access.build([], ["127.0.0.1", "::1", "10.0.0.0/8"])
    assert access.client_address(peer, xff) == client


@pytest.mark.parametrize(
    "spelling",
    [
        "1.2.3.4",
        " 1.2.3.4 ",
        "1.2.3.4:8080",
        "::ffff:1.2.3.4",
        "::FFFF:1.2.3.4",
        "[::ffff:1.2.3.4]",
        "[::ffff:1.2.3.4]:443",
        "::ffff:102:304",
        "0:0:0:0:0:ffff:0102:0304",
        "\t1.2.3.4",
    ],
)
def test_one_ipv4_address_has_one_spelling(spelling: str) -> None:
    assert canonical_address(spelling) == "1.2.3.4"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("2001:DB8::5", "2001:db8::5"),
        ("2001:db8:0:0:0:0:0:5", "2001:db8::5"),
        ("[2001:db8::5]:443", "2001:db8::5"),
        ("fe80::1%eth0", "fe80::1"),
        ("::1", "::1"),
        ("1.2.3.4:http", None),
        ("1.2.3.4:", None),
        ("1.2.3.4:123456", None),
        ("1.2.3.4:\u0663", None),  # a Unicode digit is not a port
        ("[1.2.3.4", None),
        ("[::1]x", None),
        ("01.2.3.4", None),
        ("1.2.3", None),
        ("", None),
        ("unknown", None),
    ],
)
def test_canonical_address_table(text: str, canonical: str | None) -> None:
    assert canonical_address(text) == canonical
