"""The web plumbing every API handler shares: JSON answers, the error and API-key middlewares,
the answer's common headers, and reading a request body into a validated model.

An `ApiError` carries its own status and headers (`Retry-After`, a 429's quota headers, a 401's
challenge); the error middleware only renders it in the contract's JSON shape.

Design notes:
1. A body that cannot be read to its end (it did not arrive within `BODY_TIMEOUT_S`, or its
   content or chunked encoding is broken) is answered, and then nothing more is read from the
   connection, which closes after the answer: aiohttp would otherwise linger up to 10 s more
   reading what is left of it, the very hold on a descriptor a slow-body client is after.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from pydantic import BaseModel, ValidationError

from . import keys
from .edge import SERVER
from .errors import ApiError, ErrorCode, code_for_status
from .limits.core import quota_headers
from .logs import REQUEST_ID_HEADER, Handler

log = structlog.get_logger("service.http")
Body = TypeVar("Body", bound=BaseModel)

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
    return json_response(err.body(), status=err.status, headers=err.headers or None)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError and aiohttp's own HTTP errors become JSON; anything else a 500 without details."""
    try:
        response = await handler(request)
    except ApiError as err:
        response = error_response(err)
        if isinstance(err, BodyUnread):
            _read_no_more(request, response)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = code_for_status(exc.status)
        response = error_response(ApiError(code, exc.reason, status=exc.status))
    except Exception:
        log.exception("request.failed")
        response = error_response(ApiError(ErrorCode.INTERNAL, "Internal error."))
    return response


def _read_no_more(request: web.Request, response: web.StreamResponse) -> None:
    """Design note 1: ignore the rest of the body and close the connection after the answer."""
    response.force_close()
    request.protocol.close()  # the connection stops reading; it closes after this answer
    request.content.feed_eof()  # so aiohttp does not wait for the rest of the body


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# Routes (by name) whose capability is in their path, not a key: reading a stream by its id, which
# a browser EventSource (which cannot send `Authorization`) must be able to do.
KEYLESS_ROUTES = frozenset({"read_stream"})


@web.middleware
async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With API_KEYS set, every /api/ route needs `Authorization: Bearer <key>` (a CORS
    preflight carries no credentials and passes), but for `KEYLESS_ROUTES`; probes and /metrics
    need none."""
    access = request.app[keys.ACCESS]
    if (
        access.auth_required
        and request.path.startswith("/api/")
        and request.method != "OPTIONS"
        and request.match_info.route.name not in KEYLESS_ROUTES
    ):
        ident = access.authenticate(request.headers.get("Authorization"))
        if ident is None:
            raise ApiError(
                ErrorCode.UNAUTHORIZED,
                "A valid API key is required (Authorization: Bearer).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request[keys.KEY_ID] = ident
        structlog.contextvars.bind_contextvars(key_id=ident)
    return await handler(request)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names its request, carries the quota headers of the limits that admitted
    it, and is counted once, when its status is final."""
    response.headers["Server"] = SERVER  # the product, never its versions
    request_id = request.get(keys.REQUEST_ID)
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    admission = request.get(keys.ADMISSION)
    if admission is not None:
        response.headers.update(quota_headers(admission))
    metrics = request.app[keys.METRICS]
    metrics.child(metrics.requests, _route(request), str(response.status)).inc()


async def vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    """An answer that names the allowed origin differs by Origin: caches must key on it. Runs
    after aiohttp-cors's own hook has set the header."""
    origin = response.headers.get("Access-Control-Allow-Origin")
    if origin and origin != "*":
        vary = response.headers.get("Vary", "")
        if "origin" not in vary.lower():
            response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


async def read_json(request: web.Request, model: type[Body]) -> Body:
    """The request body as `model`, or the precise 4xx that says what is wrong with it."""
    media = media_type(request.headers.get("Content-Type", ""))
    if media != "application/json":
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json." if media else "Content-Type is missing.",
        )
    coding = request.headers.get("Content-Encoding", "").strip().lower() or "identity"
    if coding not in CONTENT_CODINGS:
        codings = ", ".join(sorted(CONTENT_CODINGS - {"identity"}))
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding must be one of {codings}, or none."
        )
    limit = request.app[keys.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, f"The body is larger than {limit} bytes.")
    raw = await _read_body(request, limit)
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise ApiError(ErrorCode.BAD_REQUEST, describe(err)) from err


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, decoded, within BODY_TIMEOUT_S of the request's arrival."""
    timeout_s = request.app[keys.SETTINGS].body_timeout_s
    loop = asyncio.get_running_loop()
    deadline = request.get(keys.ARRIVED, loop.time()) + timeout_s if timeout_s else None
    try:
        async with asyncio.timeout_at(deadline):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"The body is larger than {limit} bytes."
        ) from err
    except TimeoutError as err:
        message = f"The body did not arrive within {timeout_s:g} s."
        raise BodyUnread(ErrorCode.REQUEST_TIMEOUT, message) from err
    except web.RequestPayloadError as err:
        message = "The body could not be read: its content or chunked encoding is not valid."
        raise BodyUnread(ErrorCode.BAD_REQUEST, message) from err


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
