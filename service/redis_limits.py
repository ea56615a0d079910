"""The limits of `ratelimit`, kept in Redis so several instances share one budget.

Each operation is one Lua script (atomic in Redis) or one pipeline; the formulas mirror
`ratelimit.gcra`, `ratelimit.refill` and the lease rules, and `now` comes from the caller
(ratelimit design note 1). Keys carry the client in a hash tag, `aistream:{client}:...`, so one
client's keys stay on one Redis Cluster slot. Every key expires once it holds nothing a fresh key
would not, so idle clients cost nothing. Redis errors and timeouts surface as
`LimiterUnavailable`; what to do then is the caller's policy.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .ratelimit import Admission, LimitConfig, Quota, reserve_for

# KEYS: rpm, tpm, concurrency. ARGV: now, rpm, burst, tpm, reserve, concurrency limit, lease id,
# lease TTL (s). Reply: allowed, refused (0 none, 1 requests, 2 concurrency, 3 tokens),
# retry after ms, requests remaining, requests reset ms, tokens remaining, tokens reset ms.
ADMIT = """
local now, rpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
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
local req_rem, req_ms, new_tat = 0, 0, 0
if rpm > 0 then
  local interval = 60.0 / rpm
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  new_tat = tat + interval
  if new_tat - now > burst * interval + 1e-9 then
    local used = tat - now
    local rem = math.max(0, math.floor((burst * interval - used) / interval + 1e-9))
    local retry = math.ceil(((tat + interval - now) - burst * interval) * 1000)
    return {0, 1, retry, rem, math.floor(used * 1000), tok_rem, tok_ms}
  end
  req_rem = math.max(0, math.floor((burst * interval - (new_tat - now)) / interval + 1e-9))
  req_ms = math.floor((new_tat - now) * 1000)
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
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
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


def _key(client: str, kind: str) -> str:
    return f"aistream:{{{client}}}:{kind}"


class RedisLimiter:
    def __init__(
        self, config: LimitConfig, url: str, *, timeout_s: float = 1.0, connections: int = 256
    ) -> None:
        self.config = config
        # A bounded pool that waits (briefly) for a free connection: under a burst of admissions
        # the default pool raises MaxConnectionsError instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self.redis = aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
        self._admit = self.redis.register_script(ADMIT)
        self._charge = self.redis.register_script(CHARGE)

    async def admit(self, client: str, estimate: int, now: float) -> Admission:
        c = self.config
        lease = uuid.uuid4().hex
        reserve = reserve_for(estimate, c.tpm) if c.tpm else 0
        keys = [_key(client, "rpm"), _key(client, "tpm"), _key(client, "conc")]
        args: list[str | int | float] = [
            now,
            c.rpm,
            c.burst,
            c.tpm,
            reserve,
            c.concurrent,
            lease,
            c.lease_s,
        ]
        try:
            raw = await self._admit(keys=keys, args=args)
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err
        return decode_admission(list(raw), c, lease, reserve)

    async def charge(self, debits: dict[str, int], now: float) -> dict[str, float]:
        if not self.config.tpm or not debits:
            return {}
        clients = list(debits)
        keys = [_key(client, "tpm") for client in clients]
        try:
            raw = await self._charge(
                keys=keys, args=[now, self.config.tpm, *(debits[c] for c in clients)]
            )
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err
        return {client: float(balance) for client, balance in zip(clients, raw, strict=True)}

    async def release(self, client: str, lease: str) -> None:
        try:
            await self.redis.zrem(_key(client, "conc"), lease)
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err

    async def renew(self, leases: list[tuple[str, str]], now: float) -> None:
        if not leases:
            return
        lease_s = self.config.lease_s
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for client, lease in leases:
                    pipe.zadd(_key(client, "conc"), {lease: now + lease_s}, xx=True)
                    pipe.pexpire(_key(client, "conc"), int(lease_s * 2000))
                await pipe.execute()
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err

    async def concurrent(self, client: str, now: float) -> int:
        try:
            return int(await self.redis.zcount(_key(client, "conc"), now, "+inf"))
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(str(err)) from err

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
