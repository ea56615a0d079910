"""The limiter in the app: admission with the Redis-outage policy, one upkeep task per instance
(batched token charges that cut over-budget streams, lease renewal), and each stream's final
settlement (reconciled with the upstream's usage, lease released).

Overshoot bound: a client's balance is checked once per `RATE_LIMIT_CHARGE_INTERVAL_S`, so it can
overdraw by what its open streams relay in one interval (about rate x interval per stream, e.g.
50 tokens/s x 0.5 s = 25 tokens), plus the difference between the prompt estimate and the
upstream's prompt count, which is settled when the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import structlog

from .errors import ApiError, Outcome
from .metrics import Metrics
from .ratelimit import Admission, LimitConfig, Limiter
from .redis_limits import LimiterRecovering, LimiterUnavailable
from .relay import LiveStreams, Relay, outlive_cancel

log = structlog.get_logger("service.limits")
STORE_TIMEOUT_S = 2.0  # the longest a request waits on the limit store before the policy applies
RECOVERY_TRIES = 3  # admissions that wait for a restarted store's leases before giving up


class Limits:
    def __init__(
        self,
        limiter: Limiter,
        *,
        metrics: Metrics,
        live: LiveStreams,
        fail_open: bool = True,
        charge_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limiter = limiter
        self.config: LimitConfig = limiter.config
        self._metrics = metrics
        self._live = live
        self._fail_open = fail_open
        self._charge_interval_s = charge_interval_s
        self.clock = clock
        self._held: set[tuple[str, str]] = set()  # leases held outside a relay (the probe)
        self._released: set[str] | None = None  # leases released while a renewal is in flight

    async def admit(self, client: str, estimate: int) -> Admission:
        """Admit one request or raise 429 (with Retry-After) or, Redis being down and the policy
        closed, 503. While a restarted Redis gets its leases back, the request waits. A
        cancellation (the client left) waits for the store's answer, at most `STORE_TIMEOUT_S`,
        and gives back what it granted: a lease is never left behind."""
        if not self.config.enabled:
            return Admission(True)
        for _ in range(RECOVERY_TRIES):
            task = asyncio.create_task(self._admit(client, estimate))
            try:
                return await outlive_cancel(task)
            except LimiterRecovering as err:
                await asyncio.sleep(err.wait_s)  # redis_limits design note 2
            except asyncio.CancelledError:
                if not task.cancelled() and task.exception() is None:
                    granted = task.result()
                    await outlive_cancel(self.give_back(client, granted.lease, granted.reserved))
                raise
        raise ApiError("overloaded", "Rate limiting is recovering; retry shortly.", retry_after_s=1)

    async def _admit(self, client: str, estimate: int) -> Admission:
        """One try at the store (a restarted one's LimiterRecovering goes to `admit`)."""
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                admission = await self.limiter.admit(client, estimate, self.clock())
        except (LimiterUnavailable, TimeoutError) as err:
            self._unavailable("admit", err)
            if self._fail_open:
                # Unlimited, but with a lease that renewal registers once Redis answers, so the
                # stream counts against its client from then on.
                lease = uuid.uuid4().hex if self.config.concurrent else None
                return Admission(True, lease=lease)
            raise ApiError(
                "overloaded", "Rate limiting is unavailable; retry shortly.", retry_after_s=1
            ) from err
        if not admission.allowed:
            assert admission.limit is not None
            self._metrics.child(self._metrics.rate_limited, admission.limit).inc()
            raise RateLimited(admission)
        return admission

    async def settle(self, relay: Relay) -> None:
        """The stream ended: charge what is left (reconciled with usage) and free its lease."""
        if not relay.client or not self.config.enabled:
            return
        result = relay.result
        actual = (
            result.prompt_tokens + result.completion_tokens
            if result.usage
            else relay.reserved + result.deltas
        )
        debit = actual - relay.reserved - relay.charged
        lease, relay.lease = relay.lease, None  # given back: renewals no longer see it
        await self._close(relay.client, lease, debit, "settle")

    def hold(self, client: str, lease: str | None) -> None:
        """Keep a lease taken outside a relay alive (renewed by `upkeep`) until `give_back`."""
        if lease:
            self._held.add((client, lease))

    async def give_back(self, client: str, lease: str | None, reserved: int) -> None:
        """An admission that relayed no tokens ends: refund its reserve and free its lease."""
        if lease:
            self._held.discard((client, lease))
        if client and self.config.enabled:
            await self._close(client, lease, -reserved, "give_back")

    async def _close(self, client: str, lease: str | None, debit: int, where: str) -> None:
        if lease and self._released is not None:
            self._released.add(lease)  # a renewal in flight may re-create it: `renew`
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                if self.config.tpm and debit:
                    await self.limiter.charge({client: debit}, self.clock())
                if lease:
                    await self.limiter.release(client, lease)
        except (LimiterUnavailable, TimeoutError) as err:
            self._unavailable(where, err)  # the lease expires by itself within its TTL

    async def upkeep(self) -> None:
        """Forever: charge streamed tokens every interval; renew leases every third of a TTL, and
        at once when the store says it restarted (it lost them)."""
        c, restarted = self.config, self.limiter.restarted
        # renewals must keep their period within the store's recovery hold (redis_limits note 2)
        tick = min(self._charge_interval_s, c.renew_interval_s / 4)
        renew_at = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await restarted.wait()
            if restarted.is_set():
                restarted.clear()
                renew_at = 0.0
            now = self.clock()
            try:
                async with asyncio.timeout(STORE_TIMEOUT_S):
                    if c.tpm:
                        await self._charge(now)
                    if c.concurrent and now >= renew_at:
                        renew_at = now + c.renew_interval_s
                        await self.renew(now)
            except (LimiterUnavailable, TimeoutError) as err:
                self._unavailable("upkeep", err)

    async def renew(self, now: float) -> None:
        """Renew (or re-create) the leases of running streams. A stream that ended meanwhile had
        its lease released, perhaps before the renewal re-created it: release it again."""
        leases = [(r.client, r.lease) for r in self._live if r.lease]
        leases.extend(self._held)
        self._released = set()
        try:
            await self.limiter.renew(leases, now)
        finally:
            released, self._released = self._released, None
        for client, lease in leases:
            if lease in released:
                await self.limiter.release(client, lease)

    async def _charge(self, now: float) -> None:
        debits: dict[str, int] = defaultdict(int)
        streams: dict[str, list[Relay]] = defaultdict(list)
        for relay in self._live:
            if not relay.client:
                continue
            streams[relay.client].append(relay)
            if relay.uncharged:
                debits[relay.client] += relay.uncharged
                relay.charged += relay.uncharged
                relay.uncharged = 0
        if not debits:
            return
        for client, balance in (await self.limiter.charge(dict(debits), now)).items():
            if balance < 0:
                for relay in streams[client]:
                    self._metrics.child(self._metrics.rate_limited, "tokens").inc()
                    # when the budget is back above zero (a JSON answer's Retry-After)
                    relay.result.retry_after_s = -balance * 60.0 / self.config.tpm
                    relay.expire(Outcome.RATE_LIMITED)

    def _unavailable(self, where: str, err: BaseException) -> None:
        self._metrics.limiter_errors.inc()
        log.error(
            "ratelimit.unavailable",
            where=where,
            policy="fail open" if self._fail_open else "fail closed",
            error=type(err.__cause__ or err).__name__,
        )


class RateLimited(ApiError):
    """429 with Retry-After (whole seconds, at least 1) and the quota headers."""

    def __init__(self, admission: Admission) -> None:
        what = {
            "requests": "requests per minute",
            "concurrency": "concurrent streams",
            "tokens": "tokens per minute",
        }[admission.limit or "requests"]
        super().__init__(
            "rate_limited",
            f"Rate limit reached for {what}; retry after the Retry-After delay.",
            retry_after_s=max(1, math.ceil(admission.retry_after_s)),
        )
        self.admission = admission
