"""Coming back to a stream, and stopping one: `GET /api/v1/ai/streams/{streamId}` (read from a
cursor, then live), a retried `POST` of a streaming route carrying `Last-Event-ID` (`resume_post`,
called first by those handlers), and `POST /api/v1/ai/streams/{streamId}/cancel`.

Design notes:
1. Reading needs only the stream id: it is server-minted (128 random bits) and sent only to the
   client that started the stream, and a browser `EventSource` cannot send a key. So the read
   route passes the key check (`web.KEYLESS_ROUTES`); stopping needs the owner's key, and a
   stream of another key is answered 404 like an unknown one (its existence is not revealed).
2. The GET route answers everything wrong before any event, as a status: 400 for a malformed
   stream id or cursor, a `Last-Event-ID` of another stream, or a cursor beyond the last event
   (a client cannot have read an event that does not exist); 404 for a stream unknown or
   expired here and, with shared streams, elsewhere; 204 for a cursor at the end of a finished
   stream (it tells `EventSource` to stop reconnecting); 429 with `Retry-After: 1` past
   `RESUME_MAX_READERS` readers of the stream.
3. A POST carrying `Last-Event-ID` never gets a 4xx or a 204, which `fetch-event-source` would
   retry forever: a stream of the same route and client (key id; anyone with keys off) is
   resumed exactly as the GET route would; at its end, an SSE body with no event; anything else
   (malformed, unknown, expired, another client's or route's, beyond the end) one terminal
   `error` event, code `not_found` and `reason` null (no stream was read, so there is no
   outcome to report); past the reader cap, one `error` event, code `rate_limited`. Those lone
   events carry no `id:` line (they belong to no stream). An empty or blank header is no resume.
4. Readers take nothing from the limits or `MAX_STREAMS`; they are counted per stream.
   `ai_stream_resumes_total{route,outcome}` counts every way back by the route it came through
   (`stream` for the GET route) and what it got: `resumed`, `ended`, `not_found`, `bad_cursor`,
   `too_many_readers`.
5. A stream not here is asked of the shared streams (`keys.SHARED_STREAMS`, with `REDIS_URL`):
   read from Redis with the same cursor rules, statuses and framing (`readers.serve_remote`),
   and stopped by asking its producing instance (`request_cancel`, checked against the owner
   there). `RESUME_MAX_READERS` counts the readers on the producing instance only: a remote
   reader is not counted against it, nor refused by it. A client moving from the producing
   instance may hold a cursor a flush ahead of Redis: a cursor beyond a running remote stream's
   end is given up to the producer's lease to be reached before it is called beyond the end.
   The cursor goes with the lookup, so the producer flushes at once a stream whose reader is
   at or past what Redis holds (`mirror` note 5).
6. The cancel route answers once the generation here has ended (bounded by `CANCEL_WAIT_S`):
   by then its outcome is counted, a chat answer is saved `partial` and the conversation's turn
   released, so a client may send its next turn the moment it has the 204. A stream produced
   on another instance is asked to stop (note 5); that 204 means "asked", and a turn sent at
   once there may still meet the 409 for the few milliseconds the producer takes to end it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from aiohttp import web

from .. import keys, sse
from ..errors import ApiError, ErrorCode, Outcome
from ..readers import resume, serve_remote, sse_response
from ..relay import Generation, RemoteStream

READ_ROUTE: Final = "stream"  # the metrics' route label of the GET route
LAST_EVENT_ID: Final = "Last-Event-ID"
_MAX_AFTER_DIGITS: Final = 12
CANCEL_WAIT_S: Final = 5.0  # the longest the cancel route waits for the generation's end (note 6)

Source = Generation | RemoteStream


async def _position(source: Source, cursor: int) -> tuple[int, bool]:
    """How many events the stream has now, and whether it has ended (a remote stream given a
    moment to reach the cursor: note 5)."""
    if isinstance(source, Generation):
        return len(source.log), source.log.ended
    if cursor > source.length and not source.ended:
        await source.reach(cursor)
    return source.length, source.ended


def _count(request: web.Request, route: str, outcome: str) -> None:
    metrics = request.app[keys.METRICS]
    metrics.child(metrics.resumes, route, outcome).inc()


def _bad(request: web.Request, message: str) -> ApiError:
    _count(request, READ_ROUTE, "bad_cursor")
    return ApiError(ErrorCode.BAD_REQUEST, message)


def _cursor(request: web.Request, stream_id: str) -> int:
    """The GET route's cursor: `Last-Event-ID` (wins), else `?after=N`, else 0 (the start)."""
    header = request.headers.get(LAST_EVENT_ID, "").strip()
    if header:
        parsed = sse.parse_cursor(header)
        if parsed is None:
            raise _bad(request, "Last-Event-ID: must be <streamId>:<n>, as the stream's id lines.")
        if parsed[0] != stream_id:
            raise _bad(request, "Last-Event-ID: names another stream.")
        return parsed[1]
    after = request.query.get("after")
    if after is None:
        return 0
    if not (after.isascii() and after.isdigit()) or len(after) > _MAX_AFTER_DIGITS:
        raise _bad(request, "after: must be a whole number of events, 0 or more.")
    return int(after)


async def _open(request: web.Request, stream_id: str, cursor: int) -> Source | None:
    """The stream here (running or retained), else from the shared streams, else None."""
    generation = request.app[keys.LIVE].find(stream_id)
    if generation is not None:
        return generation
    shared = request.app.get(keys.SHARED_STREAMS)
    if shared is None:
        return None
    return await shared.open(stream_id, cursor)


async def _closed(source: Source | None) -> None:
    if source is not None and not isinstance(source, Generation):
        await source.aclose()


