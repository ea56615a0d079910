"""The Redis mirror of streams (`shared_streams`) wired into the app, with `REDIS_URL`: every
native generation published as it starts, and the stream routes' `keys.SHARED_STREAMS` seam
(`relay.SharedStreams`: `open`, `request_cancel`) answered from Redis.

Design notes:
1. Published from `Generations.on_start`, synchronously (no round trip): the meta names the
   route, the owner's key id, this instance and, for a chat answer, its conversation and message
   (read from the stream's first event, `metadata`); `lost` is the stream's own terminal `error`
   event (code `server_shutdown`, reason `shutdown`), what its readers elsewhere get if this
   process dies. A cancel from another instance is `expire(Outcome.CANCELLED)`, as the local
   route's; a reader elsewhere holds the generation through its grace window
   (`held_elsewhere`: what the flusher last saw). With no `REDIS_URL` none of this exists: the
   hook list stays empty and the routes find no seam.
2. A remote reader's cursor is checked against what Redis holds when it opens (`length`,
   `ended`), as a local reader's is against the log, except that a cursor beyond the end of a
   running stream is given up to the producer's lease to be reached (`reach`: blocking reads
   that the flush carrying it wakes, note 5): a client that read an event on the producing
   instance may come back here before the flush that carries it; likewise a stream not found
   is looked for again every flush interval for up to a second (`UNKNOWN_WAIT_S`) before it is
   called unknown, as a stream that started a moment ago may not have been flushed yet (its
   producer is not known here, so it cannot be asked to flush), and under load a flush
   can lag its interval (the bench's reconnect scenario met one such 404 with two intervals).
   Its events then come from one `RemoteStream.read(after)`, which the route closes when its
   client leaves.
3. Redis failing when a stream is looked up is "not here": the GET route answers 404 and a
   POST resume its `not_found` event, never a 500. Redis failing mid-read (past the mirror's
   outage allowance) ends the body with no terminal event, so the client reconnects from its
   cursor by itself, as after a dropped connection.
4. A dead producer's chat answer (`on_orphan`, run once by whichever instance claimed the
   stream) is closed `partial` with the text that reached Redis through the store's
   `close_answer`, which refuses an answer already closed: whoever closes first wins, once.
   The dead producer's turn on the conversation (its holder names this answer) is released
   then, so the conversation takes its next turn at once rather than after the turn's lease.
   A producer that was only cut off from Redis for longer than its lease (`shared_streams`
   note 5) loses its turn the same way: its own close of the answer is then refused, and its
   turn's renewal logs `chat.turn_lost`.
5. A reader's cursor goes with its lookup (`open(stream_id, cursor)`): at or past what Redis
   holds of a running stream, the producer is asked to flush that stream at once
   (`shared_streams` note 10), in the lookup's own round trip, so the first missed event comes
   within a few round trips rather than up to `RESUME_FLUSH_MS` later. Before that event the
   reader costs one round trip when Redis holds it (the lookup brings the events after the
   cursor), else two (the lookup; then the presence key with a blocking read, which the flush
   it asked for wakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator

import structlog
from redis.exceptions import RedisError

from . import sse
from .chat.conversations import Message
from .chat.holders import token_of
from .chat.stores import ConversationStore, StoreUnavailable
from .errors import FAILURE_BY_OUTCOME, Outcome
from .relay import Generation, Result
from .shared_streams import RemoteStream, SharedStreams, StreamMeta

log = structlog.get_logger("service.mirror")

UNKNOWN_WAIT_S = 1.0  # how long a stream not found is looked for again (note 2)


def instance_name() -> str:
    """Unique per process: host, pid and a random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def lost_event(generation: Generation) -> bytes:
    """The stream's terminal event should its producer die: `server_shutdown`, in its
    vocabulary (note 1)."""
    assert generation.vocabulary is not None
    result = Result(generation.request_id, generation.stream_id, generation.request.model)
    result.outcome = Outcome.SHUTDOWN
    result.error_code, result.error_message = FAILURE_BY_OUTCOME[Outcome.SHUTDOWN]
    return sse.dumps_kept(generation.vocabulary.error(result))  # kept per stream


def meta_of(generation: Generation, instance: str) -> StreamMeta:
    opening = generation.opening or {}
    conversation_id, message_id = opening.get("conversationId"), opening.get("messageId")
    return StreamMeta(
        stream_id=generation.stream_id,
        route=generation.route,
        owner=generation.owner,
        instance=instance,
        created=time.time(),
        lost=lost_event(generation),
        conversation_id=conversation_id if isinstance(conversation_id, str) else None,
        message_id=message_id if isinstance(message_id, str) else None,
    )


