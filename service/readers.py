"""Readers of a generation: an SSE response (in the frame shape its `Accept` asks for) and the
JSON routes' collector; and how a handler starts an admitted request's generation with the reader
it answers with (`generation_for`, then `stream` or `collect`). A reader attaches to a
generation, writes its event log from a cursor, and leaves on every exit; the generation's clocks
and outcome are not its business, its own connection's are: the heartbeat and the write deadline
(`relay` design note 4).

An SSE reader catches up with the log in its own task (the first event, then whatever came
meanwhile), then follows: the generation's pump writes the next events to it directly (`relay`
design note 8). Its task then only sleeps until its next heartbeat or write deadline, or the end
of the log, and writes the terminal event itself.

A reader that comes back (`resume`: the stream route, or a POST retried with `Last-Event-ID`)
is the same SSE reader started at its cursor: it catches up from event cursor + 1, then follows.
It holds nothing of the generation's (no slot, no account): its handler returns when it leaves.
A stream read from another instance (`RemoteStream`) is written by `serve_remote` with the same
framing, heartbeat and write deadline.

Design notes:
1. A frame's write returns once the transport has drained below its high-water mark (a flag
   check, no system call), so for a reader that stops reading the write blocks once a bounded
   amount is queued (`tcp.STREAM_QUEUE_BOUND`) and the write deadline can fire; aiohttp alone
   waits only every 64 KiB written. A write that misses its deadline aborts the connection: the
   client is treated as gone (as when it disconnects), and nothing waits on it any more.
2. A remote reader (`serve_remote`) waits for its next event in a task of its own, so that its
   heartbeat can go out meanwhile; when its client leaves, that task is cancelled, and cancelled
   again every 0.1 s until it has ended: redis-py can swallow one cancellation (it retries a
   command on a fresh connection when the cancelled one was dropped), and a read that went on
   would keep the reader's presence alive in Redis, holding the generation elsewhere.
3. Once bound, a frame goes to the response's own writer (`StreamResponse.write` only checks that
   the response is prepared and not ended, which a reader's frames always are), and the drain
   is awaited only when the transport holds unsent bytes: with none it is below its high-water
   mark, so the drain would return at once. Fewer coroutine calls per token, the same bound.
4. When that writer is aiohttp's own, for a chunked body with its headers sent and nothing to
   do per write (no compression, no chunk or body-write callbacks, no declared length), a frame
   is written to the transport as one HTTP chunk (`size CRLF frame CRLF`, the bytes aiohttp
   would write), its output size kept: one bytes format and one transport call per token
   instead of the writer's coroutine and its three helpers. A closing transport goes through
   the writer, which raises the connection error the reader expects.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from . import keys, sse, tcp
from .relay import Generation, Meter, RemoteStream, Result, Vocabulary
from .tasks import outlive_cancel
from .upstream import CompletionRequest


class SseReader:
    """One prepared response reading one generation, with the stamps its watch reads."""

    __slots__ = (
        "_chunked",
        "_generation",
        "_loop",
        "_on_ping",
        "_out",
        "_request",
        "_resp",
        "cursor",
        "framing",
        "heartbeat_s",
        "last_write",
        "lost",
        "resumed",
        "write_timeout_s",
        "writing_since",
    )

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        generation: Generation,
        *,
        write_timeout_s: float,
        heartbeat_s: float,
        on_ping: Callable[[], None],
        cursor: int = 0,
        resumed: bool = False,
    ) -> None:
        self._request = request
        self._resp = response
        self._generation = generation
        self._out: AbstractStreamWriter | None = None  # bound at the first write (note 1)
        self._chunked = False  # its frames can be written to the transport as chunks (note 4)
        self._loop = asyncio.get_running_loop()
        self._on_ping = on_ping
        self.framing = sse.Framing.for_accept(request.headers.get("Accept"), generation.stream_id)
        self.write_timeout_s = write_timeout_s
        self.heartbeat_s = heartbeat_s
        self.cursor = cursor  # the last event written (or read before: a resumed reader's)
        self.resumed = resumed
        self.last_write = self._loop.time()
        self.writing_since = 0.0
        self.lost = False

    async def _write(self, data: bytes) -> None:
        self.writing_since = now = self._loop.time()
        out = self._out
        if out is None:  # the first write, or a response with no bounds (not on a TCP socket)
            await self._resp.write(data)
            out = self._out = self._resp.get(tcp.STREAM_OUT)
            if out is not None:
                self._chunked = _plain_chunks(out)
                await out.drain()  # design note 1
        else:
            transport = out.transport
            if self._chunked and transport is not None and not transport.is_closing():
                chunk = b"%x\r\n%b\r\n" % (len(data), data)  # design note 4
                transport.write(chunk)
                out.output_size += len(chunk)
            else:
                await out.write(data)  # the response's own writer (note 3)
                transport = out.transport
            if transport is not None and transport.get_write_buffer_size():
                await out.drain()  # design note 1
        self.writing_since = 0.0
        self.last_write = now

    async def deliver(self, seq: int, payload: bytes) -> None:
        """Event `seq`, written by the generation's pump once this reader follows."""
        await self._write(self.framing.frame(seq, payload))
        self.cursor = seq

    def _drop(self) -> None:
        """The client did not take a write in time: drop its connection (note 1) and leave."""
        self.lost = True
        transport = self._out.transport if self._out is not None else None
        if transport is not None:
            transport.abort()
        self._generation.leave(self)

    async def run(self) -> None:
        """Send the headers, then the generation's events until its end or the client's."""
        generation = self._generation
        generation.attach(self, resumed=self.resumed)
        try:
            await self._resp.prepare(self._request)
            await self._catch_up()
            if self.lost or generation.log.ended:
                return
            generation.follow(self)
            await self._watch()
            if not self.lost:
                await self._catch_up()  # the terminal event
        except ConnectionError:
            self.lost = True  # a write to the client failed: it is gone
        finally:
            generation.leave(self)

    async def _catch_up(self) -> None:
        """Write what the log holds past the cursor, each frame within the write deadline."""
        generation = self._generation
        events = generation.log.events
        while self.cursor < len(events) and not self.lost:
            seq = self.cursor + 1
            try:
                async with asyncio.timeout(self.write_timeout_s or None):
                    await self._write(self.framing.frame(seq, events[seq - 1]))
            except TimeoutError:
                self._drop()
                return
            self.cursor = seq
            generation.known = True  # the client has the stream id: relay design note 9

    async def _watch(self) -> None:
        """Sleep until the end of the log, pinging when the stream has been silent for the
        heartbeat interval and dropping a client that does not take a write in time."""
        log = self._generation.log
        loop, heartbeat_s, write_timeout_s = self._loop, self.heartbeat_s, self.write_timeout_s
        while not log.ended and not self.lost:
            now = loop.time()
            wake = math.inf
            if self.writing_since:
                if write_timeout_s:
                    if now - self.writing_since >= write_timeout_s:
                        return self._drop()
                    wake = self.writing_since + write_timeout_s
            elif heartbeat_s:
                ping_at = self.last_write + heartbeat_s
                if now >= ping_at:
                    try:
                        async with asyncio.timeout(write_timeout_s or None):
                            await self._write(self.framing.ping)
                    except (TimeoutError, ConnectionError):
                        return self._drop()
                    self._on_ping()
                    continue
                wake = ping_at
            try:
                async with asyncio.timeout(min(wake - now, 3600.0)):
                    await log.wait_end()  # a future of its own: the timeout cancels only that
            except TimeoutError:
                pass
        return None


