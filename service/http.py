"""What every API handler does around a stream: read and validate the body, admit the stream,
start its generation with the reader its route answers with (`stream`: an SSE response,
`collect`: the JSON routes), and turn any error before the stream into the contract's JSON shape
with a precise status.

Admission is contexts, entered in this order and left in the reverse: `take_slot` (one of
`MAX_STREAMS`, counted synchronously, before the first await, so a burst cannot walk past the
cap while earlier requests wait on SQLite or Redis), then `limited` (the client's limits), or
both as `admitted`. Whatever ends the request (a 4xx, a store error, a cancellation at any await,
the stream's end) gives back what was taken.

Design notes:
1. A body that cannot be read to its end (it did not arrive within `BODY_TIMEOUT_S`, or its
   content or chunked encoding is broken) is answered, and then nothing more is read from the
   connection, which closes after the answer: aiohttp would otherwise linger up to 10 s more
   reading what is left of it, the very hold on a descriptor a slow-body client is after.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from pydantic import BaseModel, ValidationError

from . import keys, sse
from .edge import SERVER
from .errors import ApiError
from .limits import Account, RateLimited
from .logs import REQUEST_ID_HEADER, Handler
from .ratelimit import quota_headers
from .readers import Collector, SseReader
from .relay import Generation, Result, Slot, Vocabulary
from .tasks import outlive_cancel
from .upstream import CompletionRequest

log = structlog.get_logger("service.http")
Body = TypeVar("Body", bound=BaseModel)

_CODE_BY_STATUS = {404: "not_found", 413: "payload_too_large", 415: "unsupported_media_type"}
# Content codings aiohttp decodes here (br and zstd only where their libraries are installed).
CONTENT_CODINGS = frozenset(
    [
        "identity",
        "gzip",
        "deflate",
        *(["br"] if HAS_BROTLI else []),
        *(["zstd"] if HAS_ZSTD else []),
    ]
)


class BodyUnread(ApiError):
    """The body could not be read to its end: answered, then the connection closes (note 1)."""


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(err: ApiError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return json_response(err.body(), status=err.status, headers=headers)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError and aiohttp's own HTTP errors become JSON; anything else a 500 without details."""
    try:
        response = await handler(request)
    except ApiError as err:
        if isinstance(err, RateLimited):
            request[keys.ADMISSION] = err.admission
        response = error_response(err)
        if isinstance(err, BodyUnread):
            _read_no_more(request, response)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODE_BY_STATUS.get(exc.status, "bad_request" if exc.status < 500 else "internal")
        response = error_response(ApiError(code, exc.reason, status=exc.status))
    except Exception:
        log.exception("request.failed")
        response = error_response(ApiError("internal", "Internal error."))
    return response


def _read_no_more(request: web.Request, response: web.StreamResponse) -> None:
    """Design note 1: ignore the rest of the body and close the connection after the answer."""
    response.force_close()
    request.protocol.close()  # the connection stops reading; it closes after this answer
    request.content.feed_eof()  # so aiohttp does not wait for the rest of the body


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With API_KEYS set, every /api/ route needs `Authorization: Bearer <key>` (a CORS
    preflight carries no credentials and passes); probes and /metrics need none."""
    access = request.app[keys.ACCESS]
    if access.auth_required and request.path.startswith("/api/") and request.method != "OPTIONS":
        ident = access.authenticate(request.headers.get("Authorization"))
        if ident is None:
            raise ApiError("unauthorized", "A valid API key is required (Authorization: Bearer).")
        request[keys.KEY_ID] = ident
        structlog.contextvars.bind_contextvars(key_id=ident)
    return await handler(request)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names its request, carries the quota headers of the limits that were
    consulted, and is counted once, when its status is final."""
    response.headers["Server"] = SERVER  # the product, never its versions
    request_id = request.get(keys.REQUEST_ID)
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    admission = request.get(keys.ADMISSION)
    if admission is not None:
        response.headers.update(quota_headers(admission))
    if response.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    metrics = request.app[keys.METRICS]
    metrics.child(metrics.requests, _route(request), str(response.status)).inc()


