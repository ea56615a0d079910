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

Answers in progress (numbered notes):
1. An answer is *opened* at its turn's start (`open_answer`: status `streaming`, no text), right
   after its user message, and *closed* in place by its turn's end (`close_answer`: final text,
   status, usage, finishReason; same message id, same position). In between, `checkpoint` rewrites
   the text of many open answers at once: one SQLite transaction (one fsync) or one Redis script
   call (one round trip) per call, whatever the number of answers. Only open answers are
   rewritten: one whose conversation was deleted, or that was already closed, is skipped.
2. `load` shows an open answer as `streaming` while its conversation's turn is held, else as
   `partial` with its checkpointed text (its process died; nothing will close it). With one turn
   at a time per conversation, an open answer under a held turn is that turn's.
3. `close_abandoned` closes as `partial` the open answers of a conversation whose turn is free or
   held by the given holder (a turn that has opened nothing yet): at start-up for the turns a
   killed process held, and when a turn takes a conversation whose last lease lapsed.
4. SQLite's schema is versioned by `PRAGMA user_version` and migrated in `open()`, in one
   transaction, idempotently: 0 (messages as JSON records only) -> 1 (each row also names its
   message id and whether it is open, indexed). A file of a newer version is refused.
5. Redis: an open answer's list element is the placeholder `open:<message id>` and its record lives
   in the hash `chat:o:{id}` (message id -> record) until it is closed, when the placeholder is
   replaced by the record (LSET at its LPOS) and the hash field dropped, in one Lua call. Existing
   keys keep their meaning (only keys and list elements of a new kind are added); `open()` records
   the layout's version in `chat:schema` and refuses data of a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
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


class NewerSchema(Exception):
    """The stored data was written by a newer version of this code (notes 4 and 5)."""


