"""The load generator: `python -m bench.load --url URL --mode service|direct ... --out FILE`.

Opens `--streams` streams, at most `--concurrency` at once, either through the service
(`POST /api/ai/generate-stream`) or straight to the upstream (`POST /v1/chat/completions`, the
baseline), and writes one JSON summary.

Per stream it records the request start, the first content arrival (TTFT), every later content
arrival (inter-token gaps), the tokens received and the end. An arrival is one network read that
carried at least one content event: deltas or frames that come in the same read count once, as a
frame carrying several deltas does. In service mode every stream is checked: the joined deltas must
equal `done.content` and `" w0 w1 ... w{N-1}"`, and the last `tokenCount` must be N; in direct
mode the deltas' text is checked the same way. "Flowing at once" is the largest number of
streams that were between their first token and their end at the same instant.

With `--clients K` the streams carry `X-Forwarded-For` addresses 10.x.y.z of K different clients
(round robin), so a service that limits per client can be measured with its limits on.

With `--ramp-s T` the streams arrive evenly over T seconds (stream i starts at i*T/S), the
shape of a burst of new users rather than all at once. `--phase-s P` adds frac(i*φ)*P to stream
i's start (φ the golden ratio): with P the upstream's token interval, the streams' tokens fall
evenly over that interval instead of in step (arrivals 10 ms apart with tokens 20 ms apart would
put every token of every stream in two instants per interval), as the tokens of users who arrived
at unrelated times do.

`--mode resume` (the reconnect scenario) opens each stream through the service in full SSE
(`Accept: text/event-stream`), cuts the connection after a random number of content events (1 to
two thirds of the tokens; bytes after the last whole event in that read are dropped, so the cut
may fall inside a frame), stays away a random 30-100 ms (so events are missed at model pace),
then reconnects with `GET /api/v1/ai/streams/{X-Stream-ID}` and `Last-Event-ID: <last id seen>`
(to `--resume-url` when given: another instance sharing the streams through Redis).
It times the reconnect, from sending it to the first event received (the first missed one), and
checks that the joined text of both connections equals `done.content` and the expected text, and
that the first resumed cursor comes after the last one seen. A reconnect answered 404 or 405 means
the route is not served: the run stops taking new streams and reports `route_missing`.

`--mode openai` opens each stream through the service's OpenAI-compatible route
(`POST /v1/chat/completions`, `stream: true`, the same body as direct mode) and reads the OpenAI
chunks as direct mode reads the upstream's: the joined `delta.content` must equal the expected text,
one delta per token, and the body must end with `data: [DONE]`. A `data: {"error": ...}` chunk (the
gateway's in-stream error) is recorded as `error_chunk:<code>`; `: ping` comment frames are skipped.

Everything is bounded: a timeout per stream and one for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .common import install_uvloop, percentile, raise_nofile

JSON_HEADERS = {"Content-Type": "application/json"}
SERVICE_CONTENT = b'{"type":"content"'
MAX_MISMATCH_EXAMPLES = 3
GOLDEN = (1 + math.sqrt(5)) / 2  # frac(i * φ) spreads the streams' phases evenly (--phase-s)


def expected_text(tokens: int) -> str:
    return "".join(f" w{i}" for i in range(tokens))


@dataclass(slots=True)
class Stream:
    """What one stream did; times are `time.monotonic()` seconds, 0.0 for never."""

    start: float = 0.0
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0
    completed: bool = False
    error: str | None = None
    mismatch: str | None = None
    resume_s: float = 0.0  # reconnect sent -> first missed event received (resume mode)


class Run:
    """One load run: its settings, the streams and the gaps seen so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.mode: str = args.mode
        self.tokens: int = args.tokens
        self.model: str = args.model
        self.base = base = args.url.rstrip("/")
        self.resume_base = (args.resume_url or base).rstrip("/")
        self.rng = random.Random(args.seed)
        self.away = (args.away_min_s, max(args.away_min_s, args.away_max_s))
        self.route_missing = 0  # reconnects answered 404/405: the resume route is not served
        self.resumed = 0
        if self.mode in ("service", "resume"):
            self.url = base + "/api/ai/generate-stream"
            body: dict[str, Any] = {
                "prompt": "bench",
                "maxTokens": self.tokens,
                "model": self.model,
            }
        else:  # direct, and openai (the service's OpenAI-compatible route): the same request
            self.url = base + "/v1/chat/completions"
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": "bench"}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_completion_tokens": self.tokens,
            }
        self.body = orjson.dumps(body)
        self.expected = expected_text(self.tokens)
        self.streams = [Stream() for _ in range(args.streams)]
        self.gaps: list[float] = []
        self.clients: int = args.clients

    def headers(self, index: int) -> dict[str, str]:
        if not self.clients:
            return JSON_HEADERS
        k = index % self.clients
        return {**JSON_HEADERS, "X-Forwarded-For": f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"}

    async def one(self, session: aiohttp.ClientSession, index: int, rec: Stream) -> None:
        headers = self.headers(index)
        rec.start = time.monotonic()
        async with session.post(self.url, data=self.body, headers=headers) as resp:
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                await resp.read()
                return
            if self.mode == "service":
                await self._read_service(resp, rec)
            else:
                await self._read_direct(resp, rec)

    async def one_resume(self, session: aiohttp.ClientSession, index: int, rec: Stream) -> None:
        """Open a stream in full SSE, cut the connection after a random number of content
        events, stay away a moment, reconnect with `GET /api/v1/ai/streams/{id}` and
        `Last-Event-ID`, read to the end, and check the joined text (module docstring)."""
        clock = time.monotonic
        cut_after = self.rng.randint(1, max(1, self.tokens * 2 // 3))
        away = self.rng.uniform(*self.away)
        headers = {**self.headers(index), "Accept": "text/event-stream"}
        pieces: list[str] = []
        events = SseEvents()
        stream_id = ""
        last_id = ""
        cut = False
        rec.start = clock()
        resp = await session.post(self.url, data=self.body, headers=headers)
        try:
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                return
            stream_id = resp.headers.get("X-Stream-ID", "")
            async for data in resp.content.iter_any():  # bounded by the stream's own end
                now = clock()
                for cursor, obj in events.feed(data):
                    if cursor is None:
                        rec.error = "event_without_id"
                        return
                    last_id = cursor  # events after the cut in the same read count as unseen
                    kind = obj.get("type")
                    if kind == "content":
                        pieces.append(obj["delta"])
                        rec.first = rec.first or now
                        if len(pieces) >= cut_after:
                            cut = True
                            break
                    elif kind in ("done", "error"):
                        rec.error = f"ended_before_cut:{kind}:{obj.get('code')}"
                        return
                if cut:
                    break
        finally:
            resp.close()  # the cut: the connection is dropped, not read to its end
        if not cut:
            rec.error = rec.error or "truncated_before_cut"
            return
        if not stream_id or not last_id:
            rec.error = "no_stream_id"
            return
        last_seq = _seq(last_id)
        await asyncio.sleep(away)  # the client's time away (not synchronisation): events pile up
        url = f"{self.resume_base}/api/v1/ai/streams/{stream_id}"
        headers = {"Accept": "text/event-stream", "Last-Event-ID": last_id}
        events = SseEvents()
        done: dict[str, Any] | None = None
        sent = clock()
        async with session.get(url, headers=headers) as resp:
            if resp.status in (404, 405):
                self.route_missing += 1
                rec.error = f"resume_http_{resp.status}"
                await resp.read()
                return
            if resp.status != 200:
                rec.error = f"resume_http_{resp.status}"
                await resp.read()
                return
            async for data in resp.content.iter_any():  # bounded by the stream's own end
                now = clock()
                if done is not None or rec.error:
                    continue
                for cursor, obj in events.feed(data):
                    if not rec.resume_s:
                        rec.resume_s = now - sent
                        seq = _seq(cursor or "")
                        if last_seq is not None and seq is not None and seq <= last_seq:
                            rec.mismatch = f"resumed at seq {seq} after cursor seq {last_seq}"
                    kind = obj.get("type")
                    if kind == "content":
                        pieces.append(obj["delta"])
                        rec.tokens = obj["tokenCount"]
                    elif kind == "done":
                        done = obj
                        break
                    elif kind == "error":
                        rec.error = f"error_frame:{obj.get('code')}:{obj.get('reason')}"
                        break
        rec.end = clock()
        if done is None:
            rec.error = rec.error or "truncated_after_resume"
            return
        self.resumed += 1
        rec.completed = True
        text = "".join(pieces)
        if rec.mismatch:
            return
        if text != done.get("content"):
            rec.mismatch = f"joined text differs from done.content ({len(text)} chars)"
        elif text != self.expected:
            rec.mismatch = "done.content differs from expected"

    async def _read_service(self, resp: aiohttp.ClientResponse, rec: Stream) -> None:
        loads, gaps, clock = orjson.loads, self.gaps, time.monotonic
        pieces: list[str] = []
        buf = b""
        last_arrival = 0.0
        token_count = 0
        done: dict[str, Any] | None = None
        async for data in resp.content.iter_any():
            now = clock()
            if done is not None or rec.error:
                continue  # read on to the end of the body so the connection can be reused
            frames = (buf + data if buf else data).split(b"\n\n")
            buf = frames.pop()
            arrived = False
            for frame in frames:
                at = frame.find(b"data: ")
                if at < 0:
                    continue  # a `: ping` comment, or a frame without data
                payload = frame[at + 6 :]
                if payload.startswith(SERVICE_CONTENT):
                    obj = loads(payload)
                    pieces.append(obj["delta"])
                    token_count = obj["tokenCount"]
                    arrived = True
                    continue
                obj = loads(payload)
                kind = obj.get("type")
                if kind == "done":
                    done = obj
                    break
                if kind == "error":
                    rec.error = f"error_frame:{obj.get('code')}:{obj.get('reason')}"
                    break
            if arrived:
                last_arrival = _arrival(rec, gaps, now, last_arrival)
        rec.end = clock()
        rec.tokens = token_count
        if done is None:
            rec.error = rec.error or "truncated"
            return
        rec.completed = True
        text = "".join(pieces)
        if text != self.expected:
            rec.mismatch = f"deltas differ from expected: {len(text)} vs {len(self.expected)} chars"
        elif done.get("content") != self.expected:
            rec.mismatch = "done.content differs from expected"
        elif token_count != self.tokens:
            rec.mismatch = f"last tokenCount {token_count} != {self.tokens}"
        elif done.get("tokenCount") != self.tokens:
            rec.mismatch = f"done.tokenCount {done.get('tokenCount')} != {self.tokens}"

    async def _read_direct(self, resp: aiohttp.ClientResponse, rec: Stream) -> None:
        loads, gaps, clock = orjson.loads, self.gaps, time.monotonic
        pieces: list[str] = []
        buf = b""
        last_arrival = 0.0
        finished = False
        async for data in resp.content.iter_any():
            now = clock()
            if finished or rec.error:
                continue  # read on to the end of the body so the connection can be reused
            events = (buf + data if buf else data).split(b"\n\n")
            buf = events.pop()
            arrived = False
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    finished = True
                    break
                obj = loads(payload)
                if "error" in obj:  # the gateway's in-stream error: the end of the body
                    error = obj["error"] if isinstance(obj["error"], dict) else {}
                    rec.error = f"error_chunk:{error.get('code')}"
                    break
                choices = obj.get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        pieces.append(content)
                        arrived = True
            if arrived:
                last_arrival = _arrival(rec, gaps, now, last_arrival)
        rec.end = clock()
        rec.tokens = len(pieces)
        if not finished:
            rec.error = rec.error or "truncated"
            return
        rec.completed = True
        if "".join(pieces) != self.expected or rec.tokens != self.tokens:
            rec.mismatch = f"text differs from expected ({rec.tokens} deltas)"


class SseEvents:
    """Full-SSE frames (`id:` and `data:` lines, a blank line after) from a byte stream; a
    `: ping` comment line is skipped wherever it falls."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[str | None, dict[str, Any]]]:
        frames = (self.buf + data if self.buf else data).split(b"\n\n")
        self.buf = frames.pop()
        out: list[tuple[str | None, dict[str, Any]]] = []
        for frame in frames:
            cursor: str | None = None
            payload = b""
            for line in frame.split(b"\n"):
                if line.startswith(b"id: "):
                    cursor = line[4:].decode()
                elif line.startswith(b"data: "):
                    payload = line[6:]
            if payload:
                out.append((cursor, orjson.loads(payload)))
        return out


def _seq(cursor: str) -> int | None:
    """The `<seq>` of a `<streamId>:<seq>` cursor, None when it has none."""
    _, colon, seq = cursor.rpartition(":")
    return int(seq) if colon and seq.isdigit() else None


def _error_name(err: BaseException) -> str:
    if isinstance(err, aiohttp.ClientConnectorError) and err.os_error.errno:
        return "connect:" + errno.errorcode.get(err.os_error.errno, str(err.os_error.errno))
    if isinstance(err, OSError) and err.errno:
        return type(err).__name__ + ":" + errno.errorcode.get(err.errno, str(err.errno))
    return type(err).__name__


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    streams = run.streams
    next_index = 0

    began = time.monotonic()
    ramp = args.ramp_s / len(streams)
    phase = args.phase_s

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < len(streams):  # bounded: each pass takes one of the S streams
            if run.route_missing and not run.resumed:
                return  # the resume route is not served: the rest would fail the same way
            index = next_index
            next_index += 1
            rec = streams[index]
            if ramp or phase:  # stream i starts at i * ramp_s / S + frac(i * φ) * phase_s
                offset = math.modf(index * GOLDEN)[0] * phase
                wait = began + index * ramp + offset - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                async with asyncio.timeout(args.stream_timeout):
                    if run.mode == "resume":
                        await run.one_resume(session, index, rec)
                    else:
                        await run.one(session, index, rec)
            except TimeoutError:
                rec.error = "stream_timeout"
            except (aiohttp.ClientError, OSError, ValueError) as err:
                rec.error = _error_name(err)
            if not rec.end:
                rec.end = time.monotonic()

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.stream_timeout)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [
            asyncio.create_task(worker(session)) for _ in range(min(args.concurrency, len(streams)))
        ]
        try:
            async with asyncio.timeout(args.timeout):
                await asyncio.gather(*workers)
        except TimeoutError:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for rec in streams:
                if not rec.completed and not rec.error:
                    rec.error = "run_timeout" if rec.start else "not_started"
                    rec.end = rec.end or time.monotonic()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return summarize(run, began, cpu_s, args)


def flowing_at_once(streams: list[Stream]) -> int:
    """Most streams that were between their first token and their end at one instant."""
    marks: list[tuple[float, int]] = []
    for rec in streams:
        if rec.first:
            marks.append((rec.first, 1))
            marks.append((max(rec.end, rec.first), -1))
    marks.sort()  # at equal times the end (-1) sorts before the start (+1): no false overlap
    best = current = 0
    for _, step in marks:
        current += step
        best = max(best, current)
    return best


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize(run: Run, began: float, cpu_s: float, args: argparse.Namespace) -> dict[str, Any]:
    streams = run.streams
    started = [rec for rec in streams if rec.start]
    ttfts = sorted(rec.first - rec.start for rec in streams if rec.first)
    gaps = sorted(run.gaps)
    errors: dict[str, int] = {}
    for rec in streams:
        if rec.error:
            errors[rec.error] = errors.get(rec.error, 0) + 1
    mismatches = [rec.mismatch for rec in streams if rec.mismatch]
    tokens = sum(rec.tokens for rec in streams)
    first_start = min((rec.start for rec in started), default=began)
    last_end = max((rec.end for rec in started), default=began)
    wall_s = max(last_end - first_start, 1e-9)
    firsts = [rec.first for rec in streams if rec.first]
    flowing = flowing_at_once(streams)
    return {
        "mode": run.mode,
        "url": run.url,
        "model": run.model,
        "tokens_per_stream": run.tokens,
        "streams": len(streams),
        "concurrency": args.concurrency,
        "clients": run.clients,
        "completed": sum(rec.completed for rec in streams),
        "errors": errors,
        "error_count": sum(errors.values()),
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:MAX_MISMATCH_EXAMPLES],
        "tokens_received": tokens,
        "wall_s": round(wall_s, 4),
        "tokens_per_s": round(tokens / wall_s, 1),
        "ttft_ms": {
            "count": len(ttfts),
            "p50": _ms(percentile(ttfts, 50)),
            "p90": _ms(percentile(ttfts, 90)),
            "p99": _ms(percentile(ttfts, 99)),
            "max": _ms(ttfts[-1] if ttfts else None),
        },
        "gap_ms": {
            "count": len(gaps),
            "p50": _ms(percentile(gaps, 50)),
            "p99": _ms(percentile(gaps, 99)),
            "max": _ms(gaps[-1] if gaps else None),
        },
        "flowing_at_once": flowing,
        "flowing_share": round(flowing / len(streams), 4) if streams else 0.0,
        "first_token_spread_s": round(max(firsts) - first_start, 3) if firsts else None,
        "load_cpu_s": round(cpu_s, 3),
        **(_resume_summary(run) if run.mode == "resume" else {}),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def _resume_summary(run: Run) -> dict[str, Any]:
    times = sorted(rec.resume_s for rec in run.streams if rec.resume_s)
    return {
        "resumed": run.resumed,
        "route_missing": run.route_missing,
        "resume_ms": {
            "count": len(times),
            "p50": _ms(percentile(times, 50)),
            "p99": _ms(percentile(times, 99)),
            "max": _ms(times[-1] if times else None),
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--url", required=True, help="service or upstream base URL")
    parser.add_argument("--mode", choices=("service", "direct", "resume", "openai"), required=True)
    parser.add_argument(
        "--away-min-s", type=float, default=0.03, help="resume mode: shortest time away"
    )
    parser.add_argument(
        "--away-max-s", type=float, default=0.1, help="resume mode: longest time away"
    )
    parser.add_argument("--seed", type=int, default=1, help="resume mode: cut points and time away")
    parser.add_argument(
        "--resume-url",
        default="",
        help="resume mode: reconnect to this base URL (another instance)",
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--model", default="bench")
    parser.add_argument(
        "--clients",
        type=int,
        default=0,
        help="spread streams over this many X-Forwarded-For client addresses (0: no header)",
    )
    parser.add_argument(
        "--ramp-s",
        type=float,
        default=0.0,
        help="spread the streams' arrivals evenly over this many seconds (0: as fast as allowed)",
    )
    parser.add_argument(
        "--phase-s",
        type=float,
        default=0.0,
        help="add frac(i * golden ratio) * this many seconds to stream i's start (0: none)",
    )
    parser.add_argument("--stream-timeout", type=float, default=120.0, help="seconds per stream")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, help="write the JSON summary here (default stdout)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.streams < 1 or args.tokens < 1:
        parser.error("--concurrency, --streams and --tokens must be at least 1")
    if not 0 <= args.clients <= 1 << 24:
        parser.error("--clients must be from 0 to 16777216")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    install_uvloop()
    summary = asyncio.run(drive(args))
    data = orjson.dumps(summary, option=orjson.OPT_INDENT_2)
    if args.out:
        args.out.write_bytes(data)
    else:
        sys.stdout.write(data.decode() + "\n")
    return 0


def _arrival(rec: Stream, gaps: list[float], now: float, last: float) -> float:
    """Record a read that carried content: the first token's time, or the gap since the last."""
    if last:
        gaps.append(now - last)
    else:
        rec.first = now
    return now


if __name__ == "__main__":
    sys.exit(main())