async def read_json(request: web.Request, model: type[Body]) -> Body:
    """The request body as `model`, or the precise 4xx that says what is wrong with it."""
    media = media_type(request.headers.get("Content-Type", ""))
    if media != "application/json":
        raise ApiError(
            "unsupported_media_type",
            "Content-Type must be application/json." if media else "Content-Type is missing.",
        )
    coding = request.headers.get("Content-Encoding", "").strip().lower() or "identity"
    if coding not in CONTENT_CODINGS:
        codings = ", ".join(sorted(CONTENT_CODINGS - {"identity"}))
        raise ApiError(
            "unsupported_media_type", f"Content-Encoding must be one of {codings}, or none."
        )
    limit = request.app[keys.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError("payload_too_large", f"The body is larger than {limit} bytes.")
    raw = await _read_body(request, limit)
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise ApiError("bad_request", describe(err)) from err


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, decoded, within BODY_TIMEOUT_S of the request's arrival."""
    timeout_s = request.app[keys.SETTINGS].body_timeout_s
    loop = asyncio.get_running_loop()
    deadline = request.get(keys.ARRIVED, loop.time()) + timeout_s if timeout_s else None
    try:
        async with asyncio.timeout_at(deadline):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise ApiError("payload_too_large", f"The body is larger than {limit} bytes.") from err
    except TimeoutError as err:
        message = f"The body did not arrive within {timeout_s:g} s."
        raise BodyUnread("request_timeout", message) from err
    except web.RequestPayloadError as err:
        message = "The body could not be read: its content or chunked encoding is not valid."
        raise BodyUnread("bad_request", message) from err


async def vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    """An answer that names the allowed origin differs by Origin: caches must key on it. Runs
    after aiohttp-cors's own hook has set the header."""
    origin = response.headers.get("Access-Control-Allow-Origin")
    if origin and origin != "*":
        vary = response.headers.get("Vary", "")
        if "origin" not in vary.lower():
            response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def media_type(header: str) -> str:
    """The media type of a Content-Type header, parameters dropped. Read by hand: aiohttp's
    `request.content_type` goes through the stdlib's email parser, which raises IndexError on
    some malformed values (`;0*`), and the type is all that is needed here."""
    return header.split(";", 1)[0].strip().lower()[:100]


def describe(err: ValidationError) -> str:
    """Pydantic's errors as one line: `field: what is wrong; ...` (input values left out)."""
    parts = []
    for item in err.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        message = item["msg"]
        if item["type"] == "json_invalid":
            where, message = "body", "not valid JSON"
        parts.append(f"{where}: {message}")
    if err.error_count() > 5:
        parts.append(f"and {err.error_count() - 5} more")
    return "; ".join(parts)


def client_of(request: web.Request) -> str:
    """The API key's id when keys are required, else the client's address."""
    key = request.get(keys.KEY_ID)
    if key is not None:
        return f"key:{key}"
    access = request.app[keys.ACCESS]
    return "ip:" + access.client_address(request.remote, request.headers.get("X-Forwarded-For"))


def take_slot(request: web.Request) -> Slot:
    """One of this instance's `MAX_STREAMS`, taken before any await (503 when draining or full).
    Use it as `with take_slot(request):` around everything the stream does."""
    live = request.app[keys.LIVE]
    if live.draining:
        raise ApiError("server_shutdown", "The server is shutting down.", retry_after_s=1)
    slot = live.take(request.app[keys.SETTINGS].max_streams)
    if slot is None:
        raise ApiError("overloaded", "Too many open streams; retry shortly.", retry_after_s=1)
    return slot


@contextlib.asynccontextmanager
async def limited(request: web.Request, estimate: int) -> AsyncIterator[Account]:
    """The client's limits: its request, lease and token reserve (429 when over one), as the
    stream's account. On exit, cancellation included, the account is given back unless a stream
    ran on it and settled it already (an account closes once)."""
    limits = request.app[keys.LIMITS]
    client = client_of(request)
    admission = await limits.admit(client, estimate)
    request[keys.ADMISSION] = admission
    account = limits.open(client, admission)
    try:
        yield account
    finally:
        await outlive_cancel(account.give_back())


@contextlib.asynccontextmanager
async def admitted(request: web.Request, estimate: int) -> AsyncIterator[Account]:
    """A new stream's admission as one context: a `MAX_STREAMS` slot taken synchronously, then
    the client's limits; everything taken is given back when the context exits."""
    with take_slot(request):
        async with limited(request, estimate) as account:
            yield account


def generation_for(
    request: web.Request,
    route: str,
    upstream_request: CompletionRequest,
    account: Account,
    *,
    vocabulary: Vocabulary | None = None,
    opening: dict[str, Any] | None = None,
    stream_id: str | None = None,
    on_end: Callable[[Result], Awaitable[None]] | None = None,
) -> Generation:
    """The generation for an admitted request, wired to the app's upstream and metrics and to
    its account with the limits; its stream id is `stream_id` (chat: the answer's message id) or
    a fresh one. Streamed answers give the `vocabulary` of their events and the first event."""
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
        vocabulary=vocabulary,
        opening=opening,
        meter=account,
        on_end=on_end,
    )


async def stream(request: web.Request, generation: Generation) -> web.StreamResponse:
    """Start `generation` and answer with an SSE reader of it (the SSE headers and
    `X-Stream-ID`); returns once the generation has ended, so what the handler holds around it
    (a slot, an account, a chat turn) is given back after, whatever ended it."""
    app = request.app
    settings, metrics = app[keys.SETTINGS], app[keys.METRICS]
    headers = {**sse.HEADERS, sse.STREAM_ID_HEADER: generation.stream_id}
    response = web.StreamResponse(headers=headers)
    reader = SseReader(
        request,
        response,
        generation,
        write_timeout_s=settings.write_timeout_s,
        heartbeat_s=settings.heartbeat_interval_s,
        on_ping=metrics.heartbeats.inc,
    )
    app[keys.LIVE].start(generation)
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


def failed(result: Result) -> ApiError:
    """A JSON endpoint's answer that did not complete, as the error it answers with."""
    code = result.error_code or "internal"
    retry_after = None
    if code == "server_shutdown":
        retry_after = 1
    elif code == "rate_limited":  # the token budget ran out: it is back above zero by then
        retry_after = max(1, math.ceil(result.retry_after_s))
    return ApiError(code, result.error_message or "The answer failed.", retry_after_s=retry_after)
