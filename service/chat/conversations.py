"""Conversations as values: messages, their wire shape, input sanitising and the model's context.

Pure functions only; the stores (`stores`) persist these values and the turns (`turns`) drive them.

Context (what the model sees for a turn): the system prompt, then the latest whole turns of the
history that fit `CHAT_CONTEXT_TOKENS`, then the new message. A turn is a user message with the
assistant answers that follow it; history is trimmed from the oldest turn and never inside a
message, so the model never sees half a sentence or an answer without its question. Sizes are
`prompts.estimate_tokens` (4 characters a token, 4 a message), the same estimate the token limit
reserves with. A user message with no answer that has text is not a turn, and is left out.

Statuses: an answer is `streaming` from its turn's start (saved open, its text checkpointed every
`CHECKPOINT_S`) until its turn closes it `complete`, `partial` or `error`; an open answer whose
turn is no longer held (its process died) reads back `partial` with its checkpointed text. The
model never sees a `streaming` answer.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from ..errors import ApiError, ErrorCode, Outcome
from ..prompts import estimate_tokens
from ..sse import new_stream_id

Role = Literal["user", "assistant"]
Status = Literal["complete", "partial", "error", "streaming"]

# Control characters are removed from a message; tab and newline are kept, CR LF becomes LF.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
_ID: Final = re.compile(r"c_[A-Za-z0-9_-]{22}")


def new_conversation_id() -> str:
    return "c_" + secrets.token_urlsafe(16)


def new_message_id() -> str:
    """128 random bits, URL-safe: an answer's message id is also its stream id (`sse`)."""
    return new_stream_id()


def valid_conversation_id(value: str) -> bool:
    """Ids are ours (`new_conversation_id`); anything else is unknown without a store lookup."""
    return _ID.fullmatch(value) is not None


def sanitize(message: str, max_chars: int) -> str:
    """The message as it will be stored and sent: control characters removed, ends trimmed.
    Raises a 400 that says what is wrong."""
    text = _CONTROL.sub("", message.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        raise ApiError(ErrorCode.BAD_REQUEST, "message: must not be empty")
    if len(text) > max_chars:
        raise ApiError(
            ErrorCode.BAD_REQUEST,
            f"message: longer than {max_chars} characters ({len(text)} given)",
        )
    return text


def status_of(outcome: Outcome) -> Status:
    """How a saved answer is flagged: `complete`, `error` when the model server failed, else
    `partial` (the client left, a clock ran out, shutdown, or the token budget): text kept."""
    if outcome is Outcome.COMPLETED:
        return "complete"
    if outcome is Outcome.UPSTREAM_ERROR:
        return "error"
    return "partial"


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Message:
    message_id: str
    role: Role
    content: str
    status: Status
    created_at: float
    completed_at: float | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None  # an answer's: the upstream's word (README, finishReason)

    def wire(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "finishReason": self.finish_reason,
            "createdAt": iso(self.created_at),
            "completedAt": iso(self.completed_at),
            "model": self.model,
            "usage": self.usage,
        }

    def record(self) -> dict[str, Any]:
        """The stored form (short keys, epoch seconds), the same in SQLite and Redis. A record
        saved before `finish` existed reads back with None: a JSON record needs no migration."""
        return {
            "id": self.message_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "finish": self.finish_reason,
            "created": self.created_at,
            "completed": self.completed_at,
            "model": self.model,
            "usage": self.usage,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Message:
        return cls(
            message_id=record["id"],
            role=record["role"],
            content=record["content"],
            status=record["status"],
            created_at=record["created"],
            completed_at=record.get("completed"),
            model=record.get("model"),
            usage=record.get("usage"),
            finish_reason=record.get("finish"),
        )


@dataclass(slots=True)
class Conversation:
    conversation_id: str
    owner: str  # the API key's id that made it, or "" when keys are off
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {
            "conversationId": self.conversation_id,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "messages": [m.wire() for m in self.messages],
        }


def build_context(
    system_prompt: str, history: Sequence[Message], message: str, budget: int
) -> list[dict[str, Any]]:
    """The messages sent upstream: system prompt, the newest whole turns within `budget`
    tokens (estimated), then `message`. Empty answers (a failure before any text) and answers
    still `streaming` (another turn's, never whole) are left out,
    and so is a user message that no answer with text followed (its turn was cut before the
    model said anything, or its process was killed): the model never sees a question twice."""
    system = {"role": "system", "content": system_prompt}
    new = {"role": "user", "content": message}
    left = budget - estimate_tokens([system, new])
    kept: list[list[dict[str, Any]]] = []
    turn: list[dict[str, Any]] = []
    for item in reversed(history):
        if item.role != "user":
            if item.content and item.status != "streaming":
                turn.insert(0, {"role": item.role, "content": item.content})
            continue
        if not turn:  # unanswered
            continue
        turn.insert(0, {"role": item.role, "content": item.content})
        cost = estimate_tokens(turn)
        if cost > left:
            break
        left -= cost
        kept.insert(0, turn)
        turn = []
    return [system, *(m for t in kept for m in t), new]