async def _serve(request: web.Request, stream_id: str, source: Source, cursor: int) -> Any:
    if isinstance(source, Generation):
        return await resume(request, source, cursor)
    return await serve_remote(request, stream_id, source, cursor)


async def read_stream(request: web.Request) -> web.StreamResponse:
    """`GET /api/v1/ai/streams/{streamId}`: the stream's events after the cursor, then live."""
    stream_id = request.match_info["streamId"]
    if not sse.valid_stream_id(stream_id):
        raise _bad(request, "streamId: not a stream id.")
    cursor = _cursor(request, stream_id)
    source = await _open(request, stream_id, cursor)
    if source is None:
        _count(request, READ_ROUTE, "not_found")
        raise ApiError(ErrorCode.NOT_FOUND, "No such stream, or it has expired.")
    try:
        length, ended = await _position(source, cursor)
        if cursor > length:
            raise _bad(
                request,
                f"The cursor is beyond the end of the stream: event {cursor}, "
                f"and the stream has {length}.",
            )
        if cursor == length and ended:
            _count(request, READ_ROUTE, "ended")
            await _closed(source)
            return web.Response(status=204)
        if isinstance(source, Generation) and _full(request, source):
            _count(request, READ_ROUTE, "too_many_readers")
            raise _too_many(request)
    except BaseException:
        await _closed(source)
        raise
    _count(request, READ_ROUTE, "resumed")
    response: web.StreamResponse = await _serve(request, stream_id, source, cursor)
    return response


def _full(request: web.Request, generation: Generation) -> bool:
    return generation.readers >= request.app[keys.SETTINGS].resume_max_readers


def _too_many(request: web.Request) -> ApiError:
    cap = request.app[keys.SETTINGS].resume_max_readers
    return ApiError(
        ErrorCode.RATE_LIMITED, f"This stream has {cap} readers already; retry when one leaves."
    )


async def resume_post(
    request: web.Request, route: str, error_fields: dict[str, Any]
) -> web.StreamResponse | None:
    """A streaming POST carrying `Last-Event-ID`, answered before its body is read (note 3);
    None when it carries none (a normal POST). `error_fields` are the route's vocabulary's
    additions to an `error` event."""
    header = request.headers.get(LAST_EVENT_ID, "")
    if not header.strip():
        return None
    parsed = sse.parse_cursor(header)
    if parsed is None:
        _count(request, route, "bad_cursor")
        return await _lone_error(request, None, ErrorCode.NOT_FOUND, error_fields)
    stream_id, cursor = parsed
    source = await _open(request, stream_id, cursor)
    owner = request.get(keys.KEY_ID) or ""
    if source is None or source.route != route or source.owner != owner:
        await _closed(source)
        _count(request, route, "not_found")
        return await _lone_error(request, None, ErrorCode.NOT_FOUND, error_fields)
    length, ended = await _position(source, cursor)
    if cursor > length:
        await _closed(source)
        _count(request, route, "bad_cursor")
        return await _lone_error(request, None, ErrorCode.NOT_FOUND, error_fields)
    if cursor == length and ended:
        await _closed(source)
        _count(request, route, "ended")
        response = sse_response(request, stream_id)
        await response.prepare(request)
        await response.write_eof()
        return response
    if isinstance(source, Generation) and _full(request, source):
        _count(request, route, "too_many_readers")
        return await _lone_error(request, stream_id, ErrorCode.RATE_LIMITED, error_fields)
    _count(request, route, "resumed")
    served: web.StreamResponse = await _serve(request, stream_id, source, cursor)
    return served


_MESSAGES: Final = {
    ErrorCode.NOT_FOUND: "No such stream to resume, or it has expired.",
    ErrorCode.RATE_LIMITED: "This stream has as many readers as it may have; retry shortly.",
}


async def _lone_error(
    request: web.Request, stream_id: str | None, code: ErrorCode, fields: dict[str, Any]
) -> web.StreamResponse:
    """A 200 SSE answer with one terminal `error` event and no `id:` line (note 3)."""
    headers = dict(sse.HEADERS)
    if stream_id is not None:
        headers[sse.STREAM_ID_HEADER] = stream_id
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    event = {"type": "error", "error": _MESSAGES[code], "code": code, "reason": None, **fields}
    await response.write(sse.DATA_ONLY.event(1, event))
    await response.write_eof()
    return response


async def cancel_stream(request: web.Request) -> web.Response:
    """`POST /api/v1/ai/streams/{streamId}/cancel`: end the generation now (outcome `cancelled`);
    204 also when it has already ended; 404 when unknown or another key's (note 1)."""
    stream_id = request.match_info["streamId"]
    if not sse.valid_stream_id(stream_id):
        raise ApiError(ErrorCode.NOT_FOUND, "No such stream, or it has expired.")
    owner = request.get(keys.KEY_ID) or ""
    generation = request.app[keys.LIVE].find(stream_id)
    if generation is not None and generation.owner == owner:
        generation.expire(Outcome.CANCELLED)
        with contextlib.suppress(TimeoutError):  # ended, answer saved, turn released: note 6
            await asyncio.wait_for(asyncio.shield(generation.finished()), CANCEL_WAIT_S)
        return web.Response(status=204)
    shared = request.app.get(keys.SHARED_STREAMS)
    if generation is None and shared is not None and await shared.request_cancel(stream_id, owner):
        return web.Response(status=204)  # the producing instance stops it (note 5)
    raise ApiError(ErrorCode.NOT_FOUND, "No such stream, or it has expired.")


def setup(app: web.Application) -> None:
    app.router.add_get(
        "/api/v1/ai/streams/{streamId}", read_stream, name="read_stream", allow_head=False
    )
    app.router.add_post("/api/v1/ai/streams/{streamId}/cancel", cancel_stream, name="cancel_stream")
