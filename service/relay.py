"""The one place concurrency lives: pump upstream text to the client, watch the clocks, and
account for how every stream ended.

A stream is two tasks: the pump (upstream batches -> frames) and a watchdog that sleeps until the
next deadline (heartbeat, first token, idle, total, write). The watchdog ends a stream by
recording the outcome and cancelling the pump; a client disconnect cancels the handler (aiohttp's
`handler_cancellation`), which cancels the pump it awaits. Either way the upstream request is
closed by the pump's `async with` before `run()` returns, and the outcome is counted once.

Design notes:
1. No timer per token. The pump only stores `loop.time()` per batch; the watchdog wakes at most
   once per heartbeat interval or at a deadline and re-reads those stamps. This keeps the per-token
   path to a parse, a frame and a write.
2. Deltas that arrive in one network read are written as one frame (`tokenCount` counts deltas,
   so it stays exact). Nothing is held back to batch: a frame leaves as soon as its read does.
3. A frame is one `write()` call, so a ping written by the watchdog can never split it.
4. Heartbeats count as writes for the heartbeat clock only; idle and first-token clocks measure
   the upstream's silence, not the client's.
5. Teardown outlives a second cancellation. A client can leave while the stream is already
   closing (aiohttp cancels the handler then); the pump must still finish closing the upstream
   and the stream must still be counted and released, so `tasks.settle` waits through the
   cancellation and re-raises it afterwards instead of abandoning the bookkeeping.
6. Completion tokens are counted as they are relayed (one counter increment per batch), so
   `rate(ai_stream_completion_tokens_total)` shows a long answer while it streams rather than in
   one step at its end; when the upstream's usage reports more tokens than deltas, the rest is
   added at the end.
7. A frame's write returns once the transport has drained below its high-water mark (a flag
   check, no system call), so for a reader that stops reading the write blocks once a bounded
   amount is queued (`tcp.STREAM_QUEUE_BOUND`) and the write deadline can fire; aiohttp alone
   waits only every 64 KiB written. A write that misses its deadline aborts the connection: the
   client is treated as gone (as when it disconnects), and nothing waits on it any more.
8. A clock that runs out before the first token while the upstream has been failing (the SDK
   backing off between retries) ends the stream as `upstream_error` with the failure's kind,
   not as a timeout: the cause is what users and `ai_stream_upstream_errors_total` need to see
   (upstream design note 5).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from . import sse, tcp
from .config import Settings
from .errors import FAILURE_BY_OUTCOME, Outcome
from .metrics import Metrics
from .tasks import settle
from .upstream import (
    ATTEMPTS,
    Attempts,
    CompletionRequest,
    Upstream,
    UpstreamError,
    client_message,
)

log = structlog.get_logger("service.relay")
_CLOCKS = (Outcome.FIRST_TOKEN_TIMEOUT, Outcome.TOTAL_TIMEOUT)


@dataclass(slots=True)
class Result:
    """What one stream produced and how it ended; vocabularies turn it into frames or JSON."""

    request_id: str
    stream_id: str
    model: str
    outcome: Outcome = Outcome.COMPLETED
    text: str = ""
    deltas: int = 0
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None  # the upstream's own word; "refusal" for a refusal
    elapsed_ms: int = 0
    error_code: str | None = None
    error_message: str | None = None
    upstream_error_kind: str | None = None
    upstream_error_detail: str | None = None  # the upstream's own text, capped: the log's only
    retry_after_s: float = 0.0  # when a retry may succeed (a token-budget cut)

    @property
    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return self.deltas

    @property
    def prompt_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("prompt_tokens"), int):
            return int(self.usage["prompt_tokens"])
        return 0

    def error_event(self) -> dict[str, Any]:
        """The fields every vocabulary's `error` event carries: for people, programs, outcome."""
        return {
            "type": "error",
            "error": self.error_message,
            "code": self.error_code,
            "reason": self.outcome.value,
        }


class Vocabulary(Protocol):
    """How one endpoint's events look. `content_head` + JSON text + `content_tail(n)`."""

    content_head: bytes

    def content_tail(self, deltas: int) -> bytes: ...

    def done(self, result: Result) -> dict[str, Any]: ...

    def error(self, result: Result) -> dict[str, Any]: ...


