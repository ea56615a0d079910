"""A stream's events in Redis, so a reader on any instance can resume it (`REDIS_URL`).

The producing instance `publish`es a generation's `EventLog`; one flusher task per instance
copies every published log's new events into Redis. A reader anywhere `open`s a stream by id and
`read`s it from a cursor: the events after it, then the live ones, ending after the terminal
event. Keys of one stream share a hash tag, `aistream:resume:{<id>}:<kind>`:

- `events`: a Redis Stream; event n is entry `"<n>-0"` with field `d` (its payload, one JSON
  line), so resuming after n events is one `XREAD` from `"<n>-0"`. The end is the entry
  `"<N>-1"` (field `e`), right after the last event N: a reader stops at an entry whose sequence
  part is 1. Never trimmed.
- `meta`: a hash (`StreamMeta`), plus `ended` = N once the end entry is written.
- `lease`: the producer's lease, TTL `lease_s`, renewed by the flusher.
- `cancel`: set by `request_cancel`; the producer's flusher sees it and calls `on_cancel` once.
- `readers`: "a reader is present", TTL `2 * lease_s`, kept alive by `RemoteStream.read`.
And one set for all instances, `aistream:resume:live`: a sorted set of running stream ids scored
by their lease deadline (the producer's clock), for the sweep.

Interface (what the relay and the routes call):
- `connect(url, lease_s=3.0) -> redis.asyncio.Redis`: a client with fitting timeouts.
- `SharedStreams(redis, instance=..., flush_ms=..., ttl_s=..., lease_s=3.0, metrics=None,
  on_orphan=None, outage_s=10.0)`, `await start()`, `await aclose()` (the client stays the
  caller's to close).
- `publish(meta, log, on_cancel) -> Publication`: synchronous, no round trip; the log is read
  from the flusher's task only. `Publication.remote_readers()` is what the last flush saw;
  `Publication.claimed` is true when a reader declared the producer dead (note 5).
- `await open(stream_id, cursor=None) -> RemoteStream | None`, one round trip: with a reader's
  `cursor`, it also reads the entries after it (where `read(cursor)` starts, with no round trip
  before them), or, at or past what Redis holds, asks the producer to flush (note 10);
  `RemoteStream.meta`,
  `RemoteStream.at_open` (`(events, ended)` as of `open`),
  `await RemoteStream.length() -> (events, ended)`,
  `await RemoteStream.wait_past(length, cursor, timeout_s) -> (events, ended)` (one blocking read
  until Redis holds more than `length`), `RemoteStream.read(after)` (async iterator of
  `(n, payload)`; an async generator: close it, or run it to its end).
- `request_flush(stream_id, after=-1) -> bool`: the producer's side of note 10 (what its
  listener calls; `watching` names the streams waiting for their next event);
  `await flush(only=None) -> bool` is public for tests.
- `await request_cancel(stream_id, owner) -> bool`: the producer's `on_cancel` runs within a
  round trip (note 9).
- `on_orphan(meta, text)` runs once per dead producer's stream, awaited in the task of whichever
  claimed it (a reader's `read` or the sweep); `claim(meta)` and `sweep()` are public for tests.
Redis errors from `open`, `length` and `request_cancel` propagate (`RedisError`), and from
`read` once Redis has been out of reach for `outage_s` (note 7): what a failed read means to a
client is the route's business. The flusher and the sweep never raise.

Design notes:
1. One pipeline per flush for all published streams with something to send, never one round
   trip per token: one `EVALSHA` of `APPEND` per `BATCH` streams (their new events, expiry and
   lease, and back their cancel flags and reader presence), plus the live set's update. One
   call for many streams, answering one string, rather than one per stream: redis-py's packing
   and parsing per command and per reply element cost more than the work (at model pace, 200
   streams at 30 events/s, `bench/shared_streams.py`: 15 µs of CPU per event with a call per
   stream, 8 µs so). The keys of one call span hash slots, so this needs a Redis that
   is not a cluster. Nothing is sent when nothing changed, except that each stream's lease and
   expiry are renewed every `lease_s / 3`. The pumps never wait for Redis: a log is only read,
   in the flusher's task, and what Redis has not taken yet stays in the log (which is
   authoritative) and goes out at the next flush.
2. `APPEND` checks that the stream holds exactly the events the producer believes it flushed. A
   Redis that restarted empty (or lost the stream) answers with its length instead; the
   producer then sends the meta and every event again at the next flush. A failed pipeline is
   retried at the next tick, after a backoff that doubles up to `lease_s / 3` (one log line per
   run of failures, one when it recovers).
3. Expiry: an ended stream's keys expire `max(ttl_s, lease_s)` after the end (a `RESUME_TTL_S`
   of 0 still lets readers in flight read the end). A running stream's keys expire that plus
   `lease_s` after their last renewal, which leaves a sweep (every `lease_s / 2`) time to claim
   a dead producer's stream after its lease lapsed and before its keys go. So a killed
   producer leaves nothing `max(ttl_s, lease_s) + 1.5 * lease_s` after its death (claimed), or
   `max(ttl_s, lease_s) + lease_s` (no instance left to claim it). The live set expires with
   its last renewal the same way.
4. A dead producer: a reader whose `XREAD` waited `lease_s / 3` with nothing, and a sweep every
   `lease_s / 2` on every instance over the live set's overdue entries, try `CLAIM`: atomically,
   only when the lease is gone and the stream has not ended, it appends `meta.lost` as the next
   event and the end entry. Exactly one claimer wins; it reconstructs the text that reached
   Redis (`relayed_text`) and awaits `on_orphan(meta, text)`. Readers then read the lost event
   as their terminal one: within `lease_s` plus `lease_s / 3` plus a round trip of the death.
   A stream whose keys are gone altogether (expired, or a Redis that restarted empty with no
   producer to fill it again) ends its readers with `meta.lost` too, after `lease_s` of absence.
5. A producer whose lease lapsed while it was alive (Redis unreachable for over `lease_s`) finds
   its stream claimed at its next flush: its publication is dropped and marked `claimed`; the
   local readers go on, the remote ones have their terminal event.
6. Presence is refreshed by a reader between two reads, not while its consumer holds it
   suspended at a `yield` (a client slow to take a write), so a reader blocked for over
   `2 * lease_s` may be seen absent. The refresh goes in one pipeline with the read it precedes
   (no round trip of its own before a reader's first event).
7. A reader rides out a Redis it cannot reach for up to `outage_s` (default 10), retrying every
   `lease_s / 3` from its cursor, then raises: a Redis restart costs a reader a pause, not its
   stream. The client's `socket_timeout` must exceed `lease_s / 3` (the blocking `XREAD`).
   A reader holds one connection while it blocks, so the client's pool is a blocking one of
   `MAX_CONNECTIONS` (redis-py's default of 100 failed lookups with `MaxConnectionsError` once
   a hundred readers were waiting: the bench's reconnect scenario): past it a command waits
   for a free connection, up to the lease, instead of failing.
8. Memory stays bounded through a long Redis outage: an ended log that the flusher could not
   hand over within `max(ttl_s, lease_s)` (when Redis would have dropped it anyway) is given
   up (logged); a reader elsewhere ends with `meta.lost` once the lease has lapsed.
9. Cancel from another instance: `request_cancel` sets the flag and publishes the stream id on
   the producing instance's channel, `aistream:resume:cancel:<instance>`; each instance
   listens to its own, so `on_cancel` runs within a round trip. The flag, which the flusher
   reads back, covers a message lost while the listener was resubscribing: within a flush while
   the stream produces, within `lease_s / 3` while it is idle.
10. A flush on request: a reader elsewhere whose cursor is at or past what Redis holds of a
   running stream (its first missed event not flushed yet, or events it read on the producing
   instance) would otherwise wait up to `flush_ms` for the next flush. The lookup (`OPEN`, one
   script in one round trip: the meta, the length, whether it ended, and the entries after a
   cursor that Redis holds, up to `READ_COUNT`) then publishes `flush:<id>:<cursor>` on the
   producing instance's channel (note 9's). The producer's listener wakes the flusher if that
   stream has something Redis has not taken, and the flusher sends the streams asked for only,
   in one `APPEND` call, leaving the interval's schedule as it was; requests that arrive during
   a flush go together in the next. When the reader's next event is not produced yet (it is at
   the live edge, or came back before the producer read its next token) the stream is also
   watched: one waiter on its log (`EventLog.wait`, one per stream however many ask), and the
   request is looked at again when an event is appended. So at most one message and two extra
   flushes per reconnect, never one per token; the readers that follow a stream elsewhere
   afterwards get its events at the interval. A producer too old to know the message finds no
   publication of that name and ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .events import EventLog
from .metrics import Metrics

log = structlog.get_logger("service.shared_streams")

LIVE = "aistream:resume:live"
SWEEP_BATCH = 100
BATCH = 200  # streams per APPEND call: bounds how long one call holds Redis (note 1)
KINDS = ("events", "meta", "lease", "cancel", "readers")

# KEYS: five per stream: events, meta, lease, cancel, readers. ARGV: lease ms, a running stream's
# expiry ms, an ended stream's, then per stream: events flushed so far, final (1: write the end
# entry and drop the lease), lease holder, meta field count m, payload count p, m fields and
# values, p payloads. Reply: one string, four integers per stream, comma-separated (one reply
# line to parse, not four per stream): status, length, cancel, readers; status 1
# appended, -1 the stream does not hold `flushed` events (length = what it holds; note 2), -2
# the stream has ended without us (claimed, note 5).
APPEND = """
local lease_ms, running_ms, ended_ms = ARGV[1], ARGV[2], ARGV[3]
local out, a = {}, 4
for k = 0, #KEYS - 5, 5 do
  local flushed, final, holder = tonumber(ARGV[a]), ARGV[a + 1] == '1', ARGV[a + 2]
  local m0 = a + 5
  local p0 = m0 + 2 * tonumber(ARGV[a + 3])
  a = p0 + tonumber(ARGV[a + 4])
  local cancel = redis.call('EXISTS', KEYS[k + 4])
  local readers = redis.call('EXISTS', KEYS[k + 5])
  local status, n = 1, redis.call('XLEN', KEYS[k + 1])
  if redis.call('HEXISTS', KEYS[k + 2], 'ended') == 1 then
    status = -2
  elseif n ~= flushed then
    status = -1
  else
    if p0 > m0 then redis.call('HSET', KEYS[k + 2], unpack(ARGV, m0, p0 - 1)) end
    for i = p0, a - 1 do
      n = n + 1
      redis.call('XADD', KEYS[k + 1], n .. '-0', 'd', ARGV[i])
    end
    local expire_ms = running_ms
    if final then
      redis.call('XADD', KEYS[k + 1], n .. '-1', 'e', '1')
      redis.call('HSET', KEYS[k + 2], 'ended', n)
      redis.call('DEL', KEYS[k + 3])
      expire_ms = ended_ms
    else
      redis.call('SET', KEYS[k + 3], holder, 'PX', lease_ms)
    end
    -- the lease has its own TTL, and so has the readers' presence (note 6)
    for _, j in ipairs({1, 2, 4}) do redis.call('PEXPIRE', KEYS[k + j], expire_ms) end
  end
  out[#out + 1] = status .. ',' .. n .. ',' .. cancel .. ',' .. readers
end
return table.concat(out, ',')
"""

# KEYS: events, meta, lease, cancel, readers. ARGV: expiry ms. Reply: {n, payloads...} when this
# call claimed the stream (note 4): n the lost event's number, the payloads those before it;
# {0} when its producer is alive; {-1} when it has ended or is gone.
CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
if redis.call('HEXISTS', KEYS[2], 'ended') == 1 then return {-1} end
local out = {0}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  if entry[2][1] == 'd' then out[#out + 1] = entry[2][2] end
end
local n = redis.call('XLEN', KEYS[1]) + 1
out[1] = n
redis.call('XADD', KEYS[1], n .. '-0', 'd', redis.call('HGET', KEYS[2], 'lost'))
redis.call('XADD', KEYS[1], n .. '-1', 'e', '1')
redis.call('HSET', KEYS[2], 'ended', n)
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1])) end
return out
"""

# Each instance listens on its own channel, this prefix and its instance id (note 9); the two
# scripts that publish there are given it in place of `CHANNEL`.
CHANNEL_PREFIX: Final = "aistream:resume:cancel:"

# KEYS: meta, cancel. ARGV: owner, stream id. Reply: 1 requested (or already ended), 0 unknown or
# not the owner's. The producer hears it on its instance's channel (note 9), else sees the flag.
CANCEL = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'ended', 'instance')
if not meta[1] then return 0 end
if meta[1] ~= '' and meta[1] ~= ARGV[1] then return 0 end
if meta[2] then return 1 end
redis.call('SET', KEYS[2], '1', 'PX', math.max(1, redis.call('PTTL', KEYS[1])))
redis.call('PUBLISH', CHANNEL .. meta[3], ARGV[2])
return 1
""".replace("CHANNEL", repr(CHANNEL_PREFIX))


# KEYS: meta, events. ARGV: the reader's cursor (-1: none), stream id, how many entries to read.
# Reply: {} when the stream is unknown, else {events so far (the end entry left out), ended (0/1),
# m, m meta fields and values..., then entry ids and values}: the entries after the cursor (up to
# the count), or, for a cursor at or past what Redis holds of a running stream, none and a request
# to its producer to flush (note 10).
OPEN = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {} end
local fields = {}
for i = 1, #meta, 2 do fields[meta[i]] = meta[i + 1] end
local cursor = tonumber(ARGV[1])
local n, ended = redis.call('XLEN', KEYS[2]), 0
if fields['ended'] then
  n, ended = tonumber(fields['ended']), 1
elseif fields['instance'] and cursor >= n then
  local request = 'flush:' .. ARGV[2] .. ':' .. ARGV[1]
  redis.call('PUBLISH', CHANNEL .. fields['instance'], request)
end
local out = {n, ended, #meta}
for i = 1, #meta do out[#out + 1] = meta[i] end
if cursor >= 0 and cursor < n then
  local entries = redis.call('XRANGE', KEYS[2], (cursor + 1) .. '-0', '+', 'COUNT', ARGV[3])
  for _, entry in ipairs(entries) do
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
  end
end
return out
""".replace("CHANNEL", repr(CHANNEL_PREFIX))
READ_COUNT = 1000  # entries per read