class ConversationStore(Protocol):
    async def create(self, conversation_id: str, owner: str, now: float) -> None: ...

    async def owner(self, conversation_id: str) -> str | None:
        """Who the conversation belongs to ("" when keys are off), or None when it is unknown."""

    async def load(self, conversation_id: str, last: int | None = None) -> Conversation | None:
        """The conversation with its messages (only the `last` ones when given), or None."""

    async def append(self, conversation_id: str, message: Message, now: float) -> bool:
        """Add a message; False when the conversation no longer exists."""

    async def remove(self, conversation_id: str, message: Message) -> None:
        """Take back a message that was appended or opened (the same message id), if it is there."""

    async def open_answer(self, conversation_id: str, message: Message, now: float) -> bool:
        """Add `message` as an open answer (note 1); False when the conversation no longer
        exists."""

    async def checkpoint(self, updates: Sequence[tuple[str, Message]], now: float) -> int:
        """Rewrite the text of many open answers in one write (note 1); how many were open."""

    async def close_answer(self, conversation_id: str, message: Message, now: float) -> bool:
        """Close the open answer with `message`'s id as `message`, in place; False when it is not
        open (its conversation was deleted, or it was closed as abandoned)."""

    async def close_abandoned(self, conversation_id: str, holder: str, now: float) -> int:
        """Close as `partial` the conversation's open answers, unless its turn is held by someone
        other than `holder` (note 3); how many were closed."""

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
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq)
"""
# Note 4: MIGRATIONS[n] takes a file from version n to n + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "ALTER TABLE messages ADD COLUMN message_id TEXT",
        "ALTER TABLE messages ADD COLUMN streaming INTEGER NOT NULL DEFAULT 0",
        "UPDATE messages SET message_id = json_extract(record, '$.id')",
        "CREATE INDEX messages_by_id ON messages (message_id)",
        "CREATE INDEX messages_open ON messages (conversation_id) WHERE streaming = 1",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def _abandoned(message: Message, now: float) -> Message:
    """An open answer nothing will close: `partial` with its checkpointed text."""
    message.status = "partial"
    message.completed_at = now
    return message


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
        self._db = db
        self._migrate()

    def _migrate(self) -> None:
        """Create the tables (version 0) and migrate them to `SCHEMA_VERSION`, in one
        transaction (note 4)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                self.db.execute(statement)
            version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self._path} has schema version {version}; this code knows up to "
                    f"{SCHEMA_VERSION}"
                )
            for migration in MIGRATIONS[version:]:
                for statement in migration:
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        now = self._clock()
        row = self.db.execute(
            "SELECT owner, created, updated, turn IS NOT NULL AND turn_until >= ? "
            "FROM conversations WHERE id = ?",
            (now, conversation_id),
        ).fetchone()
        if row is None:
            return None
        rows = self.db.execute(
            "SELECT record, streaming FROM (SELECT seq, record, streaming FROM messages "
            "WHERE conversation_id = ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (conversation_id, -1 if last is None else last),
        ).fetchall()
        messages = []
        for record, streaming in rows:
            message = Message.from_record(orjson.loads(record))
            if streaming and not row[3]:  # note 2
                message = _abandoned(message, row[2])
            messages.append(message)
        return Conversation(conversation_id, row[0], row[1], row[2], messages)

    async def append(self, conversation_id: str, message: Message, now: float) -> bool:
        return await self._call(self._append, conversation_id, message, now)

    def _append(
        self, conversation_id: str, message: Message, now: float, streaming: bool = False
    ) -> bool:
        with self.db:  # one transaction: the message and the conversation's update time
            self.db.execute("BEGIN IMMEDIATE")
            updated = self.db.execute(
                "UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id)
            ).rowcount
            if not updated:
                return False
            self.db.execute(
                "INSERT INTO messages (conversation_id, message_id, streaming, record) "
                "VALUES (?, ?, ?, ?)",
                (
                    conversation_id,
                    message.message_id,
                    int(streaming),
                    orjson.dumps(message.record()).decode(),
                ),
            )
        return True

    async def remove(self, conversation_id: str, message: Message) -> None:
        await self._call(
            self._execute,
            "DELETE FROM messages WHERE conversation_id = ? AND message_id = ?",
            (conversation_id, message.message_id),
        )

    async def open_answer(self, conversation_id: str, message: Message, now: float) -> bool:
        return await self._call(self._append, conversation_id, message, now, True)

    async def checkpoint(self, updates: Sequence[tuple[str, Message]], now: float) -> int:
        return await self._call(self._rewrite, updates, now, True)

    async def close_answer(self, conversation_id: str, message: Message, now: float) -> bool:
        return await self._call(self._rewrite, [(conversation_id, message)], now, False) > 0

    def _rewrite(self, updates: Sequence[tuple[str, Message]], now: float, still_open: bool) -> int:
        """Rewrite open answers in one transaction (one fsync); how many were open."""
        written = 0
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for conversation_id, message in updates:
                written += self._replace(conversation_id, message, now, still_open)
        return written

    def _replace(self, conversation_id: str, message: Message, now: float, still_open: bool) -> int:
        changed = self.db.execute(
            "UPDATE messages SET record = ?, streaming = ? "
            "WHERE message_id = ? AND conversation_id = ? AND streaming = 1",
            (
                orjson.dumps(message.record()).decode(),
                int(still_open),
                message.message_id,
                conversation_id,
            ),
        ).rowcount
        if changed:
            self.db.execute(
                "UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id)
            )
        return int(changed > 0)

    async def close_abandoned(self, conversation_id: str, holder: str, now: float) -> int:
        return await self._call(self._close_abandoned, conversation_id, holder, now)

    def _close_abandoned(self, conversation_id: str, holder: str, now: float) -> int:
        closed = 0
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            held = self.db.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND turn IS NOT NULL "
                "AND turn_until >= ? AND turn != ?",
                (conversation_id, self._clock(), holder),
            ).fetchone()
            if held is not None:
                return 0
            rows = self.db.execute(
                "SELECT record FROM messages WHERE conversation_id = ? AND streaming = 1",
                (conversation_id,),
            ).fetchall()
            for (record,) in rows:
                message = _abandoned(Message.from_record(orjson.loads(record)), now)
                closed += self._replace(conversation_id, message, now, False)
        return closed

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
# KEYS: conversation hash, message list, open answers hash. ARGV: message id, record, now.
_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], 'open:' .. ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
return 1
"""
# KEYS: conversation hash and open answers hash of each answer. ARGV: now, then message id and
# record of each. Rewrites the answers still open; how many.
_CHECKPOINT = """
local written = 0
for i = 1, #KEYS, 2 do
  local id = ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[i + 1], id) == 1 then
    redis.call('HSET', KEYS[i + 1], id, ARGV[i + 2])
    redis.call('HSET', KEYS[i], 'updated', ARGV[1])
    written = written + 1
  end
end
return written
"""
# KEYS: conversation hash, message list, open answers hash, turn key. ARGV: check the turn ("1"
# or "0"), holder, now, then message id and record pairs. Closes each still open in place, unless
# the turn is checked and held by another holder (note 3).
_CLOSE = """
if ARGV[1] == '1' then
  local turn = redis.call('GET', KEYS[4])
  if turn and turn ~= ARGV[2] then return 0 end
end
local closed = 0
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 1 then
    local at = redis.call('LPOS', KEYS[2], 'open:' .. ARGV[i], 'RANK', -1)
    if at then redis.call('LSET', KEYS[2], at, ARGV[i + 1]) end
    redis.call('HDEL', KEYS[3], ARGV[i])
    closed = closed + 1
  end
