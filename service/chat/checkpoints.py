"""Checkpoints of chat answers in progress: one task per `Chats` saves, every `CHECKPOINT_S`, the
text of every open answer that changed since its last checkpoint, all with one store call (one
SQLite transaction, one Redis script call), so a crash (SIGKILL, OOM) loses at most the last
interval of an answer's text.

1. Nothing per token: each answer's text is read from its turn's `progress` (its generation's
   `text_so_far`) once per interval; an interval in which no answer changed writes nothing.
2. A store error is logged and the answers stay as they were last saved, so the next interval
   writes them again; it never reaches a stream.
3. `CHECKPOINT_S=0` starts no task: answers are saved only when they end.
4. The task starts with the first answer tracked and stops in `aclose()`; an answer is tracked
   from its opening to its turn's end (`forget`, before the turn closes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from ..metrics import Metrics
from .conversations import Message
from .stores import ConversationStore, StoreUnavailable

log = structlog.get_logger("service.chat")


class Progressing(Protocol):
    """What a checkpoint reads of a turn (`turns.Turn`)."""

    @property
    def conversation_id(self) -> str: ...
    @property
    def answer_id(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def progress(self) -> Callable[[], str] | None: ...


class Checkpointer:
    def __init__(
        self,
        store: ConversationStore,
        interval_s: float,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._clock = clock
        self._metrics = metrics
        # Open answers: the length of the text last saved (text only grows; a copy of the text
        # would double each answer's memory).
        self._saved: dict[Progressing, int] = {}
        self._task: asyncio.Task[None] | None = None

    def track(self, turn: Progressing) -> None:
        """Checkpoint `turn`'s answer (opened with no text) until `forget`."""
        if self._interval_s <= 0:
            return  # note 3
        self._saved[turn] = 0
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="chat-checkpoints")

    def forget(self, turn: Progressing) -> None:
        self._saved.pop(turn, None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except Exception:  # a bug must not stop every later checkpoint
                log.exception("chat.checkpoint_crashed")

    async def flush(self) -> int:
        """Write every open answer whose text changed since its last checkpoint, in one call;
        how many the store still had open."""
        changed: list[tuple[Progressing, str]] = []
        for turn, saved in self._saved.items():
            progress = turn.progress
            if progress is None:
                continue
            text = progress()
            if len(text) != saved:
                changed.append((turn, text))
        if not changed:
            return 0  # note 1
        updates = [
            (t.conversation_id, Message(t.answer_id, "assistant", text, "streaming", t.started))
            for t, text in changed
        ]
        try:
            written = await self._store.checkpoint(updates, self._clock())
        except StoreUnavailable as err:  # note 2
            log.warning("chat.checkpoint_failed", answers=len(updates), error=str(err))
            return 0
        for turn, text in changed:
            if turn in self._saved:
                self._saved[turn] = len(text)
        if self._metrics is not None:
            self._metrics.checkpoints.inc()
            self._metrics.checkpoint_answers.inc(written)
        return written

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
