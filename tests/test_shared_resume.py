"""Streams across instances (REDIS_URL): two real service processes sharing a real redis-server,
a reader cut on one and back on the other, a reader elsewhere holding a generation through its
grace, a cancel sent to the instance that does not produce, a producer SIGKILLed mid-answer,
the keys' expiry and the number of Redis calls per stream. Small flush, lease, grace and TTL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from service import keys
from tests.conftest import API_KEY, WAIT, Frames, MakeGateway, RedisServer
from tests.fake_upstream import Done, FakeUpstream, Finish, Gate, Sleep, Step, Text, Usage
from tests.process import ServiceProcess, service
from tests.test_resume import ACCEPTS, PIECES, STREAMS, check_joined, frames_of, gated, parse

NEVER = asyncio.Event
GENERATE = "/api/ai/generate-stream"
CHAT = "/api/v1/ai/chat/stream"
LEASE_S = 0.6
FLUSH_MS = 20


def env_for(fake: FakeUpstream, redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "REDIS_URL": redis.url,
        "RATE_LIMIT_RPM": "0",
        "RATE_LIMIT_CONCURRENT": "0",
        "RATE_LIMIT_TPM": "0",
        "RESUME_FLUSH_MS": str(FLUSH_MS),
        "RESUME_LEASE_S": str(LEASE_S),
        "RESUME_GRACE_S": "5",
        "HEARTBEAT_INTERVAL_S": "0.3",
        **extra,
    }


@contextlib.asynccontextmanager
async def two(
    fake: FakeUpstream, redis: RedisServer, tmp: Path, **extra: str
) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess, aiohttp.ClientSession]]:
    """Instances A and B sharing `redis`, started side by side, and a client session."""
    env = env_for(fake, redis, **extra)
    async with contextlib.AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            stack.enter_async_context(service(env, tmp)),
            stack.enter_async_context(service(env, tmp)),
        )
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield a, b, session


async def scrape(session: aiohttp.ClientSession, instance: ServiceProcess, name: str) -> float:
    """A counter's value on a running instance (no labels)."""
    async with session.get(f"{instance.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(WAIT):
        return await resp.read()


# --- a reader moving between instances ----------------------------------------------------


@pytest.mark.parametrize("shape", ["full", "data-only"])
@pytest.mark.parametrize("way", ["get", "post"])
async def test_a_stream_cut_on_one_instance_resumes_on_the_other(
    fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path, shape: str, way: str
) -> None:
    gates = [asyncio.Event() for _ in PIECES[1:]]
    fake.queue(gated(gates))
    accept = {"Accept": ACCEPTS[shape]}
    async with two(fake, redis_server, tmp_path) as (a, b, session):
        resp = await session.post(a.url + GENERATE, json={"prompt": "x"}, headers=accept)
        sid = resp.headers["X-Stream-ID"]
        frames = Frames(resp)
        await frames.event()  # start
        await frames.event()  # "Hel": read on A, maybe not yet flushed to Redis
        resp.close()
        seen = [parse(f) for f in frames_of(frames.raw)]
        headers = {**accept, "Last-Event-ID": f"{sid}:{len(seen)}"}
        if way == "get":
            back = await session.get(f"{b.url}{STREAMS}{sid}", headers=headers)
        else:  # fetch-event-source's retry: the same POST, its body not looked at
            back = await session.post(b.url + GENERATE, data=b"{", headers=headers)
        assert back.status == 200
        assert back.headers["X-Stream-ID"] == sid
        for gate in gates:  # the rest is produced on A while B's reader follows through Redis
            gate.set()
        rest = [parse(f) for f in frames_of(await read_all(back))]
        check_joined(seen + rest, sid, full=shape == "full")
        assert len(fake.seen) == 1  # one generation, never a second
        route = "generate_stream" if way == "post" else "stream"
        async with session.get(f"{b.url}/metrics") as metrics:
            exposition = await metrics.text()
        assert f'ai_stream_resumes_total{{outcome="resumed",route="{route}"}} 1.0' in exposition
        # at its end, on either instance: 204 (EventSource stops reconnecting)
        for instance in (a, b):
            after = len(seen) + len(rest)
            end = await session.get(f"{instance.url}{STREAMS}{sid}?after={after}")
            assert end.status == 204


SLOW_FLUSH_S = 3.0  # the interval that a reader's request for a flush must beat


@pytest.mark.parametrize("cursor", ["at_redis", "ahead_of_redis", "at_the_live_edge"])
async def test_a_reader_back_elsewhere_gets_its_first_missed_event_before_the_next_flush(
    fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path, cursor: str
) -> None:
    """Events 3 and 4 are produced on A after a flush; a reader comes back on B with a cursor
    at what Redis holds (its first missed event not flushed yet), past it (it read 3 on A), or
    at the end of what A produced (event 5 comes once it is back): B asks A to flush that
    stream, so the event arrives before A's next flush could happen."""
    gates = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
    steps: list[Step] = [Text("a")]
    for gate, piece in zip(gates, "bcd", strict=True):
        steps += [Gate(gate), Text(piece)]
    fake.queue([*steps, Gate(NEVER())])
    flush_ms = str(round(SLOW_FLUSH_S * 1000))
    redis = aioredis.Redis.from_url(redis_server.url)
    lease = {"RESUME_FLUSH_MS": flush_ms, "RESUME_LEASE_S": "30"}  # renewed by every flush
    async with two(fake, redis_server, tmp_path, **lease) as (a, b, session):
        resp = await session.post(a.url + GENERATE, json={"prompt": "x"})
        sid = resp.headers["X-Stream-ID"]
        frames = Frames(resp)
        seen = [await frames.event(), await frames.event()]  # start, "a"
        meta, events = f"aistream:resume:{{{sid}}}:meta", f"aistream:resume:{{{sid}}}:events"
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(SLOW_FLUSH_S + WAIT):  # A's first flush
            while not await redis.exists(meta):  # noqa: ASYNC110 (a flush is not an event)
                await asyncio.sleep(0.01)  # bounded by the timeout above
        next_flush = loop.time() + SLOW_FLUSH_S  # A's next flush comes no sooner
        held = await redis.xlen(events)
        assert held <= 2  # events 3 and 4 wait for their gates
        for gate in gates[:2]:
            gate.set()
            seen.append(await frames.event())  # "b", then "c": read on A, not in Redis
        after = {"at_redis": held, "ahead_of_redis": 3, "at_the_live_edge": 4}[cursor]
        resp.close()
        headers = {"Last-Event-ID": f"{sid}:{after}"}
        await redis.config_resetstat()
        async with asyncio.timeout_at(next_flush - 0.2):
            back = await session.get(f"{b.url}{STREAMS}{sid}", headers=headers)
            assert back.status == 200
            if cursor == "at_the_live_edge":
                gates[2].set()  # "d", event 5: produced now that the reader is back
                assert (await Frames(back).event())["delta"] == "d"
            else:
                assert await Frames(back).event() == seen[after]
        back.close()
        stats: dict[str, Any] = await redis.info("commandstats")
        assert stats["cmdstat_publish"]["calls"] == 1  # one request for this reconnect
    await redis.aclose()


async def test_a_reader_elsewhere_holds_the_generation_past_its_grace(
    fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    grace_s = 0.5
    gate = asyncio.Event()
    fake.queue([Text("a"), Gate(gate), Text("b"), Gate(NEVER())])
    async with two(fake, redis_server, tmp_path, RESUME_GRACE_S=str(grace_s)) as (a, b, session):
        resp = await session.post(a.url + GENERATE, json={"prompt": "x"})
        sid = resp.headers["X-Stream-ID"]
        frames = Frames(resp)
        await frames.event()
        await frames.event()
        remote = await session.get(f"{b.url}{STREAMS}{sid}?after=2")
        assert remote.status == 200
        resp.close()  # A's last local reader leaves: its grace window starts
        upstream = fake.seen[0].ended
        # time is the subject: three grace windows pass while B's reader holds the generation
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3 * grace_s + LEASE_S):
                await upstream.wait()
        gate.set()
        assert (await Frames(remote).event())["delta"] == "b"  # still live, read through B
        loop = asyncio.get_running_loop()
        left = loop.time()
        remote.close()  # nobody anywhere now
        async with asyncio.timeout(WAIT):
            await upstream.wait()
        # the reader elsewhere gets a grace window of its own, once its presence has lapsed (two
        # leases) and the producer has seen it (a renewal, then a look every third of a lease)
        assert grace_s <= loop.time() - left < grace_s + 2 * LEASE_S + 2 * LEASE_S / 3 + 0.5


async def test_a_cancel_sent_to_another_instance_stops_the_generation(
    fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.queue([Text("a"), Gate(NEVER())])
    one, other = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    async with two(fake, redis_server, tmp_path, API_KEYS="key-one,key-two") as (a, b, session):
        resp = await session.post(a.url + GENERATE, json={"prompt": "x"}, headers=one)
        sid = resp.headers["X-Stream-ID"]
        local = Frames(resp)
        await local.event()
        await local.event()
        remote = await session.get(f"{b.url}{STREAMS}{sid}?after=2")  # reading needs no key
        assert remote.status == 200
        # another key's POST resume on B: the `not_found` event, as on the producing instance
        theirs = {**other, "Last-Event-ID": f"{sid}:2"}
        lone = await Frames(await session.post(b.url + GENERATE, data=b"{", headers=theirs)).rest()
        assert [(e["type"], e["code"]) for e in lone] == [("error", "not_found")]
        beyond = await session.get(f"{b.url}{STREAMS}{sid}?after=9")  # after the lease's wait
        assert beyond.status == 400
        refused = await session.post(f"{b.url}{STREAMS}{sid}/cancel", headers=other)
        assert refused.status == 404
        unknown = await session.post(f"{b.url}{STREAMS}{'U' * 22}/cancel", headers=one)
        assert unknown.status == 404
        assert not fake.seen[0].ended.is_set()
        stop = await session.post(f"{b.url}{STREAMS}{sid}/cancel", headers=one)
        assert stop.status == 204
        async with asyncio.timeout(1.0):
            await fake.seen[0].ended.wait()
        for frames in (local, Frames(remote)):
            (error,) = await frames.rest()
            assert (error["type"], error["code"], error["reason"]) == (
                "error",
                "cancelled",
                "cancelled",
            )
        again = await session.post(f"{b.url}{STREAMS}{sid}/cancel", headers=one)
        assert again.status == 204  # already ended: nothing changes


# --- a producer that dies -----------------------------------------------------------------


async def test_a_killed_producers_readers_end_and_its_answer_is_saved_partial_once(
    fake: FakeUpstream,
    redis_server: RedisServer,
    tmp_path: Path,
    make_gateway: MakeGateway,
) -> None:
    gate = asyncio.Event()
    fake.queue([Text("Hi "), Gate(gate), Text("there"), Gate(NEVER())])
    # a third instance, in process: two readers on two instances race to claim the stream
    c = await make_gateway(
        redis_url=redis_server.url,
        resume_lease_s=LEASE_S,
        resume_flush_ms=FLUSH_MS,
        heartbeat_interval_s=0.3,
    )
    async with two(fake, redis_server, tmp_path, CHECKPOINT_S="0") as (a, b, session):
        resp = await session.post(a.url + CHAT, json={"message": "hello"})
        frames = Frames(resp)
        metadata = await frames.event()
        sid, cid = metadata["messageId"], metadata["conversationId"]
        readers = [
            Frames(await session.get(f"{b.url}{STREAMS}{sid}?after=1")),
            Frames(await c.client.get(f"{STREAMS}{sid}?after=1")),
        ]
        for reader in readers:  # what they read came through Redis
            assert (await reader.event())["content"] == "Hi "
        gate.set()
        for reader in readers:
            assert (await reader.event())["content"] == "there"
        busy = await session.post(b.url + CHAT, json={"message": "again", "conversationId": cid})
        assert busy.status == 409  # the answer streams on A: B names it to resume
        assert (await busy.json())["error"]["streamId"] == sid
        loop = asyncio.get_running_loop()
        a.signal(signal.SIGKILL)
        await a.wait(WAIT)
        killed = loop.time()
        for reader in readers:
            (error,) = await reader.rest()  # Frames bounds each read by WAIT: never a hang
            assert (error["type"], error["code"], error["reason"]) == (
                "error",
                "server_shutdown",
                "shutdown",
            )
        assert loop.time() - killed < LEASE_S + LEASE_S / 3 + 1.0
        claimed = await scrape(session, b, "ai_stream_resume_orphans_total")
        claimed += c.sample("ai_stream_resume_orphans_total")
        assert claimed == 1
        async with session.get(f"{b.url}/api/v1/ai/conversations/{cid}") as got:
            messages = (await got.json())["messages"]
        assert [(m["role"], m["content"], m["status"]) for m in messages] == [
            ("user", "hello", "complete"),
            ("assistant", "Hi there", "partial"),
        ]
        assert messages[1]["messageId"] == sid
        # the dead producer's turn was released with its answer: the next turn goes at once
        fake.queue([Text("ok"), Finish(), Usage(3, 1), Done()])
        turn = await session.post(b.url + CHAT, json={"message": "again", "conversationId": cid})
        assert turn.status == 200
        events = await Frames(turn).rest()
        assert events[-1]["type"] == "done"


async def test_a_producer_shutting_down_hands_its_terminal_event_to_readers_elsewhere(
    fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The mirror closes after the drain: the `server_shutdown` event the drain appends reaches
    Redis from the producer itself, with nothing left to claim."""
    fake.queue([Text("a"), Gate(NEVER())])
    async with two(fake, redis_server, tmp_path, SHUTDOWN_DRAIN_S="0") as (a, b, session):
        resp = await session.post(a.url + GENERATE, json={"prompt": "x"})
        sid = resp.headers["X-Stream-ID"]
        local = Frames(resp)
        await local.event()
        await local.event()
        remote = Frames(await session.get(f"{b.url}{STREAMS}{sid}?after=2"))
        a.signal(signal.SIGTERM)
        (error,) = await remote.rest()
        assert (error["code"], error["reason"]) == ("server_shutdown", "shutdown")
        assert error["elapsedMs"] > 0  # the producer's own event, not the stored `lost` one
        assert await a.wait(WAIT) == 0
        assert await scrape(session, b, "ai_stream_resume_orphans_total") == 0


# --- Redis: expiry and round trips ----------------------------------------------------------


async def keys_of(redis: aioredis.Redis, sid: str) -> list[bytes]:
    found: list[bytes] = []
    async for key in redis.scan_iter(match=f"aistream:resume:{{{sid}}}:*", count=1000):
        found.append(key)
    return found


async def test_a_finished_streams_keys_are_gone_after_the_ttl(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    ttl_s = 0.5
    gateway = await make_gateway(
        redis_url=redis_server.url, resume_ttl_s=ttl_s, resume_lease_s=LEASE_S
    )
    resp, frames = await gateway.stream({"prompt": "x"})
    sid = resp.headers["X-Stream-ID"]
    assert (await frames.rest())[-1]["type"] == "done"
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        async with asyncio.timeout(WAIT):
            while not await keys_of(redis, sid):  # noqa: ASYNC110 (the flush is not an event)
                await asyncio.sleep(0.01)
        ended = asyncio.get_running_loop().time()
        async with asyncio.timeout(WAIT):
            while await keys_of(redis, sid):  # noqa: ASYNC110 (an expiry is not an event)
                await asyncio.sleep(0.05)
        gone = asyncio.get_running_loop().time() - ended
        assert gone < max(ttl_s, LEASE_S) + 1.0
        assert not await redis.zscore("aistream:resume:live", sid)
    finally:
        await redis.aclose()


async def test_a_long_stream_costs_one_redis_call_per_flush_not_per_token(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    tokens = 200
    gateway = await make_gateway(redis_url=redis_server.url, resume_flush_ms=50)
    steps: list[Step] = []
    for _ in range(tokens):
        steps += [Text("x"), Sleep(0.003)]  # model pace: the stream spans many flushes
    gateway.fake.queue([*steps, Finish(), Usage(3, tokens), Done()])
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        await redis.config_resetstat()
        resp, frames = await gateway.stream({"prompt": "x"})
        events = await frames.rest()
        assert events[-1]["type"] == "done"
        assert events[-1]["tokenCount"] == tokens
        await gateway.settled()
        sid = resp.headers["X-Stream-ID"]
        async with asyncio.timeout(WAIT):  # the end reaches Redis at the next flush
            while not await redis.hexists(f"aistream:resume:{{{sid}}}:meta", "ended"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        stats: dict[str, Any] = await redis.info("commandstats")
        calls = {name: int(stat["calls"]) for name, stat in stats.items()}
    finally:
        await redis.aclose()
    flushes = gateway.sample("ai_stream_resume_redis_flushes_total")
    appends = calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0)
    assert 1 <= appends <= flushes + 1  # one APPEND call per flush
    assert flushes < tokens / 4
    assert gateway.sample("ai_stream_resume_redis_events_total") == len(events)
    mirror = sum(
        calls.get(f"cmdstat_{c}", 0) for c in ("evalsha", "eval", "zadd", "zrem", "pexpire")
    )
    assert mirror < tokens / 2, calls  # far below one per token


async def test_without_redis_nothing_is_published(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    app = gateway.client.app
    assert app[keys.LIVE].on_start == []  # no hook: the in-process path is unchanged
    assert keys.SHARED_STREAMS not in app
