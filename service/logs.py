"""structlog setup and the request-context middleware.

Every log line carries the request id (bound in a contextvar by the middleware). Prompts and
completions are never logged; API keys never reach a log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType

import structlog
from aiohttp import web

from .config import LogSettings

ARRIVED = web.RequestKey("arrived", float)  # loop.time() when the request reached the app
REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def configure(settings: LogSettings) -> None:
    """Process-wide logging; called from __main__ only. structlog's own lines and everything
    that logs through the standard library (aiohttp, asyncio, warnings, an uncaught exception)
    go out through the same renderer: with LOG_FORMAT=json, every line is one JSON object."""
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
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
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


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
    request[ARRIVED] = asyncio.get_running_loop().time()
    request_id = request_id_for(request)
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        return await handler(request)
    finally:
        structlog.contextvars.clear_contextvars()
