"""A chat answer survives a SIGKILL of the real process (SQLite file, or Redis): after a restart
the conversation shows it `partial` with everything the client had read up to one `CHECKPOINT_S`
before the kill, and the next turn is accepted at once. While it streams, it shows `streaming`."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import WAIT, MakeGateway, start_redis
from tests.fake_upstream import FakeUpstream, Gate, Repeat, Text, answer
from tests.process import service
from tests.test_chat_process import STREAM, history, upstream_env
from tests.test_process import read_events

CHECKPOINT_S = 0.2
MARGIN_S = 0.15  # a checkpoint's write and the loop's scheduling on a busy machine
READ_FOR_S = 4 * CHECKPOINT_S


async def read_until_killed(
    resp: aiohttp.ClientResponse, kill: asyncio.Future[float]
) -> list[tuple[float, str]]:
    """The text read, with the time it was read at, until READ_FOR_S after the first token; then
    `kill` is resolved (the time of the kill) by the caller, and the rest is read to the end."""
    loop = asyncio.get_running_loop()
    read: list[tuple[float, str]] = []
    text = ""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                line = await resp.content.readline()
            except aiohttp.ClientError:
                break  # the process died mid-frame
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            event = orjson.loads(line[6:])
            if event.get("type") != "token":
                continue
            text += event["content"]
            read.append((loop.time(), text))
            if not kill.done() and loop.time() - read[0][0] >= READ_FOR_S:
                kill.set_result(loop.time())
    return read


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_killed_service_keeps_the_answer_up_to_one_checkpoint_before_the_kill(
    fake: FakeUpstream, tmp_path: Path, backend: str
) -> None:
    redis = await start_redis() if backend == "redis" else None
    extra = {"CHECKPOINT_S": str(CHECKPOINT_S)}
    if redis is not None:
        extra["REDIS_URL"] = redis.url
    env = upstream_env(fake, **extra)
    fake.queue([Repeat("tok ", 0.01)])  # a model still streaming when the process dies
    try:
        async with service(env, tmp_path) as svc, aiohttp.ClientSession() as session:
            resp = await session.post(f"{svc.url}{STREAM}", json={"message": "Go"})
            [metadata] = await read_events(resp, 1)
            cid, mid = str(metadata["conversationId"]), str(metadata["messageId"])
            kill: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            reading = asyncio.create_task(read_until_killed(resp, kill))
            async with asyncio.timeout(WAIT):
                killed_at = await kill
            svc.signal(signal.SIGKILL)
            assert await svc.wait(WAIT) == -signal.SIGKILL
            read = await reading
        everything = read[-1][1]
        due = [text for at, text in read if at <= killed_at - CHECKPOINT_S - MARGIN_S]
        assert due  # the test read for long enough to hold the service to its bound
        fake.queue(answer("Next."))
        async with service(env, tmp_path) as again, aiohttp.ClientSession() as session:
            kept = await history(session, again.url, cid)
            assert [(m["role"], m["status"]) for m in kept] == [
                ("user", "complete"),
                ("assistant", "partial"),
            ]
            saved = kept[1]
            assert saved["messageId"] == mid
            assert everything.startswith(saved["content"])  # nothing the client did not get
            assert len(saved["content"]) >= len(due[-1])  # at most one checkpoint lost
            resp = await session.post(
                f"{again.url}/api/v1/ai/chat", json={"message": "Go on", "conversationId": cid}
            )
            assert resp.status == 200  # the next turn at once, not 409
            assert (await resp.json())["content"] == "Next."
        assert fake.seen[-1].body["messages"][1:] == [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": saved["content"]},
            {"role": "user", "content": "Go on"},
        ]
    finally:
        if redis is not None:
            await redis.stop()


async def test_a_conversation_shows_its_answer_streaming_then_closed_in_place(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(checkpoint_s=0.05)
    gate = asyncio.Event()
    gw.fake.queue([Text("Half"), Text(" an"), Gate(gate), *answer(" answer.")])
    resp = await gw.client.post(STREAM, json={"message": "Go"})
    events = await read_events(resp, 1)
    cid, mid = str(events[0]["conversationId"]), str(events[0]["messageId"])
    while "".join(str(e.get("content", "")) for e in events[1:]) != "Half an":
        events += await read_events(resp, 1)
    async with asyncio.timeout(WAIT):
        while True:  # bounded: polling what the checkpoint task saved
            shown = (await (await gw.client.get(f"/api/v1/ai/conversations/{cid}")).json())[
                "messages"
            ][1]
            if shown["content"] == "Half an":
                break
            await asyncio.sleep(0.02)
    assert (shown["messageId"], shown["status"], shown["completedAt"], shown["usage"]) == (
        mid,
        "streaming",
        None,
        None,
    )
    busy = await gw.post("/api/v1/ai/chat", {"message": "Not now", "conversationId": cid})
    assert busy.status == 409
    gate.set()
    await read_events(resp, 99)
    await gw.settled()
    got = (await (await gw.client.get(f"/api/v1/ai/conversations/{cid}")).json())["messages"]
    assert [(m["messageId"], m["status"], m["content"]) for m in got] == [
        (got[0]["messageId"], "complete", "Go"),
        (mid, "complete", "Half an answer."),
    ]
    assert gw.sample("ai_stream_checkpoints_total") >= 1
    assert gw.sample("ai_stream_checkpoint_answers_total") >= 1
