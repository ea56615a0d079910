"""Readiness checks with a cache, so load-balancer probes never hammer the model server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .redis_limits import LimiterUnavailable, RedisLimiter
from .upstream import Upstream, UpstreamError


class ReadinessProbe:
    """Named checks; the upstream answer is cached (longer when it passed than when it failed)."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        ok_ttl_s: float = 10.0,
        fail_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstream = upstream
        self._ok_ttl_s = ok_ttl_s
        self._fail_ttl_s = fail_ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._cached: tuple[float, str] | None = None
        self.redis: RedisLimiter | None = None  # checked (uncached) when limits live in Redis

    async def checks(self) -> dict[str, str]:
        """Each named check: "ok" or what is wrong."""
        results = {"upstream": await self.upstream()}
        if self.redis is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self.redis.ping()
                results["redis"] = "ok"
            except (LimiterUnavailable, TimeoutError):
                results["redis"] = "Redis does not answer."
        return results

    async def upstream(self) -> str:
        """ "ok", or why the model server is not reachable."""
        async with self._lock:
            now = self._clock()
            if self._cached is not None and now < self._cached[0]:
                return self._cached[1]
            try:
                await self._upstream.check()
            except UpstreamError as err:
                self._cached = (now + self._fail_ttl_s, err.message)
            else:
                self._cached = (now + self._ok_ttl_s, "ok")
            return self._cached[1]
