"""The one place a generation's concurrency lives: pump upstream text into the stream's event log
(and to the readers that have caught up), watch the clocks, and account for how every stream
ended. Readers (`readers`: an SSE response, a JSON collector) are separate objects that read the
log from a cursor; this module knows of them only the `Follower` seam below.

A generation is a task of its own, owned by the app's `Generations` registry (keyed by stream
id), not by the HTTP handler that started it. Inside it, one more task, the pump (upstream
batches -> events), and a watchdog: a loop timer armed for the next clock deadline (first token,
idle, total; the decision is the pure `next_step`), not a task (note 15). The watchdog or the
registry (shutdown) or the limits (a cut) end a generation by recording the outcome and
cancelling the pump; so does its last reader leaving, once its grace window has passed with
nobody back (design note 9), and the cancel route (`expire(Outcome.CANCELLED)`). Either way the
upstream request is closed by the pump's `async with` before `run()` returns, and the outcome is
counted once.

Hand-off between a generation and its readers: a reader `attach`es (reader count + 1), catches up
from the log at its own pace, then asks to `follow`: from then on the pump writes each new event
to it directly, in the pump's own task (note 8). It `leave`s on any exit (count - 1); a write
that fails makes the pump drop it. The terminal event is appended once the outcome is counted,
the account settled and `on_end` done (a chat answer saved), and readers write it themselves.

Design notes:
1. No timer per token. The pump only stores `loop.time()` per batch; the watchdog wakes at a
   deadline and re-reads those stamps. This keeps the per-token path to a parse, a frame and a
   write plus an append.
2. Deltas that arrive in one network read are written as one frame (`tokenCount` counts deltas,
   so it stays exact). Nothing is held back to batch: a frame leaves as soon as its read does
   (unless `STREAM_FLUSH_MS` asks otherwise: note 14).
3. A frame is one `write()` call, so a ping written by a reader's watch can never split it.
4. Heartbeats count as writes for the heartbeat clock only; idle and first-token clocks measure
   the upstream's silence, not the client's: the clocks are the generation's, the heartbeat and
   the write deadline each reader's.
5. Teardown outlives a second cancellation. A client can leave while the stream is already
   closing (aiohttp cancels the handler then); the pump must still finish closing the upstream
   and the stream must still be counted and released, so `tasks.settle` waits through the
   cancellation and re-raises it afterwards instead of abandoning the bookkeeping.
6. Completion tokens are counted as they are relayed (one counter increment per batch), so
   `rate(ai_stream_completion_tokens_total)` shows a long answer while it streams rather than in
   one step at its end; when the upstream's usage reports more tokens than deltas, the rest is
   added at the end.
7. A clock that runs out before the first token while the upstream has been failing (the attempt
   loop backing off between retries, `failover`) ends the stream as `upstream_error` with the
   failure's kind, not as a timeout: the cause is what users and `ai_stream_upstream_errors_total`
   need to see (upstream design note 5). The loop does not even start a wait that would end past the
   first-token deadline: it ends the call with the failure at once (`failover` note 3).
8. A reader that has caught up is written to by the pump itself, in the pump's task, and the
   pump waits for that write: no task hop per token (a future per token per reader costs a loop
   turn each at model pace), and a reader that stops reading holds the generation back as it
   did when the response was the pump's (readers design note 1 bounds that). A reader still
   catching up is not waited for; it joins once it reaches the end of the log.
9. The last reader leaving starts the generation's grace window (`RESUME_GRACE_S`) once the
   client has its stream id (a reader wrote the first event, or came back with the id): one
   timer per generation, armed when the last reader leaves and disarmed when one attaches, never
   a timer per token. With no reader back when it fires, the generation ends
   `client_disconnect` as before. A native stream whose reader left before its first event, the
   JSON routes (no vocabulary: their collector leaves only when its client does) and a grace of
   zero cancel at once: the upstream request is closed within a second of a disconnect, in every
   window, as when the handler owned the pump. `held_elsewhere` (a reader on another instance,
   the shared streams' seam) keeps the generation: the timer then looks again every third of
   `RESUME_LEASE_S` (how often the seam's answer is refreshed), and once nobody holds it
   elsewhere a grace window starts afresh, as when a local reader leaves; so with nobody
   anywhere the generation ends a grace window after the last reader anywhere left, plus the
   time its presence takes to lapse.
10. The upstream is called once the reader that started a streamed generation has written its
   first event and follows (or has left), as when that write came first in the handler: the
   first event still leaves before the upstream answers, and a stream whose upstream answers at
   once is written by the pump as it reads, not caught up afterwards frame by frame. A reader
   that attaches later (resume) catches up while the pump goes on.
11. A finished native stream stays findable (`Generations.find`) for `RESUME_TTL_S` after its end,
   its log and result only (`shed` lets go of its request's messages, its account and its
   `on_end`, so a flood of small abandoned streams cannot keep their prompts): it holds no slot
   and no task, and the shutdown drain does not wait for it. What is kept is bounded by
   `RESUME_KEEP_MB` (the bytes of the event payloads, counted once at the end); past it the
   oldest finished streams are dropped first. A finished log is dropped lazily (at a lookup, at
   a scrape) and by one sweep timer for the whole registry, armed for the oldest one's expiry:
   no timer per stream.
12. Seams for streams shared through Redis and for chat checkpoints: `Generations.on_start`
   (hooks called as a native stream starts), `Generation.held_elsewhere`, `Generation.owner`
   (the key id that started it, "" with keys off), `Generation.text_so_far()`, and the
   `SharedStreams`/`RemoteStream` protocols the stream routes ask when a stream is not here
   (`mirror` fills them with `REDIS_URL`).
13. A passthrough generation (the OpenAI-compatible routes: no vocabulary, so never resumed,
   retained or mirrored, and cancelled at once when its reader leaves, note 9) appends each
   upstream chunk's own JSON as an event (`chunks` design note 6) and the held tail once the
   upstream's stream has ended whole; tokens are counted, charged and timed as on the native
   routes. `answered()` tells its handler when the upstream has answered 200, so the response's
   headers go out only then (a failure before is a real status); the terminal line (`[DONE]` or
   an error chunk) is the handler's to write. `clocks` replaces the settings' clocks (a
   non-stream answer arrives whole: only the total clock bounds it).
14. `STREAM_FLUSH_MS` above 0 (default 0: note 2 as it stands) joins the deltas of a native
   stream read within the interval into one frame: the first delta held arms one timer (one per
   frame, never per token), and when it fires everything held leaves as one `content` event,
   written by a task of its own while the pump waits for its next read. Nothing is held longer
   than the interval (plus the loop's lateness); `tokenCount` counts every delta in the frame;
   the held text is written before the terminal event when the answer ends whole, and put in the
   log before it on any other end (readers catch up). The pump waits for a frame being written
   before going on, so a reader that stops reading still holds the generation back (note 8).
   The time to first token is observed when the first frame is written. Passthrough streams
   (note 13) relay each chunk as it came and are not joined.
15. What an open stream holds is kept small, as thousands are open at once: two tasks (the
   generation and its pump; the watchdog is a timer callback re-armed at each deadline, the
   registry's bookkeeping runs at the end of the generation's own task), and no
   `asyncio.Event` until someone waits: `ended`/`answered` are flags, and the event behind
   `finished()`/`answered()` is made by the first wait (`_Flag`). The opening and terminal
   events are encoded by `sse.dumps_kept`: orjson's own output would keep a 4 KB buffer each,
   for the stream's life and for as long as a finished stream is retained (note 11).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import structlog

from . import sse
from .chunks import ChunkRelay
from .config import Settings
from .errors import FAILURE_BY_OUTCOME, ApiError, ErrorCode, Outcome
from .events import EventLog
from .metrics import Metrics
from .tasks import outlive_cancel, settle
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
    error_code: ErrorCode | None = None
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

    def failure(self) -> ApiError:
        """An answer that did not complete, as the error a JSON route answers with; a token
        budget that ran out is back above zero after its Retry-After."""
        code = self.error_code or ErrorCode.INTERNAL
        retry_after = (
            max(1, math.ceil(self.retry_after_s)) if code is ErrorCode.RATE_LIMITED else None
        )
        return ApiError(code, self.error_message or "The answer failed.", retry_after_s=retry_after)

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


class Meter(Protocol):
    """Where a stream reports the tokens it relays: its account with the limits. `on_cut` gives
    it the way to end the stream (its client's budget ran out; the argument is when a retry may
    succeed), and `settle` is called once, when the stream has ended, with the upstream's count
    of prompt and completion tokens (None when it reported none)."""

    def relayed(self, tokens: int) -> None: ...

    def on_cut(self, cut: Callable[[float], None]) -> None: ...

    async def settle(self, used: int | None) -> None: ...


class RemoteStream(Protocol):
    """A stream read from elsewhere (another instance's, through Redis): what the stream route
    needs to check a cursor and serve it. `events(after)` yields the payloads after event
    `after`, in order, the terminal event last, waiting for new ones while the stream runs."""

    @property
    def route(self) -> str: ...

    @property
    def owner(self) -> str: ...

    @property
    def length(self) -> int: ...

    @property
    def ended(self) -> bool: ...

    def events(self, after: int) -> AsyncIterator[bytes]: ...

    async def reach(self, cursor: int) -> None:
        """Wait, bounded, until `length` is at least `cursor` or the stream has ended: a reader
        moving from the producing instance may be ahead of what has reached the other."""
        ...

    async def aclose(self) -> None: ...


class SharedStreams(Protocol):
    """Streams of other instances (`keys.SHARED_STREAMS`): the stream routes ask it before a
    404 when a stream is not running or retained here."""

    async def open(self, stream_id: str, cursor: int) -> RemoteStream | None:
        """The stream, for a reader at `cursor` (its producer may be asked to hand its newest
        events over at once), or None."""
        ...

    async def request_cancel(self, stream_id: str, owner: str) -> bool:
        """Stop the stream where it runs; False when it is unknown or not `owner`'s."""
        ...


class Follower(Protocol):
    """A reader the pump writes to once it has caught up (design note 8). `deliver` writes event
    `seq` and raises ConnectionError when the client is gone."""

    async def deliver(self, seq: int, payload: bytes) -> None: ...


# --- the watchdog's decision ----------------------------------------------------------------


class Clocks(NamedTuple):
    """The settings that bound a generation in time (0 = off)."""

    first_token_s: float
    idle_s: float
    total_s: float


class Step(NamedTuple):
    """What the watchdog does next: end the stream with `outcome`, or sleep until `wake`."""

    outcome: Outcome | None
    wake: float


def next_step(clocks: Clocks, now: float, arrived: float, last_token: float | None) -> Step:
    """The watchdog's decision from the clocks and the stamps (`last_token` None before the
    first): a pure function, so a table pins it."""
    total_at = arrived + clocks.total_s if clocks.total_s else math.inf
    if last_token is not None:
        token_at = last_token + clocks.idle_s if clocks.idle_s else math.inf
        token_outcome = Outcome.IDLE_TIMEOUT
    else:
        token_at = arrived + clocks.first_token_s if clocks.first_token_s else math.inf
        token_outcome = Outcome.FIRST_TOKEN_TIMEOUT
    if now >= total_at:
        return Step(Outcome.TOTAL_TIMEOUT, now)
    if now >= token_at:
        return Step(token_outcome, now)
    wake = min(total_at, token_at)
    if last_token is None and clocks.idle_s:
        # The idle clock starts at the first token, which may come any moment: a deadline of
        # first token + idle is never earlier than now + idle.
        wake = min(wake, now + clocks.idle_s)
    return Step(None, wake)


# --- the registry ---------------------------------------------------------------------------


class Slot:
    """One of this instance's `MAX_STREAMS`, taken at admission and held until the stream's
    answer has ended; giving it back twice is harmless. A context manager that gives it back."""

    __slots__ = ("_live", "held")

    def __init__(self, live: Generations) -> None:
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


class Generations:
    """The app's generations, by stream id, each run as a task owned here; the `MAX_STREAMS`
    slots (taken synchronously at admission, so a burst cannot walk past the cap while earlier
    requests await the stores); the shutdown drain; and the finished native streams kept
    readable for `ttl_s` within `keep_bytes` (design note 11)."""

    def __init__(self, ttl_s: float = 0.0, keep_bytes: int = 0) -> None:
        self.ttl_s = ttl_s
        self.keep_bytes = keep_bytes
        self.on_start: list[Callable[[Generation], None]] = []  # native streams (note 12)
        self._retained: OrderedDict[str, tuple[Generation, float, int]] = OrderedDict()
        self._retained_bytes = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._running: dict[str, Generation] = {}
        self._tasks: set[asyncio.Task[Result]] = set()
        self._slots = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False

    def __len__(self) -> int:
        """Slots taken: streams admitted and not yet ended."""
        return self._slots

    def __iter__(self) -> Iterator[Generation]:
        return iter(list(self._running.values()))

    def find(self, stream_id: str) -> Generation | None:
        """The native stream `stream_id`, running or finished and retained; None when unknown,
        expired or a JSON route's."""
        running = self._running.get(stream_id)
        if running is not None:
            return running if running.vocabulary is not None else None
        self.sweep()
        kept = self._retained.get(stream_id)
        return kept[0] if kept is not None else None

    @property
    def retained(self) -> int:
        """Finished streams kept readable now."""
        self.sweep()
        return len(self._retained)

    @property
    def retained_bytes(self) -> int:
        """The event bytes of the finished streams kept readable now."""
        self.sweep()
        return self._retained_bytes

    def _retain(self, generation: Generation) -> None:
        """Keep a finished native stream for `ttl_s` (note 11); the oldest go past the cap."""
        if not self.ttl_s or generation.vocabulary is None:
            return
        size = sum(map(len, generation.log.events))
        if size > self.keep_bytes:
            return
        generation.shed()
        now = time.monotonic()
        self._retained[generation.stream_id] = (generation, now, size)
        self._retained_bytes += size
        while self._retained_bytes > self.keep_bytes:
            self._drop_oldest()
        self._arm_sweep(now)

    def _drop_oldest(self) -> None:
        _, (_, _, size) = self._retained.popitem(last=False)
        self._retained_bytes -= size

    def sweep(self) -> None:
        """Drop the finished streams past their `ttl_s` (oldest first: all share one TTL)."""
        if not self._retained:
            return
        now = time.monotonic()
        while self._retained:
            _, ended_at, _ = next(iter(self._retained.values()))
            if ended_at + self.ttl_s > now:
                break
            self._drop_oldest()

    def _arm_sweep(self, now: float) -> None:
        if self._sweep is not None or not self._retained:
            return
        _, ended_at, _ = next(iter(self._retained.values()))
        delay = max(0.0, ended_at + self.ttl_s - now)
        self._sweep = asyncio.get_running_loop().call_later(delay, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self.sweep()
        self._arm_sweep(time.monotonic())

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

    def start(self, generation: Generation) -> None:
        """Run `generation` as a task of its own until it ends."""
        self._running[generation.stream_id] = generation
        self._empty.clear()
        generation._on_run_end = self._ended  # at the end of its own task (note 15)
        task = asyncio.create_task(generation.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if generation.vocabulary is not None:
            for hook in self.on_start:
                hook(generation)

    def _ended(self, generation: Generation) -> None:
        """`generation` has ended (its last step, in its own task)."""
        del self._running[generation.stream_id]
        self._retain(generation)
        self._settle_empty()

    def _settle_empty(self) -> None:
        if not self._running and not self._slots:
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
            for generation in self:
                generation.expire(Outcome.SHUTDOWN)
            try:
                async with asyncio.timeout(grace_s):
                    await self._empty.wait()
            except TimeoutError:
                log.warning("shutdown.streams_left", count=len(self._running), slots=self._slots)


# --- one generation -------------------------------------------------------------------------


def _unmetered(tokens: int) -> None:
    return None


class _Flush:
    """Text read but not yet written, with `STREAM_FLUSH_MS` (design note 14): the first delta
    held arms one timer for the interval; when it fires, everything held leaves as one frame, in
    a task of its own (the pump is then waiting for its next read)."""

    __slots__ = (
        "_first_written",
        "_frame",
        "_generation",
        "_interval_s",
        "_timer",
        "task",
        "unsent",
    )

    def __init__(
        self,
        generation: Generation,
        interval_ms: int,
        frame: Callable[[str], bytes],
        first_written: Callable[[], None],
    ) -> None:
        self._generation = generation
        self._interval_s = interval_ms / 1000
        self._frame = frame  # the held text as one content event, with the count so far
        self._first_written: Callable[[], None] | None = first_written
        self._timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None  # a held frame being written
        self.unsent: list[str] = []

    def add(self, text: str) -> None:
        """Hold `text`; the first text held arms the timer (at most `interval` of holding)."""
        self.unsent.append(text)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self._due)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        self._timer = None
        if self.task is None and self.unsent:
            self.task = asyncio.get_running_loop().create_task(self._write())

    def _take(self) -> bytes:
        text = "".join(self.unsent)
        self.unsent.clear()
        return self._frame(text)

    async def _write(self) -> None:
        try:
            while self.unsent:  # text held while the last frame was being written goes next
                await self._generation._publish(self._take())
                if self._first_written is not None:  # measured once the first is written
                    self._first_written()
                    self._first_written = None
        finally:
            self.task = None

    async def drain(self) -> None:
        """The answer ended whole: write what is held now (before the terminal event)."""
        self._disarm()
        if self.task is not None:
            await asyncio.shield(self.task)
        if self.unsent:
            self.task = asyncio.get_running_loop().create_task(self._write())
            await asyncio.shield(self.task)

    async def settle(self) -> None:
        """The generation is ending: no more timer; a frame being written is written (its
        reader's write deadline bounds it), so it is never written twice."""
        self._disarm()
        task = self.task
        if task is not None:
            await outlive_cancel(asyncio.wait([task]))
            if not task.cancelled():
                task.exception()  # retrieved: the pump saw it, or the outcome is taken

    def spill(self) -> None:
        """What is still held goes into the log, before the terminal event; readers catch up."""
        self._disarm()
        if self.unsent:
            self._generation.log.append(self._take())


class _Flag:
    """A flag with an `asyncio.Event` made only when someone waits for it (note 15): most
    streams are never waited for, and an event (with its deque of waiters) costs ~0.7 KB."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: asyncio.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if self._set:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


@dataclass(slots=True, eq=False)
class Generation:
    """One upstream call, produced into an event log for its readers (SSE responses), or only
    into its `Result` (no `vocabulary`: the JSON routes' collector reads that)."""

    settings: Settings
    upstream: Upstream
    metrics: Metrics
    route: str
    request: CompletionRequest
    request_id: str
    arrived: float
    stream_id: str = field(default_factory=sse.new_stream_id)  # server-minted, never a client's
    vocabulary: Vocabulary | None = None
    opening: dict[str, Any] | None = None  # the first event, in the log before anything else
    meter: Meter | None = None
    on_end: Callable[[Result], Awaitable[None]] | None = None  # before the terminal event
    owner: str = ""  # the API key id that started it ("" with keys off): who may stop it
    held_elsewhere: Callable[[], bool] | None = None  # a reader elsewhere keeps it (note 9)
    passthrough: bool = False  # each upstream chunk relayed as its own event (note 13)
    clocks: Clocks | None = None  # instead of the settings' (note 13)
    known: bool = field(default=False, init=False)  # a client has its stream id (note 9)
    log: EventLog = field(default_factory=EventLog, init=False)
    result: Result = field(init=False)
    _readers: set[object] = field(default_factory=set, init=False)
    _following: tuple[Follower, ...] = field(default=(), init=False)
    _first_reader: asyncio.Future[None] | None = field(default=None, init=False)  # note 10
    _done: _Flag = field(default_factory=_Flag, init=False)  # note 15
    _answered: _Flag = field(default_factory=_Flag, init=False)  # notes 13 and 15
    _forced: Outcome | None = field(default=None, init=False)
    _pump_task: asyncio.Task[None] | None = field(default=None, init=False)
    _watchdog: asyncio.Handle | None = field(default=None, init=False)  # note 15
    _on_run_end: Callable[[Generation], None] | None = field(default=None, init=False)
    _attempts: Attempts = field(default_factory=Attempts, init=False)
    _pieces: list[str] = field(default_factory=list, init=False)
    _first_token: float = field(default=0.0, init=False)
    _last_token: float = field(default=0.0, init=False)
    _grace: asyncio.TimerHandle | None = field(default=None, init=False)  # note 9
    _attached: int = field(default=0, init=False)  # readers in all, for the log line
    _resumes: int = field(default=0, init=False)  # of which came back by a cursor
    _held: bool = field(default=False, init=False)  # a reader elsewhere held it (note 9)
    _flush: _Flush | None = field(default=None, init=False)  # STREAM_FLUSH_MS (note 14)

    def __post_init__(self) -> None:
        self.result = Result(
            request_id=self.request_id, stream_id=self.stream_id, model=self.request.model
        )
        if self.opening is not None:
            self.log.append(sse.dumps_kept(self.opening))  # note 15
        if self.meter is not None:
            self.meter.on_cut(self._cut)

    # --- readers (design notes 8 and 9) ---

    def attach(self, reader: object, *, resumed: bool = False) -> None:
        """`reader` reads the log; one that came back by a cursor (`resumed`) knows the stream
        id, and any reader ends a grace window (note 9)."""
        self._readers.add(reader)
        self._attached += 1
        if resumed:
            self._resumes += 1
            self.known = True
        if self._grace is not None:
            self._disarm()

    @property
    def readers(self) -> int:
        """Readers attached now."""
        return len(self._readers)

    def shed(self) -> None:
        """Once ended and kept for readers (note 11): let go of what only the run needed (the
        request's messages, the account, the chat turn `on_end` holds), so what a finished
        stream keeps is its log and its result."""
        self.request = CompletionRequest(self.request.model, [], 0)
        self.meter = None
        self.on_end = None
        self.opening = None
        self._flush = None  # its frame builder holds the vocabulary and metrics (note 14)

    def text_so_far(self) -> str:
        """The answer's text as produced so far (all of it once ended)."""
        return self.result.text if self._done.is_set() else "".join(self._pieces)

    def follow(self, reader: Follower) -> None:
        """`reader` has caught up with the log: the pump writes the next events to it."""
        if not self.log.ended:
            self._following = (*self._following, reader)
        self._open_gate()

    def _open_gate(self) -> None:
        gate = self._first_reader
        if gate is not None and not gate.done():
            gate.set_result(None)

    def leave(self, reader: object) -> None:
        """`reader` is gone; the last one leaving starts the grace window, or ends the generation
        at once (note 9)."""
        if reader not in self._readers:
            return
        self._readers.discard(reader)
        self._following = tuple(r for r in self._following if r is not reader)
        self._open_gate()
        if self._readers or self.log.ended:
            return
        grace_s = self.settings.resume_grace_s
        if grace_s and self.known and self.vocabulary is not None and self._forced is None:
            if self._grace is None:
                self.metrics.child(self.metrics.generations_unread, self.route).inc()
                self._grace = asyncio.get_running_loop().call_later(grace_s, self._grace_over)
        else:
            self.expire(Outcome.CLIENT_DISCONNECT)

    def _disarm(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
            self.metrics.child(self.metrics.generations_unread, self.route).dec()

    def _grace_over(self) -> None:
        """Nobody came back within the grace window: end, unless a reader elsewhere holds it
        (then look again every third of the lease, and give the reader elsewhere, once it has
        left, a grace window of its own: note 9)."""
        held, loop = self.held_elsewhere, asyncio.get_running_loop()
        if held is not None and held():
            self._held = True
            self._grace = loop.call_later(self.settings.resume_lease_s / 3, self._grace_over)
            return
        if self._held:
            self._held = False
            self._grace = loop.call_later(self.settings.resume_grace_s, self._grace_over)
            return
        self._disarm()
        self.metrics.child(self.metrics.grace_expiries, self.route).inc()
        self.expire(Outcome.CLIENT_DISCONNECT)

    @property
    def ended(self) -> bool:
        """Its outcome is counted and its terminal event appended."""
        return self._done.is_set()

    async def answered(self) -> bool:
        """Wait until the upstream has answered 200 (True) or the generation has ended before
        it did (False): note 13."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._answered, self._done)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._answered.is_set()

    async def finished(self) -> Result:
        """The result, once the generation has ended (its terminal event appended)."""
        await self._done.wait()
        return self.result

    # --- ending ---

    def _cut(self, retry_after_s: float) -> None:
        """The client's token budget ran out (its meter says so)."""
        self.result.retry_after_s = retry_after_s  # a JSON answer's Retry-After
        self.expire(Outcome.RATE_LIMITED)

    def expire(self, outcome: Outcome) -> None:
        """End the generation from outside the pump (a clock, a reader leaving, a cut,
        shutdown, the cancel route); the first reason given is the outcome. Nothing changes once
        it has ended."""
        if self.log.ended:
            return
        if self._forced is None:
            self._forced = outcome
        if self._pump_task is not None:
            self._pump_task.cancel()

    async def run(self) -> Result:
        """Relay the answer into the log, count how it ended, settle the account, run `on_end`,
        then append the terminal event."""
        try:
            loop = asyncio.get_running_loop()
            if self.vocabulary is not None and self._readers and not self._following:
                self._first_reader = loop.create_future()  # opened by its reader: note 10
            labels = self.metrics.child(self.metrics.streams_active, self.route)
            labels.inc()
            outcome = Outcome.COMPLETED
            try:
                self._pump_task = pump = asyncio.create_task(self._pump())
                self._watchdog = loop.call_soon(self._watch)  # note 15
                if self._forced is not None:  # ended before it began (its reader left at once)
                    pump.cancel()
                await pump
            except ConnectionError:
                # its last reader's write failed
                outcome = self._forced or Outcome.CLIENT_DISCONNECT
            except asyncio.CancelledError:
                outcome = self._blame(self._forced or Outcome.CANCELLED)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the loop is closing: the bookkeeping below still runs
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
                if self._watchdog is not None:
                    self._watchdog.cancel()
                    self._watchdog = None
                try:
                    if self._pump_task is not None:
                        await settle(self._pump_task)
                    if self._flush is not None:
                        await self._flush.settle()
                finally:
                    self._disarm()
                    self._finish(outcome, loop.time())
                    labels.dec()
                    try:
                        await self._close()
                    finally:
                        if self._flush is not None:
                            self._flush.spill()  # held text before the terminal event (note 14)
                        self._end_log()
                        self._done.set()
                        self._pieces.clear()  # the text is the result's now (`text_so_far`)
        finally:
            if self._on_run_end is not None:  # the registry's bookkeeping (note 15)
                self._on_run_end(self)
        return self.result

    async def _close(self) -> None:
        result = self.result
        try:
            if self.meter is not None:
                used = result.prompt_tokens + result.completion_tokens
                await self.meter.settle(used if result.usage else None)
        finally:
            if self.on_end is not None:
                await self.on_end(result)

    def _end_log(self) -> None:
        self._following = ()
        vocabulary, result = self.vocabulary, self.result
        if vocabulary is None:
            self.log.end()
            return
        final = vocabulary.done if result.outcome is Outcome.COMPLETED else vocabulary.error
        self.log.end(sse.dumps_kept(final(result)))  # note 15

    def _blame(self, outcome: Outcome) -> Outcome:
        """A clock that ran out while the upstream kept failing names the failure (note 7)."""
        failure = self._attempts.failure
        if outcome not in _CLOCKS or failure is None or self.result.deltas:
            return outcome
        self.result.upstream_error_kind = failure.kind
        self.result.upstream_error_detail = failure.detail
        self.result.error_message = client_message(failure.kind)  # never the upstream's text
        return Outcome.UPSTREAM_ERROR

    # --- the pump and the watchdog ---

    async def _pump(self) -> None:
        ATTEMPTS.set(self._attempts)  # this task's upstream tries note what they meet
        self._attempts.answered = self._answered.set  # a server's 200, before its first batch
        loop_time = asyncio.get_running_loop().time
        metrics, model = self.metrics, self.metrics.model_label(self.request.model)
        gap = metrics.child(metrics.inter_token_latency, self.route, model).observe
        tokens = metrics.child(metrics.completion_tokens, model).inc  # as they flow: note 6
        relayed = self.meter.relayed if self.meter is not None else _unmetered
        vocabulary, append = self.vocabulary, self.log.append
        head = vocabulary.content_head if vocabulary is not None else b""
        tail = vocabulary.content_tail if vocabulary is not None else None
        dumps = sse.dumps
        pieces, result = self._pieces, self.result
        route = self.route

        def first_written() -> None:
            """Time to first token, measured once the first content is written to the client."""
            metrics.child(metrics.time_to_first_token, route, model).observe(
                loop_time() - self.arrived
            )

        flush: _Flush | None = None
        if tail is not None and self.settings.stream_flush_ms:  # note 14

            def frame(text: str) -> bytes:
                return b"%b%b%b" % (head, dumps(text), tail(result.deltas))

            flush = self._flush = _Flush(self, self.settings.stream_flush_ms, frame, first_written)
        if self._first_reader is not None:
            await self._first_reader
        called = loop_time()
        async with self.upstream.stream(self.request) as stream:
            self._answered.set()
            relay = stream.parser.chunks if self.passthrough else None  # note 13
            async for text, count in stream:
                if relay:
                    await self._relay(relay)
                if not count:
                    continue
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
                if flush is not None:
                    flush.add(text)
                    if flush.task is not None:  # a reader that stops reading holds it (note 8)
                        await asyncio.shield(flush.task)
                    continue
                if tail is not None:
                    payload = b"%b%b%b" % (head, dumps(text), tail(result.deltas))
                    seq = append(payload)
                    for reader in self._following:  # design note 8
                        try:
                            await reader.deliver(seq, payload)
                        except ConnectionError:
                            self.leave(reader)  # the last one leaving ends the generation
                            if self._forced is not None:
                                raise  # stop before another read: its text would go nowhere
                if first:
                    first_written()
            if flush is not None:
                await flush.drain()  # the last text, before the terminal event
            parser = stream.parser
            if self.passthrough and parser.chunks:  # a whole answer's one chunk
                await self._relay(parser.chunks)
            if isinstance(parser, ChunkRelay) and parser.tail:  # ended whole: note 13
                await self._relay(parser.tail)
            result.usage = parser.usage
            result.finish_reason = parser.reason
            if parser.model:
                result.model = parser.model

    async def _relay(self, chunks: list[bytes]) -> None:
        """Append a passthrough stream's chunks as events and write them to the readers that
        follow (note 13)."""
        append = self.log.append
        for payload in chunks:
            seq = append(payload)
            for reader in self._following:
                try:
                    await reader.deliver(seq, payload)
                except ConnectionError:
                    self.leave(reader)
                    if self._forced is not None:
                        raise
        chunks.clear()

    async def _publish(self, payload: bytes) -> None:
        """Append one event and write it to the readers that follow; a reader whose write fails
        leaves (the last one leaving ends the generation). For a held frame (note 14)."""
        seq = self.log.append(payload)
        for reader in self._following:
            try:
                await reader.deliver(seq, payload)
            except ConnectionError:
                self.leave(reader)

    def _watch(self) -> None:
        """The watchdog: a timer callback, re-armed for the next deadline (note 15)."""
        self._watchdog = None
        s, loop = self.settings, asyncio.get_running_loop()
        clocks = self.clocks or Clocks(s.first_token_timeout_s, s.idle_timeout_s, s.max_stream_s)
        now = loop.time()
        last = self._last_token if self.result.deltas else None
        step = next_step(clocks, now, self.arrived, last)
        if step.outcome is not None:
            self.expire(step.outcome)
            return
        self._watchdog = loop.call_at(min(step.wake, now + 3600.0), self._watch)

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
            upstream=self._attempts.server,
            upstream_error=result.upstream_error_kind,
            upstream_detail=result.upstream_error_detail,
            finish_reason=result.finish_reason,
            usage_estimated=result.usage is None,
            readers=self._attached,
            resumes=self._resumes,
        )
