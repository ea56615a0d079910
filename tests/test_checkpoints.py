"""The checkpointer against a real SQLite store: one write per interval for every answer that
changed, nothing when nothing changed, a store error retried at the next interval, counted in
`ai_stream_checkpoints_total` and `ai_stream_checkpoint_answers_total`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.chat.checkpoints import Checkpointer
from service.chat.conversations import Message, new_conversation_id, new_message_id
from service.chat.stores import SqliteStore, StoreUnavailable
from service.metrics import Metrics, create_metrics
from tests.conftest import WAIT


class CountingStore(SqliteStore):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.calls: list[list[str]] = []
        self.fail_next = False

    async def checkpoint(self, updates: Sequence[tuple[str, Message]], now: float) -> int:
        self.calls.append([m.content for _, m in updates])
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailable("sqlite: disk I/O error")
        return await super().checkpoint(updates, now)


@dataclass(eq=False)
class Answer:
    conversation_id: str
    answer_id: str
    started: float
    text: str = ""

    @property
    def progress(self) -> Callable[[], str]:
        return lambda: self.text


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    store = CountingStore(str(tmp_path / "chat.db"))
    await store.open()
    yield store
    await store.aclose()


async def opened(store: SqliteStore) -> Answer:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    answer = Answer(cid, new_message_id(), 1.0)
    message = Message(answer.answer_id, "assistant", "", "streaming", 1.0)
    assert await store.open_answer(cid, message, 1.0)
    return answer


def counts(metrics: Metrics) -> tuple[float | None, float | None]:
    get = metrics.registry.get_sample_value
    return get("ai_stream_checkpoints_total"), get("ai_stream_checkpoint_answers_total")


async def test_one_write_for_every_changed_answer_and_none_when_nothing_changed(
    store: CountingStore,
) -> None:
    metrics = create_metrics(CollectorRegistry(), [])
    checkpoints = Checkpointer(store, 3600, metrics=metrics)  # flushed by hand here
    a, b, c = await opened(store), await opened(store), await opened(store)
    for answer in (a, b, c):
        checkpoints.track(answer)
    try:
        assert await checkpoints.flush() == 0  # nothing yet
        a.text, b.text = "alpha", "beta"
        assert await checkpoints.flush() == 2
        assert await checkpoints.flush() == 0
        b.text += " more"
        assert await checkpoints.flush() == 1
        assert store.calls == [["alpha", "beta"], ["beta more"]]
        assert counts(metrics) == (2.0, 3.0)

        c.text = "gamma"
        store.fail_next = True
        assert await checkpoints.flush() == 0  # logged, never raised
        assert await checkpoints.flush() == 1  # retried at the next interval
        assert store.calls[-2:] == [["gamma"], ["gamma"]]

        checkpoints.forget(a)
        a.text += " after its end"
        assert await checkpoints.flush() == 0
        loaded = await store.load(a.conversation_id)
        assert loaded is not None
        assert loaded.messages[0].content == "alpha"
    finally:
        await checkpoints.aclose()


async def test_the_task_saves_every_interval_and_zero_starts_none(store: CountingStore) -> None:
    checkpoints = Checkpointer(store, 0.05)
    answer = await opened(store)
    checkpoints.track(answer)
    try:
        answer.text = "saved by the task"
        async with asyncio.timeout(WAIT):
            while True:
                loaded = await store.load(answer.conversation_id)
                assert loaded is not None
                if loaded.messages[0].content == answer.text:
                    break
                await asyncio.sleep(0.05)  # bounded by the timeout: polling the task's effect
    finally:
        await checkpoints.aclose()

    off = Checkpointer(store, 0)
    off.track(answer)
    assert off._task is None
    answer.text += " and more"
    assert await off.flush() == 0  # saved only at its end
    await off.aclose()
