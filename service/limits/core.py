"""Per-client limits: requests per minute, concurrent streams, tokens per minute.

Hand-written rather than taken from the `limits` library: it offers fixed and sliding windows, but
not concurrency leases that expire, and not a token bucket that a stream debits as it
goes and may overdraw (then repaid at the end from the upstream's usage). The arithmetic is pure
and takes the clock as an argument; the in-process backend and the Redis backend (Lua scripts,
atomic) run the same formulas, and the app passes its own clock to both (design note 1).

- Requests: a sliding log. A client's admitted requests of the last 60 s are kept (at most RPM
  timestamps; a Redis sorted set trimmed to the window); a request is admitted while fewer than
  RPM are in the window. So a fresh client may send its RPM at once, no 60-second window ever
  holds more than RPM of a client's requests, `remaining` counts down from RPM, and `reset` is
  when the oldest request leaves the window (the next slot frees).
- Tokens: a bucket of TPM tokens refilled at TPM/60 per second. Admission needs the prompt
  estimate in the bucket and takes it out; streamed tokens are charged in batches; the balance can
  go below zero, which ends the client's open streams (`rate_limited`).
- Concurrency: a lease per open stream, with a TTL renewed while the stream lives, so a crashed
  instance's leases free themselves within the TTL.

Design notes:
1. Redis scripts take `now` from the calling instance rather than `TIME`, so one injected clock
   drives both backends in tests. Instances sharing a Redis must keep their clocks in step (NTP);
   a skew of s seconds shifts a client's budget by at most s seconds of refill.
2. `admit` is one atomic step for all three limits: a request refused by one limit consumes
   nothing from the others.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LimitConfig:
    rpm: int = 0
    concurrent: int = 0
    tpm: int = 0
    lease_s: float = 10.0

    @property
    def renew_interval_s(self) -> float:
        """How often a held lease is renewed: three times per TTL."""
        return self.lease_s / 3

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.concurrent or self.tpm)


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    limit: str | None = None  # which limit refused: "requests", "concurrency" or "tokens"
    retry_after_s: float = 0.0
    requests: Quota | None = None
    tokens: Quota | None = None
    lease: str | None = None
    reserved: int = 0  # tokens taken from the bucket, settled when the stream ends


# --- the arithmetic -------------------------------------------------------------------------


WINDOW_S = 60.0  # the requests-per-minute window


def window_start(now: float) -> float:
    """Requests stamped at or before this have left the window that ends at `now`."""
    return now - WINDOW_S


def request_quota(
    stamps: Sequence[float], now: float, rpm: int, *, plus_now: bool = False
) -> Quota:
    """The request quota for a client whose requests in the window are `stamps` (oldest first),
    and one more at `now` if `plus_now`: what is left, and when the next slot frees (the oldest
    request that matters leaves the window)."""
    used = len(stamps) + plus_now
    if not used:
        return Quota(rpm, rpm, 0.0)
    at = max(0, used - rpm)
    oldest = stamps[at] if at < len(stamps) else now
    return Quota(rpm, max(0, rpm - used), max(0.0, oldest + WINDOW_S - now))


def sliding_log(stamps: Sequence[float], now: float, rpm: int) -> tuple[bool, Quota, float]:
    """One request against a client's log of admitted requests still in the window (oldest
    first). Returns (allowed, the quota after it, retry after)."""
    if len(stamps) >= rpm:
        quota = request_quota(stamps, now, rpm)
        return False, quota, quota.reset_s
    return True, request_quota(stamps, now, rpm, plus_now=True), 0.0


def refill(balance: float, updated: float, now: float, tpm: int) -> float:
    """The token bucket's balance at `now`."""
    return min(float(tpm), balance + max(0.0, now - updated) * tpm / 60.0)


def token_quota(balance: float, tpm: int) -> Quota:
    return Quota(tpm, max(0, math.floor(balance)), max(0.0, (tpm - balance) * 60.0 / tpm))


def reserve_for(estimate: int, tpm: int) -> int:
    """What admission takes from the bucket: the prompt estimate, never more than a full bucket."""
    return min(max(1, estimate), tpm)


# --- backends -------------------------------------------------------------------------------


