"""The limits of `core`, kept in Redis so several instances share one budget.

Each operation is one Lua script (atomic in Redis) or one pipeline; the formulas mirror
`core.sliding_log`, `core.refill` and the lease rules, and `now` comes from the caller
(core design note 1). Keys carry the client in a hash tag, `aistream:{client}:...`, so one
client's keys stay on one Redis Cluster slot. Every key expires once it holds nothing a fresh key
would not, so idle clients cost nothing. Redis errors and timeouts surface as
`LimiterUnavailable`; what to do then is the caller's policy.

Design notes:
1. A connection error is retried once, on the same connection reconnected first (redis-py's
   retry), so a pooled connection left stale by a Redis restart costs a reconnect, not a failed
   request. Timeouts are not retried: the caller's deadline is the bound.
2. Every new connection first asks the server's run id (`INFO server`). A run id unlike the one
   seen before means Redis restarted and, without persistence, lost every lease. The limiter then
   sets `restarted` (the app's upkeep re-registers its running streams' leases at once: renewal
   re-creates a missing lease) and admissions wait `hold_s`, one renew interval plus half of
   another for late timers and round trips, by which time every instance has renewed, and so
   re-created, its leases. An admission that ran while the restart was being noticed on another
   connection is undone and waits too. Either way no client runs more streams than its limit
   across a restart. (Request logs and token buckets lost with the data start afresh.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from .core import Admission, LimitConfig, Quota, reserve_for, window_start

log = structlog.get_logger("service.limits.redis_backend")
T = TypeVar("T")

# KEYS: rpm, tpm, concurrency. ARGV: now, rpm, window start, tpm, reserve, concurrency limit,
# lease id (also the request's entry in the log), lease TTL (s). Reply: allowed, refused (0 none,
# 1 requests, 2 concurrency, 3 tokens), retry after ms, requests remaining, requests reset ms,
# tokens remaining, tokens reset ms.
ADMIT = """
local now, rpm, start = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local tpm, reserve, climit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, lease_s = ARGV[7], tonumber(ARGV[8])
local balance = tpm
if tpm > 0 then
  local st = redis.call('HMGET', KEYS[2], 'b', 'u')
  if st[1] then
    balance = math.min(tpm, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * tpm / 60.0)
  end
end
local function tok_reset() return math.max(0, math.ceil((tpm - balance) * 60000 / tpm)) end
local tok_rem, tok_ms = 0, 0
if tpm > 0 then tok_rem, tok_ms = math.floor(balance), tok_reset() end
-- the sliding log: the request quota with `used` requests in the window (plus `extra` at now)
local used = 0
local function req_quota(extra)
  local n = used + extra
  if n == 0 then return rpm, 0 end
  local at = math.max(0, n - rpm)
  local stamp
  if at < used then
    stamp = tonumber(redis.call('ZRANGE', KEYS[1], at, at, 'WITHSCORES')[2])
  else
    stamp = now
  end
  return math.max(0, rpm - n), math.max(0, math.ceil((stamp + 60 - now) * 1000))
end
local req_rem, req_ms = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', start)
  used = redis.call('ZCARD', KEYS[1])
  if used >= rpm then
    req_rem, req_ms = req_quota(0)
    return {0, 1, math.max(1, req_ms), req_rem, req_ms, tok_rem, tok_ms}
  end
  req_rem, req_ms = req_quota(0)  -- what a refusal by another limit reports: nothing spent
end
if climit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= climit then
    return {0, 2, 1000, req_rem, req_ms, tok_rem, tok_ms}
  end
end
if tpm > 0 then
  if balance < reserve then
    return {0, 3, math.ceil((reserve - balance) * 60000 / tpm), req_rem, req_ms, tok_rem, tok_ms}
  end
  balance = balance - reserve
  tok_rem, tok_ms = math.floor(balance), tok_reset()
  redis.call('HSET', KEYS[2], 'b', tostring(balance), 'u', tostring(now))
  redis.call('PEXPIRE', KEYS[2], tok_ms + 1000)
end
if rpm > 0 then
  req_rem, req_ms = req_quota(1)
  redis.call('ZADD', KEYS[1], ARGV[1], lease)
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if climit > 0 then
  redis.call('ZADD', KEYS[3], now + lease_s, lease)
  redis.call('PEXPIRE', KEYS[3], math.ceil(lease_s * 2000))
end
return {1, 0, 0, req_rem, req_ms, tok_rem, tok_ms}
"""

# KEYS: tpm keys. ARGV: now, tpm, then one debit per key. Reply: balances (floored).
CHARGE = """
local now, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local st = redis.call('HMGET', key, 'b', 'u')
  local balance = tpm
  if st[1] then
    balance = math.min(tpm, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * tpm / 60.0)
  end
  balance = balance - tonumber(ARGV[i + 2])
  redis.call('HSET', key, 'b', tostring(balance), 'u', tostring(now))
  redis.call('PEXPIRE', key, math.max(0, math.ceil((tpm - balance) * 60000 / tpm)) + 1000)
  out[i] = math.floor(balance)
end
return out
"""


class LimiterUnavailable(Exception):
    """Redis did not answer (in time)."""


class LimiterRecovering(Exception):
    """Redis came back without its state: admissions wait `wait_s` while leases re-register."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"leases re-registering for {wait_s:.2f} s")
        self.wait_s = wait_s


class _Restarted(RedisError):
    """A new connection met a Redis with a new run id (design note 2)."""


def _key(client: str, kind: str) -> str:
    return f"aistream:{{{client}}}:{kind}"


def run_id(info: bytes | str) -> str | None:
    """The `run_id` field of an `INFO server` reply."""
    text = info.decode() if isinstance(info, bytes) else info
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line[7:].strip() or None
    return None