def _plain_chunks(out: AbstractStreamWriter) -> bool:
    """Whether `out` is aiohttp's own writer of a chunked body, its headers sent, with nothing
    of its own to do per write (no compression, no chunk or body-write callbacks, no declared
    length): then a frame can go to the transport as one chunk (design note 4)."""
    return (
        type(out) is StreamWriter
        and out.chunked
        and out.length is None
        and getattr(out, "_compress", True) is None
        and getattr(out, "_on_chunk_sent", True) is None
        and getattr(out, "on_body_write", True) is None
        and getattr(out, "_headers_buf", True) is None
        and getattr(out, "_headers_written", False) is True
    )


class Collector:
    """The JSON routes' reader: attached until the generation ends, it writes nothing."""

    __slots__ = ("_generation",)

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    async def run(self) -> Result:
        generation = self._generation
        generation.attach(self)
        try:
            return await generation.finished()
        finally:
            generation.leave(self)


# --- a handler's generation and its reader -------------------------------------------------


def sse_response(request: web.Request, stream_id: str) -> web.StreamResponse:
    """An SSE answer's response: the SSE headers and `X-Stream-ID`."""
    return web.StreamResponse(headers={**sse.HEADERS, sse.STREAM_ID_HEADER: stream_id})


def sse_reader(
    request: web.Request,
    response: web.StreamResponse,
    generation: Generation,
    cursor: int = 0,
    resumed: bool = False,
) -> SseReader:
    """An SSE reader of `generation` into `response`, with the app's write deadline, heartbeat
    and ping counter."""
    app = request.app
    settings, metrics = app[keys.SETTINGS], app[keys.METRICS]
    return SseReader(
        request,
        response,
        generation,
        write_timeout_s=settings.write_timeout_s,
        heartbeat_s=settings.heartbeat_interval_s,
        on_ping=metrics.heartbeats.inc,
        cursor=cursor,
        resumed=resumed,
    )