class Limiter(Protocol):
    config: LimitConfig
    restarted: asyncio.Event  # set when the store lost its state: re-register the leases now

    async def admit(self, client: str, estimate: int, now: float) -> Admission: ...

    async def charge(self, debits: dict[str, int], now: float) -> dict[str, float]:
        """Debit tokens per client; return each client's balance afterwards."""
        ...

    async def release(self, client: str, lease: str) -> None: ...

    async def renew(self, leases: list[tuple[str, str]], now: float) -> None: ...

    async def concurrent(self, client: str, now: float) -> int:
        """Open leases of a client (for tests and the endurance check)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Client:
    stamps: deque[float] = field(default_factory=deque)  # admitted requests in the window
    balance: float | None = None
    updated: float = 0.0
    leases: set[str] = field(default_factory=set)


class MemoryLimiter:
    """Limits for one instance. Idle clients (full buckets, no leases) are evicted on a sweep."""

    def __init__(self, config: LimitConfig, *, sweep_every_s: float = 60.0) -> None:
        self.config = config
        self.restarted = asyncio.Event()  # never set: this state dies with its process
        self._clients: dict[str, _Client] = {}
        self._sweep_every_s = sweep_every_s
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._clients)

    def _client(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(updated=now)
        stamps, gone = state.stamps, window_start(now)
        while stamps and stamps[0] <= gone:
            stamps.popleft()
        if self.config.tpm:
            start = state.balance if state.balance is not None else float(self.config.tpm)
            state.balance = refill(start, state.updated, now, self.config.tpm)
            state.updated = now
        return state

    async def admit(self, client: str, estimate: int, now: float) -> Admission:
        self._sweep(now)
        c, state = self.config, self._client(client, now)
        requests = tokens = None
        reserved = 0
        if c.rpm:
            ok, requests, retry = sliding_log(state.stamps, now, c.rpm)
            if not ok:
                return Admission(False, "requests", retry, requests, _tokens(state, c))
        # refused by another limit, the request is not spent: the quota is the log's as it is
        unspent = request_quota(state.stamps, now, c.rpm) if c.rpm else None
        if c.concurrent and len(state.leases) >= c.concurrent:
            return Admission(False, "concurrency", 1.0, unspent, _tokens(state, c))
        if c.tpm:
            assert state.balance is not None
            reserved = reserve_for(estimate, c.tpm)
            if state.balance < reserved:
                retry = (reserved - state.balance) * 60.0 / c.tpm
                return Admission(False, "tokens", retry, unspent, _tokens(state, c))
            state.balance -= reserved
            tokens = _tokens(state, c)
        if c.rpm:
            state.stamps.append(now)
        lease = None
        if c.concurrent:
            lease = uuid.uuid4().hex
            state.leases.add(lease)
        return Admission(True, None, 0.0, requests, tokens, lease, reserved)

    async def charge(self, debits: dict[str, int], now: float) -> dict[str, float]:
        balances = {}
        for client, tokens in debits.items():
            state = self._client(client, now)
            if state.balance is not None:
                state.balance -= tokens
                balances[client] = state.balance
        return balances

    async def release(self, client: str, lease: str) -> None:
        state = self._clients.get(client)
        if state is not None:
            state.leases.discard(lease)

    async def renew(self, leases: list[tuple[str, str]], now: float) -> None:
        return None  # leases die with the process: nothing to renew

    async def concurrent(self, client: str, now: float) -> int:
        state = self._clients.get(client)
        return len(state.leases) if state else 0

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every_s
        c = self.config
        for key in [k for k, s in self._clients.items() if self._idle(s, now, c)]:
            del self._clients[key]

    @staticmethod
    def _idle(state: _Client, now: float, c: LimitConfig) -> bool:
        full = state.balance is None or refill(state.balance, state.updated, now, c.tpm) >= c.tpm
        stale = not state.stamps or state.stamps[-1] <= window_start(now)
        return not state.leases and stale and full

    async def aclose(self) -> None:
        return None


def _tokens(state: _Client, c: LimitConfig) -> Quota | None:
    return token_quota(state.balance, c.tpm) if c.tpm and state.balance is not None else None


def quota_headers(admission: Admission) -> dict[str, str]:
    """The OpenAI-style `x-ratelimit-*` headers for the limits that are on."""
    headers = {}
    for name, quota in (("requests", admission.requests), ("tokens", admission.tokens)):
        if quota is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(quota.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(quota.remaining)
            headers[f"x-ratelimit-reset-{name}"] = duration(quota.reset_s)
    return headers


def duration(seconds: float) -> str:
    """`1m30s`, `2s`, `250ms`: the format OpenAI uses for resets."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
