"""`GET /api/ai/stream-probe`: timed events that show whether the path to the service streams.

No upstream call and no token cost. Each event carries `sentAt`, the server's clock when it was
written, so `python -m service probe URL` (service/buffering.py) can measure how late each arrived.
The shape is chosen to trip the buffering traps known for the proxies in front (README,
Deployment): the first event is over 512 bytes (a compressor that waits for more before it
flushes) and every third probe event is 6 KB (a proxy buffer that sends large events one late).

Design notes:
1. Admission is the streams' own (`admission.admitted`): one of `MAX_STREAMS` (a probe is an open
   stream holding a connection like any other), one request from the client's per-minute budget
   and one concurrency slot, held until the probe ends. The shared admission reserves at least
   one token; it is given back at the end, so the probe costs no tokens. The probe is not a
   generation (there is no upstream, no model and no tokens to account), so it is not in the stream
   metrics. Its account with the limits is the streams' own: the upkeep renews its lease with
   theirs, and the admission's exit gives back its reserve and lease.
2. Shutdown ends a probe at its next tick (at most `interval_ms` later) with a `server_shutdown`
   error event instead of holding a drain for a diagnostic.
3. Frames are the data-only shape whatever the request's `Accept`: a probe is not a stream that
   can be resumed, so it has no stream id and hands out no `id:` cursors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from .. import keys, sse
from ..admission import admitted
from ..errors import FAILURE_BY_OUTCOME, ApiError, ErrorCode, Outcome

log = structlog.get_logger("service.probe")

COUNT: Final = (1, 100, 20)  # low, high, default
INTERVAL_MS: Final = (50, 2000, 200)
MAX_TOTAL_MS: Final = 60_000
FIRST_EVENT_BYTES: Final = 1024  # over Caddy's 512-byte encode threshold
LARGE_EVENT_BYTES: Final = 6144  # nginx's "one event late" size
LARGE_EVERY: Final = 3


def _bounded(query: Mapping[str, str], name: str, bounds: tuple[int, int, int]) -> int:
    low, high, default = bounds
    raw = query.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit and int() also take other scripts' digits ("²", "٣").
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not low <= int(raw) <= high:
        raise ApiError(ErrorCode.BAD_REQUEST, f"{name}: must be an integer from {low} to {high}")
    return int(raw)


def parse_query(query: Mapping[str, str]) -> tuple[int, int]:
    """(count, interval_ms) from the query string, or a 400 naming what is wrong."""
    count = _bounded(query, "count", COUNT)
    interval_ms = _bounded(query, "interval_ms", INTERVAL_MS)
    if count * interval_ms > MAX_TOTAL_MS:
        raise ApiError(
            ErrorCode.BAD_REQUEST, f"count x interval_ms: must be at most {MAX_TOTAL_MS} ms"
        )
    return count, interval_ms


def frame(payload: dict[str, Any], size: int = 0) -> bytes:
    """One SSE frame, padded with a `pad` field to at least `size` bytes. Data-only whatever the
    `Accept`: the probe cannot be resumed, so it hands out no cursors (design note 3)."""
    data = sse.DATA_ONLY.event(0, {**payload, "pad": ""})
    if len(data) < size:
        data = sse.DATA_ONLY.event(0, {**payload, "pad": "." * (size - len(data))})
    return data


class _Probe:
    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.settings = request.app[keys.SETTINGS]

    async def write(self, payload: dict[str, Any], size: int = 0) -> None:
        payload["sentAt"] = round(time.time(), 6)
        async with asyncio.timeout(self.settings.write_timeout_s or None):
            await self.response.write(frame(payload, size))

    async def run(self, count: int, interval_ms: int) -> Outcome:
        request_id = self.request[keys.REQUEST_ID]
        loop = asyncio.get_running_loop()
        started = loop.time()
        live = self.request.app[keys.LIVE]
        head = {"type": "start", "requestId": request_id, "count": count, "intervalMs": interval_ms}
        await self.write(head, FIRST_EVENT_BYTES)
        for n in range(1, count + 1):
            await asyncio.sleep(max(0.0, started + n * interval_ms / 1000 - loop.time()))
            if live.draining:  # design note 2
                code, message = FAILURE_BY_OUTCOME[Outcome.SHUTDOWN]
                await self.write(
                    {
                        "type": "error",
                        "error": message,
                        "code": code,
                        "reason": Outcome.SHUTDOWN.value,
                        "requestId": request_id,
                    }
                )
                return Outcome.SHUTDOWN
            large = n % LARGE_EVERY == 0
            await self.write({"type": "probe", "seq": n}, LARGE_EVENT_BYTES if large else 0)
        elapsed_ms = round((loop.time() - started) * 1000)
        await self.write(
            {"type": "done", "requestId": request_id, "count": count, "elapsedMs": elapsed_ms}
        )
        return Outcome.COMPLETED


async def stream_probe(request: web.Request) -> web.StreamResponse:
    count, interval_ms = parse_query(request.query)
    response = web.StreamResponse(headers=sse.HEADERS)
    outcome = Outcome.CLIENT_DISCONNECT
    async with admitted(request, 0):  # design note 1: its account is given back on exit
        try:
            await response.prepare(request)
            outcome = await _Probe(request, response).run(count, interval_ms)
        except (ConnectionError, TimeoutError):
            pass  # the client left or stopped reading: nothing more to say to it
        finally:
            log.info("probe.finished", outcome=outcome.value, count=count, interval_ms=interval_ms)
    return response


def setup(app: web.Application) -> None:
    app.router.add_get("/api/ai/stream-probe", stream_probe, name="stream_probe")