class RedisLimiter:
    def __init__(
        self,
        config: LimitConfig,
        url: str,
        *,
        timeout_s: float = 1.0,
        connections: int = 256,
        hold_s: float | None = None,
    ) -> None:
        self.config = config
        self.restarted = asyncio.Event()
        self.hold_s = config.lease_s / 2 if hold_s is None else hold_s  # design note 2
        self._run_id: str | None = None
        self._generation = 0  # run ids seen after the first
        self._hold_until = 0.0  # event-loop time
        # A bounded pool that waits (briefly) for a free connection: under a burst of admissions
        # the default pool raises MaxConnectionsError instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),  # note 1
            redis_connect_func=self._on_connect,
        )
        self.redis = aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
        self._admit = self.redis.register_script(ADMIT)
        self._charge = self.redis.register_script(CHARGE)

    async def _on_connect(self, conn: AbstractConnection) -> None:
        """Handshake as usual, then compare the server's run id with the last one seen."""
        await conn.on_connect()
        try:
            await conn.send_command("INFO", "server", check_health=False)
            seen = run_id(await conn.read_response())
        except ResponseError:
            # INFO is disabled here: a restart goes unnoticed, so admissions do not wait, but
            # renewal still brings every running stream's lease back within one interval
            return
        if seen is None or seen == self._run_id:
            return
        first, self._run_id = self._run_id is None, seen
        if first:
            return
        self._generation += 1
        self._hold_until = asyncio.get_running_loop().time() + self.hold_s
        self.restarted.set()
        log.warning("ratelimit.redis_restarted", hold_s=self.hold_s)
        raise _Restarted("Redis restarted")

    def _hold_left(self) -> float:
        return max(0.0, self._hold_until - asyncio.get_running_loop().time())

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        """One operation; a connection that met a restarted Redis is simply used again (only
        admissions wait for the leases to re-register)."""
        try:
            try:
                return await call()
            except _Restarted:
                return await call()
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err

    async def admit(self, client: str, estimate: int, now: float) -> Admission:
        c = self.config
        if wait := self._hold_left():
            raise LimiterRecovering(wait)
        generation = self._generation
        lease = uuid.uuid4().hex
        reserve = reserve_for(estimate, c.tpm) if c.tpm else 0
        keys = [_key(client, "rpm"), _key(client, "tpm"), _key(client, "conc")]
        args: list[str | int | float] = [
            repr(now),
            c.rpm,
            repr(window_start(now)),
            c.tpm,
            reserve,
            c.concurrent,
            lease,
            c.lease_s,
        ]
        try:
            raw = await self._admit(keys=keys, args=args)
        except _Restarted as err:
            raise LimiterRecovering(self._hold_left()) from err
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err
        admission = decode_admission(list(raw), c, lease, reserve)
        if generation != self._generation:
            # Redis restarted while this ran: it may have been counted before the leases were
            # back (design note 2). Undo it; it waits like the others.
            if admission.allowed:
                await self._undo(client, lease, admission.reserved, now)
            raise LimiterRecovering(self._hold_left())
        return admission

    async def _undo(self, client: str, lease: str, reserved: int, now: float) -> None:
        async def undo() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(_key(client, "rpm"), lease)
                pipe.zrem(_key(client, "conc"), lease)
                await pipe.execute()

        try:
            await self._run(undo)
            if reserved:
                await self.charge({client: -reserved}, now)
        except LimiterUnavailable:
            pass  # the lease expires within its TTL

    async def charge(self, debits: dict[str, int], now: float) -> dict[str, float]:
        if not self.config.tpm or not debits:
            return {}
        clients = list(debits)
        keys = [_key(client, "tpm") for client in clients]
        args = [now, self.config.tpm, *(debits[c] for c in clients)]
        raw = await self._run(lambda: self._charge(keys=keys, args=args))
        return {client: float(balance) for client, balance in zip(clients, raw, strict=True)}

    async def release(self, client: str, lease: str) -> None:
        await self._run(lambda: self.redis.zrem(_key(client, "conc"), lease))

    async def renew(self, leases: list[tuple[str, str]], now: float) -> None:
        """Extend each lease's TTL, re-creating a lease Redis lost (design note 2)."""
        if not leases:
            return
        lease_s = self.config.lease_s

        async def renew() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for client, lease in leases:
                    pipe.zadd(_key(client, "conc"), {lease: now + lease_s})
                    pipe.pexpire(_key(client, "conc"), int(lease_s * 2000))
                await pipe.execute()

        await self._run(renew)

    async def concurrent(self, client: str, now: float) -> int:
        return int(await self._run(lambda: self.redis.zcount(_key(client, "conc"), now, "+inf")))

    async def ping(self) -> None:
        await self._run(self.redis.ping)

    async def aclose(self) -> None:
        await self.redis.aclose()


def decode_admission(raw: list[Any], c: LimitConfig, lease: str | None, reserved: int) -> Admission:
    """An Admission from the ADMIT script's reply."""
    allowed, refused, retry_ms, req_rem, req_reset_ms, tok_rem, tok_reset_ms = (int(x) for x in raw)
    requests = Quota(c.rpm, req_rem, req_reset_ms / 1000) if c.rpm else None
    tokens = Quota(c.tpm, max(0, tok_rem), tok_reset_ms / 1000) if c.tpm else None
    limit = (None, "requests", "concurrency", "tokens")[refused]
    return Admission(
        bool(allowed),
        limit,
        retry_ms / 1000,
        requests,
        tokens,
        lease if allowed and c.concurrent else None,
        reserved if allowed else 0,
    )
