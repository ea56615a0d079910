"""One behaviour suite for both limiter backends (in-process and a real Redis), on an injected
clock, plus the pure arithmetic and the access rules as tables."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.access import Access, key_id
from service.ratelimit import (
    Admission,
    LimitConfig,
    Limiter,
    MemoryLimiter,
    Quota,
    duration,
    gcra,
    quota_headers,
)
from service.redis_limits import RedisLimiter
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


async def test_requests_burst_then_smooth(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make(rpm=60)  # one a second, bursts of ten
    results = [await limiter.admit("c", 1, T0) for _ in range(11)]
    assert [r.allowed for r in results] == [True] * 10 + [False]
    assert [r.requests.remaining for r in results[:10]] == list(range(9, -1, -1))
    refused = results[-1]
    assert (refused.limit, round(refused.retry_after_s, 3)) == ("requests", 1.0)
    assert not (await limiter.admit("c", 1, T0 + 0.9)).allowed
    assert (await limiter.admit("c", 1, T0 + 1.0)).allowed
    assert (await limiter.admit("other", 1, T0 + 1.0)).allowed  # clients are separate


async def test_requests_never_double_burst_in_any_minute(make) -> None:  # type: ignore[no-untyped-def]
    limiter = make(rpm=60)
    allowed = [t for t in range(1200) if (await limiter.admit("c", 1, T0 + t / 10)).allowed]
    # every 60 s window holds at most the burst plus one a second
    times = [t / 10 for t in allowed]
    worst = max(sum(1 for x in times if start <= x < start + 60) for start in times)
    assert worst <= 10 + 60


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
    limiter = make(rpm=6, concurrent=1, tpm=600, lease_s=60)  # a burst of one request
    first = await limiter.admit("c", 100, T0)
    assert first.allowed
    assert first.tokens == Quota(600, 500, 10.0)
    refused = await limiter.admit("c", 100, T0 + 10)  # the request is fine, the lease is not
    assert refused.limit == "concurrency"
    assert refused.tokens is not None
    assert refused.tokens.remaining == 600  # refilled, and nothing reserved for the refusal
    await limiter.release("c", first.lease)
    assert (await limiter.admit("c", 100, T0 + 10)).allowed  # its request slot was not spent


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


async def test_memory_evicts_idle_clients() -> None:
    limiter = MemoryLimiter(LimitConfig(rpm=60, tpm=600), sweep_every_s=10)
    for i in range(100):
        await limiter.admit(f"c{i}", 10, T0)
    assert len(limiter) == 100
    await limiter.admit("late", 10, T0 + 61)  # after a full refill everyone else is idle
    assert len(limiter) == 1


@pytest.mark.parametrize(
    ("tat", "now", "allowed", "new_tat", "remaining", "retry"),
    [
        (0.0, 100.0, True, 101.0, 9, 0.0),
        (109.0, 100.0, True, 110.0, 0, 0.0),
        (110.0, 100.0, False, 110.0, 0, 1.0),
        (110.0, 100.5, False, 110.0, 0, 0.5),
    ],
)
def test_gcra_table(
    tat: float, now: float, allowed: bool, new_tat: float, remaining: int, retry: float
) -> None:
    ok, tat_after, quota, retry_after = gcra(tat, now, 60, 10)
    assert (ok, tat_after, quota.remaining, round(retry_after, 6)) == (
        allowed,
        new_tat,
        remaining,
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
    ],
)
def test_client_address(peer: str, xff: str | None, client: str) -> None:
    access = Access.build([], ["127.0.0.1", "::1", "10.0.0.0/8"])
    assert access.client_address(peer, xff) == client
