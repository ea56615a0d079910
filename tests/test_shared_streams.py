"""Streams in Redis against a real redis-server, each instance a `SharedStreams` with a client of
its own: readers on another instance get every event once from any cursor; a flush is one
pipeline whatever the number of events; a SIGKILLed producer's readers end with its `lost` event
and one claimer saves its text; keys expire; cancel and presence cross instances; a Redis
restarted empty mid-stream is filled again."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from service.events import EventLog
from service.metrics import Metrics, create_metrics
from service.mirror import Mirror
from service.shared_streams import (
    LIVE,
    MAX_CONNECTIONS,
    RemoteStream,
    SharedStreams,
    StreamMeta,
    connect,
    keys_of,
    relayed_text,
)
from tests.conftest import WAIT, RedisServer
from tests.shared_producer import LOST, PAYLOADS, meta

LEASE_S = 0.6
TTL_S = 0.5
Orphans = list[tuple[StreamMeta, str]]


def token(n: int) -> bytes:
    return b'{"type":"token","content":"t%d "}' % n


END = b'{"type":"done","content":"..."}'


@asynccontextmanager
async def instance(
    server: RedisServer,
    name: str,
    *,
    flush_ms: int = 10,
    lease_s: float = LEASE_S,
    ttl_s: float = TTL_S,
    orphans: Orphans | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[SharedStreams]:
    redis = connect(server.url, lease_s=lease_s)

    async def on_orphan(meta: StreamMeta, text: str) -> None:
        assert orphans is not None
        orphans.append((meta, text))

    shared = SharedStreams(
        redis,
        instance=name,
        flush_ms=flush_ms,
        ttl_s=ttl_s,
        lease_s=lease_s,
        metrics=metrics,
        on_orphan=on_orphan if orphans is not None else None,
    )
    await shared.start()
    try:
        yield shared
    finally:
        await shared.aclose()
        await redis.aclose()


async def until(check: Callable[[], Awaitable[bool]], within: float = WAIT) -> None:
    """Wait for a condition that Redis or another task makes true, bounded by `within`."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 (Redis has no event for it)
            await asyncio.sleep(0.01)  # bounded by the timeout above


async def opened(shared: SharedStreams, stream_id: str) -> RemoteStream:
    found: list[RemoteStream] = []

    async def check() -> bool:
        remote = await shared.open(stream_id)
        if remote is not None:
            found.append(remote)
        return bool(found)

    await until(check)
    return found[0]


async def read_all(remote: RemoteStream, after: int) -> list[tuple[int, bytes]]:
    async with asyncio.timeout(WAIT):
        return [event async for event in remote.read(after)]


async def stream_keys(redis: aioredis.Redis) -> list[bytes]:
    keys: list[bytes] = []
    async with asyncio.timeout(WAIT):
        async for key in redis.scan_iter(match="aistream:resume:*", count=1000):
            keys.append(key)
    return keys


