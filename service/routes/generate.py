"""`POST /api/ai/generate` (JSON) and `POST /api/ai/generate-stream` (SSE "generate" events).

Both run the same generation; the JSON endpoint's reader is a collector that answers once at the
end, so disconnects, timeouts and shutdown behave alike for both. A streaming POST that carries
`Last-Event-ID` resumes the stream it names instead (`streams.resume_post`), checked first.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from .. import keys, sse
from ..admission import admitted
from ..errors import ApiError, ErrorCode, Outcome
from ..prompts import estimate_tokens, extract_placeholders, generate_messages
from ..readers import collect, generation_for, stream
from ..relay import Result
from ..upstream import CompletionRequest
from ..web import json_response, read_json
from .options import MaxTokens, Model, Temperature, options
from .streams import resume_post

_IMAGE_URL = re.compile(
    r"https?://[^\s]{1,4096}|data:image/[a-z0-9.+-]{1,32};base64,[A-Za-z0-9+/=\s]+", re.IGNORECASE
)


def _image_url(value: str) -> str:
    if not _IMAGE_URL.fullmatch(value):
        raise ValueError("must be an http(s) URL or a data:image/...;base64 URL")
    return value


ImageUrl = Annotated[StrictStr, AfterValidator(_image_url)]


class GenerateBody(BaseModel):
    """The generate request. Unknown fields are ignored, so clients can send more later."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: StrictStr
    selectedImageUrls: list[ImageUrl] = Field(default_factory=list)  # wire names are camelCase
    referenceImageUrls: list[ImageUrl] = Field(default_factory=list)
    model: Model = None
    maxTokens: MaxTokens = None
    temperature: Temperature = None


def completion_request(body: GenerateBody, request: web.Request) -> CompletionRequest:
    """Check the body against this deployment's limits and build the upstream request."""
    settings = request.app[keys.SETTINGS]
    if not body.prompt.strip():
        raise ApiError(ErrorCode.BAD_REQUEST, "prompt: must not be empty")
    if len(body.prompt) > settings.prompt_max_chars:
        raise ApiError(
            ErrorCode.BAD_REQUEST, f"prompt: longer than {settings.prompt_max_chars} characters"
        )
    images = len(body.selectedImageUrls) + len(body.referenceImageUrls)
    if images > settings.max_images:
        raise ApiError(ErrorCode.BAD_REQUEST, f"at most {settings.max_images} images in all")
    chosen = options(body, settings)
    return chosen.request(
        generate_messages(body.prompt, body.selectedImageUrls, body.referenceImageUrls)
    )


class GenerateVocabulary:
    """The first design note's events: start, content, done, error."""

    content_head = b'{"type":"content","delta":'

    @staticmethod
    def content_tail(deltas: int) -> bytes:
        return b',"tokenCount":%d}' % deltas

    @staticmethod
    def done(result: Result) -> dict[str, Any]:
        return {"type": "done", **_answer(result)}

    @staticmethod
    def error(result: Result) -> dict[str, Any]:
        ids = {"requestId": result.request_id, "elapsedMs": result.elapsed_ms}
        return {**result.error_event(), **ids}


def _answer(result: Result) -> dict[str, Any]:
    return {
        "content": result.text,
        "imagePlaceholders": extract_placeholders(result.text),
        "tokenCount": result.completion_tokens,
        "model": result.model,
        "requestId": result.request_id,
        "elapsedMs": result.elapsed_ms,
        "finishReason": result.finish_reason,
    }


async def generate_stream(request: web.Request) -> web.StreamResponse:
    ids = {"requestId": request[keys.REQUEST_ID], "elapsedMs": 0}
    resumed = await resume_post(request, "generate_stream", ids)  # before anything else
    if resumed is not None:
        return resumed
    upstream_request = completion_request(await read_json(request, GenerateBody), request)
    async with admitted(request, estimate_tokens(upstream_request.messages)) as account:
        stream_id = sse.new_stream_id()
        start = {"type": "start", "requestId": request[keys.REQUEST_ID], "streamId": stream_id}
        generation = generation_for(
            request,
            "generate_stream",
            upstream_request,
            account,
            vocabulary=GenerateVocabulary,
            opening=start,
            stream_id=stream_id,
        )
        return await stream(request, generation)


async def generate(request: web.Request) -> web.Response:
    upstream_request = completion_request(await read_json(request, GenerateBody), request)
    async with admitted(request, estimate_tokens(upstream_request.messages)) as account:
        generation = generation_for(request, "generate", upstream_request, account)
        result = await collect(request, generation)
    if result.outcome is Outcome.COMPLETED:
        return json_response({**_answer(result), "usage": result.usage})
    raise result.failure()


def setup(app: web.Application) -> None:
    app.router.add_post("/api/ai/generate", generate, name="generate")
    app.router.add_post("/api/ai/generate-stream", generate_stream, name="generate_stream")
