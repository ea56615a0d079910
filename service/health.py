"""Readiness checks with a cache, so load-balancer probes never hammer the model server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from .redis_limits import LimiterUnavailable, RedisLimiter
from .upstream import Upstream, UpstreamError

log = structlog.get_logger("service.health")
FAILED = "The check failed unexpectedly."


async def _guarded(name: str, check: Callable[[], Awaitable[str]]) -> str:
    """A check's word, or FAILED when it raised something it does not expect: readiness is then
    a 503 naming the check, never a 500."""
    try:
        return await check()
    except Exception:
        log.exception("ready.check_failed", check=name)
        return FAILED


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
        results = {"upstream": await _guarded("upstream", self.upstream)}
        redis = self.redis
        if redis is not None:

            async def ping() -> str:
                try:
                    async with asyncio.timeout(1.0):
                        await redis.ping()
                except (LimiterUnavailable, TimeoutError):
                    return "Redis does not answer."
                return "ok"

            results["redis"] = await _guarded("redis", ping)
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
            except Exception:
                self._cached = (now + self._fail_ttl_s, FAILED)
                raise
            else:
                self._cached = (now + self._ok_ttl_s, "ok")
            return self._cached[1]
