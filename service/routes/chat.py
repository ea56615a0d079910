"""`POST /api/v1/ai/chat` (JSON) and `POST /api/v1/ai/chat/stream` (SSE "chat" events), and the
saved conversations: `GET` and `DELETE /api/v1/ai/conversations/{conversationId}`.

A turn runs on the same relay as generate, with the second design note's vocabulary (metadata,
token, done, error). Order of a turn: validate, check the conversation and hold its turn (404,
409), admit against the limits (429), save the user's message, relay, save the answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StrictStr

from .. import keys
from ..chat import Chats, Turn, usage_of
from ..conversations import sanitize
from ..errors import ApiError, Outcome
from ..http import admit, failed, json_response, last_event, read_json, relay_for, sse_response
from ..prompts import estimate_tokens
from ..relay import Relay, Result
from ..upstream import CompletionRequest


class ChatBody(BaseModel):
    """A chat turn. Unknown fields are ignored, so clients can send more later."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    message: StrictStr
    conversationId: StrictStr | None = None  # wire names are camelCase


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


async def _open_turn(request: web.Request, route: str) -> tuple[Turn, Relay, int]:
    """Everything before the upstream is called: the turn held, the client admitted, the user's
    message saved. Whatever fails on the way releases what was taken."""
    settings = request.app[keys.SETTINGS]
    body = await read_json(request, ChatBody)
    text = sanitize(body.message, settings.chat_message_max_chars)
    chats = request.app[keys.CHATS]
    turn = await chats.begin(body.conversationId, _owner(request), text)
    estimate = estimate_tokens(turn.context)
    try:
        ticket = await admit(request, estimate)
    except BaseException:
        await chats.abandon(turn)
        raise
    try:
        await chats.start(turn)
    except BaseException:
        await request.app[keys.LIMITS].give_back(ticket.client, ticket.lease, ticket.reserved)
        raise
    upstream_request = CompletionRequest(
        model=settings.openai_model,
        messages=turn.context,
        max_tokens=settings.default_max_tokens,
        temperature=None,
    )
    relay = relay_for(request, route, upstream_request, ticket, stream_id=turn.answer_id)
    return turn, relay, estimate


async def chat_stream(request: web.Request) -> web.StreamResponse:
    turn, relay, estimate = await _open_turn(request, "chat_stream")
    chats = request.app[keys.CHATS]
    vocabulary = ChatVocabulary(turn, estimate)
    response, writer = sse_response(request, relay, vocabulary)

    async def opening() -> None:
        await response.prepare(request)
        await writer.event(vocabulary.metadata(relay.request.model))

    try:
        result = await relay.run(opening)
    finally:
        await chats.finish(turn, relay.result, estimate)
    await last_event(writer, result, relay.settings.write_timeout_s)
    return response


async def chat(request: web.Request) -> web.Response:
    turn, relay, estimate = await _open_turn(request, "chat")
    try:
        result = await relay.run()
    finally:
        answer = await request.app[keys.CHATS].finish(turn, relay.result, estimate)
    if result.outcome is not Outcome.COMPLETED:
        raise failed(result)
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
        raise ApiError("not_found", "No such conversation.")
    return chats, conversation_id


async def get_conversation(request: web.Request) -> web.Response:
    chats, conversation_id = await _visible(request)
    conversation = await chats.load(conversation_id)
    if conversation is None:
        raise ApiError("not_found", "No such conversation.")
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