class SseWriter:
    """Frames onto one prepared response, in the shape its client asked for, with the stamps the
    watchdog reads."""

    __slots__ = (
        "_loop",
        "_out",
        "_resp",
        "framing",
        "last_write",
        "seq",
        "vocabulary",
        "writing_since",
    )

    def __init__(
        self, resp: web.StreamResponse, vocabulary: Vocabulary, framing: sse.Framing
    ) -> None:
        self._resp = resp
        self._out: AbstractStreamWriter | None = None  # bound at the first write (note 7)
        self._loop = asyncio.get_running_loop()
        self.vocabulary = vocabulary
        self.framing = framing
        self.seq = 0
        self.last_write = self._loop.time()
        self.writing_since = 0.0

    async def _write(self, data: bytes) -> None:
        self.writing_since = now = self._loop.time()
        await self._resp.write(data)
        out = self._out
        if out is None:  # the first write, or a response with no bounds (not on a TCP socket)
            out = self._out = self._resp.get(tcp.STREAM_OUT)
        if out is not None:
            await out.drain()  # design note 7
        self.writing_since = 0.0
        self.last_write = now

    def abort(self) -> None:
        """Drop the connection of a client that did not take a write in time (design note 7)."""
        transport = self._out.transport if self._out is not None else None
        if transport is not None:
            transport.abort()

    async def event(self, payload: dict[str, Any]) -> None:
        self.seq += 1
        await self._write(self.framing.event(self.seq, payload))

    async def text(self, text: str, deltas: int) -> None:
        self.seq += 1
        vocabulary = self.vocabulary
        tail = vocabulary.content_tail(deltas)
        frame = self.framing.text_event(self.seq, vocabulary.content_head, text, tail)
        await self._write(frame)

    async def ping(self) -> None:
        await self._write(self.framing.ping)


class Meter(Protocol):
    """Where a stream reports the tokens it relays: its account with the limits. `on_cut` gives
    it the way to end the stream (its client's budget ran out; the argument is when a retry may
    succeed), and `settle` is called once, when the stream has ended, with the upstream's count
    of prompt and completion tokens (None when it reported none)."""

    def relayed(self, tokens: int) -> None: ...

    def on_cut(self, cut: Callable[[float], None]) -> None: ...

    async def settle(self, used: int | None) -> None: ...


class Slot:
    """One of this instance's `MAX_STREAMS`, taken at admission and held until the stream's
    answer has ended; giving it back twice is harmless. A context manager that gives it back."""

    __slots__ = ("_live", "held")

    def __init__(self, live: LiveStreams) -> None:
        self._live = live
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._live._given_back()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LiveStreams:
    """Streams on this instance: the `MAX_STREAMS` slots (taken synchronously at admission, so a
    burst cannot walk past the cap while earlier requests await the stores), the relays in flight
    (the limits' upkeep), and the shutdown drain."""

    def __init__(self) -> None:
        self._relays: set[Relay] = set()
        self._slots = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False

    def __len__(self) -> int:
        """Slots taken: streams admitted and not yet ended."""
        return self._slots

    def __iter__(self) -> Iterator[Relay]:
        return iter(list(self._relays))

    def take(self, cap: int) -> Slot | None:
        """A slot, or None when `cap` (0 = no cap) are taken. No await: the count and the take
        are one step of the event loop."""
        if cap and self._slots >= cap:
            return None
        self._slots += 1
        self._empty.clear()
        return Slot(self)

    def _given_back(self) -> None:
        self._slots -= 1
        self._settle_empty()

    def add(self, relay: Relay) -> None:
        self._relays.add(relay)
        self._empty.clear()

    def discard(self, relay: Relay) -> None:
        self._relays.discard(relay)
        self._settle_empty()

    def _settle_empty(self) -> None:
        if not self._relays and not self._slots:
            self._empty.set()

    async def idle(self) -> None:
        """Return once no stream is in flight or admitted (every outcome so far is accounted and
        every slot given back)."""
        await self._empty.wait()

    async def drain(self, drain_s: float, grace_s: float = 5.0) -> None:
        """Let streams finish for `drain_s`, then end the rest with `shutdown` and wait for them."""
        self.draining = True
        try:
            async with asyncio.timeout(drain_s):
                await self._empty.wait()
        except TimeoutError:
            for relay in list(self._relays):
                relay.expire(Outcome.SHUTDOWN)
            try:
                async with asyncio.timeout(grace_s):
                    await self._empty.wait()
            except TimeoutError:
                log.warning("shutdown.streams_left", count=len(self._relays), slots=self._slots)


def _unmetered(tokens: int) -> None:
    return None


