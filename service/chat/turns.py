"""One chat turn, end to end, as one async context (`Chats.turn`): check the conversation and take
its turn, build the model's context from its history, admit the turn against the client's limits,
save the user's message before the upstream is called; the body runs the generation, whose end
saves the answer exactly once (`Chats.answered`), whatever ended it; then the limits are given
back and the turn released. The store's errors reach a request as one answer, a 503 with
Retry-After (`_answerable`), translated once at this boundary.

The context's exit runs as a task of its own that the handler waits for but a cancellation cannot
stop (a client that leaves, even before the generation, cancels the handler at whatever await it is
in; its turn must still be released and its `partial` answer written, or its unanswered message
taken back). `aclose()` waits for exits still in flight, so shutdown loses none. A save that fails
is retried a few times with backoff, then logged with the conversation id.

Crash durability: the answer is opened (`streaming`, no text) with the user's message, before the
upstream is called; while it streams, the `checkpoints` task saves its text (read from the turn's
`progress`, the generation's `text_so_far`) every `CHECKPOINT_S`; its end closes it in place. A
process killed mid-answer leaves it open: at start-up `recover` closes the open answers of the
turns it frees as `partial`, and a turn that takes a conversation whose last lease lapsed closes
them before reading the history (`stores`, notes 1 to 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, ParamSpec, TypeVar

import structlog

from ..config import Settings
from ..errors import ApiError, ErrorCode
from ..metrics import Metrics
from ..prompts import estimate_tokens
from ..relay import Meter, Result
from ..sse import valid_stream_id
from ..tasks import outlive_cancel
from .checkpoints import Checkpointer
from .conversations import (
    Conversation,
    Message,
    build_context,
    new_conversation_id,
    new_message_id,
    status_of,
    valid_conversation_id,
)
from .holders import gone, new_holder, token_of
from .stores import ConversationStore, StoreUnavailable

log = structlog.get_logger("service.chat")

TURN_LEASE_S: Final = 30.0  # a turn's hold on its conversation, renewed every third of it
HISTORY_WINDOW: Final = 200  # newest messages read to build a context (the budget trims more)
SAVE_ATTEMPTS: Final = 4

P = ParamSpec("P")
T = TypeVar("T")
# The client's limits for a turn: entered with its prompt estimate, the stream's account inside.
Admit = Callable[[int], contextlib.AbstractAsyncContextManager[Meter]]


def _answerable(call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """The store's errors as the answer a request gets: a 503 with Retry-After, logged."""

    @functools.wraps(call)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except StoreUnavailable as err:
            log.error("chat.store_unavailable", error=str(err))
            raise ApiError(
                ErrorCode.INTERNAL,
                "Conversation storage is unavailable; retry shortly.",
                status=503,
            ) from err

    return translated


