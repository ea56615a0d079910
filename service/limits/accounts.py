"""The limiter in the app: admission with the Redis-outage policy, one `Account` per admitted
stream (who pays, its concurrency lease, its token reserve, what was charged so far), one upkeep
task per instance (batched token charges that cut over-budget streams, lease renewal, both over
the open accounts), and each account's closing (reconciled with the upstream's usage, or its
reserve given back when no stream ran; lease released).

A stream reports to its account through two plain calls (`relayed(tokens)`, then `settle(used)`
once it has ended) and learns of a cut through the callable it hands to `on_cut`: this module
knows nothing of streams, and the stream layer nothing of limits.

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

from ..errors import ApiError, ErrorCode
from ..metrics import Metrics
from ..tasks import outlive_cancel
from .core import Admission, LimitConfig, Limiter, quota_headers
from .redis_backend import LimiterRecovering, LimiterUnavailable

log = structlog.get_logger("service.limits")
STORE_TIMEOUT_S = 2.0  # the longest a request waits on the limit store before the policy applies
RECOVERY_TRIES = 3  # admissions that wait for a restarted store's leases before giving up

Cut = Callable[[float], None]  # ends a stream over its budget; given when a retry may succeed


class Account:
    """One admitted stream's standing with the limits. Its stream reports the tokens it relays;
    the upkeep charges them in batches and renews the lease; it is closed once: `settle` when
    its stream has ended, `give_back` when none ran (the admission's exit), whichever is first."""

    __slots__ = ("_limits", "charged", "client", "cut", "deltas", "lease", "reserved", "uncharged")

    def __init__(self, limits: Limits, client: str, lease: str | None, reserved: int) -> None:
        self._limits = limits
        self.client = client  # whose limits the stream counts against
        self.lease = lease  # the concurrency lease; None once released
        self.reserved = reserved  # tokens taken from the client's budget at admission
        self.uncharged = 0  # tokens relayed since the upkeep last charged them
        self.charged = 0
        self.deltas = 0  # tokens relayed in all
        self.cut: Cut | None = None

    def relayed(self, tokens: int) -> None:
        """The stream relayed `tokens` more (charged by the upkeep's next batch)."""
        self.uncharged += tokens
        self.deltas += tokens

    def on_cut(self, cut: Cut) -> None:
        """How to end the stream when its client's budget runs out."""
        self.cut = cut

    async def settle(self, used: int | None) -> None:
        """The stream ended: charge what is left and free the lease. `used` is the upstream's
        count of prompt and completion tokens; None when it reported none (the reserve then
        stands for the prompt, the tokens relayed for the completion)."""
        actual = used if used is not None else self.reserved + self.deltas
        await self._limits._close(self, actual - self.reserved - self.charged, "settle")

    async def give_back(self) -> None:
        """No stream ran on this admission: refund its reserve and free its lease."""
        await self._limits._close(self, -self.reserved, "give_back")


class Limits:
    def __init__(
        self,
        limiter: Limiter,
        *,
        metrics: Metrics,
        fail_open: bool = True,
        charge_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limiter = limiter
        self.config: LimitConfig = limiter.config
        self._metrics = metrics
        self._fail_open = fail_open
        self._charge_interval_s = charge_interval_s
        self.clock = clock
        self._accounts: set[Account] = set()  # open: charged and renewed by the upkeep
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
                await asyncio.sleep(err.wait_s)  # redis_backend design note 2
            except asyncio.CancelledError:
                if not task.cancelled() and task.exception() is None:
                    granted = task.result()
                    await outlive_cancel(self.open(client, granted).give_back())
                raise
        raise ApiError(
            ErrorCode.OVERLOADED, "Rate limiting is recovering; retry shortly.", retry_after_s=1
        )

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
                ErrorCode.OVERLOADED,
                "Rate limiting is unavailable; retry shortly.",
                retry_after_s=1,
            ) from err
        if not admission.allowed:
            assert admission.limit is not None
            self._metrics.child(self._metrics.rate_limited, admission.limit).inc()
            raise RateLimited(admission)
        return admission

    def open(self, client: str, admission: Admission) -> Account:
        """The account of a stream admitted for `client` (no await: nothing can interrupt it
        between the admission and the account that gives it back)."""
        account = Account(self, client, admission.lease, admission.reserved)
        if self.config.enabled:
            self._accounts.add(account)
        return account

    async def _close(self, account: Account, debit: int, where: str) -> None:
        if account not in self._accounts:
            return  # closed already (or limits are off)
        self._accounts.discard(account)  # renewals and charges no longer see it
        client, lease, account.lease = account.client, account.lease, None
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
        # renewals must keep their period within the store's recovery hold (redis_backend note 2)
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
        """Renew (or re-create) the leases of open accounts. An account closed meanwhile had its
        lease released, perhaps before the renewal re-created it: release it again."""
        leases = [(a.client, a.lease) for a in self._accounts if a.lease]
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
        streams: dict[str, list[Account]] = defaultdict(list)
        for account in self._accounts:
            streams[account.client].append(account)
            if account.uncharged:
                debits[account.client] += account.uncharged
                account.charged += account.uncharged
                account.uncharged = 0
        if not debits:
            return
        for client, balance in (await self.limiter.charge(dict(debits), now)).items():
            if balance < 0:
                for account in streams[client]:
                    if account.cut is None:
                        continue  # nothing streams on it (the probe)
                    self._metrics.child(self._metrics.rate_limited, "tokens").inc()
                    # when the budget is back above zero (a JSON answer's Retry-After)
                    account.cut(-balance * 60.0 / self.config.tpm)

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
            ErrorCode.RATE_LIMITED,
            f"Rate limit reached for {what}; retry after the Retry-After delay.",
            retry_after_s=max(1, math.ceil(admission.retry_after_s)),
            headers=quota_headers(admission),
        )
