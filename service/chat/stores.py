"""Where conversations live: a SQLite file by default, Redis when `REDIS_URL` is set.

Both keep the same records (`Message.record()`), answer the same calls and pass one behaviour
suite (`tests/test_chat_store.py`). A conversation also carries its *turn*: a lease that one chat
turn holds while it streams (renewed while it runs, expiring on its own if the instance holding it
dies), so two turns on one conversation never interleave; the second gets 409.

SQLite: the stdlib `sqlite3` on one dedicated thread (one connection, calls queued in order), WAL
so readers never wait for the writer, `synchronous=FULL` so a saved message survives a power cut,
not only a crash. Redis: a hash per conversation, a list of JSON messages, a lease key, and Lua
where a step must be atomic (append only to a conversation that still exists; renew or release a
lease only by its holder). A turn's holder names its process (`holders`), so a process starting
on the same host frees at once the turns of one that was killed. Forgetting wins: an answer
finishing after its conversation was deleted is not saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .conversations import Conversation, Message

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store could not be reached or failed; nothing was changed that the caller relies on."""


class ConversationStore(Protocol):
    async def create(self, conversation_id: str, owner: str, now: float) -> None: ...

    async def owner(self, conversation_id: str) -> str | None:
        """Who the conversation belongs to ("" when keys are off), or None when it is unknown."""

    async def load(self, conversation_id: str, last: int | None = None) -> Conversation | None:
        """The conversation with its messages (only the `last` ones when given), or None."""

    async def append(self, conversation_id: str, message: Message, now: float) -> bool:
        """Add a message; False when the conversation no longer exists."""

    async def remove(self, conversation_id: str, message: Message) -> None:
        """Take back a message that was appended (the same value), if it is there."""

    async def delete(self, conversation_id: str) -> bool: ...

    async def take_turn(self, conversation_id: str, turn: str, lease_s: float) -> bool:
        """Hold the conversation's turn for `lease_s`; False when another turn holds it."""

    async def renew_turn(self, conversation_id: str, turn: str, lease_s: float) -> bool: ...

    async def release_turn(self, conversation_id: str, turn: str) -> None: ...

    async def turn_holder(self, conversation_id: str) -> str | None:
        """Who holds the conversation's turn now (None: nobody)."""
        ...

    async def held_turns(self) -> list[tuple[str, str]]:
        """(conversation id, holder) of every turn held now."""

    async def ping(self) -> None:
        """A cheap round trip (readiness); StoreUnavailable when the store does not answer."""

    async def aclose(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turn TEXT,
    turn_until REAL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
"""


class SqliteStore:
    """One SQLite file (or `:memory:`), reached from one worker thread."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-sqlite")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        self._db = db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as err:
            raise StoreUnavailable(f"sqlite: {err}") from err

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "SqliteStore.open() first"
        return self._db

    def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement on the worker thread; the number of rows it changed."""
        return self.db.execute(sql, params).rowcount

    async def create(self, conversation_id: str, owner: str, now: float) -> None:
        await self._call(
            self._execute,
            "INSERT INTO conversations (id, owner, created, updated) VALUES (?, ?, ?, ?)",
            (conversation_id, owner, now, now),
        )

    async def owner(self, conversation_id: str) -> str | None:
        row = await self._call(self._owner, conversation_id)
        return None if row is None else str(row[0])

    def _owner(self, conversation_id: str) -> Any:
        return self.db.execute(
            "SELECT owner FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()

    async def load(self, conversation_id: str, last: int | None = None) -> Conversation | None:
        return await self._call(self._load, conversation_id, last)

    def _load(self, conversation_id: str, last: int | None) -> Conversation | None:
        with self.db:  # one read transaction: the head and the messages from one snapshot
            self.db.execute("BEGIN")
            return self._read(conversation_id, last)

    def _read(self, conversation_id: str, last: int | None) -> Conversation | None:
        row = self.db.execute(
            "SELECT owner, created, updated FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            return None
        rows = self.db.execute(
            "SELECT record FROM (SELECT seq, record FROM messages WHERE conversation_id = ? "
            "ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (conversation_id, -1 if last is None else last),
        ).fetchall()
        messages = [Message.from_record(orjson.loads(r[0])) for r in rows]
        return Conversation(conversation_id, row[0], row[1], row[2], messages)

    async def append(self, conversation_id: str, message: Message, now: float) -> bool:
        return await self._call(self._append, conversation_id, message, now)

    def _append(self, conversation_id: str, message: Message, now: float) -> bool:
        with self.db:  # one transaction: the message and the conversation's update time
            self.db.execute("BEGIN IMMEDIATE")
            updated = self.db.execute(
                "UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id)
            ).rowcount
            if not updated:
                return False
            self.db.execute(
                "INSERT INTO messages (conversation_id, record) VALUES (?, ?)",
                (conversation_id, orjson.dumps(message.record()).decode()),
            )
        return True

    async def remove(self, conversation_id: str, message: Message) -> None:
        await self._call(
            self._execute,
            "DELETE FROM messages WHERE conversation_id = ? AND record = ?",
            (conversation_id, orjson.dumps(message.record()).decode()),
        )

    async def delete(self, conversation_id: str) -> bool:
        changed = await self._call(
            self._execute, "DELETE FROM conversations WHERE id = ?", (conversation_id,)
        )
        return changed > 0

    async def take_turn(self, conversation_id: str, turn: str, lease_s: float) -> bool:
        now = self._clock()
        changed = await self._call(
            self._execute,
            "UPDATE conversations SET turn = ?, turn_until = ? "
            "WHERE id = ? AND (turn IS NULL OR turn_until < ?)",
            (turn, now + lease_s, conversation_id, now),
        )
        return changed > 0

    async def renew_turn(self, conversation_id: str, turn: str, lease_s: float) -> bool:
        changed = await self._call(
            self._execute,
            "UPDATE conversations SET turn_until = ? WHERE id = ? AND turn = ?",
            (self._clock() + lease_s, conversation_id, turn),
        )
        return changed > 0

    async def release_turn(self, conversation_id: str, turn: str) -> None:
        await self._call(
            self._execute,
            "UPDATE conversations SET turn = NULL, turn_until = NULL WHERE id = ? AND turn = ?",
            (conversation_id, turn),
        )

    async def turn_holder(self, conversation_id: str) -> str | None:
        return await self._call(self._turn_holder, conversation_id)

    def _turn_holder(self, conversation_id: str) -> str | None:
        row = self.db.execute(
            "SELECT turn FROM conversations WHERE id = ? AND turn_until >= ?",
            (conversation_id, self._clock()),
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    async def held_turns(self) -> list[tuple[str, str]]:
        return await self._call(self._held_turns)

    def _held_turns(self) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT id, turn FROM conversations WHERE turn IS NOT NULL")
        return [(str(cid), str(turn)) for cid, turn in rows.fetchall()]

    async def ping(self) -> None:
        await self._call(self._ping)

    def _ping(self) -> None:
        self.db.execute("SELECT 1 FROM conversations LIMIT 1").fetchall()

    async def aclose(self) -> None:
        if self._db is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._call(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)


# KEYS: conversation hash, message list. ARGV: record, now.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
return 1
"""
# KEYS: turn key. ARGV: turn, lease ms. Renew only our own lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: turn key. ARGV: turn. Release only our own lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Conversations in Redis, shared by every instance with the same `REDIS_URL`."""

    def __init__(self, url: str, prefix: str = "chat") -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            health_check_interval=30,
            # A pooled connection left stale by a Redis restart costs a reconnect, not a failed
            # request: a connection error is retried once on the connection reconnected.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._prefix = prefix
        self._append = self._redis.register_script(_APPEND)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, conversation_id: str) -> tuple[str, str, str]:
        p = self._prefix
        return f"{p}:c:{conversation_id}", f"{p}:m:{conversation_id}", f"{p}:t:{conversation_id}"

    async def create(self, conversation_id: str, owner: str, now: float) -> None:
        head, _, _ = self._keys(conversation_id)
        try:
            await self._redis.hset(head, mapping={"owner": owner, "created": now, "updated": now})
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def owner(self, conversation_id: str) -> str | None:
        head, _, _ = self._keys(conversation_id)
        try:
            owner = await self._redis.hget(head, "owner")
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        if owner is None:
            return None
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def load(self, conversation_id: str, last: int | None = None) -> Conversation | None:
        head, messages, _ = self._keys(conversation_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(head)
                pipe.lrange(messages, 0 if last is None else -last, -1)
                fields, records = await pipe.execute()
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        if not fields:
            return None
        return Conversation(
            conversation_id,
            fields[b"owner"].decode(),
            float(fields[b"created"]),
            float(fields[b"updated"]),
            [Message.from_record(orjson.loads(r)) for r in records],
        )

    async def append(self, conversation_id: str, message: Message, now: float) -> bool:
        head, messages, _ = self._keys(conversation_id)
        record = orjson.dumps(message.record())
        try:
            return bool(await self._append(keys=[head, messages], args=[record, now]))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def remove(self, conversation_id: str, message: Message) -> None:
        _, messages, _ = self._keys(conversation_id)
        try:
            await self._redis.lrem(messages, -1, orjson.dumps(message.record()).decode())
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def delete(self, conversation_id: str) -> bool:
        try:
            return bool(await self._redis.delete(*self._keys(conversation_id)))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def take_turn(self, conversation_id: str, turn: str, lease_s: float) -> bool:
        _, _, key = self._keys(conversation_id)
        try:
            return bool(await self._redis.set(key, turn, nx=True, px=round(lease_s * 1000)))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def renew_turn(self, conversation_id: str, turn: str, lease_s: float) -> bool:
        _, _, key = self._keys(conversation_id)
        try:
            return bool(await self._renew(keys=[key], args=[turn, round(lease_s * 1000)]))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def release_turn(self, conversation_id: str, turn: str) -> None:
        _, _, key = self._keys(conversation_id)
        try:
            await self._release(keys=[key], args=[turn])
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def turn_holder(self, conversation_id: str) -> str | None:
        _, _, key = self._keys(conversation_id)
        try:
            value = await self._redis.get(key)
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def held_turns(self) -> list[tuple[str, str]]:
        """Every turn key, found with SCAN (start-up only: one pass over the keyspace)."""
        head = f"{self._prefix}:t:"
        held: list[tuple[str, str]] = []
        try:
            async for key in self._redis.scan_iter(match=head + "*", count=1000):
                value = await self._redis.get(key)
                if value is not None:
                    name = key.decode() if isinstance(key, bytes) else str(key)
                    holder = value.decode() if isinstance(value, bytes) else str(value)
                    held.append((name[len(head) :], holder))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        return held

    async def ping(self) -> None:
        try:
            await self._redis.ping()  # a stale pooled connection is retried by the client
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def aclose(self) -> None:
        await self._redis.aclose()
