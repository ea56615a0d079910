"""The HTTP layer's edge: how a connection is read and answered before the application sees a
request, and how the process serves an app (`run`, in place of `web.run_app`).

`Protocol` is aiohttp's connection handler plus:
- a deadline for the request head (`HEADER_TIMEOUT_S`), counted from the connection's start for
  its first request and from the first byte of each later one; a client that sent part of a head
  by then is answered 408 `request_timeout`, an idle one is closed without an answer;
- the contract's JSON error shape for the answers aiohttp makes itself (bad request line, bad or
  oversized headers, bad chunked encoding, an unsupported `Content-Encoding`, and the HTTP errors
  raised before the app's middlewares run, such as an unknown `Expect`), echoing nothing of the
  request and logged as one line without a traceback;
- a `Server` header without versions (`SERVER`; the apps set it on their own answers too).

Design notes:
1. aiohttp makes its connection handler in `web.Server.__call__`, and the runner makes the
   `web.Server` in `AppRunner._make_server`. `Runner` overrides that one hook (after aiohttp has
   started the app up as usual) to serve with `Protocol`; everything else, start-up, shutdown
   order and cleanup contexts included, stays aiohttp's own.
2. The head deadline only acts while the connection waits for a request (aiohttp's own test for
   an idle connection, as in its keep-alive timer): a timer still running when a request has
   started is a no-op. A partial head that arrives while a handler runs (pipelining) is bounded
   by the keep-alive timeout instead.
3. aiohttp's parser reports a body whose encoding breaks at its very end (a deflate stream that
   never finishes) as a new, separate error message, and leaves the body being read waiting for
   an end that never comes (until `BODY_TIMEOUT_S`). `Protocol` hands that error to the body's
   reader instead, so the request is answered 400 at once.
4. `run` stops on SIGINT/SIGTERM through an event rather than `run_app`'s exception from the
   signal handler, so the drain runs in a task that is not being cancelled.
5. Python's cyclic garbage collector was the largest single cost of opening streams in a burst
   (py-spy, S3: about a third of the service's samples sat in frames that allocate, the SDK's
   request headers, asyncio's `Event` and `create_task`, socket creation): every 700 allocations
   a young collection, and the older generations scanned again and again as thousands of open
   streams' objects aged into them. Once the app has started, `serve` collects once, freezes
   everything start-up made (modules, the SDK client, pydantic's validators: never scanned again)
   and raises the thresholds to `GC_THRESHOLDS`. Reference counting still frees almost
   everything at once; only garbage in cycles waits longer: up to 20,000 allocations while
   young, a million once it has lived through a young collection. In `make bench` S3 this cut
   the CPU per stream by about a third (2.8 to 1.8 ms) and the added first-token p99 from
   seconds to under 200 ms on a quiet machine (README, Performance).
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .errors import ApiError, ErrorCode, code_for_status

log = structlog.get_logger("service.edge")

SERVER: Final = "ai-stream-gateway"
KEEPALIVE_TIMEOUT_S: Final = 75.0  # web.run_app's default, kept
# gen0 every 20,000 net allocations (CPython: 700), gen1 every 50 of those (10), the full
# collection at most every 10 of those (10), and then only past CPython's own 25 % growth rule.
GC_THRESHOLDS: Final = (20_000, 50, 10)
_ERROR_HEADERS: Final = {"Server": SERVER, "X-Content-Type-Options": "nosniff"}
_CLIENT_ERRORS = (HttpProcessingError, web.RequestPayloadError, ConnectionError)

RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def protocol_error(status: int, exc: BaseException | None = None) -> ApiError:
    """What a client is told about a request aiohttp could not read (never its bytes)."""
    if status >= 500:
        if status == 504:
            return ApiError(ErrorCode.TIMEOUT, "The request timed out.")
        return ApiError(ErrorCode.INTERNAL, "Internal error.")
    if isinstance(exc, ContentEncodingError) and "install" in exc.message:
        # aiohttp names the library it lacks for this coding (br, zstd)
        return ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE, "The request's Content-Encoding is not supported."
        )
    if isinstance(exc, ContentEncodingError):
        return ApiError(
            ErrorCode.BAD_REQUEST, "The body does not decode as its Content-Encoding says."
        )
    if isinstance(exc, BadHttpMethod):
        message = "The request method is not valid."
    elif isinstance(exc, BadStatusLine):
        message = "The request line is not valid HTTP/1.1."
    elif isinstance(exc, LineTooLong):
        message = "A request line or header is too long."
    else:
        message = "The request is not valid HTTP/1.1."
    return ApiError(ErrorCode.BAD_REQUEST, message, status=status)


def json_error(err: ApiError) -> web.Response:
    response = web.Response(
        body=orjson.dumps(err.body()),
        status=err.status,
        content_type="application/json",
        headers=_ERROR_HEADERS,
    )
    response.force_close()
    return response


def raw_answer(err: ApiError) -> bytes:
    """An error answer as bytes, for a connection with no request to answer through."""
    body = orjson.dumps(err.body())
    head = (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Server: {SERVER}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _json_http_errors(handler: RawHandler) -> RawHandler:
    """HTTP errors raised before the app's middlewares (an unknown `Expect`) become JSON."""

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            log.info("http.refused", status=exc.status)
            message = "Only Expect: 100-continue is supported." if exc.status == 417 else exc.reason
            return json_error(ApiError(code_for_status(exc.status), message, status=exc.status))

    return answer