FLUSH_PREFIX = b"flush:"  # a flush request on an instance's channel; anything else is a cancel

MAX_CONNECTIONS = 1024  # per instance: blocked readers hold one each (note 7)


def connect(url: str, *, lease_s: float = 3.0) -> aioredis.Redis:
    """A client fit for `SharedStreams`: bytes replies, a read timeout above the readers'
    blocking wait, a blocking pool of `MAX_CONNECTIONS` (note 7), one reconnect on a stale
    connection (as the stores do)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=lease_s,
        socket_connect_timeout=1.0,
        socket_timeout=lease_s / 3 + 2.0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(RedisError, OSError):
        await cast(Any, pubsub).aclose()  # redis-py leaves it untyped


def keys_of(stream_id: str) -> list[str]:
    """The stream's keys, in the order the scripts take them."""
    return [f"aistream:resume:{{{stream_id}}}:{kind}" for kind in KINDS]


@dataclass(frozen=True, slots=True)
class StreamMeta:
    stream_id: str
    route: str
    owner: str  # the API key's id, "" when keys are off
    instance: str
    created: float
    lost: bytes  # the terminal payload readers get if the producer dies (one JSON line)
    conversation_id: str | None = None  # chat answers
    message_id: str | None = None

    def fields(self) -> list[bytes | str]:
        out: list[bytes | str] = ["route", self.route, "owner", self.owner]
        out += ["instance", self.instance, "created", repr(self.created), "lost", self.lost]
        if self.conversation_id is not None:
            out += ["conversation_id", self.conversation_id]
        if self.message_id is not None:
            out += ["message_id", self.message_id]
        return out

    @classmethod
    def parse(cls, stream_id: str, raw: dict[bytes, bytes]) -> StreamMeta:
        def opt(name: bytes) -> str | None:
            value = raw.get(name)
            return None if value is None else value.decode()

        return cls(
            stream_id=stream_id,
            route=raw[b"route"].decode(),
            owner=raw[b"owner"].decode(),
            instance=raw[b"instance"].decode(),
            created=float(raw[b"created"]),
            lost=raw[b"lost"],
            conversation_id=opt(b"conversation_id"),
            message_id=opt(b"message_id"),
        )


