"""Stored conversations carry over: a SQLite file written by the schema-0 store (the committed
fixture `fixtures/chat-v0.db`, made by `fixtures/make_chat_v0_db.py` from that code) opens with
today's store, reads back unchanged and takes new turns; Redis records its layout's version."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from service.chat.conversations import Message, new_message_id
from service.chat.stores import (
    REDIS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    NewerSchema,
    RedisStore,
    SqliteStore,
    StoreUnavailable,
)
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream, answer
from tests.fixtures.make_chat_v0_db import CONTENT, messages
from tests.process import service
from tests.test_chat_process import history, upstream_env

FIXTURE = Path(__file__).parent / "fixtures" / "chat-v0.db"


async def user_version(store: SqliteStore) -> int:
    row = await store._call(lambda: store.db.execute("PRAGMA user_version").fetchone())
    return int(row[0])


@pytest.fixture
def v0_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.db"
    shutil.copyfile(FIXTURE, path)
    return path


async def test_a_schema_0_file_reads_back_unchanged_and_takes_new_turns(v0_file: Path) -> None:
    store = SqliteStore(str(v0_file))
    await store.open()
    try:
        assert await user_version(store) == SCHEMA_VERSION == 1
        for cid, owner, rows in CONTENT:
            loaded = await store.load(cid)
            assert loaded is not None
            assert (loaded.owner, loaded.created_at) == (owner, 100.0)
            assert loaded.messages == messages(rows)
            assert await store.owner(cid) == owner

        cid, _, rows = CONTENT[0]
        assert await store.take_turn(cid, "holder", 30)
        user = Message(new_message_id(), "user", "Go on", "complete", 200.0, 200.0)
        await store.append(cid, user, 200.0)
        answer = Message(new_message_id(), "assistant", "", "streaming", 200.0)
        assert await store.open_answer(cid, answer, 200.0)
        answer.content = "Going"
        assert await store.checkpoint([(cid, answer)], 201.0) == 1
        final = Message(answer.message_id, "assistant", "Going on.", "complete", 200.0, 202.0)
        assert await store.close_answer(cid, final, 202.0)
        await store.release_turn(cid, "holder")
        # A message written by the old code is found by its id (the migration filled it in).
        await store.remove(cid, messages(rows)[3])
        loaded = await store.load(cid)
        assert loaded is not None
        assert loaded.messages == [*messages(rows)[:3], user, final]
    finally:
        await store.aclose()


async def test_the_migration_runs_once(v0_file: Path) -> None:
    for _ in range(3):
        store = SqliteStore(str(v0_file))
        await store.open()
        try:
            assert await user_version(store) == 1
            for cid, _, rows in CONTENT:
                loaded = await store.load(cid)
                assert loaded is not None
                assert loaded.messages == messages(rows)
        finally:
            await store.aclose()


async def test_a_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "chat.db")
    store = SqliteStore(path)
    await store.open()
    await store._call(lambda: store.db.execute("PRAGMA user_version = 99"))
    await store.aclose()
    newer = SqliteStore(path)
    with pytest.raises(StoreUnavailable, match="schema version 99"):
        await newer.open()
    await newer.aclose()


async def test_redis_records_its_layout_version_and_refuses_a_newer_one(
    redis_server: RedisServer,
) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url)
    try:
        await store.open()
        await store.open()
        assert await raw.get("chat:schema") == str(REDIS_SCHEMA_VERSION).encode()
        await raw.set("chat:schema", REDIS_SCHEMA_VERSION + 1)
        with pytest.raises(NewerSchema):
            await store.open()
    finally:
        await store.aclose()
        await raw.aclose()


async def test_the_service_migrates_its_file_on_start(fake: FakeUpstream, tmp_path: Path) -> None:
    shutil.copyfile(FIXTURE, tmp_path / "conversations.db")  # the file `service` points at
    cid, _, rows = CONTENT[1]
    fake.queue(answer("Answered now."))
    async with service(upstream_env(fake), tmp_path) as svc, aiohttp.ClientSession() as session:
        kept = await history(session, svc.url, cid)
        assert kept == [m.wire() for m in messages(rows)]
        resp = await session.post(
            f"{svc.url}/api/v1/ai/chat", json={"message": "Again", "conversationId": cid}
        )
        assert resp.status == 200
        kept = await history(session, svc.url, cid)
    assert [(m["content"], m["status"]) for m in kept] == [
        ("Unanswered (its process was killed).", "complete"),
        ("Again", "complete"),
        ("Answered now.", "complete"),
    ]