class Protocol(RequestHandler):
    """aiohttp's connection handler with a head deadline and JSON protocol errors."""

    __slots__ = ("_body", "_head_bytes", "_head_timer", "_header_timeout_s")

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False
        self._body: StreamReader | None = None  # the latest request's body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Head bytes: anything before the first request, or sent while waiting for the next one.
        waiting = self._waiter is not None and not self._waiter.done()
        if data and (waiting or self._request_count == 0):
            if self._head_timer is None:
                self._arm_head()
            self._head_bytes = True
        parsed = self._request_count
        super().data_received(data)
        if added := self._request_count - parsed:
            self._disarm_head()
            self._follow_bodies(added)

    def _follow_bodies(self, added: int) -> None:
        """Design note 3: a parse error after a request's head goes to that request's body."""
        for message, body in list(self._messages)[-added:]:
            if not isinstance(message, _ErrInfo):
                self._body = body
            elif self._body is not None and not self._body.is_eof():
                self._body.set_exception(web.RequestPayloadError(message.message))
                self._body = None

    def _arm_head(self) -> None:
        if self._header_timeout_s:
            self._head_timer = self._loop.call_later(self._header_timeout_s, self._head_late)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = False

    def _head_late(self) -> None:
        self._head_timer = None
        waiting = self._waiter is not None and not self._waiter.done()
        if self.transport is None or not waiting:  # design note 2
            return
        if self._head_bytes:
            err = ApiError(ErrorCode.REQUEST_TIMEOUT, "The request head did not arrive in time.")
            self.transport.write(raw_answer(err))
            log.info("http.head_timeout", status=408)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("the answer has started; no error answer is possible")
        err = protocol_error(status, exc)
        if err.status >= 500:
            log.error("http.failed", status=err.status, exc_info=exc or True)
        else:
            log.info("http.bad_request", status=err.status, error=type(exc).__name__)
        return json_error(err)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other error logs: a client's fault is one line, anything else keeps its
        traceback (in the JSON line)."""
        exc = kw.get("exc_info")
        what = str(args[0]) if args else "error"
        if isinstance(exc, _CLIENT_ERRORS):
            log.info("http.client_error", what=what, error=type(exc).__name__)
        else:
            log.error("http.unhandled", what=what, exc_info=exc or True)


class _Server(web.Server):
    def __init__(self, handler: RawHandler, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        return Protocol(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )


class Runner(web.AppRunner):
    """`web.AppRunner` serving with `Protocol` (design note 1)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(
            _json_http_errors(made.request_handler),
            header_timeout_s=self.header_timeout_s,
            request_factory=made.request_factory,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    backlog: int,
    shutdown_timeout: float,
    header_timeout_s: float,
) -> None:
    """Serve `app` until SIGINT or SIGTERM, then drain and clean up as aiohttp does."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = Runner(
        app,
        header_timeout_s=header_timeout_s,
        # Without this, aiohttp lets a handler run on after its client left (STYLE.md).
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        access_log=None,
    )
    await runner.setup()
    tune_gc()  # design note 5: after start-up, before the first request
    try:
        await web.TCPSite(runner, host, port, backlog=backlog).start()
        await stop.wait()  # design note 4
        log.info("server.stopping")
    finally:
        await runner.cleanup()


def tune_gc() -> None:
    """Design note 5: freeze what start-up made, and collect the young generations less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(app: web.Application, **options: Any) -> None:
    asyncio.run(serve(app, **options))
