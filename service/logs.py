"""structlog setup and the request-context middleware.

Every log line carries the request id (bound in a contextvar by the middleware), and every HTTP
answer of the app gets one `request.finished` line (route, method, status, duration, and the error
code of an error answer), refusals before a stream included. Prompts and completions are never
logged; API keys never reach a log line. With `LOG_FORMAT=json` a traceback is structured (a list
of exceptions with their frames) in the line's `exception` field.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType

import orjson
import structlog
from aiohttp import hdrs, web

from .config import LogSettings
from .errors import ErrorCode

log = structlog.get_logger("service.http")

ARRIVED = web.RequestKey("arrived", float)  # loop.time() when the request reached the app
REQUEST_ID = web.RequestKey("request_id", str)
ANSWERED = web.RequestKey("answered", int)  # the answer's status, once its head is prepared
CLIENT_CLOSED = 499  # the status logged for a request whose client left before any answer
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def configure(settings: LogSettings) -> None:
    """Process-wide logging; called from __main__ only. structlog's own lines and everything
    that logs through the standard library (aiohttp, asyncio, warnings, an uncaught exception)
    go out through the same renderer: with LOG_FORMAT=json, every line is one JSON object."""
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    renderer, exceptions = output(settings)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                exceptions,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def output(
    settings: LogSettings,
) -> tuple[structlog.typing.Processor, structlog.typing.Processor]:
    """The renderer, and what turns `exc_info` into the line's `exception` field: for JSON a
    structured traceback (exceptions, frames, locals left out), for people the usual text."""
    if settings.log_format == "json":
        dict_tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        return structlog.processors.JSONRenderer(), dict_tracebacks
    console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return console, structlog.processors.format_exc_info


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    structlog.get_logger("service").critical("process.crashed", exc_info=(kind, value, tb))


def request_id_for(request: web.Request) -> str:
    """A valid incoming X-Request-ID, else a new one."""
    incoming = request.headers.get(REQUEST_ID_HEADER)
    if incoming and _VALID_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Binds the request id for every line logged while the request runs, and logs the
    request's one `request.finished` line when its handler is done (the outermost middleware:
    the error middleware has made every error an answer by then)."""
    request[ARRIVED] = asyncio.get_running_loop().time()
    request_id = request_id_for(request)
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # a redirect or other answer raised as an exception
        _finished(request, exc.status, None)
        raise
    except asyncio.CancelledError:  # the client left: the answer it got, if any, else 499
        status = request.get(ANSWERED, CLIENT_CLOSED)
        _finished(request, status, ErrorCode.CANCELLED if status == CLIENT_CLOSED else None)
        raise
    else:
        _finished(request, response.status, error_code(response))
        return response
    finally:
        structlog.contextvars.clear_contextvars()


async def note_answer(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the status a client got, even if the handler ends cancelled."""
    request[ANSWERED] = response.status


def _finished(request: web.Request, status: int, error: str | None) -> None:
    duration_ms = round((asyncio.get_running_loop().time() - request[ARRIVED]) * 1000)
    resource = request.match_info.route.resource
    route = (resource.name or resource.canonical) if resource is not None else "unmatched"
    fields = {
        "route": route,
        "method": request.method if request.method in hdrs.METH_ALL else "other",  # bounded
        "status": status,
        "duration_ms": duration_ms,
        "request_id": request[REQUEST_ID],
    }
    if error is not None:
        fields["error"] = error
    if status >= 500:
        log.error("request.finished", **fields)
    else:
        log.info("request.finished", **fields)


def error_code(response: web.StreamResponse) -> str | None:
    """The code of an error answer, read back from the body the client got (`{"error": {"code":
    ...}}`, the contract's shape), so every layer that answers an error is covered alike."""
    if response.status < 400 or not isinstance(response, web.Response):
        return None
    body = response.body
    if not isinstance(body, bytes) or response.content_type != "application/json":
        return None
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