end
if closed > 0 then redis.call('HSET', KEYS[1], 'updated', ARGV[3]) end
return closed
"""
# KEYS: schema key. ARGV: version. The version recorded, raised to ARGV[1] if lower.
_SCHEMA_MARK = """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) return tonumber(ARGV[1]) end
return v
"""
REDIS_SCHEMA_VERSION = 1
_OPEN_MARK = b"open:"
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
        self._open = self._redis.register_script(_OPEN)
        self._checkpoint = self._redis.register_script(_CHECKPOINT)
        self._close = self._redis.register_script(_CLOSE)
        self._schema_mark = self._redis.register_script(_SCHEMA_MARK)

    def _keys(self, conversation_id: str) -> tuple[str, str, str]:
        p = self._prefix
        return f"{p}:c:{conversation_id}", f"{p}:m:{conversation_id}", f"{p}:t:{conversation_id}"

    def _open_key(self, conversation_id: str) -> str:
        return f"{self._prefix}:o:{conversation_id}"

    async def open(self) -> None:
        """Record the layout's version (note 5); NewerSchema for data written by a newer one,
        StoreUnavailable when Redis does not answer."""
        try:
            found = int(
                await self._schema_mark(
                    keys=[f"{self._prefix}:schema"], args=[REDIS_SCHEMA_VERSION]
                )
            )
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        if found > REDIS_SCHEMA_VERSION:
            raise NewerSchema(
                f"redis: conversations have layout version {found}; this code knows up to "
                f"{REDIS_SCHEMA_VERSION}"
            )

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
        head, messages, turn = self._keys(conversation_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(head)
                pipe.lrange(messages, 0 if last is None else -last, -1)
                pipe.hgetall(self._open_key(conversation_id))
                pipe.exists(turn)
                fields, records, opened, held = await pipe.execute()
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        if not fields:
            return None
        updated = float(fields[b"updated"])
        loaded: list[Message] = []
        for record in records:
            if not record.startswith(_OPEN_MARK):
                loaded.append(Message.from_record(orjson.loads(record)))
                continue
            body = opened.get(record[len(_OPEN_MARK) :])
            if body is None:  # never: one script writes or drops both
                continue
            message = Message.from_record(orjson.loads(body))
            loaded.append(message if held else _abandoned(message, updated))  # note 2
        return Conversation(
            conversation_id, fields[b"owner"].decode(), float(fields[b"created"]), updated, loaded
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
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lrem(messages, -1, orjson.dumps(message.record()).decode())
                pipe.lrem(messages, -1, f"open:{message.message_id}")
                pipe.hdel(self._open_key(conversation_id), message.message_id)
                await pipe.execute()
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def open_answer(self, conversation_id: str, message: Message, now: float) -> bool:
        head, messages, _ = self._keys(conversation_id)
        keys = [head, messages, self._open_key(conversation_id)]
        args: list[str | bytes | float] = [message.message_id, orjson.dumps(message.record()), now]
        try:
            return bool(await self._open(keys=keys, args=args))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def checkpoint(self, updates: Sequence[tuple[str, Message]], now: float) -> int:
        """One script call (one round trip) for every answer."""
        if not updates:
            return 0
        keys: list[str] = []
        args: list[str | bytes | float] = [now]
        for conversation_id, message in updates:
            keys += [self._keys(conversation_id)[0], self._open_key(conversation_id)]
            args += [message.message_id, orjson.dumps(message.record())]
        try:
            return int(await self._checkpoint(keys=keys, args=args))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def close_answer(self, conversation_id: str, message: Message, now: float) -> bool:
        return await self._closing(conversation_id, [message], now, holder=None) > 0

    async def close_abandoned(self, conversation_id: str, holder: str, now: float) -> int:
        try:
            opened = await self._redis.hgetall(self._open_key(conversation_id))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        if not opened:
            return 0
        answers = [_abandoned(Message.from_record(orjson.loads(r)), now) for r in opened.values()]
        return await self._closing(conversation_id, answers, now, holder)

    async def _closing(
        self, conversation_id: str, answers: Sequence[Message], now: float, holder: str | None
    ) -> int:
        head, messages, turn = self._keys(conversation_id)
        keys = [head, messages, self._open_key(conversation_id), turn]
        args: list[str | bytes | float] = ["0" if holder is None else "1", holder or "", now]
        for answer in answers:
            args += [answer.message_id, orjson.dumps(answer.record())]
        try:
            return int(await self._close(keys=keys, args=args))
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err

    async def delete(self, conversation_id: str) -> bool:
        keys = (*self._keys(conversation_id), self._open_key(conversation_id))
        try:
            return bool(await self._redis.delete(*keys))
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
