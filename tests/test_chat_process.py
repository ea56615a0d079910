"""Chat against the real process: history survives a restart (SQLite file), a shutdown mid-answer
saves it as `partial`, the seed's curl example works, and with Redis two instances share one
conversation and its turn."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import API_KEY, WAIT, MakeGateway, RedisServer
from tests.fake_upstream import Echo, FakeUpstream, Finish, Gate, Text, answer, echoed
from tests.process import curl_events, service
from tests.test_process import read_events

STREAM = "/api/v1/ai/chat/stream"


def upstream_env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        **extra,
    }


async def history(session: aiohttp.ClientSession, url: str, cid: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/api/v1/ai/conversations/{cid}") as resp:
        assert resp.status == 200
        return list((await resp.json())["messages"])


async def test_history_survives_a_restart(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.queue(answer("Nice to meet you, Ada."), [Echo(), Finish()])
    env = upstream_env(fake)
    async with service(env, tmp_path) as first, aiohttp.ClientSession() as session:
        resp = await session.post(f"{first.url}/api/v1/ai/chat", json={"message": "I am Ada."})
        cid = (await resp.json())["conversationId"]
        first.signal(signal.SIGTERM)
        assert await first.wait(WAIT) == 0

    async with service(env, tmp_path) as second, aiohttp.ClientSession() as session:
        kept = await history(session, second.url, cid)
        assert [(m["role"], m["content"]) for m in kept] == [
            ("user", "I am Ada."),
            ("assistant", "Nice to meet you, Ada."),
        ]
        resp = await session.post(
            f"{second.url}{STREAM}", json={"message": "Who am I?", "conversationId": cid}
        )
        events = await read_events(resp, 99)
    context = [
        {"role": "system", "content": fake.seen[1].body["messages"][0]["content"]},
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "Who am I?"},
    ]
    assert fake.seen[1].body["messages"] == context
    assert "".join(str(e["content"]) for e in events if e["type"] == "token") == echoed(context)


async def test_shutdown_mid_answer_saves_it_as_partial(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.queue([Text("Half an"), Text(" answer"), Gate(asyncio.Event())])
    env = upstream_env(fake, SHUTDOWN_DRAIN_S="0.2")
    async with service(env, tmp_path) as svc, aiohttp.ClientSession() as session:
        resp = await session.post(f"{svc.url}{STREAM}", json={"message": "Go"})
        events = await read_events(resp, 2)
        cid = str(events[0]["conversationId"])
        while "".join(str(e.get("content", "")) for e in events[1:]) != "Half an answer":
            events += await read_events(resp, 1)
        svc.signal(signal.SIGINT)
        rest = await read_events(resp, 99)
        assert await svc.wait(WAIT) == 0
    assert rest[-1]["code"] == "server_shutdown"
    async with service(env, tmp_path) as again, aiohttp.ClientSession() as session:
        kept = await history(session, again.url, cid)
    assert [(m["role"], m["status"], m["content"]) for m in kept] == [
        ("user", "complete", "Go"),
        ("assistant", "partial", "Half an answer"),
    ]


async def test_the_seed_curl_example_streams_tokens(tmp_path: Path) -> None:
    async with service({"DEMO_TOKENS_PER_S": "2000"}, tmp_path) as svc:
        events = await curl_events(
            "-s",
            "-X",
            "POST",
            f"{svc.url}{STREAM}",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"message": "Tell me about baby sleep patterns"}',
            "--no-buffer",
        )
    assert events[0]["type"] == "metadata"
    assert events[0]["model"] == "demo-writer-1"
    assert {e["type"] for e in events[1:-1]} == {"token"}
    assert events[-1]["type"] == "done"
    assert events[-1]["usage"]["completion_tokens"] == 350
    text = "".join(e["content"] for e in events[1:-1])
    assert "baby sleep patterns" in text.lower()


async def test_two_instances_share_a_conversation_and_its_turn_through_redis(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    a = await make_gateway(redis_url=redis_server.url)
    b = await make_gateway(redis_url=redis_server.url)
    a.fake.queue(answer("From A"))
    cid = (await (await a.post("/api/v1/ai/chat", {"message": "Hello A"})).json())["conversationId"]
    gate = asyncio.Event()
    a.fake.queue([Text("From"), Gate(gate), *answer(" B")])
    resp = await b.client.post(STREAM, json={"message": "Hello B", "conversationId": cid})
    await read_events(resp, 2)
    busy = await a.post("/api/v1/ai/chat", {"message": "Not now", "conversationId": cid})
    assert busy.status == 409
    gate.set()
    await read_events(resp, 99)
    await b.settled()
    got = await (await a.client.get(f"/api/v1/ai/conversations/{cid}")).json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "Hello A"),
        ("assistant", "From A"),
        ("user", "Hello B"),
        ("assistant", "From B"),
    ]
    assert a.fake.seen[1].body["messages"][1:] == [
        {"role": "user", "content": "Hello A"},
        {"role": "assistant", "content": "From A"},
        {"role": "user", "content": "Hello B"},
    ]
    assert (await b.client.delete(f"/api/v1/ai/conversations/{cid}")).status == 204
    assert (await a.client.get(f"/api/v1/ai/conversations/{cid}")).status == 404
