"""`POST /api/v1/ai/chat` (JSON) and `POST /api/v1/ai/chat/stream` (SSE "chat" events), and the
saved conversations: `GET` and `DELETE /api/v1/ai/conversations/{conversationId}`.

A turn runs on the same generation as generate, with the second design note's vocabulary (metadata,
token, done, error). A handler validates, takes a `MAX_STREAMS` slot (503), then runs the turn as
one context (`Chats.turn`: the conversation and its turn, 404 and 409; the limits, 429; the user's
message saved) around its generation, whose end saves the answer before the last event; each step
gives back what it took, whatever ends the request.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StrictStr

from .. import keys
from ..admission import limited, take_slot
from ..chat.conversations import sanitize
from ..chat.turns import Chats, Turn, usage_of
from ..errors import ApiError, ErrorCode, Outcome
from ..readers import collect, generation_for, stream
from ..relay import Generation, Result
from ..web import json_response, read_json
from .options import MaxTokens, Model, Options, Temperature, options
from .streams import resume_post


class ChatBody(BaseModel):
    """A chat turn. Unknown fields are ignored, so clients can send more later. The model
    options are the turn's own: a conversation may change models from one turn to the next."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    message: StrictStr
    conversationId: StrictStr | None = None  # wire names are camelCase
    model: Model = None
    maxTokens: MaxTokens = None
    temperature: Temperature = None


class ChatVocabulary:
    """The second design note's events: metadata, token, done, error."""

    content_head = b'{"type":"token","content":'

    def __init__(self, turn: Turn, prompt_estimate: int) -> None:
        self.turn = turn
        self.prompt_estimate = prompt_estimate

    @staticmethod
    def content_tail(deltas: int) -> bytes:
        return b"}"

    def metadata(self, model: str) -> dict[str, Any]:
        return {
            "type": "metadata",
            "conversationId": self.turn.conversation_id,
            "messageId": self.turn.answer_id,
            "model": model,
        }

    def done(self, result: Result) -> dict[str, Any]:
        return {
            "type": "done",
            "conversationId": self.turn.conversation_id,
            "messageId": self.turn.answer_id,
            "usage": usage_of(result, self.prompt_estimate),
            "finishReason": result.finish_reason,
        }

    @staticmethod
    def error(result: Result) -> dict[str, Any]:
        return result.error_event()


def _owner(request: web.Request) -> str:
    """A conversation belongs to the API key that made it; "" when keys are off."""
    return request.get(keys.KEY_ID) or ""


async def _read(request: web.Request) -> tuple[ChatBody, str, Options]:
    """The turn's body, its message as it will be saved and its checked options: every 400
    before anything is taken."""
    settings = request.app[keys.SETTINGS]
    body = await read_json(request, ChatBody)
    text = sanitize(body.message, settings.chat_message_max_chars)
    return body, text, options(body, settings)


@contextlib.asynccontextmanager
async def _turn(
    request: web.Request,
    route: str,
    read: tuple[ChatBody, str, Options],
    streamed: bool,
) -> AsyncIterator[tuple[Turn, Generation]]:
    """The turn (`Chats.turn`, admitted against the client's limits) and its generation, which
    saves the answer as it ends (`Chats.answered`); the caller holds the `MAX_STREAMS` slot
    around it."""
    body, text, chosen = read
    chats = request.app[keys.CHATS]
    admit = functools.partial(limited, request)
    async with chats.turn(body.conversationId, _owner(request), text, admit) as turn:
        upstream_request = chosen.request(turn.context)
        vocabulary = ChatVocabulary(turn, turn.prompt_estimate) if streamed else None
        generation = generation_for(
            request,
            route,
            upstream_request,
            turn.meter,
            vocabulary=vocabulary,
            opening=vocabulary.metadata(upstream_request.model) if vocabulary else None,
            stream_id=turn.answer_id,
            on_end=functools.partial(chats.answered, turn),
        )
        turn.progress = generation.text_so_far  # the answer's checkpoints read it
        yield turn, generation


async def chat_stream(request: web.Request) -> web.StreamResponse:
    resumed = await resume_post(request, "chat_stream", {})  # before anything else
    if resumed is not None:
        return resumed
    read = await _read(request)
    with take_slot(request):
        async with _turn(request, "chat_stream", read, streamed=True) as (_, generation):
            # The answer is saved and the turn free before `done` goes out: a client may send its
            # next turn as soon as it reads it.
            return await stream(request, generation)


async def chat(request: web.Request) -> web.Response:
    read = await _read(request)
    with take_slot(request):
        async with _turn(request, "chat", read, streamed=False) as (turn, generation):
            result = await collect(request, generation)
    answer = turn.answer
    if result.outcome is not Outcome.COMPLETED or answer is None:
        raise result.failure()
    return json_response(
        {
            "conversationId": turn.conversation_id,
            "messageId": answer.message_id,
            "model": answer.model,
            "content": answer.content,
            "usage": answer.usage,
            "finishReason": answer.finish_reason,
        }
    )


async def _visible(request: web.Request) -> tuple[Chats, str]:
    chats = request.app[keys.CHATS]
    conversation_id = request.match_info["conversationId"]
    if not await chats.visible(conversation_id, _owner(request)):
        raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
    return chats, conversation_id


async def get_conversation(request: web.Request) -> web.Response:
    chats, conversation_id = await _visible(request)
    conversation = await chats.load(conversation_id)
    if conversation is None:
        raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
    return json_response(conversation.wire())


async def delete_conversation(request: web.Request) -> web.Response:
    chats, conversation_id = await _visible(request)
    await chats.forget(conversation_id)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app.router.add_post("/api/v1/ai/chat", chat, name="chat")
    app.router.add_post("/api/v1/ai/chat/stream", chat_stream, name="chat_stream")
    conversation = app.router.add_resource(
        "/api/v1/ai/conversations/{conversationId}", name="conversation"
    )
    conversation.add_route("GET", get_conversation)
    conversation.add_route("DELETE", delete_conversation)
