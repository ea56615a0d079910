"""`python -m service probe URL`: does the path to the service stream, or buffer?

Reads `GET /api/ai/stream-probe` (service/routes/probe.py) through whatever sits in front of the
service (a proxy, a CDN, a load balancer) and measures how late each event arrived. Exit status:
0 STREAMING, 1 BUFFERED, 2 the probe itself failed (no answer, an error status, a cut stream).

Lag, robust to clock offset between the two machines: each event's delay is `arrival - sentAt`
(client clock minus server clock); the smallest delay of the run stands for the network and the
clock offset, and an event's lag is how much longer than that it took. A buffered stream shows as
events arriving together: the early ones with a lag as long as the buffering. A constant delay on
every event cannot be told from clock offset; the time to the first event, measured on the
client's clock alone, is printed for that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

PATH = "/api/ai/stream-probe"
THRESHOLD_MS = 150.0  # streamed events arrive within ~10 ms, buffered ones 200 ms to seconds late


@dataclass(frozen=True, slots=True)
class Arrival:
    """One event as the client saw it."""

    payload: dict[str, Any]
    size: int  # bytes of the frame, after any decompression
    arrived: float  # client wall clock, seconds

    @property
    def name(self) -> str:
        kind = str(self.payload.get("type"))
        return f"{kind} {self.payload['seq']}" if kind == "probe" else kind

    @property
    def delay(self) -> float:
        return self.arrived - float(self.payload["sentAt"])


@dataclass(frozen=True, slots=True)
class Verdict:
    streaming: bool
    lags_ms: list[float]  # per event, in arrival order
    worst: int  # index of the latest event

    @property
    def worst_ms(self) -> float:
        return self.lags_ms[self.worst]


def judge(events: list[Arrival], threshold_ms: float = THRESHOLD_MS) -> Verdict:
    """Per-event lag beyond the fastest event's delay; STREAMING when none exceeds the threshold."""
    base = min(e.delay for e in events)
    lags = [(e.delay - base) * 1000 for e in events]
    worst = max(range(len(lags)), key=lags.__getitem__)
    return Verdict(lags[worst] <= threshold_ms, lags, worst)


class ProbeFailed(Exception):
    """The probe could not measure anything (said on stderr, exit 2)."""


def probe_url(url: str, count: int, interval_ms: int) -> str:
    """The probe route under `url` (a base URL, or the probe route itself) with the query."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProbeFailed(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(PATH):
        path += PATH
    return f"{parts.scheme}://{parts.netloc}{path}?count={count}&interval_ms={interval_ms}"


@dataclass(slots=True)
class Run:
    status: int = 0
    headers_ms: float = 0.0  # request sent -> response headers
    first_ms: float = 0.0  # request sent -> first complete event
    encoding: str = ""
    request_id: str = ""
    events: list[Arrival] | None = None


async def fetch(url: str, *, key: str | None, timeout_s: float) -> Run:
    """Read the probe stream, stamping each event's arrival."""
    headers = {"Accept": "text/event-stream", "Accept-Encoding": "gzip, deflate"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    run = Run(events=[])
    events = run.events
    assert events is not None
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sent = time.monotonic()
        async with session.get(url, headers=headers) as resp:
            run.headers_ms = (time.monotonic() - sent) * 1000
            run.status = resp.status
            run.encoding = resp.headers.get("Content-Encoding", "")
            run.request_id = resp.headers.get("X-Request-ID", "")
            if resp.status != 200:
                body = (await resp.read())[:500]
                raise ProbeFailed(f"HTTP {resp.status}: {_error_message(body)}")
            media = resp.headers.get("Content-Type", "")
            if not media.startswith("text/event-stream"):
                raise ProbeFailed(f"not an event stream: Content-Type {media!r}")
            buffer = b""
            async for chunk in resp.content.iter_any():
                arrived = time.time()
                buffer += chunk
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    data = [ln[6:] for ln in frame.split(b"\n") if ln.startswith(b"data: ")]
                    if not data:
                        continue  # a `: ping` comment
                    if not events:
                        run.first_ms = (time.monotonic() - sent) * 1000
                    events.append(Arrival(orjson.loads(data[0]), len(frame) + 2, arrived))
    return run


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip() or "(no body)"


def check_complete(events: list[Arrival], count: int) -> None:
    """The stream must hold start, `count` probe events and done, in order."""
    if events and events[-1].payload.get("type") == "error":
        raise ProbeFailed(f"the service ended the probe: {events[-1].payload.get('error')}")
    names = [e.name for e in events]
    expected = ["start", *(f"probe {n}" for n in range(1, count + 1)), "done"]
    if names != expected:
        raise ProbeFailed(f"expected {len(expected)} events, got {len(names)}: the stream was cut")


def report(run: Run, verdict: Verdict, threshold_ms: float) -> str:
    events = run.events or []
    lines = [
        f"HTTP {run.status}, Content-Encoding: {run.encoding or 'none'}, "
        f"X-Request-ID: {run.request_id or '-'}",
        f"headers after {run.headers_ms:.0f} ms, first event after {run.first_ms:.0f} ms",
        f"{'event':<10} {'bytes':>6} {'lag ms':>7}",
    ]
    for event, lag in zip(events, verdict.lags_ms, strict=True):
        lines.append(f"{event.name:<10} {event.size:>6} {lag:>7.0f}")
    worst = events[verdict.worst]
    word = "STREAMING" if verdict.streaming else "BUFFERED"
    lines.append(
        f"{word}: worst lag {verdict.worst_ms:.0f} ms ({worst.name}, {worst.size} bytes) "
        f"over {len(events)} events; threshold {threshold_ms:.0f} ms"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service probe",
        description="Say whether the path to the service streams events or buffers them.",
    )
    parser.add_argument("url", help="the service as clients reach it, e.g. https://api.example.com")
    parser.add_argument("--count", type=int, default=20, help="probe events (default 20)")
    parser.add_argument(
        "--interval-ms",
        type=int,
        default=200,
        help="between events (default 200; keep it above "
        "the threshold so an event held back by one shows)",
    )
    parser.add_argument("--threshold-ms", type=float, default=THRESHOLD_MS)
    parser.add_argument(
        "--key", default=os.environ.get("PROBE_API_KEY"), help="API key (default $PROBE_API_KEY)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        url = probe_url(args.url, args.count, args.interval_ms)
        timeout_s = args.count * args.interval_ms / 1000 + 30
        run = asyncio.run(fetch(url, key=args.key, timeout_s=timeout_s))
        events = run.events or []
        check_complete(events, args.count)
    except ProbeFailed as err:
        print(f"probe failed: {err}", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as err:
        print(f"probe failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    verdict = judge(events, args.threshold_ms)
    print(f"probe {url}")
    print(report(run, verdict, args.threshold_ms))
    return 0 if verdict.streaming else 1