def relayed_text(payloads: list[bytes]) -> str:
    """The text a stream relayed: chat `token` contents and generate `content` deltas, joined."""
    parts: list[str] = []
    for payload in payloads:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        text = event.get("content") if kind == "token" else event.get("delta")
        if kind in ("token", "content") and isinstance(text, str):
            parts.append(text)
    return "".join(parts)


@dataclass(eq=False)
class Publication:
    """A published log, as the flusher sees it."""

    meta: StreamMeta
    events: EventLog
    on_cancel: Callable[[], None]
    flushed: int = 0  # events Redis holds
    renew_at: float = 0.0  # loop time of the next lease renewal when nothing changed
    readers: bool = False
    cancelled: bool = False
    claimed: bool = False  # note 5
    done: bool = False
    sending: int = 0  # events in the flush under way
    final: bool = False  # the flush under way ends the stream
    keys: list[str] = field(default_factory=list)
    ended_at: float | None = None  # loop time the flusher first saw the log ended (note 8)

    def __post_init__(self) -> None:
        self.keys = keys_of(self.meta.stream_id)

    def cancel(self) -> None:
        """Call `on_cancel`, once."""
        if self.cancelled:
            return
        self.cancelled = True
        try:
            self.on_cancel()
        except Exception:
            log.exception("resume.on_cancel_failed", stream_id=self.meta.stream_id)

    def remote_readers(self) -> bool:
        """A reader on any instance was present at the last flush."""
        return self.readers

    def pending(self) -> bool:
        """Something Redis has not taken yet: events, or the end (note 10)."""
        return len(self.events.events) > self.flushed or self.events.ended

    def due(self, now: float) -> bool:
        if self.events.ended and self.ended_at is None:
            self.ended_at = now
        return len(self.events.events) > self.flushed or self.events.ended or now >= self.renew_at

    def stage(self, keys: list[str], args: list[Any]) -> None:
        """Add this stream's part of an `APPEND` call."""
        events = self.events.events
        self.sending = len(events)
        self.final = self.events.ended
        meta = self.meta.fields() if self.flushed == 0 else []
        keys += self.keys
        args += [self.flushed, 1 if self.final else 0, self.meta.instance, len(meta) // 2]
        args += [self.sending - self.flushed, *meta, *events[self.flushed : self.sending]]

    def apply(self, reply: list[int], now: float, renew_s: float) -> int:
        """Take the flush's answer; the number of events appended."""
        status, length, cancel, readers = reply
        self.readers = bool(readers)
        if cancel:
            self.cancel()
        if status == -2:
            self.claimed = self.done = True
            log.warning("resume.stream_claimed", stream_id=self.meta.stream_id)
            return 0
        if status == -1:
            log.warning("resume.stream_lost", stream_id=self.meta.stream_id, length=length)
            self.flushed = 0  # note 2: everything again at the next flush
            return 0
        appended = self.sending - self.flushed
        self.flushed = self.sending
        self.renew_at = now + renew_s
        self.done = self.final
        return appended


class SharedStreams:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        instance: str,
        flush_ms: int,
        ttl_s: float,
        lease_s: float = 3.0,
        metrics: Metrics | None = None,
        on_orphan: Callable[[StreamMeta, str], Awaitable[None]] | None = None,
        outage_s: float = 10.0,
    ) -> None:
        self.redis = redis
        self.outage_s = outage_s
        self.instance = instance
        self.flush_s = flush_ms / 1000
        self.lease_s = lease_s
        self.renew_s = lease_s / 3
        self.lease_ms = max(1, round(lease_s * 1000))
        self.ended_ms = max(1, round(max(ttl_s, lease_s) * 1000))  # note 3
        self.running_ms = self.ended_ms + self.lease_ms
        self.presence_ms = max(1, round(2 * lease_s * 1000))
        self.metrics = metrics
        self.on_orphan = on_orphan
        self.publications: dict[str, Publication] = {}
        self.channel = CHANNEL_PREFIX + instance
        self._append = redis.register_script(APPEND)
        self._claim = redis.register_script(CLAIM)
        self._cancel = redis.register_script(CANCEL)
        self._open = redis.register_script(OPEN)
        self._wanted = asyncio.Event()  # a flush was asked for: the flusher goes now (note 10)
        self._asked: set[str] = set()  # the streams it was asked for
        self.watching: set[str] = set()  # asked for with nothing new yet: flushed at their next
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0

    async def start(self) -> None:
        """Start the flusher, the sweep and the cancel listener (Redis need not be up: each
        retries on its own)."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.script_load(APPEND)
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        subscribed: PubSub | None = pubsub
        try:
            await pubsub.subscribe(self.channel)
        except (RedisError, OSError):
            await _close(pubsub)
            subscribed = None  # the listener subscribes when Redis is back
        self._tasks = [
            asyncio.create_task(self._flusher(), name="resume-flusher"),
            asyncio.create_task(self._sweeper(), name="resume-sweeper"),
            asyncio.create_task(self._listener(subscribed), name="resume-cancels"),
        ]

    async def aclose(self) -> None:
        """Stop the tasks, after one last bounded flush of what is pending."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(self.lease_s, 1.0)):
                await self.flush()

    # -- producer side

    def publish(
        self, meta: StreamMeta, events: EventLog, on_cancel: Callable[[], None]
    ) -> Publication:
        """Copy `events` into Redis from now on, until it has ended and all of it is there."""
        publication = Publication(meta, events, on_cancel)
        self.publications[meta.stream_id] = publication
        return publication

    async def flush(self, only: Iterable[str] | None = None) -> bool:
        """One pipeline for every publication with something to send (or for those of `only`,
        the streams readers asked for: note 10); False when Redis failed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if only is None:
            publications: Iterable[Publication] = self.publications.values()
        else:
            publications = filter(None, map(self.publications.get, only))
        due = [p for p in publications if p.due(now)]
        for p in due:
            if p.ended_at is not None and now - p.ended_at > self.ended_ms / 1000:  # note 8
                log.warning("resume.stream_not_flushed", stream_id=p.meta.stream_id)
                del self.publications[p.meta.stream_id]
        due = [p for p in due if self.publications.get(p.meta.stream_id) is p]
        if not due:
            return True
        pipe = self.redis.pipeline(transaction=False)
        batches = [due[i : i + BATCH] for i in range(0, len(due), BATCH)]
        for batch in batches:
            keys: list[str] = []
            args: list[Any] = [self.lease_ms, self.running_ms, self.ended_ms]
            for p in batch:
                p.stage(keys, args)
            pipe.evalsha(self._append.sha, len(keys), *keys, *args)
        deadline = time.time() + self.lease_s
        if running := {p.meta.stream_id: deadline for p in due if not p.final}:
            pipe.zadd(LIVE, running)
            pipe.pexpire(LIVE, self.running_ms)
        if ended := [p.meta.stream_id for p in due if p.final]:
            pipe.zrem(LIVE, *ended)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as err:
            self._failed(err)
            return False
        if self.metrics is not None:
            self.metrics.resume_redis_flushes.inc()
        now = loop.time()
        appended = 0
        unloaded = failed = False
        for batch, reply in zip(batches, replies, strict=False):
            if isinstance(reply, NoScriptError):  # a Redis that restarted: note 2
                unloaded = True
                continue
            if isinstance(reply, Exception):
                self._failed(reply)
                failed = True
                continue
            values = [int(x) for x in reply.split(b",")]
            for n, p in enumerate(batch):
                appended += p.apply(values[4 * n : 4 * n + 4], now, self.renew_s)
                if p.done and self.publications.get(p.meta.stream_id) is p:
                    del self.publications[p.meta.stream_id]
        if unloaded:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.script_load(APPEND)
        if self.metrics is not None and appended:
            self.metrics.resume_redis_events.inc(appended)
        if self._failures and not failed:
            log.info("resume.redis_recovered", failures=self._failures)
            self._failures = 0
        return True

    def _failed(self, err: BaseException) -> None:
        if not self._failures:
            log.warning("resume.redis_failed", error=repr(err))
        self._failures += 1

    def request_flush(self, stream_id: str, after: int = -1) -> bool:
        """A reader elsewhere at cursor `after` waits for this stream's next events (note 10):
        flush now, when it has something Redis has not taken yet; and when the reader's next
        event is not produced yet, again as soon as it is. Whether a flush was asked for now."""
        found = self.publications.get(stream_id)
        if found is None:
            return False
        log = found.events
        if len(log.events) <= after and not log.ended and stream_id not in self.watching:
            self.watching.add(stream_id)  # one waiter per stream, however many ask
            log.wait().add_done_callback(functools.partial(self._next, stream_id, after))
        if not found.pending():
            return False
        self._asked.add(stream_id)
        self._wanted.set()
        return True

    def _next(self, stream_id: str, after: int, _: asyncio.Future[None]) -> None:
        """A watched stream has a new event (or has ended): look again."""
        self.watching.discard(stream_id)
        self.request_flush(stream_id, after)

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self.flush_s
        wanted = self._wanted
        tick = loop.time() + pause
        while True:
            if not wanted.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(tick):
                        await wanted.wait()  # the interval, or a reader's request (note 10)
            wanted.clear()
            # asked for before the interval is up: those streams only, the interval unchanged
            only = self._asked if loop.time() < tick else None
            self._asked = set()
            try:
                ok = await self.flush(only)
            except Exception:  # never let the flusher die; the next tick retries
                log.exception("resume.flush_error")
                ok = False
            if only is None:
                pause = self.flush_s if ok else min(max(pause * 2, self.flush_s), self.renew_s)
                tick = loop.time() + pause

    # -- any instance

    async def open(self, stream_id: str, cursor: int | None = None) -> RemoteStream | None:
        """The stream as Redis holds it now (`RemoteStream.at_open`), in one round trip; a
        reader's `cursor` at or past what Redis holds asks the producer to flush (note 10)."""
        keys = keys_of(stream_id)
        args: list[int | str] = [-1 if cursor is None else cursor, stream_id, READ_COUNT]
        reply: Any = await self._open(keys=[keys[1], keys[0]], args=args)
        if not reply:
            return None
        end = 3 + int(reply[2])
        raw = dict(zip(reply[3:end:2], reply[4:end:2], strict=True))
        if b"lost" not in raw:
            return None
        remote = RemoteStream(self, StreamMeta.parse(stream_id, raw))
        remote.at_open = (int(reply[0]), bool(reply[1]))
        if cursor is not None and end < len(reply):
            entries = list(zip(reply[end::2], reply[end + 1 :: 2], strict=True))
            remote.prefetched = (cursor, entries)
        return remote

    async def request_cancel(self, stream_id: str, owner: str) -> bool:
        keys = keys_of(stream_id)
        return bool(await self._cancel(keys=[keys[1], keys[3]], args=[owner, stream_id]))

    async def _listener(self, pubsub: PubSub | None) -> None:
        """Cancels published to this instance's channel (note 9); resubscribes after a failure."""
        pause = self.flush_s
        while True:
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    pause = self.flush_s
                    if message is not None and message["type"] == "message":
                        data: bytes = message["data"]
                        if data.startswith(FLUSH_PREFIX):
                            stream_id, _, after = data[len(FLUSH_PREFIX) :].decode().partition(":")
                            self.request_flush(stream_id, int(after) if after.isdigit() else -1)
                            continue
                        found = self.publications.get(data.decode())
                        if found is not None:
                            found.cancel()
            except (RedisError, OSError) as err:
                log.warning("resume.cancels_failed", error=repr(err))
            finally:
                if pubsub is not None:
                    await _close(pubsub)
                    pubsub = None
            await asyncio.sleep(pause)  # bounded backoff before subscribing again
            pause = min(pause * 2, self.renew_s)

    async def claim(self, meta: StreamMeta) -> bool | None:
        """End a stream whose producer is gone (note 4): True for the one caller that did, False
        while its producer is alive, None when it has ended or is gone."""
        reply: Any = await self._claim(keys=keys_of(meta.stream_id), args=[self.ended_ms])
        status = int(reply[0])
        if status <= 0:
            return None if status < 0 else False
        if self.metrics is not None:
            self.metrics.resume_orphans.inc()
        log.warning("resume.producer_lost", stream_id=meta.stream_id, instance=meta.instance)
        if self.on_orphan is not None:
            try:
                await self.on_orphan(meta, relayed_text(reply[1:]))
            except Exception:
                log.exception("resume.on_orphan_failed", stream_id=meta.stream_id)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(LIVE, meta.stream_id)
        return True

    async def sweep(self) -> int:
        """Claim the overdue streams of the live set; how many this call claimed."""
        overdue: Any = await self.redis.zrangebyscore(LIVE, "-inf", time.time(), 0, SWEEP_BATCH)
        claimed = 0
        for raw_id in overdue:
            stream_id = raw_id.decode()
            if stream_id in self.publications:
                continue  # ours and alive: the flusher renews it
            remote = await self.open(stream_id)
            outcome = None if remote is None else await self.claim(remote.meta)
            if outcome is None:  # ended or gone: nothing to watch
                await self.redis.zrem(LIVE, stream_id)
            claimed += bool(outcome)
        return claimed

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 2)  # note 3
            try:
                await self.sweep()
            except (RedisError, OSError) as err:
                log.warning("resume.sweep_failed", error=repr(err))