async def resume(request: web.Request, generation: Generation, cursor: int) -> web.StreamResponse:
    """Answer with a reader of `generation` from event `cursor` + 1 (already checked against its
    log): the log's events past it, then the live ones, the terminal event last. Returns when the
    reader leaves; it held nothing of the generation's."""
    response = sse_response(request, generation.stream_id)
    await sse_reader(request, response, generation, cursor, resumed=True).run()
    return response


async def serve_remote(
    request: web.Request, stream_id: str, remote: RemoteStream, cursor: int
) -> web.StreamResponse:
    """Answer with the events of a stream read from elsewhere, from event `cursor` + 1 (already
    checked), framed as a local reader's, with its heartbeat and write deadline (a write waits
    for the transport to drain, as a local reader's: note 1)."""
    settings, metrics = request.app[keys.SETTINGS], request.app[keys.METRICS]
    heartbeat_s, write_timeout_s = settings.heartbeat_interval_s, settings.write_timeout_s
    framing = sse.Framing.for_accept(request.headers.get("Accept"), stream_id)
    response = sse_response(request, stream_id)
    events = remote.events(cursor)
    pending: asyncio.Future[bytes] | None = None
    seq = cursor

    async def write(data: bytes) -> None:
        async with asyncio.timeout(write_timeout_s or None):
            await response.write(data)
            out = response.get(tcp.STREAM_OUT)
            if out is not None:
                await out.drain()

    try:
        await response.prepare(request)
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=heartbeat_s or None)
            if not done:
                await write(framing.ping)
                metrics.heartbeats.inc()
                continue
            try:
                payload = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            seq += 1
            await write(framing.frame(seq, payload))
    except (ConnectionError, TimeoutError):
        transport = request.transport
        if transport is not None:
            transport.abort()  # the client is gone, or did not take a write in time
    finally:
        await outlive_cancel(_stop_reading(pending, remote))
    return response


_CANCEL_TRIES = 20
_CANCEL_WAIT_S = 0.1


async def _stop_reading(pending: asyncio.Future[bytes] | None, remote: RemoteStream) -> None:
    """Stop a remote read: the read in flight first (its generator is running), then the rest.
    The Redis client can absorb a cancellation (its retry of a command whose connection the
    cancellation dropped), so the read is cancelled again until it ends (note 2)."""
    if pending is not None:
        for _ in range(_CANCEL_TRIES):
            pending.cancel()
            await asyncio.wait({pending}, timeout=_CANCEL_WAIT_S)
            if pending.done():
                break
        else:
            await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # retrieved: the reader is leaving anyway
    await remote.aclose()


def generation_for(
    request: web.Request,
    route: str,
    upstream_request: CompletionRequest,
    meter: Meter | None,
    *,
    vocabulary: Vocabulary | None = None,
    opening: dict[str, Any] | None = None,
    stream_id: str | None = None,
    on_end: Callable[[Result], Awaitable[None]] | None = None,
) -> Generation:
    """The generation for an admitted request, wired to the app's upstream and metrics and to
    its account with the limits (`meter`); its stream id is `stream_id` (chat: the answer's
    message id) or a fresh one. Streamed answers give the `vocabulary` of their events and the
    first event."""
    app = request.app
    return Generation(
        settings=app[keys.SETTINGS],
        upstream=app[keys.UPSTREAM],
        metrics=app[keys.METRICS],
        route=route,
        request=upstream_request,
        request_id=request[keys.REQUEST_ID],
        arrived=request[keys.ARRIVED],
        stream_id=stream_id or sse.new_stream_id(),
        owner=request.get(keys.KEY_ID) or "",
        vocabulary=vocabulary,
        opening=opening,
        meter=meter,
        on_end=on_end,
    )


async def stream(request: web.Request, generation: Generation) -> web.StreamResponse:
    """Start `generation` and answer with an SSE reader of it (the SSE headers and
    `X-Stream-ID`); returns once the generation has ended, so what the handler holds around it
    (a slot, an account, a chat turn) is given back after, whatever ended it."""
    response = sse_response(request, generation.stream_id)
    reader = sse_reader(request, response, generation)
    request.app[keys.LIVE].start(generation)
    try:
        await reader.run()
    finally:
        if not generation.ended:  # its reader left early: wait for the generation to end
            await outlive_cancel(generation.finished())
    return response


async def collect(request: web.Request, generation: Generation) -> Result:
    """Start `generation` and wait for its result (the JSON routes); a client that leaves
    meanwhile ends it, and this returns (or re-raises) only once it has ended."""
    request.app[keys.LIVE].start(generation)
    try:
        return await Collector(generation).run()
    finally:
        if not generation.ended:  # the client left: wait for the generation to end
            await outlive_cancel(generation.finished())