@dataclass(slots=True, eq=False)
class Relay:
    """One upstream call relayed to one client (or collected, for the JSON endpoints)."""

    settings: Settings
    upstream: Upstream
    metrics: Metrics
    live: LiveStreams
    route: str
    request: CompletionRequest
    request_id: str
    arrived: float
    stream_id: str = field(default_factory=sse.new_stream_id)  # server-minted, never a client's
    writer: SseWriter | None = None
    meter: Meter | None = None
    result: Result = field(init=False)
    ran: bool = field(default=False, init=False)  # run() began: it settles its meter
    _forced: Outcome | None = field(default=None, init=False)
    _pump_task: asyncio.Task[None] | None = field(default=None, init=False)
    _attempts: Attempts = field(default_factory=Attempts, init=False)
    _pieces: list[str] = field(default_factory=list, init=False)
    _first_token: float = field(default=0.0, init=False)
    _last_token: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.result = Result(
            request_id=self.request_id, stream_id=self.stream_id, model=self.request.model
        )
        if self.meter is not None:
            self.meter.on_cut(self._cut)

    def _cut(self, retry_after_s: float) -> None:
        """The client's token budget ran out (its meter says so)."""
        self.result.retry_after_s = retry_after_s  # a JSON answer's Retry-After
        self.expire(Outcome.RATE_LIMITED)

    def expire(self, outcome: Outcome) -> None:
        """End the stream from outside the pump (a clock, or shutdown)."""
        if self._forced is None:
            self._forced = outcome
        if self._pump_task is not None:
            self._pump_task.cancel()

    async def run(self, opening: Callable[[], Awaitable[None]] | None = None) -> Result:
        """Relay the answer; `opening` (headers, first event) runs first, inside the accounting,
        so a client that leaves even then is counted and its limits released."""
        self.ran = True
        loop = asyncio.get_running_loop()
        labels = self.metrics.child(self.metrics.streams_active, self.route)
        labels.inc()
        self.live.add(self)
        tasks: list[asyncio.Task[None]] = []
        outcome = Outcome.COMPLETED
        try:
            if opening is not None:
                await opening()
            self._pump_task = pump = asyncio.create_task(self._pump())
            tasks = [pump, asyncio.create_task(self._watch())]
            await pump
        except ConnectionError:
            outcome = Outcome.CLIENT_DISCONNECT  # a write to the client failed: it is gone
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Our own handler was cancelled: aiohttp saw the client go (or gave up on it).
                outcome = self._blame(self._forced or Outcome.CLIENT_DISCONNECT)
                raise
            outcome = self._blame(self._forced or Outcome.CANCELLED)
        except UpstreamError as err:
            outcome = Outcome.UPSTREAM_ERROR
            self.result.upstream_error_kind = err.kind
            self.result.upstream_error_detail = err.detail
            self.result.error_message = client_message(err.kind)  # never the upstream's text
        except Exception:
            # A failure nothing translated (a bug, or an exception a library let through): the
            # client still gets an error event and the stream is still counted.
            log.exception("stream.failed", route=self.route)
            outcome = Outcome.UPSTREAM_ERROR
            self.result.upstream_error_kind = "other"
        finally:
            try:
                await settle(*tasks)
            finally:
                self._finish(outcome, loop.time())
                labels.dec()
                try:
                    if self.meter is not None:
                        result = self.result
                        used = result.prompt_tokens + result.completion_tokens
                        await self.meter.settle(used if result.usage else None)
                finally:
                    self.live.discard(self)
        return self.result

    def _blame(self, outcome: Outcome) -> Outcome:
        """A clock that ran out while the upstream kept failing names the failure (note 8)."""
        failure = self._attempts.failure
        if outcome not in _CLOCKS or failure is None or self.result.deltas:
            return outcome
        self.result.upstream_error_kind = failure.kind
        self.result.upstream_error_detail = failure.detail
        self.result.error_message = client_message(failure.kind)  # never the upstream's text
        return Outcome.UPSTREAM_ERROR

    async def _pump(self) -> None:
        ATTEMPTS.set(self._attempts)  # this task's upstream tries note what they meet
        loop_time = asyncio.get_running_loop().time
        metrics, model = self.metrics, self.metrics.model_label(self.request.model)
        gap = metrics.child(metrics.inter_token_latency, self.route, model).observe
        tokens = metrics.child(metrics.completion_tokens, model).inc  # as they flow: note 6
        relayed = self.meter.relayed if self.meter is not None else _unmetered
        write = self.writer.text if self.writer else None
        pieces, result = self._pieces, self.result
        called = loop_time()
        async with self.upstream.stream(self.request) as stream:
            async for text, count in stream:
                now = loop_time()
                first = not result.deltas
                if first:
                    self._first_token = now
                    metrics.child(metrics.upstream_time_to_first_token, model).observe(now - called)
                else:
                    gap(now - self._last_token)
                self._last_token = now
                result.deltas += count
                relayed(count)
                tokens(count)
                pieces.append(text)
                if write is not None:
                    await write(text, result.deltas)
                if first:  # measured once the first content is written to the client
                    metrics.child(metrics.time_to_first_token, self.route, model).observe(
                        loop_time() - self.arrived
                    )
            parser = stream.parser
            result.usage = parser.usage
            result.finish_reason = parser.reason
            if parser.model:
                result.model = parser.model

    async def _watch(self) -> None:
        s, loop, writer = self.settings, asyncio.get_running_loop(), self.writer
        total_at = self.arrived + s.max_stream_s if s.max_stream_s else math.inf
        while True:
            now = loop.time()
            if self.result.deltas:
                token_at = self._last_token + s.idle_timeout_s if s.idle_timeout_s else math.inf
                token_outcome = Outcome.IDLE_TIMEOUT
            else:
                token_at = (
                    self.arrived + s.first_token_timeout_s if s.first_token_timeout_s else math.inf
                )
                token_outcome = Outcome.FIRST_TOKEN_TIMEOUT
            if now >= total_at:
                return self.expire(Outcome.TOTAL_TIMEOUT)
            if now >= token_at:
                return self.expire(token_outcome)
            wake = min(total_at, token_at)
            if not self.result.deltas and s.idle_timeout_s:
                # The idle clock starts at the first token, which may come any moment: a deadline
                # of first token + idle is never earlier than now + idle.
                wake = min(wake, now + s.idle_timeout_s)
            if writer is not None:
                if writer.writing_since:
                    if s.write_timeout_s:
                        if now - writer.writing_since >= s.write_timeout_s:
                            writer.abort()
                            return self.expire(Outcome.CLIENT_DISCONNECT)
                        wake = min(wake, writer.writing_since + s.write_timeout_s)
                elif s.heartbeat_interval_s:
                    ping_at = writer.last_write + s.heartbeat_interval_s
                    if now >= ping_at:
                        try:
                            async with asyncio.timeout(s.write_timeout_s or None):
                                await writer.ping()
                        except (TimeoutError, ConnectionError):
                            writer.abort()
                            return self.expire(Outcome.CLIENT_DISCONNECT)
                        self.metrics.heartbeats.inc()
                        ping_at = writer.last_write + s.heartbeat_interval_s
                    wake = min(wake, ping_at)
            await asyncio.sleep(min(wake - now, 3600.0))

    def _finish(self, outcome: Outcome, now: float) -> None:
        result, metrics = self.result, self.metrics
        result.outcome = outcome
        result.text = "".join(self._pieces)
        result.elapsed_ms = round((now - self.arrived) * 1000)
        if outcome is not Outcome.COMPLETED:
            code, message = FAILURE_BY_OUTCOME[outcome]
            result.error_code = code
            result.error_message = result.error_message or message
        model = metrics.model_label(self.request.model)
        metrics.child(metrics.outcomes, self.route, outcome.value).inc()
        metrics.child(metrics.duration, self.route, outcome.value).observe(now - self.arrived)
        if result.upstream_error_kind:
            metrics.child(metrics.upstream_errors, result.upstream_error_kind).inc()
        if result.completion_tokens > result.deltas:  # the upstream's usage counts more
            metrics.child(metrics.completion_tokens, model).inc(
                result.completion_tokens - result.deltas
            )
        metrics.child(metrics.prompt_tokens, model).inc(result.prompt_tokens)
        decode_s = self._last_token - self._first_token
        if result.deltas > 1 and decode_s > 0:
            metrics.child(metrics.output_tokens_per_second, self.route, model).observe(
                result.completion_tokens / decode_s
            )
        log.info(
            "stream.finished",
            route=self.route,
            outcome=outcome.value,
            model=result.model,
            completion_tokens=result.completion_tokens,
            prompt_tokens=result.prompt_tokens,
            deltas=result.deltas,
            ttft_ms=round((self._first_token - self.arrived) * 1000) if result.deltas else None,
            duration_ms=result.elapsed_ms,
            upstream_error=result.upstream_error_kind,
            upstream_detail=result.upstream_error_detail,
            finish_reason=result.finish_reason,
        )