async def test_readers_on_another_instance_get_every_event_once_from_any_cursor(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a, instance(redis_server, "b") as b:
        events = EventLog()
        a.publish(meta("s1", "a"), events, lambda: None)
        for n in range(1, 4):
            events.append(token(n))
        remote = await opened(b, "s1")
        assert remote.meta == meta("s1", "a")
        assert await b.open("unknown") is None
        await until(lambda: _length_is(remote, 3))
        readers = [asyncio.create_task(read_all(remote, after)) for after in (0, 2, 3)]
        for n in range(4, 40):
            events.append(token(n))
            if n % 7 == 0:
                await asyncio.sleep(0.02)  # events over several flushes, not to synchronise
        events.end(END)
        expected = [(n, token(n)) for n in range(1, 40)] + [(40, END)]
        assert await readers[0] == expected
        assert await readers[1] == expected[2:]
        assert await readers[2] == expected[3:]
        assert await remote.length() == (40, True)
        # a reader at the end of a finished stream ends at once
        assert await read_all(remote, 40) == []
        assert await read_all(remote, 38) == expected[38:]
        assert "s1" not in a.publications  # dropped once all of it is in Redis


async def test_a_lookup_with_a_cursor_brings_the_events_after_it_and_reading_goes_on_from_there(
    redis_server: RedisServer,
) -> None:
    """The lookup reads the entries after the reader's cursor in its own round trip: a reader's
    first missed event that Redis holds needs no read of its own; every event comes once."""
    async with instance(redis_server, "a") as a, instance(redis_server, "b") as b:
        events = EventLog()
        a.publish(meta("pre", "a"), events, lambda: None)
        for n in range(1, 4):
            events.append(token(n))
        await opened(b, "pre")
        await b.redis.config_resetstat()
        remote = await b.open("pre", 1)
        assert remote is not None
        assert remote.at_open == (3, False)
        async with aclosing(remote.read(1)) as reading, asyncio.timeout(WAIT):
            assert await anext(reading) == (2, token(2))
            assert "cmdstat_xread" not in await commandstats(b.redis)  # no read of its own
            assert await anext(reading) == (3, token(3))
            events.append(token(4))  # live, after the lookup
            assert await anext(reading) == (4, token(4))
        events.end(END)
        expected = [(n, token(n)) for n in range(1, 5)] + [(5, END)]
        await until(lambda: _length_is(remote, 5))
        for after in range(6):
            found = await b.open("pre", after)
            assert found is not None
            assert found.at_open == (5, True)
            assert await read_all(found, after) == expected[after:]


async def _length_is(remote: RemoteStream, n: int) -> bool:
    return (await remote.length())[0] == n


async def commandstats(redis: aioredis.Redis) -> dict[str, int]:
    info: dict[str, Any] = await redis.info("commandstats")
    return {name: int(stats["calls"]) for name, stats in info.items()}


async def test_five_hundred_events_in_one_interval_cost_one_pipeline(
    redis_server: RedisServer,
) -> None:
    """One stream with 500 events and 250 streams with one each, appended within one interval:
    one pipeline (the only round trip), two `APPEND` calls (`BATCH` streams each)."""
    metrics = create_metrics(CollectorRegistry(), ())
    spy = aioredis.Redis(port=redis_server.port)
    async with instance(redis_server, "a", flush_ms=200, lease_s=3.0, metrics=metrics) as a:
        remote = RemoteStream(a, meta("big", "a"))
        last = RemoteStream(a, meta("small-249", "a"))
        before = await commandstats(spy)
        events = EventLog()
        a.publish(meta("big", "a"), events, lambda: None)
        for n in range(1, 501):  # within one interval: no await in between
            events.append(token(n))
        for n in range(250):
            small = EventLog()
            small.append(token(n))
            a.publish(meta(f"small-{n}", "a"), small, lambda: None)
        await until(lambda: _length_is(remote, 500))
        await until(lambda: _length_is(last, 1))
        after = await commandstats(spy)
        assert after["cmdstat_evalsha"] - before.get("cmdstat_evalsha", 0) == 2
        assert after["cmdstat_xadd"] - before.get("cmdstat_xadd", 0) == 750
        assert metrics.registry.get_sample_value("ai_stream_resume_redis_flushes_total") == 1
        assert metrics.registry.get_sample_value("ai_stream_resume_redis_events_total") == 750
        async with asyncio.timeout(WAIT), aclosing(last.read(0)) as reading:
            assert await anext(reading) == (1, token(249))
    await spy.aclose()


async def test_a_killed_producer_ends_its_readers_with_lost_and_one_claimer_saves_its_text(
    redis_server: RedisServer,
) -> None:
    producer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.shared_producer",
        redis_server.url,
        "doomed",
        str(LEASE_S),
        str(TTL_S),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    orphans: Orphans = []
    try:
        assert producer.stdout is not None
        async with asyncio.timeout(WAIT):
            assert await producer.stdout.readline() == b"flushed\n"
        async with (
            instance(redis_server, "b", orphans=orphans) as b,
            instance(redis_server, "c", orphans=orphans) as c,
        ):
            readers = [
                asyncio.create_task(read_all(await opened(shared, "doomed"), 1))
                for shared in (b, c)
            ]
            loop = asyncio.get_running_loop()
            producer.kill()
            await producer.wait()
            killed_at = loop.time()
            expected = [(2, PAYLOADS[1]), (3, PAYLOADS[2]), (4, LOST)]
            for reader in asyncio.as_completed(readers):
                assert await reader == expected
                assert loop.time() - killed_at < LEASE_S + 1.0
            await until(lambda: _true(bool(orphans)))
            # the sweeps run too (every lease_s on both instances) and claim nothing more
            assert await b.sweep() == 0
            assert await c.sweep() == 0
            assert orphans == [(meta("doomed", "doomed"), "Hello, world")]
            # nothing outlives max(ttl_s, lease_s) + 1.5 lease_s after the kill (note 3)
            bound = max(TTL_S, LEASE_S) + 1.5 * LEASE_S + 1.0
            await until(lambda: _no_keys(b.redis), within=killed_at + bound - loop.time())
    finally:
        if producer.returncode is None:
            producer.kill()
            await producer.wait()


async def _true(value: bool) -> bool:
    return value


async def _no_keys(redis: aioredis.Redis) -> bool:
    return not await stream_keys(redis)


async def test_a_sweep_claims_a_dead_producers_stream_with_no_reader(
    redis_server: RedisServer,
) -> None:
    orphans: Orphans = []
    async with instance(redis_server, "b", orphans=orphans) as b:
        async with instance(redis_server, "a") as a:
            events = EventLog()
            a.publish(meta("s", "a"), events, lambda: None)
            events.append(b'{"type":"content","delta":"Half an "}')
            events.append(b'{"type":"content","delta":"article"}')
            remote = await opened(b, "s")
            await until(lambda: _length_is(remote, 2))
            a.publications.clear()  # the producer stops renewing, as if dead
        await until(lambda: _true(bool(orphans)), within=2 * LEASE_S + 1.0)
        assert orphans == [(meta("s", "a"), "Half an article")]
        assert await remote.length() == (3, True)
        assert await read_all(remote, 2) == [(3, LOST)]
        assert await b.redis.zscore(LIVE, "s") is None


async def test_keys_expire_ttl_after_the_end(redis_server: RedisServer) -> None:
    async with instance(redis_server, "a", ttl_s=1.0) as a:
        events = EventLog()
        a.publish(meta("s", "a"), events, lambda: None)
        events.append(token(1))
        events.end(END)
        remote = await opened(a, "s")
        assert await read_all(remote, 0) == [(1, token(1)), (2, END)]
        events_key, meta_key, lease_key = keys_of("s")[:3]
        assert not await a.redis.exists(lease_key)
        for key in (events_key, meta_key):
            assert 0 < await a.redis.pttl(key) <= 1000
        # the reader's presence key lives 2 * lease_s after its last read
        await until(lambda: _no_keys(a.redis), within=max(1.0, 2 * LEASE_S) + 1.0)


async def test_a_running_streams_keys_expire_a_lease_later_than_an_ended_streams(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a:
        events = EventLog()
        a.publish(meta("s", "a"), events, lambda: None)
        events.append(token(1))
        remote = await opened(a, "s")
        await until(lambda: _length_is(remote, 1))
        for key in [*keys_of("s")[:3], LIVE]:
            ttl = await a.redis.pttl(key)
            assert 0 < ttl <= round((max(TTL_S, LEASE_S) + LEASE_S) * 1000), key
        assert 0 < await a.redis.pttl(keys_of("s")[2]) <= round(LEASE_S * 1000)


async def test_cancel_from_another_instance_reaches_the_producer_and_only_the_owners(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a, instance(redis_server, "b") as b:
        calls: list[str] = []
        cancelled = asyncio.Event()

        def on_cancel() -> None:
            calls.append("cancel")
            cancelled.set()

        events = EventLog()
        a.publish(meta("s", "a", owner="k1"), events, on_cancel)
        events.append(token(1))
        await opened(b, "s")
        assert not await b.request_cancel("s", "k2")
        assert not await b.request_cancel("unknown", "k1")
        assert await b.request_cancel("s", "k1")
        async with asyncio.timeout(WAIT):
            await cancelled.wait()
        events.append(token(2))
        events.end(END)
        remote = await opened(b, "s")
        await until(lambda: _ended(remote))
        assert calls == ["cancel"]
        assert await b.request_cancel("s", "k1")  # ended: nothing left to stop, still the owner's

        keyless = EventLog()
        a.publish(meta("open", "a"), keyless, lambda: calls.append("open"))
        await opened(b, "open")
        assert await b.request_cancel("open", "anyone")
        await until(lambda: _true("open" in calls))


async def _ended(remote: RemoteStream) -> bool:
    return (await remote.length())[1]


async def test_a_reader_on_another_instance_is_seen_by_the_producer_while_it_reads(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a, instance(redis_server, "b") as b:
        events = EventLog()
        publication = a.publish(meta("s", "a"), events, lambda: None)
        remote = await opened(b, "s")
        assert not publication.remote_readers()
        got: list[int] = []

        async def consume() -> None:
            async for n, _ in remote.read(0):
                got.append(n)

        reader = asyncio.create_task(consume())
        await until(lambda: _true(publication.remote_readers()), within=LEASE_S + 1.0)
        events.append(token(1))
        await until(lambda: _true(got == [1]))
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await until(lambda: _true(not publication.remote_readers()), within=3 * LEASE_S + 1.0)
        events.end(END)


async def test_a_redis_restarted_empty_mid_stream_is_filled_again_and_the_reader_misses_nothing(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a, instance(redis_server, "b") as b:
        events = EventLog()
        a.publish(meta("s", "a"), events, lambda: None)
        for n in range(1, 6):
            events.append(token(n))
        remote = await opened(b, "s")
        got: list[tuple[int, bytes]] = []

        async def consume() -> None:
            async for event in remote.read(0):
                got.append(event)

        reader = asyncio.create_task(consume())
        await until(lambda: _true(len(got) == 5))
        await redis_server.restart()
        for n in range(6, 11):
            events.append(token(n))
        await until(lambda: _length_is(remote, 10))
        events.end(END)
        async with asyncio.timeout(WAIT):
            await reader
        assert got == [(n, token(n)) for n in range(1, 11)] + [(11, END)]
        assert await remote.length() == (11, True)


@pytest.mark.parametrize(
    ("payloads", "text"),
    [
        ([b'{"type":"token","content":"a"}', b'{"type":"token","content":"b"}'], "ab"),
        ([b'{"type":"content","delta":"x"}', b'{"type":"done","content":"x"}'], "x"),
        ([b'{"type":"metadata"}', b"not json", b"[1]", b'{"type":"token"}'], ""),
    ],
)
def test_relayed_text(payloads: list[bytes], text: str) -> None:
    assert relayed_text(payloads) == text


async def test_a_producer_whose_lease_lapsed_while_alive_finds_its_stream_claimed(
    redis_server: RedisServer,
) -> None:
    orphans: Orphans = []
    async with instance(redis_server, "a") as a, instance(redis_server, "b", orphans=orphans) as b:
        events = EventLog()
        publication = a.publish(meta("s", "a"), events, lambda: None)
        events.append(token(1))
        remote = await opened(b, "s")
        await until(lambda: _length_is(remote, 1))
        await b.redis.delete(keys_of("s")[2])  # the lease lapsed (Redis out of reach, say)
        assert await b.claim(remote.meta) is True
        assert await b.claim(remote.meta) is None  # one claimer only
        events.append(token(2))
        await until(lambda: _true(publication.claimed))
        assert "s" not in a.publications
        assert orphans == [(meta("s", "a"), "t1 ")]
        assert await read_all(remote, 0) == [(1, token(1)), (2, LOST)]


async def test_a_reader_of_a_stream_whose_keys_vanished_ends_with_lost_within_the_lease(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a, instance(redis_server, "b") as b:
        events = EventLog()
        a.publish(meta("s", "a"), events, lambda: None)
        events.append(token(1))
        remote = await opened(b, "s")
        got: list[tuple[int, bytes]] = []

        async def consume() -> None:
            async for event in remote.read(0):
                got.append(event)

        reader = asyncio.create_task(consume())
        await until(lambda: _true(len(got) == 1))
        a.publications.clear()  # no producer to fill Redis again
        await b.redis.flushall()
        async with asyncio.timeout(LEASE_S + 1.0):
            await reader
        assert got == [(1, token(1)), (2, LOST)]


async def test_an_ended_log_redis_cannot_take_is_given_up_after_the_ttl(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, "a") as a:
        await redis_server.stop()
        events = EventLog()
        a.publish(meta("s", "a"), events, lambda: None)
        events.append(token(1))
        events.end(END)
        window = max(TTL_S, LEASE_S)
        await until(lambda: _true("s" not in a.publications), within=window + 2.0)
        await redis_server.start()


async def test_cancel_reaches_an_idle_producer_within_a_round_trip(
    redis_server: RedisServer,
) -> None:
    """With a 30 s lease the flag alone would be read back only every 10 s while the stream is
    idle (waiting for its first token, say); the producer's channel brings it at once."""
    async with (
        instance(redis_server, "a", lease_s=30.0) as a,
        instance(redis_server, "b", lease_s=30.0) as b,
    ):
        cancelled = asyncio.Event()
        events = EventLog()
        publication = a.publish(meta("s", "a"), events, cancelled.set)
        await opened(b, "s")
        assert await b.request_cancel("s", "")
        async with asyncio.timeout(1.0):
            await cancelled.wait()
        assert publication.cancelled
        events.end(END)


async def test_a_stream_flushed_late_is_still_found_by_a_reader_elsewhere(
    redis_server: RedisServer,
) -> None:
    """A flush can lag its interval under load, so a stream not in Redis yet is looked for again
    for up to a second (`mirror.UNKNOWN_WAIT_S`) before the read route calls it unknown."""
    async with (
        instance(redis_server, "a", flush_ms=400) as a,
        instance(redis_server, "b", flush_ms=10) as b,
    ):
        events = EventLog()
        a.publish(meta("late", "a"), events, lambda: None)  # in Redis at a's next flush
        events.append(token(1))
        remote = await Mirror(b).open("late", 0)
        assert remote is not None
        await remote.aclose()
        assert await Mirror(b).open("never-published", 0) is None


async def test_more_readers_elsewhere_than_the_default_pool_leave_lookups_working(
    redis_server: RedisServer,
) -> None:
    """Each reader elsewhere holds a connection while it blocks for events; the client's pool is
    a blocking one of `MAX_CONNECTIONS`, so lookups keep working past redis-py's default 100."""
    assert MAX_CONNECTIONS > 150
    # A lease of production's length: with the suite's short one, a loaded machine can delay
    # the producer's renewal past it while 150 readers wake, and the stream reads as lost.
    async with (
        instance(redis_server, "a", lease_s=3.0) as a,
        instance(redis_server, "b", lease_s=3.0) as b,
    ):
        events = EventLog()
        a.publish(meta("busy", "a"), events, lambda: None)
        events.append(token(1))
        remote = await opened(b, "busy")
        readers = [asyncio.create_task(read_all(remote, 1)) for _ in range(150)]
        await until(lambda: _clients_above(b, 150))
        assert await b.open("busy") is not None  # a command past 100 connections still runs
        events.end(END)
        assert [await r for r in readers] == [[(2, END)]] * 150


async def _clients_above(shared: SharedStreams, count: int) -> bool:
    info = await shared.redis.info("clients")
    return int(info["connected_clients"]) > count


# --- a reader elsewhere asks for the flush it waits for --------------------------------------

SLOW_FLUSH_MS = 60_000  # no scheduled flush during a test: what arrives came from a request


async def test_a_reader_at_what_redis_holds_gets_the_next_event_without_waiting_for_the_interval(
    redis_server: RedisServer,
) -> None:
    """A cursor at the end of what Redis holds asks the producer to flush that stream now: the
    missed event arrives within a round trip or two, not at the next interval (a minute here);
    the producer's other streams wait for their interval."""
    async with (
        instance(redis_server, "a", flush_ms=SLOW_FLUSH_MS) as a,
        instance(redis_server, "b") as b,
    ):
        events, other = EventLog(), EventLog()
        a.publish(meta("asked", "a"), events, lambda: None)
        bystander = a.publish(meta("other", "a"), other, lambda: None)
        events.append(token(1))
        other.append(token(1))
        assert await a.flush()  # the first flush, by hand: both streams in Redis, one event each
        events.append(token(2))  # produced; Redis does not hold it yet
        other.append(token(2))
        remote = await b.open("asked", 1)
        assert remote is not None
        assert remote.at_open == (1, False)
        reading = aclosing(remote.read(1))
        async with reading as events_read, asyncio.timeout(WAIT):
            assert await anext(events_read) == (2, token(2))
        assert await b.redis.xlen(keys_of("other")[0]) == 1  # not asked for: at the interval
        assert bystander.flushed == 1
        events.end(END)
        other.end(END)


async def test_a_reader_ahead_of_redis_is_let_in_once_the_asked_flush_reaches_its_cursor(
    redis_server: RedisServer,
) -> None:
    """A client that read events on the producing instance that Redis does not hold yet comes
    back elsewhere: its cursor is reached by the flush it asks for, not by the next interval."""
    async with (
        instance(redis_server, "a", flush_ms=SLOW_FLUSH_MS) as a,
        instance(redis_server, "b") as b,
    ):
        events = EventLog()
        a.publish(meta("ahead", "a"), events, lambda: None)
        events.append(token(1))
        assert await a.flush()
        for n in (2, 3, 4):
            events.append(token(n))
        async with asyncio.timeout(WAIT):
            remote = await Mirror(b).open("ahead", 3)  # read 3 on a; Redis holds 1
            assert remote is not None
            await remote.reach(3)
        assert remote.length >= 3
        assert not remote.ended
        try:
            async with asyncio.timeout(WAIT):
                assert await anext(remote.events(3)) == token(4)
        finally:
            await remote.aclose()  # closes the read too
        events.end(END)


async def test_a_reader_at_the_live_edge_gets_the_next_event_as_soon_as_it_is_produced(
    redis_server: RedisServer,
) -> None:
    """Asked for a stream with nothing new, the producer watches its log (one waiter however
    many ask) and flushes its next event the moment it is appended."""
    async with (
        instance(redis_server, "a", flush_ms=SLOW_FLUSH_MS) as a,
        instance(redis_server, "b") as b,
    ):
        events = EventLog()
        publication = a.publish(meta("edge", "a"), events, lambda: None)
        events.append(token(1))
        assert await a.flush()
        opened_thrice = [await b.open("edge", 1) for _ in range(3)]  # at what a produced
        remote = opened_thrice[-1]
        assert remote is not None
        await until(lambda: _true("edge" in a.watching))
        assert len(events._waiters) == 1  # one waiter for three requests
        assert publication.flushed == 1  # nothing to flush yet
        async with aclosing(remote.read(1)) as reading, asyncio.timeout(WAIT):
            events.append(token(2))
            assert await anext(reading) == (2, token(2))
        assert "edge" not in a.watching
        events.end(END)


async def test_a_reader_behind_what_redis_holds_asks_for_no_flush(
    redis_server: RedisServer,
) -> None:
    async with (
        instance(redis_server, "a", flush_ms=SLOW_FLUSH_MS) as a,
        instance(redis_server, "b") as b,
    ):
        events = EventLog()
        a.publish(meta("behind", "a"), events, lambda: None)
        events.append(token(1))
        events.append(token(2))
        assert await a.flush()
        assert not a.request_flush("unknown")  # no flush for a stream a does not produce
        events.append(token(3))
        await b.redis.config_resetstat()
        remote = await b.open("behind", 1)  # event 2 is in Redis: nothing to ask for
        assert remote is not None
        async with aclosing(remote.read(1)) as events_read, asyncio.timeout(WAIT):
            assert await anext(events_read) == (2, token(2))
        stats: dict[str, Any] = await b.redis.info("commandstats")
        assert "cmdstat_publish" not in stats
        events.end(END)