@dataclass(slots=True, eq=False)
class Turn:
    """What one turn took, so that its exit gives back exactly that. The flags are set before the
    store is asked, so a cancellation while the call is in flight still undoes it (releasing a
    turn that is not ours, or removing a message that was not saved, changes nothing)."""

    conversation_id: str
    owner: str
    is_new: bool
    user: Message
    answer_id: str
    context: list[dict[str, Any]] = field(default_factory=list)
    prompt_estimate: int = 0
    holder: str = field(default_factory=new_holder)
    started: float = 0.0
    held: bool = False  # the conversation's turn may be ours
    created: bool = False  # the (new) conversation may have been created
    user_saved: bool = False  # the user's message may have been saved
    meter: Meter | None = None  # the turn's account with the limits, once admitted
    result: Result | None = None  # its generation's, once ended: saved as the answer
    answer: Message | None = None
    opened: bool = False  # the answer may have been opened (`streaming`)
    progress: Callable[[], str] | None = None  # the answer's text so far, for checkpoints
    renewer: asyncio.Task[None] | None = None
    ending: asyncio.Task[None] | None = None  # the turn's end, run once (`Chats._end`)


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
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self._settings = settings
        self._clock = clock
        self._saving: set[asyncio.Task[Any]] = set()
        self.checkpoints = Checkpointer(store, settings.checkpoint_s, clock, metrics)

    @_answerable
    async def visible(self, conversation_id: str, owner: str) -> bool:
        """Whether `owner` may see the conversation (unknown and someone else's look alike)."""
        if not valid_conversation_id(conversation_id):
            return False
        return await self.store.owner(conversation_id) == owner

    @contextlib.asynccontextmanager
    async def turn(
        self, conversation_id: str | None, owner: str, text: str, admit: Admit
    ) -> AsyncIterator[Turn]:
        """One turn as a context: the conversation checked (404), its turn held (409) and the
        model's context built from its history; the client's limits (`admit`, 429) as the
        turn's `meter`; the user's message saved. The body runs the generation, with `answered`
        as its end. On exit, whatever ended it (an error, a cancellation at any await, the
        answer's end): the limits are given back (unless its generation settled them), the
        answer is saved if a generation ended, otherwise the user's message is taken back; then
        the turn is released. That work outlives a cancellation, and `aclose()` waits for it."""
        now = self._clock()
        answer_id = new_message_id()
        turn = Turn(
            conversation_id or new_conversation_id(),
            owner,
            conversation_id is None,
            Message(new_message_id(), "user", text, "complete", now, now),
            answer_id,
            holder=new_holder(answer_id),  # a refused turn names the stream to resume
        )
        try:
            await self._begin(turn)
            async with admit(turn.prompt_estimate) as meter:
                turn.meter = meter
                await self._start(turn)
                yield turn
        finally:
            await self._end(turn)

    async def answered(self, turn: Turn, result: Result) -> None:
        """The turn's generation ended with `result`: save it as the answer and release the
        turn now, before the generation's last event (a client may send its next turn as soon
        as it reads it)."""
        turn.result = result
        await self._end(turn)

    @_answerable
    async def _begin(self, turn: Turn) -> None:
        settings, cid = self._settings, turn.conversation_id
        if turn.is_new:
            turn.context = build_context(settings.chat_system_prompt, [], turn.user.content, 0)
            turn.prompt_estimate = estimate_tokens(turn.context)
            return
        if not await self.visible(cid, turn.owner):
            raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
        turn.held = True
        if not await self.store.take_turn(cid, turn.holder, TURN_LEASE_S):
            turn.held = False
            holder = await self.store.turn_holder(cid)
            answering = token_of(holder) if holder else ""
            raise ApiError(
                ErrorCode.CONFLICT,
                "Another message in this conversation is still being answered; "
                "send this one when it has finished.",
                # the answer being written, to resume (GET /api/v1/ai/streams/{streamId})
                details={"streamId": answering} if valid_stream_id(answering) else None,
            )
        # Read after taking the turn: the previous turn saved its answer before releasing.
        conversation = await self.store.load(cid, HISTORY_WINDOW)
        if conversation is None:  # deleted in between
            raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
        if any(m.status == "streaming" for m in conversation.messages):
            # Open answers under our turn are a lapsed turn's: its process died. Close them.
            await self.store.close_abandoned(cid, turn.holder, self._clock())
            conversation = await self.store.load(cid, HISTORY_WINDOW)
            if conversation is None:
                raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
        turn.context = build_context(
            settings.chat_system_prompt,
            conversation.messages,
            turn.user.content,
            settings.chat_context_tokens,
        )
        turn.prompt_estimate = estimate_tokens(turn.context)

    @_answerable
    async def _start(self, turn: Turn) -> None:
        """Save the user's message (creating a new conversation) before the upstream is called,
        and keep the turn held while the answer streams."""
        store, cid = self.store, turn.conversation_id
        turn.started = self._clock()
        if turn.is_new:
            turn.created = True
            await store.create(cid, turn.owner, turn.user.created_at)
            turn.held = True
            await store.take_turn(cid, turn.holder, TURN_LEASE_S)
        turn.user_saved = True
        if not await store.append(cid, turn.user, self._clock()):
            raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
        turn.opened = True
        if not await store.open_answer(cid, self._opening(turn), self._clock()):
            raise ApiError(ErrorCode.NOT_FOUND, "No such conversation.")
        self.checkpoints.track(turn)
        turn.renewer = asyncio.create_task(self._renew(turn))

    async def _renew(self, turn: Turn) -> None:
        while True:
            await asyncio.sleep(TURN_LEASE_S / 3)
            try:
                if not await self.store.renew_turn(turn.conversation_id, turn.holder, TURN_LEASE_S):
                    log.warning("chat.turn_lost", conversation_id=turn.conversation_id)
            except StoreUnavailable as err:
                log.warning("chat.turn_renew_failed", error=str(err))

    async def _end(self, turn: Turn) -> None:
        """The turn's end, run once whoever asks first (its generation as it ends, so the answer
        is saved before its last event; else the turn's context on exit): the answer saved if a
        generation ended, else the message taken back; then the turn released. It outlives a
        cancellation of the caller, and `aclose()` waits for it."""
        if turn.ending is None:
            turn.ending = task = asyncio.create_task(self._ending(turn))
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)
        await outlive_cancel(turn.ending)

    async def _ending(self, turn: Turn) -> None:
        self.checkpoints.forget(turn)
        if turn.renewer is not None:
            turn.renewer.cancel()
        try:
            if turn.result is not None:
                await self._save_answer(turn, turn.result)
            elif turn.user_saved or turn.created:
                await self._take_back(turn)
        finally:
            if turn.held:
                turn.held = False
                with contextlib.suppress(StoreUnavailable):
                    await self.store.release_turn(turn.conversation_id, turn.holder)

    async def _take_back(self, turn: Turn) -> None:
        """The model was never called: the turn did not happen. A new conversation goes (its id
        was never sent), an existing one loses the user's message; should that fail,
        `build_context` still leaves an unanswered message out."""
        try:
            if turn.created:
                await self.store.delete(turn.conversation_id)
            else:
                await self.store.remove(turn.conversation_id, turn.user)
                if turn.opened:
                    await self.store.remove(turn.conversation_id, self._opening(turn))
        except StoreUnavailable as err:
            log.warning(
                "chat.take_back_failed", conversation_id=turn.conversation_id, error=str(err)
            )

    @staticmethod
    def _opening(turn: Turn) -> Message:
        return Message(turn.answer_id, "assistant", "", "streaming", turn.started)

    async def _save_answer(self, turn: Turn, result: Result) -> None:
        """Close the open answer once with its final text, retried with backoff; the turn is
        released after it."""
        turn.answer = answer = Message(
            turn.answer_id,
            "assistant",
            result.text,
            status_of(result.outcome),
            turn.started,
            self._clock(),
            result.model,
            usage_of(result, turn.prompt_estimate),
            result.finish_reason,
        )
        for attempt in range(SAVE_ATTEMPTS):
            try:
                saved = await self.store.close_answer(turn.conversation_id, answer, self._clock())
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

    async def recover(self) -> int:
        """At start-up: free at once the turns whose holder process is gone from this host (a
        SIGKILL, an OOM kill) instead of after their lease, and close the answers they left open
        as `partial`, with their checkpointed text. How many turns were freed."""
        try:
            held = await self.store.held_turns()
            freed = 0
            for conversation_id, holder in held:
                if gone(holder):
                    await self.store.release_turn(conversation_id, holder)
                    await self.store.close_abandoned(conversation_id, "", self._clock())
                    freed += 1
        except StoreUnavailable as err:
            log.warning("chat.recover_failed", error=str(err))
            return 0
        log.info("chat.turns_recovered", freed=freed, held=len(held))
        return freed

    @_answerable
    async def load(self, conversation_id: str) -> Conversation | None:
        return await self.store.load(conversation_id)

    @_answerable
    async def forget(self, conversation_id: str) -> None:
        """Delete the conversation; a turn still streaming on it will not be saved."""
        await self.store.delete(conversation_id)

    async def aclose(self) -> None:
        """Stop the checkpoints, wait for answers still being saved, then close the store."""
        await self.checkpoints.aclose()
        if self._saving:
            await asyncio.wait(set(self._saving), timeout=10)
        await self.store.aclose()
