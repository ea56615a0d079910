"""The OpenAI-compatible surface: `POST /v1/chat/completions` (`stream` true or not) and
`GET /v1/models`, in OpenAI's wire format, behind every protection of the native routes (API key,
per-client limits, `MAX_STREAMS`, the three clocks, disconnect, drain, metrics, the log line).

The client's body goes to the upstream as it came but for what the gateway reads and sets
(`upstream` design note 6); the upstream's chunks come back as they came but for what the
gateway must change (`chunks` design note 6). Errors are in OpenAI's shape, `{"error":
{"message", "type", "param", "code"}}`, with the statuses the SDKs map to their exception
classes.

Design notes:
1. A stream's headers go out only once the upstream has answered 200 (`Generation.answered`):
   a failure before that (the upstream's refusal, a clock, a cut, shutdown) is a real status.
   After it, a failure is one `data: {"error": {...}}` line and the end of the body, which the
   SDKs raise as `APIError`; `data: [DONE]` ends only a whole answer.
2. No resume here: no `id:` lines, no stream id, and a client that leaves cancels the upstream
   request at once, whatever `RESUME_GRACE_S` says (a passthrough generation has no vocabulary:
   `relay` design notes 9 and 13). Heartbeats are `: ping` and a blank line, a block the SDKs'
   SSE decoders skip.
3. `n` other than 1 is refused (400): the gateway relays, counts and cuts one choice.
4. An upstream 4xx other than auth, 404 and 429 answers 400 here (the upstream rejected a field
   the client passed through, such as a bad `tools` schema); other upstream failures answer as
   on the native routes (502, 504), and never with the upstream's own text.
5. A non-stream answer is bounded by `MAX_STREAM_S` only: it arrives whole, so the first-token
   and idle clocks would time text the client never sees piecemeal.
6. Metrics and the log line name the routes `openai_chat_stream` and `openai_chat`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .. import keys, sse
from ..admission import admitted
from ..config import Settings
from ..errors import ApiError, ErrorCode, Outcome, openai_error
from ..readers import collect, sse_reader
from ..readers import generation_for as _generation_for
from ..relay import Clocks, Generation, Meter, Result
from ..tasks import outlive_cancel
from ..upstream import CompletionRequest
from ..web import json_response, read_json

STREAM_ROUTE: Final = "openai_chat_stream"
WHOLE_ROUTE: Final = "openai_chat"
DONE: Final = b"data: [DONE]\n\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    include_usage: StrictBool | None = None


class ChatCompletionBody(BaseModel):
    """The fields the gateway reads; every other field passes through as the client sent it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: StrictStr
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool | None = None
    n: StrictInt | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    stream_options: StreamOptions | None = None


def _bad(message: str, param: str, code: str | None = None) -> ApiError:
    return ApiError(ErrorCode.BAD_REQUEST, message, details={"param": param, "code": code})


def completion_request(body: ChatCompletionBody, settings: Settings) -> CompletionRequest:
    """Check the body against this deployment (400 naming the field), as the upstream request."""
    if body.model not in settings.model_allowlist:
        raise _bad(
            f"The model `{body.model}` is not offered here (GET /v1/models lists them).",
            "model",
            "model_not_found",
        )
    if body.n is not None and body.n != 1:
        raise _bad("Only n=1 is supported by this gateway.", "n")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, name)
        if value is not None and not 1 <= value <= settings.max_tokens_limit:
            raise _bad(f"{name}: must be from 1 to {settings.max_tokens_limit}", name)
    options = body.stream_options
    return CompletionRequest(
        model=body.model,
        messages=body.messages,
        max_tokens=settings.default_max_tokens,  # sent only when the client set no cap
        body=body.model_dump(exclude_unset=True),
        forward_usage=bool(body.stream and options is not None and options.include_usage),
    )


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A prompt's size before the upstream counts it: 4 characters of its JSON a token, 4 a
    message (any content shape: parts, tool calls, tool results)."""
    return len(orjson.dumps(messages)) // 4 + 4 * len(messages)


def _failure(result: Result) -> ApiError:
    """How a generation that failed before its upstream answered is told (design note 4)."""
    if result.upstream_error_kind == "rejected":
        return ApiError(ErrorCode.BAD_REQUEST, result.error_message or "Rejected.")
    return result.failure()


def error_chunk(result: Result) -> bytes:
    """The line that ends a stream that failed after its headers (design note 1)."""
    err = _failure(result)
    body = openai_error(err.code, err.message, err.status)
    return b"data: %b\n\n" % sse.dumps(body)


def _generation(
    request: web.Request, route: str, upstream_request: CompletionRequest, account: Meter
) -> Generation:
    generation = _generation_for(request, route, upstream_request, account)
    generation.passthrough = True
    if route == WHOLE_ROUTE:  # design note 5
        generation.clocks = Clocks(0.0, 0.0, request.app[keys.SETTINGS].max_stream_s)
    return generation


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS]
    body = await read_json(request, ChatCompletionBody)
    upstream_request = completion_request(body, settings)
    route = STREAM_ROUTE if body.stream else WHOLE_ROUTE
    async with admitted(request, estimate_tokens(body.messages)) as account:
        generation = _generation(request, route, upstream_request, account)
        if body.stream:
            return await _stream(request, generation)
        result = await collect(request, generation)
        events = generation.log.events
    if result.outcome is not Outcome.COMPLETED or not events:
        raise _failure(result)
    return web.Response(body=events[0], content_type="application/json")


async def _stream(request: web.Request, generation: Generation) -> web.StreamResponse:
    """Start the generation; answer once its upstream has answered (design note 1), with its
    chunks, then `[DONE]` or the error line."""
    settings = request.app[keys.SETTINGS]
    request.app[keys.LIVE].start(generation)
    try:
        try:
            answered = await generation.answered()
        except asyncio.CancelledError:
            generation.expire(Outcome.CLIENT_DISCONNECT)  # the client left first: note 2
            raise
        if not answered:
            raise _failure(generation.result)
        response = web.StreamResponse(headers=dict(sse.HEADERS))
        reader = sse_reader(request, response, generation)
        reader.framing = sse.DATA_ONLY  # no `id:` lines: design note 2
        await reader.run()
        if not reader.lost and generation.ended:
            result = generation.result
            last = DONE if result.outcome is Outcome.COMPLETED else error_chunk(result)
            try:
                async with asyncio.timeout(settings.write_timeout_s or None):
                    await response.write(last)
            except (ConnectionError, TimeoutError):
                pass  # the client is gone; the generation is accounted already
        return response
    finally:
        if not generation.ended:  # its reader left early: wait for the generation to end
            await outlive_cancel(generation.finished())


async def models(request: web.Request) -> web.Response:
    """The allowed models, in OpenAI's list shape; the default (`OPENAI_MODEL`) first."""
    settings = request.app[keys.SETTINGS]
    default = settings.openai_model
    names = [default, *sorted(settings.model_allowlist - {default})]
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "gateway"} for m in names]
    return json_response({"object": "list", "data": data})


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions, name="openai_chat_completions")
    app.router.add_get("/v1/models", models, name="openai_models")
