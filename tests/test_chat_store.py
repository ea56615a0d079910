"""One behaviour suite for both conversation stores: SQLite (a file) and Redis (a real
redis-server). Turn leases run on a clock the test moves, in SQLite; Redis expires them itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.chat.conversations import Message, new_conversation_id, new_message_id
from service.chat.stores import ConversationStore, RedisStore, SqliteStore, StoreUnavailable
from tests.conftest import WAIT, RedisServer, start_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    if request.param == "sqlite":
        sqlite = SqliteStore(str(tmp_path / "chat.db"))
        await sqlite.open()
        yield sqlite
        await sqlite.aclose()
        return
    server = await start_redis()
    redis = RedisStore(server.url)
    try:
        yield redis
    finally:
        await redis.aclose()
        await server.stop()


def message(role: str = "user", content: str = "hello", **kwargs: object) -> Message:
    return Message(new_message_id(), role, content, "complete", 1.5, 2.5, **kwargs)  # type: ignore[arg-type]


async def test_a_conversation_keeps_its_messages_in_order(store: ConversationStore) -> None:
    cid = new_conversation_id()
    await store.create(cid, "key-a", 10.0)
    sent = [
        message("user", "first question"),
        message("assistant", "first answer", model="m", usage={"prompt_tokens": 3}),
        message("user", 'second\nquestion with "quotes" and ünïcode'),
    ]
    for n, m in enumerate(sent):
        assert await store.append(cid, m, 11.0 + n)
    loaded = await store.load(cid)
    assert loaded is not None
    assert (loaded.conversation_id, loaded.owner, loaded.created_at) == (cid, "key-a", 10.0)
    assert loaded.updated_at == 13.0
    assert loaded.messages == sent
    assert await store.owner(cid) == "key-a"


async def test_an_answer_keeps_its_finish_reason_beside_its_status(
    store: ConversationStore,
) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 10.0)
    sent = [
        message("user", "question"),
        message("assistant", "cut short", finish_reason="length"),
        message("assistant", "filtered", finish_reason="content_filter"),
        message("assistant", "no word from the upstream"),
    ]
    for m in sent:
        assert await store.append(cid, m, 11.0)
    loaded = await store.load(cid)
    assert loaded is not None
    assert loaded.messages == sent
    assert [m.wire()["finishReason"] for m in loaded.messages] == [
        None,
        "length",
        "content_filter",
        None,
    ]


async def test_last_reads_only_the_newest_messages(store: ConversationStore) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    sent = [message(content=f"m{n}") for n in range(7)]
    for m in sent:
        await store.append(cid, m, 2.0)
    loaded = await store.load(cid, last=3)
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["m4", "m5", "m6"]


async def test_unknown_conversations_are_none(store: ConversationStore) -> None:
    cid = new_conversation_id()
    assert await store.load(cid) is None
    assert await store.owner(cid) is None
    assert not await store.append(cid, message(), 1.0)
    assert not await store.delete(cid)
    assert await store.load(cid) is None  # a refused append created nothing


async def test_delete_forgets_everything_and_a_late_answer_is_not_saved(
    store: ConversationStore,
) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    await store.append(cid, message(), 1.0)
    assert await store.take_turn(cid, "t1", 30)
    assert await store.delete(cid)
    assert await store.load(cid) is None
    assert not await store.append(cid, message("assistant", "late"), 2.0)
    assert await store.load(cid) is None
    # The id can be made again from nothing, turn included.
    await store.create(cid, "", 3.0)
    assert await store.take_turn(cid, "t2", 30)


async def test_one_turn_at_a_time_and_only_its_holder_renews_or_releases(
    store: ConversationStore,
) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    assert await store.take_turn(cid, "t1", 30)
    assert not await store.take_turn(cid, "t2", 30)
    assert not await store.renew_turn(cid, "t2", 30)
    await store.release_turn(cid, "t2")  # not the holder: nothing happens
    assert not await store.take_turn(cid, "t2", 30)
    assert await store.renew_turn(cid, "t1", 30)
    await store.release_turn(cid, "t1")
    assert await store.take_turn(cid, "t2", 30)


async def test_a_turn_nobody_renews_expires(tmp_path: Path) -> None:
    """A crashed instance's turn frees itself: SQLite on the store's clock, Redis by PX."""
    clock = Clock()
    sqlite = SqliteStore(str(tmp_path / "chat.db"), clock=clock)
    await sqlite.open()
    try:
        cid = new_conversation_id()
        await sqlite.create(cid, "", 1.0)
        assert await sqlite.take_turn(cid, "crashed", 30)
        clock.now += 29
        assert not await sqlite.take_turn(cid, "next", 30)
        clock.now += 2
        assert await sqlite.take_turn(cid, "next", 30)
    finally:
        await sqlite.aclose()

    server = await start_redis()
    redis = RedisStore(server.url)
    try:
        cid = new_conversation_id()
        await redis.create(cid, "", 1.0)
        assert await redis.take_turn(cid, "crashed", 0.2)
        assert not await redis.take_turn(cid, "next", 30)
        async with asyncio.timeout(WAIT):
            while not await redis.take_turn(cid, "next", 30):  # noqa: ASYNC110 (Redis's clock)
                await asyncio.sleep(0.05)  # bounded: polling Redis's own expiry
    finally:
        await redis.aclose()
        await server.stop()


async def test_sqlite_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "nested" / "dir" / "chat.db")
    first = SqliteStore(path)
    await first.open()
    cid = new_conversation_id()
    await first.create(cid, "k", 1.0)
    sent = message(content="kept")
    await first.append(cid, sent, 2.0)
    await first.aclose()

    second = SqliteStore(path)
    await second.open()
    try:
        loaded = await second.load(cid)
        assert loaded is not None
        assert loaded.messages == [sent]
        journal = await second._call(lambda: second.db.execute("PRAGMA journal_mode").fetchone())
        assert journal == ("wal",)
    finally:
        await second.aclose()


async def test_redis_instances_share_conversations(tmp_path: Path) -> None:
    server = await start_redis()
    a, b = RedisStore(server.url), RedisStore(server.url)
    try:
        cid = new_conversation_id()
        await a.create(cid, "k", 1.0)
        await a.append(cid, message(content="from a"), 2.0)
        assert await a.take_turn(cid, "a-turn", 30)
        assert not await b.take_turn(cid, "b-turn", 30)
        loaded = await b.load(cid)
        assert loaded is not None
        assert [m.content for m in loaded.messages] == ["from a"]
    finally:
        await a.aclose()
        await b.aclose()
        await server.stop()


async def test_an_unreachable_store_says_so(tmp_path: Path) -> None:
    redis = RedisStore("redis://127.0.0.1:9/0")
    try:
        with pytest.raises(StoreUnavailable):
            await redis.load(new_conversation_id())
        with pytest.raises(StoreUnavailable):
            await redis.take_turn(new_conversation_id(), "t", 30)
    finally:
        await redis.aclose()
    directory = tmp_path / "not-a-file"
    directory.mkdir()
    sqlite = SqliteStore(str(directory))
    with pytest.raises(StoreUnavailable):
        await sqlite.open()
    await sqlite.aclose()


async def test_a_message_taken_back_is_gone_and_the_others_stay(store: ConversationStore) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    kept, taken = message(content="kept"), message(content="taken back")
    await store.append(cid, kept, 2.0)
    await store.append(cid, taken, 3.0)
    await store.remove(cid, taken)
    await store.remove(cid, taken)  # twice, or never saved: nothing changes
    await store.remove(new_conversation_id(), kept)
    loaded = await store.load(cid)
    assert loaded is not None
    assert loaded.messages == [kept]


async def test_held_turns_lists_each_holder(store: ConversationStore) -> None:
    a, b = new_conversation_id(), new_conversation_id()
    for cid in (a, b):
        await store.create(cid, "", 1.0)
    assert await store.held_turns() == []
    assert await store.take_turn(a, "holder|a", 30)
    assert sorted(await store.held_turns()) == [(a, "holder|a")]
    await store.release_turn(a, "holder|a")
    assert await store.held_turns() == []


async def test_turn_holder_names_who_holds_the_turn(store: ConversationStore) -> None:
    """A refused turn reads who holds it (the holder's token names the stream to resume)."""
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    assert await store.turn_holder(cid) is None
    assert await store.take_turn(cid, "answer-id|host", 30)
    assert await store.turn_holder(cid) == "answer-id|host"
    await store.release_turn(cid, "answer-id|host")
    assert await store.turn_holder(cid) is None
    assert await store.turn_holder(new_conversation_id()) is None


async def test_redis_store_answers_the_first_request_after_a_redis_restart() -> None:
    """Pooled connections are stale once Redis restarts; the first calls after it still succeed."""
    server = await start_redis()
    redis = RedisStore(server.url)
    try:
        conversation_id = new_conversation_id()
        await redis.create(conversation_id, "owner", 1.0)
        # Several connections in the pool, all of which the restart leaves stale.
        await asyncio.gather(*(redis.owner(conversation_id) for _ in range(4)))
        await server.restart()  # healthy (and empty) from here on
        results = await asyncio.gather(
            *(redis.owner(conversation_id) for _ in range(4)), return_exceptions=True
        )
        assert results == [None, None, None, None]  # answered (the data went with the restart)
        await redis.create(conversation_id, "owner", 2.0)
        assert await redis.owner(conversation_id) == "owner"
    finally:
        await redis.aclose()
        await server.stop()


def opening(content: str = "") -> Message:
    return Message(new_message_id(), "assistant", content, "streaming", 1.5)


async def test_an_open_answer_streams_then_is_closed_in_place(store: ConversationStore) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    user = message("user", "question")
    await store.append(cid, user, 2.0)
    assert await store.take_turn(cid, "holder", 30)
    answer = opening()
    assert await store.open_answer(cid, answer, 2.0)
    loaded = await store.load(cid)
    assert loaded is not None
    assert loaded.messages == [user, answer]
    assert loaded.messages[1].wire()["status"] == "streaming"

    answer.content = "Half an"
    assert await store.checkpoint([(cid, answer)], 3.0) == 1
    loaded = await store.load(cid)
    assert loaded is not None
    assert (loaded.updated_at, loaded.messages) == (3.0, [user, answer])

    final = Message(
        answer.message_id,
        "assistant",
        "Half an answer, whole.",
        "complete",
        1.5,
        4.0,
        model="m",
        usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        finish_reason="stop",
    )
    assert await store.close_answer(cid, final, 4.0)
    later = message("user", "next question")
    await store.append(cid, later, 5.0)
    await store.release_turn(cid, "holder")
    loaded = await store.load(cid)
    assert loaded is not None
    assert loaded.messages == [user, final, later]  # same id, same place
    # Closed: neither a checkpoint nor a second close touches it.
    assert await store.checkpoint([(cid, answer)], 6.0) == 0
    assert not await store.close_answer(cid, answer, 6.0)
    loaded = await store.load(cid)
    assert loaded is not None
    assert (loaded.updated_at, loaded.messages) == (5.0, [user, final, later])


async def test_one_checkpoint_writes_many_answers_and_skips_a_deleted_conversation(
    store: ConversationStore,
) -> None:
    answers: list[tuple[str, Message]] = []
    for n in range(5):
        cid = new_conversation_id()
        await store.create(cid, "", 1.0)
        await store.append(cid, message("user", f"q{n}"), 1.0)
        assert await store.take_turn(cid, f"holder{n}", 30)
        answer = opening()
        assert await store.open_answer(cid, answer, 1.0)
        answers.append((cid, answer))
    gone_cid = answers[2][0]
    assert await store.delete(gone_cid)
    for n, (_, answer) in enumerate(answers):
        answer.content = f"text of answer {n}"
    assert await store.checkpoint(answers, 2.0) == 4
    assert await store.checkpoint([], 3.0) == 0
    for n, (cid, _) in enumerate(answers):
        loaded = await store.load(cid)
        if cid == gone_cid:
            assert loaded is None  # the checkpoint made nothing again
            continue
        assert loaded is not None
        assert [(m.content, m.status) for m in loaded.messages] == [
            (f"q{n}", "complete"),
            (f"text of answer {n}", "streaming"),
        ]
        assert loaded.updated_at == 2.0


async def test_an_open_answer_under_no_turn_reads_as_partial_until_closed(
    store: ConversationStore,
) -> None:
    """Its process died: the conversation shows the checkpointed text as `partial`, and
    `close_abandoned` closes it for good, unless another holder's turn is running."""
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    user = message("user", "question")
    await store.append(cid, user, 1.0)
    assert await store.take_turn(cid, "dead", 30)
    answer = opening()
    await store.open_answer(cid, answer, 1.0)
    answer.content = "checkpointed"
    await store.checkpoint([(cid, answer)], 2.0)
    loaded = await store.load(cid)
    assert loaded is not None
    assert loaded.messages[1].status == "streaming"

    assert await store.close_abandoned(cid, "another", 3.0) == 0  # "dead" holds it still
    await store.release_turn(cid, "dead")
    loaded = await store.load(cid)
    assert loaded is not None
    shown = loaded.messages[1]
    assert (shown.message_id, shown.content, shown.status) == (
        answer.message_id,
        "checkpointed",
        "partial",
    )
    assert await store.take_turn(cid, "next", 30)  # held by the taker: it may close them
    assert await store.close_abandoned(cid, "next", 3.0) == 1
    assert await store.close_abandoned(cid, "next", 4.0) == 0
    assert not await store.close_answer(cid, answer, 4.0)  # the dead turn's end cannot reopen it
    loaded = await store.load(cid)
    assert loaded is not None
    closed = Message(answer.message_id, "assistant", "checkpointed", "partial", 1.5, 3.0)
    assert loaded.messages == [user, closed]  # closed, and shown so while "next" holds the turn


async def test_an_open_answer_taken_back_is_gone(store: ConversationStore) -> None:
    cid = new_conversation_id()
    await store.create(cid, "", 1.0)
    kept, user = message(content="kept"), message(content="taken back")
    await store.append(cid, kept, 1.0)
    await store.append(cid, user, 2.0)
    answer = opening()
    await store.open_answer(cid, answer, 2.0)
    await store.remove(cid, user)
    await store.remove(cid, answer)
    loaded = await store.load(cid)
    assert loaded is not None
    assert loaded.messages == [kept]
    assert await store.checkpoint([(cid, answer)], 3.0) == 0
    assert not await store.open_answer(new_conversation_id(), opening(), 3.0)


async def test_sqlite_checkpoints_many_answers_in_one_transaction(tmp_path: Path) -> None:
    sqlite = SqliteStore(str(tmp_path / "chat.db"))
    await sqlite.open()
    try:
        answers = []
        for _ in range(20):
            cid = new_conversation_id()
            await sqlite.create(cid, "", 1.0)
            answer = opening()
            await sqlite.open_answer(cid, answer, 1.0)
            answer.content = "some text"
            answers.append((cid, answer))
        statements: list[str] = []
        await sqlite._call(sqlite.db.set_trace_callback, statements.append)
        assert await sqlite.checkpoint(answers, 2.0) == 20
        await sqlite._call(sqlite.db.set_trace_callback, None)
        assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == [
            "BEGIN IMMEDIATE",
            "COMMIT",
        ]
    finally:
        await sqlite.aclose()


async def test_redis_checkpoints_many_answers_in_one_command(redis_server: RedisServer) -> None:
    redis = RedisStore(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        answers = []
        for _ in range(20):
            cid = new_conversation_id()
            await redis.create(cid, "", 1.0)
            answer = opening()
            await redis.open_answer(cid, answer, 1.0)
            answer.content = "some text"
            answers.append((cid, answer))
        assert await redis.checkpoint(answers[:1], 2.0) == 1  # the script is loaded once

        async def calls() -> dict[str, int]:
            stats = await raw.info("commandstats")
            return {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}

        before = await calls()
        assert await redis.checkpoint(answers, 3.0) == 20
        after = await calls()
        sent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
        # One command from the client; what the script ran inside Redis is counted too.
        assert sent == {"cmdstat_evalsha": 1, "cmdstat_hexists": 20, "cmdstat_hset": 40}
    finally:
        await redis.aclose()
        await raw.aclose()