class Mirror:
    """The app's side of the shared streams: the `on_start` hook, the routes' seam and the
    orphans' saver."""

    def __init__(self, shared: SharedStreams) -> None:
        self.shared = shared

    def publish(self, generation: Generation) -> None:
        """`Generations.on_start` (note 1)."""
        meta = meta_of(generation, self.shared.instance)
        on_cancel = functools.partial(generation.expire, Outcome.CANCELLED)
        publication = self.shared.publish(meta, generation.log, on_cancel)
        generation.held_elsewhere = publication.remote_readers

    async def open(self, stream_id: str, cursor: int) -> Remote | None:
        """The stream as Redis holds it now, or None (unknown, expired, or Redis failing); a
        `cursor` at or past what Redis holds asks the producer to flush now (note 5)."""
        shared = self.shared
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(UNKNOWN_WAIT_S, 2 * shared.flush_s)
        try:
            remote = await shared.open(stream_id, cursor)
            while remote is None and loop.time() < deadline:  # note 2: maybe not flushed yet
                await asyncio.sleep(shared.flush_s)
                remote = await shared.open(stream_id, cursor)
        except (RedisError, OSError) as err:
            log.warning("resume.redis_lookup_failed", stream_id=stream_id, error=repr(err))
            return None
        if remote is None:
            return None
        length, ended = remote.at_open
        return Remote(remote, length, ended)

    async def request_cancel(self, stream_id: str, owner: str) -> bool:
        """Ask the producing instance to stop the stream: False when unknown or not `owner`'s."""
        try:
            return await self.shared.request_cancel(stream_id, owner)
        except (RedisError, OSError) as err:
            log.warning("resume.redis_cancel_failed", stream_id=stream_id, error=repr(err))
            return False


class Remote:
    """One remote reader's view of a stream (`relay.RemoteStream`), its cursor checked against
    `length` and `ended` as of its opening (note 2)."""

    def __init__(self, remote: RemoteStream, length: int, ended: bool) -> None:
        self._remote = remote
        self.length = length
        self.ended = ended
        self._reading: AsyncGenerator[bytes, None] | None = None

    @property
    def route(self) -> str:
        return self._remote.meta.route

    @property
    def owner(self) -> str:
        return self._remote.meta.owner

    def events(self, after: int) -> AsyncIterator[bytes]:
        self._reading = self._payloads(after)
        return self._reading

    async def _payloads(self, after: int) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(self._remote.read(after)) as reading:
            try:
                async for _, payload in reading:
                    yield payload
            except (RedisError, OSError) as err:  # note 3
                log.warning("resume.redis_read_failed", error=repr(err))

    async def reach(self, cursor: int) -> None:
        """Wait for the flush that reaches `cursor`, for up to the producer's lease (notes 2
        and 5): blocking reads of what comes past `length`, each bounded by the deadline."""
        shared = self._remote.shared
        loop = asyncio.get_running_loop()
        deadline = loop.time() + shared.lease_s
        while cursor > self.length and not self.ended:
            left = deadline - loop.time()
            if left <= 0:
                return
            wait_s = min(left, shared.renew_s)  # within the client's socket timeout
            try:
                self.length, self.ended = await self._remote.wait_past(self.length, cursor, wait_s)
            except (RedisError, OSError):
                return

    async def aclose(self) -> None:
        if self._reading is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._reading.aclose()


async def save_orphan(store: ConversationStore, meta: StreamMeta, text: str) -> None:
    """A dead producer's chat answer, closed `partial` with `text` (note 4); nothing for a
    generate stream."""
    cid, mid = meta.conversation_id, meta.message_id
    if cid is None or mid is None:
        return
    now = time.time()
    answer = Message(mid, "assistant", text, "partial", meta.created, now)
    try:
        saved = await store.close_answer(cid, answer, now)
        holder = await store.turn_holder(cid)
        if holder is not None and token_of(holder) == mid:
            await store.release_turn(cid, holder)
    except StoreUnavailable as err:
        log.error("chat.orphan_not_saved", conversation_id=cid, message_id=mid, error=str(err))
        return
    log.info("chat.orphan_saved", conversation_id=cid, message_id=mid, saved=saved)
