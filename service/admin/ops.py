"""The operations view's data: the API's own `/metrics` and `/health/ready`, read server-side.

What is computed from them, and the JSON's shape, are `series` (pure).

Design notes:

1. **Server-side reads.** The admin app scrapes every base URL of `ADMIN_METRICS_URLS` (default:
   the local API, `http://HOST:PORT`, a wildcard HOST read as loopback) every
   `ADMIN_METRICS_INTERVAL_S`, all instances at once, each read bounded by the interval (at
   least 1 s, at most 10 s). The API's `/metrics` therefore needs no CORS and gains none; the
   browser only ever calls this app's `GET /admin/api/ops`.
2. **An instance that does not answer is down, never an exception.** A refused connection, a
   timeout, a non-200 `/metrics` or an exposition the parser rejects all make that instance's
   sample `up: false` with a short reason; its counters are left out of that sample and the
   others go on. `/health/ready` answers its own JSON on 503 too (the model servers' word); an
   instance whose readiness cannot be read shows `ready: null`. The API caches its model-server
   check (`health`), so reading readiness every interval never hammers the model server.
3. **A ring, not a database.** Each sample is turned into one `Point` (the charted values) as it
   arrives, in constant time (`Derived`: the steps of the last minute with running sums), and the
   points of the last `WINDOW_S` (15 minutes: `WINDOW_S / interval` points, at most
   `MAX_SAMPLES`) are kept in a bounded deque, in memory, per admin process; the JSON is built
   once per sample however many pages poll. A restarted admin app starts with an empty history.
4. **The key rule.** With `API_KEYS` set, `/admin/api/ops` needs `Authorization: Bearer <key>`
   like the API's routes (the admin site is public in the shipped proxies); without it, it is
   open. Keys are checked by the API's own `Access` (constant time).
5. **Charts are hand-drawn SVG** (`static/ops.js`): a polyline per series over the window, a few
   dozen lines of code, so no charting library is vendored and nothing comes from elsewhere.
6. **A listed instance cannot hurt the admin app.** Each body is read in chunks and given up on
   past `MAX_METRICS_BYTES` (1 MiB; `/health/ready`: 64 KiB), so a huge or endless answer costs
   that much memory at most (down: "/metrics is larger than ..."); redirects are never followed
   (down: "/metrics answered 302"), so the admin app only ever calls the URLs it was given; the
   text is parsed in a worker thread (a megabyte takes a few hundred milliseconds), never on the
   event loop; any text the parser rejects, whatever it raises, makes that instance down (so do
   more than `series.MAX_NAMES` outcomes, limits or buckets); and a sample that fails
   in any other way is logged and sampling goes on, so the view never freezes for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from ..config import Settings
from ..errors import ApiError, ErrorCode
from ..limits.access import Access
from .series import MAX_SAMPLES, WINDOW_S, Derived, Point, Sample, Scrape, parse_exposition, render

log = structlog.get_logger("service.admin.ops")
MAX_METRICS_BYTES = 1024 * 1024  # the API's own /metrics is a few kilobytes to tens of them
MAX_READY_BYTES = 64 * 1024


def metrics_urls(settings: Settings) -> tuple[str, ...]:
    """The instances to read: `ADMIN_METRICS_URLS`, or the local API (a wildcard bind address
    is reached on loopback)."""
    if settings.admin_metrics_urls:
        return settings.admin_metrics_urls
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(
        settings.host, settings.host
    )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return (f"http://{host}:{settings.port}",)


class _Refused(Exception):
    """An instance answered, but not with something to read (the message says why)."""


class OpsSampler:
    """The loop that reads the instances, and the ring of points it derives (note 3)."""

    def __init__(self, urls: Sequence[str], interval_s: float) -> None:
        self.urls = tuple(urls)
        self.interval_s = interval_s
        self.derived = Derived(min(MAX_SAMPLES, math.ceil(WINDOW_S / interval_s)))
        self.latest: tuple[Scrape, ...] = ()
        self.timeout_s = min(10.0, max(1.0, interval_s))
        self._body: bytes | None = None  # the JSON of the current points, built once

    @property
    def samples(self) -> deque[Point]:
        return self.derived.points

    async def _get(
        self, session: aiohttp.ClientSession, url: str, path: str, limit: int, ok: int = 200
    ) -> bytes:
        """The body of `url + path` if it answers 200 (or `ok`) within `limit` bytes (note 6);
        raises `_Refused` with the reason otherwise. Redirects are never followed."""
        async with session.get(url + path, allow_redirects=False) as resp:
            if resp.status not in (200, ok):
                raise _Refused(f"{path} answered {resp.status}")
            if (resp.content_length or 0) > limit:
                raise _Refused(f"{path} is larger than {limit} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise _Refused(f"{path} is larger than {limit} bytes")
            return bytes(body)

    async def _read(self, session: aiohttp.ClientSession, url: str) -> Scrape:
        try:
            raw = await self._get(session, url, "/metrics", MAX_METRICS_BYTES)
            t = time.monotonic()
            scrape = await asyncio.to_thread(parse_exposition, url, t, raw.decode())
        except _Refused as refused:
            return Scrape(url, False, time.monotonic(), str(refused))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Scrape(url, False, time.monotonic(), f"no answer ({type(exc).__name__})")
        except Exception:  # any text the parser cannot read (note 2)
            return Scrape(url, False, time.monotonic(), "/metrics is not the exposition format")
        ready: dict[str, Any] | None = None
        with contextlib.suppress(_Refused, aiohttp.ClientError, TimeoutError, OSError, ValueError):
            body = orjson.loads(
                await self._get(session, url, "/health/ready", MAX_READY_BYTES, 503)
            )
            ready = body if isinstance(body, dict) else None
        return Scrape(
            url,
            True,
            scrape.t,
            None,
            scrape.streams_active,
            scrape.tokens,
            scrape.outcomes,
            scrape.rate_limited,
            scrape.ttft_buckets,
            ready,
        )

    async def sample_once(self, session: aiohttp.ClientSession) -> Sample:
        wall = time.time()
        scrapes = await asyncio.gather(*(self._read(session, url) for url in self.urls))
        sample = Sample(wall, tuple(scrapes))
        self.derived.add(sample)
        self.latest = sample.scrapes
        self._body = None
        return sample

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_at = time.monotonic()
            while True:
                try:
                    await self.sample_once(session)
                except Exception:  # a bad sample never ends sampling (note 6)
                    log.exception("ops sample failed")
                next_at = max(next_at + self.interval_s, time.monotonic())
                await asyncio.sleep(next_at - time.monotonic())

    def payload_json(self) -> bytes:
        if self._body is None:
            payload = render(self.derived.points, self.latest, self.interval_s)
            self._body = orjson.dumps(payload)
        return self._body


SAMPLER = web.AppKey("ops_sampler", OpsSampler)
ACCESS = web.AppKey("ops_access", Access)


async def ops(request: web.Request) -> web.Response:
    access = request.app[ACCESS]
    if access.auth_required and access.authenticate(request.headers.get("Authorization")) is None:
        error = ApiError(
            ErrorCode.UNAUTHORIZED,
            "A valid API key is required (Authorization: Bearer).",
            headers={"WWW-Authenticate": "Bearer"},
        )
        return web.json_response(error.body(), status=error.status, headers=error.headers)
    return web.Response(body=request.app[SAMPLER].payload_json(), content_type="application/json")


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[SAMPLER].run(), name="ops-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application, settings: Settings) -> None:
    app[SAMPLER] = OpsSampler(metrics_urls(settings), settings.admin_metrics_interval_s)
    app[ACCESS] = Access.build(settings.api_keys, ())
    app.cleanup_ctx.append(_sampling)
    app.router.add_get("/admin/api/ops", ops)