class RemoteStream:
    """A stream read from Redis, on any instance."""

    def __init__(self, shared: SharedStreams, meta: StreamMeta) -> None:
        self.shared = shared
        self.meta = meta
        self.keys = keys_of(meta.stream_id)
        self.at_open = (0, False)  # `length()` as of `open`, from the same round trip
        # the entries after the reader's cursor that `open` read with it: `read` starts there
        self.prefetched: tuple[int, list[tuple[bytes, bytes]]] = (-1, [])

    async def length(self) -> tuple[int, bool]:
        """Events so far (as far as Redis has them), and whether the last one is the terminal."""
        pipe = self.shared.redis.pipeline(transaction=False)
        pipe.hget(self.keys[1], "ended")
        pipe.xlen(self.keys[0])
        ended, length = await pipe.execute()
        if ended is not None:
            return int(ended), True
        return int(length), False

    async def wait_past(self, length: int, cursor: int, timeout_s: float) -> tuple[int, bool]:
        """Wait up to `timeout_s` for what Redis holds to grow past `length` events, towards
        `cursor` (one blocking `XREAD`, woken by the flush that appends: no polling); the new
        `length()`, or `(length, False)` when nothing came."""
        block_ms = max(1, round(timeout_s * 1000))
        reply: Any = await self.shared.redis.xread(
            {self.keys[0]: f"{length}-0"}, count=max(1, cursor - length), block=block_ms
        )
        if not reply:
            return length, False
        seq, part = reply[0][1][-1][0].decode().split("-")
        return int(seq), part == "1"

    async def read(self, after: int) -> AsyncGenerator[tuple[int, bytes], None]:
        """Events `after + 1`... then the live ones, ending after the terminal event (at once
        for a cursor at or past the end of an ended stream: the caller checks cursors)."""
        shared, redis = self.shared, self.shared.redis
        loop = asyncio.get_running_loop()
        block_ms = max(1, round(shared.renew_s * 1000))
        cursor, last_id = after, f"{after}-0"
        present_at = -float("inf")
        missing_since: float | None = None
        failing_since: float | None = None
        state = "live"
        prefetched_after, entries = self.prefetched
        self.prefetched = (-1, [])
        if prefetched_after == after:  # what `open` read: no round trip before these
            for entry_id, payload in entries:
                last_id = entry_id.decode()
                seq, part = last_id.split("-")
                if part == "1":
                    return
                cursor = int(seq)
                yield cursor, payload
        while True:
            now = loop.time()
            try:
                # once the stream is known to have ended, one more read without waiting
                block = None if state == "ended" else block_ms
                reply: Any
                if now - present_at >= shared.renew_s:  # with the read: one round trip
                    pipe = redis.pipeline(transaction=False)
                    pipe.set(self.keys[4], b"1", px=shared.presence_ms)
                    pipe.xread({self.keys[0]: last_id}, count=READ_COUNT, block=block)
                    _, reply = await pipe.execute()
                    present_at = now
                else:
                    reply = await redis.xread(
                        {self.keys[0]: last_id}, count=READ_COUNT, block=block
                    )
                if not reply and state == "ended":
                    return  # the cursor is at or past the end
                state = "live" if reply else await self._check(shared)
            except (RedisConnectionError, RedisTimeoutError, OSError):  # note 7
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= shared.outage_s:
                    raise
                await asyncio.sleep(shared.renew_s)  # bounded by outage_s: Redis is unreachable
                continue
            failing_since = None
            if reply:
                for entry_id, fields in reply[0][1]:
                    last_id = entry_id.decode()
                    seq, part = last_id.split("-")
                    if part == "1":
                        return
                    cursor = int(seq)
                    yield cursor, fields[b"d"]
            if state != "gone":
                missing_since = None
                continue
            missing_since = now if missing_since is None else missing_since
            if now - missing_since >= shared.lease_s:  # note 4
                yield cursor + 1, self.meta.lost
                return

    async def _check(self, shared: SharedStreams) -> str:
        """After a silent wait: "ended", "gone" (no meta), else "live" (after claiming the
        stream if its producer's lease has lapsed; the lost event then comes in the stream)."""
        pipe = shared.redis.pipeline(transaction=False)
        pipe.exists(self.keys[1])
        pipe.exists(self.keys[2])
        pipe.hexists(self.keys[1], "ended")
        has_meta, has_lease, ended = await pipe.execute()
        if not has_meta:
            return "gone"
        if ended:
            return "ended"
        if not has_lease:
            await shared.claim(self.meta)
        return "live"


__all__ = [
    "Publication",
    "RemoteStream",
    "SharedStreams",
    "StreamMeta",
    "connect",
    "relayed_text",
]
