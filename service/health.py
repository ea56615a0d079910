"""Readiness: a list of named checks, one per dependency, each answering "ok" or what is wrong.

The model server's check is cached, so load-balancer probes never hammer it (under `failover` it
asks every server at once and passes while one answers; each server's word is in the readiness
body); a store's check is
a ping (or a cheap query) bounded by `PING_TIMEOUT_S`, never cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from .upstream import Upstream, UpstreamError

log = structlog.get_logger("service.health")
FAILED = "The check failed unexpectedly."
PING_TIMEOUT_S = 1.0

Check = Callable[[], Awaitable[str]]  # "ok", or what is wrong


async def _guarded(name: str, check: Check) -> str:
    """A check's word, or FAILED when it raised something it does not expect: readiness is then
    a 503 naming the check, never a 500."""
    try:
        return await check()
    except Exception:
        log.exception("ready.check_failed", check=name)
        return FAILED


def ping(
    call: Callable[[], Awaitable[object]],
    *,
    failure: str,
    errors: tuple[type[Exception], ...],
) -> Check:
    """A check that is "ok" when `call` returns within `PING_TIMEOUT_S`, else `failure` (for a
    timeout or one of the `errors` it expects)."""

    expected: tuple[type[Exception], ...] = (*errors, TimeoutError)

    async def check() -> str:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await call()
        except expected:
            return failure
        return "ok"

    return check


class UpstreamCheck:
    """The model server's check, cached (longer when it passed than when it failed)."""

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

    async def __call__(self) -> str:
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


class ReadinessProbe:
    """Named checks, run together; the answer keeps their order."""

    def __init__(self, checks: Sequence[tuple[str, Check]]) -> None:
        self._checks = tuple(checks)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._checks)

    async def checks(self) -> dict[str, str]:
        """Each named check: "ok" or what is wrong."""
        words = await asyncio.gather(*(_guarded(name, check) for name, check in self._checks))
        return dict(zip(self.names, words, strict=True))
