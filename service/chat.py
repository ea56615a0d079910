"""One chat turn's life around the relay: check the conversation and take its turn, save the
user's message before the upstream is called, and save the answer exactly once when the stream
ends, whatever ended it.

The answer is saved by a task of its own that the handler waits for but a cancellation cannot
stop (a client that leaves mid-answer cancels the handler; its `partial` answer must still be
written). `aclose()` waits for saves still in flight, so shutdown loses none. A save that fails is
retried a few times with backoff, then logged with the conversation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from .chat_store import ConversationStore, StoreUnavailable
from .config import Settings
from .conversations import (
    Conversation,
    Message,
    build_context,
    new_conversation_id,
    new_message_id,
    status_of,
    valid_conversation_id,
)
from .errors import ApiError
from .relay import Result

log = structlog.get_logger("service.chat")

TURN_LEASE_S: Final = 30.0  # a turn's hold on its conversation, renewed every third of it
HISTORY_WINDOW: Final = 200  # newest messages read to build a context (the budget trims more)
SAVE_ATTEMPTS: Final = 4


def unavailable(err: StoreUnavailable) -> ApiError:
    log.error("chat.store_unavailable", error=str(err))
    return ApiError(
        "internal",
        "Conversation storage is unavailable; retry shortly.",
        status=503,
        retry_after_s=1,
    )


@dataclass(slots=True, eq=False)
class Turn:
    conversation_id: str
    owner: str
    is_new: bool
    user: Message
    answer_id: str
    context: list[dict[str, Any]]
    holder: str = field(default_factory=lambda: secrets.token_hex(8))
    started: float = 0.0
    held: bool = False
    renewer: asyncio.Task[None] | None = None


def usage_of(result: Result, prompt_estimate: int) -> dict[str, int]:
    """The upstream's usage; when it reported none (a stream cut short), the prompt estimate and
    the deltas relayed."""
    prompt = result.prompt_tokens if result.usage else prompt_estimate
    completion = result.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class Chats:
    """Turns on conversations kept in `store`."""

    def __init__(
        self,
        store: ConversationStore,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._settings = settings
        self._clock = clock
        self._saving: set[asyncio.Task[None]] = set()

    async def visible(self, conversation_id: str, owner: str) -> bool:
        """Whether `owner` may see the conversation (unknown and someone else's look alike)."""
        if not valid_conversation_id(conversation_id):
            return False
        try:
            return await self.store.owner(conversation_id) == owner
        except StoreUnavailable as err:
            raise unavailable(err) from err

    async def begin(self, conversation_id: str | None, owner: str, text: str) -> Turn:
        """Check the conversation, hold its turn and build the model's context.
        404 for an unknown conversation (or another key's), 409 while another turn runs."""
        settings, now = self._settings, self._clock()
        user = Message(new_message_id(), "user", text, "complete", now, now)
        if conversation_id is None:
            context = build_context(settings.chat_system_prompt, [], text, 0)
            return Turn(new_conversation_id(), owner, True, user, new_message_id(), context)
        if not await self.visible(conversation_id, owner):
            raise ApiError("not_found", "No such conversation.")
        turn = Turn(conversation_id, owner, False, user, new_message_id(), [])
        try:
            turn.held = await self.store.take_turn(conversation_id, turn.holder, TURN_LEASE_S)
            if not turn.held:
                raise ApiError(
                    "conflict",
                    "Another message in this conversation is still being answered; "
                    "send this one when it has finished.",
                )
            # Read after taking the turn: the previous turn saved its answer before releasing.
            conversation = await self.store.load(conversation_id, HISTORY_WINDOW)
        except StoreUnavailable as err:
            await self.abandon(turn)
            raise unavailable(err) from err
        if conversation is None:  # deleted in between
            await self.abandon(turn)
            raise ApiError("not_found", "No such conversation.")
        turn.context = build_context(
            settings.chat_system_prompt,
            conversation.messages,
            text,
            settings.chat_context_tokens,
        )
        return turn

    async def start(self, turn: Turn) -> None:
        """Save the user's message (creating a new conversation) before the upstream is called,
        and keep the turn held while the answer streams."""
        store = self.store
        turn.started = self._clock()
        try:
            if turn.is_new:
                await store.create(turn.conversation_id, turn.owner, turn.user.created_at)
                turn.held = await store.take_turn(turn.conversation_id, turn.holder, TURN_LEASE_S)
            if not await store.append(turn.conversation_id, turn.user, self._clock()):
                raise ApiError("not_found", "No such conversation.")
        except StoreUnavailable as err:
            await self.abandon(turn)
            raise unavailable(err) from err
        turn.renewer = asyncio.create_task(self._renew(turn))

    async def _renew(self, turn: Turn) -> None:
        while True:
            await asyncio.sleep(TURN_LEASE_S / 3)
            try:
                if not await self.store.renew_turn(turn.conversation_id, turn.holder, TURN_LEASE_S):
                    log.warning("chat.turn_lost", conversation_id=turn.conversation_id)
            except StoreUnavailable as err:
                log.warning("chat.turn_renew_failed", error=str(err))

    async def abandon(self, turn: Turn) -> None:
        """The turn will not run: let the conversation take another."""
        if turn.renewer is not None:
            turn.renewer.cancel()
        if turn.held:
            turn.held = False
            with contextlib.suppress(StoreUnavailable):
                await self.store.release_turn(turn.conversation_id, turn.holder)

    async def finish(self, turn: Turn, result: Result, prompt_estimate: int) -> Message:
        """Save the answer once, then free the turn. The save is a task of its own: cancelling
        the caller does not stop it, and `aclose()` waits for it."""
        answer = Message(
            turn.answer_id,
            "assistant",
            result.text,
            status_of(result.outcome),
            turn.started,
            self._clock(),
            result.model,
            usage_of(result, prompt_estimate),
            result.finish_reason,
        )
        task = asyncio.create_task(self._save(turn, answer))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)
        await asyncio.shield(task)
        return answer

    async def _save(self, turn: Turn, answer: Message) -> None:
        try:
            for attempt in range(SAVE_ATTEMPTS):
                try:
                    saved = await self.store.append(turn.conversation_id, answer, self._clock())
                except StoreUnavailable as err:
                    if attempt + 1 == SAVE_ATTEMPTS:
                        log.error(
                            "chat.answer_lost",
                            conversation_id=turn.conversation_id,
                            message_id=answer.message_id,
                            error=str(err),
                        )
                        return
                    await asyncio.sleep(0.25 * 2**attempt)
                    continue
                if not saved:
                    log.info("chat.answer_dropped", conversation_id=turn.conversation_id)
                return
        finally:
            await self.abandon(turn)

    async def load(self, conversation_id: str) -> Conversation | None:
        try:
            return await self.store.load(conversation_id)
        except StoreUnavailable as err:
            raise unavailable(err) from err

    async def forget(self, conversation_id: str) -> None:
        """Delete the conversation; a turn still streaming on it will not be saved."""
        try:
            await self.store.delete(conversation_id)
        except StoreUnavailable as err:
            raise unavailable(err) from err

    async def aclose(self) -> None:
        """Wait for answers still being saved, then close the store."""
        if self._saving:
            await asyncio.wait(set(self._saving), timeout=10)
        await self.store.aclose()
