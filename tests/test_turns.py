"""A chat turn gives back what it took on every exit. A client that leaves at any await before
its first event (a real disconnect; a seam holds the request at that await until the server
cancels its handler) leaves the conversation free for the next turn within 1 s, its limits and
its MAX_STREAMS slot given back, and no unanswered message in the model's next context. After a
SIGKILL, a restarted instance frees the killed process's turns at once."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from service import keys
from service.chat import holders
from service.chat.conversations import Message, build_context
from service.config import CHAT_SYSTEM_PROMPT
from tests.conftest import API_KEY, WAIT, Gateway, MakeGateway, RedisServer
from tests.fake_upstream import Echo, FakeUpstream, Finish, Gate, Text, answer, echoed
from tests.process import service
from tests.test_process import read_events

STREAM = "/api/v1/ai/chat/stream"
CHAT = "/api/v1/ai/chat"
NEVER = asyncio.Event


class Hold:
    """A seam in front of the conversation store or the limiter: the first call of `method`
    waits, before or after the real call, on `answer` (the store's answer coming back), and sets
    `reached`. The server cancelling the handler (its client left) or `answer` ends the wait."""

    def __init__(self, inner: Any, method: str, after: bool) -> None:
        self.inner = inner
        self.method = method
        self.after = after
        self.reached = asyncio.Event()
        self.answer = asyncio.Event()
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)
        if name != self.method or not self.armed:
            return real

        async def held(*args: Any, **kwargs: Any) -> Any:
            self.armed = False
            result = await real(*args, **kwargs) if self.after else None
            self.reached.set()
            await self.answer.wait()
            return await real(*args, **kwargs) if not self.after else result

        return held


def system() -> dict[str, str]:
    return {"role": "system", "content": CHAT_SYSTEM_PROMPT}


async def leave(pending: asyncio.Task[aiohttp.ClientResponse]) -> None:
    """The client goes away: it closes its socket whether or not headers came back."""
    if pending.done():
        pending.result().close()
        return
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)


def open_connections(gw: Gateway) -> int:
    """The server's connections whose socket is still open (a lost one stays listed until its
    handler has ended)."""
    assert gw.client.server.runner is not None
    server = gw.client.server.runner.server
    assert server is not None
    return sum(handler.transport is not None for handler in server.connections)


async def server_saw_leave(gw: Gateway, connections: int) -> None:
    """Wait (bounded) until the server has seen the socket close, which cancels the handler in
    the same step. aiohttp offers no event for it: poll its connections."""
    async with asyncio.timeout(WAIT):
        while open_connections(gw) > connections:  # noqa: ASYNC110 (aiohttp has no event for it)
            await asyncio.sleep(0.005)


async def abandon_at(
    gw: Gateway, target: str, method: str, after: bool, path: str, body: dict[str, Any]
) -> float:
    """Send a turn, hold it at `target.method` and leave; when the client left (loop time)."""
    app = gw.client.app
    chats, limits = app[keys.CHATS], app[keys.LIMITS]
    reached: asyncio.Event
    if target == "store":
        hold = Hold(chats.store, method, after)
        chats.store = hold  # a seam, not a store
        reached = hold.reached
    elif target == "limiter":
        hold = Hold(limits.limiter, method, after)
        limits.limiter = hold
        reached = hold.reached
    else:  # the upstream: the model is called and says nothing
        gw.fake.queue([Gate(NEVER())])
        gw.fake.arrived.clear()
        reached = gw.fake.arrived
    connections = open_connections(gw)
    async with aiohttp.ClientSession() as own:  # a connection of its own, closed on leaving
        pending = asyncio.create_task(own.post(gw.client.make_url(path), json=body))
        async with asyncio.timeout(WAIT):
            await reached.wait()
        await leave(pending)
    left = asyncio.get_running_loop().time()
    await server_saw_leave(gw, connections)
    if target == "store":
        chats.store = hold.inner
    elif target == "limiter":
        # The limit store answers after the client left: what it granted must be given back.
        hold.answer.set()
        limits.limiter = hold.inner
    return left


# Every await of a turn on an existing conversation before its first event, and the model's
# silence after it was called.
EXISTING = [
    ("store", "owner", False),
    ("store", "owner", True),
    ("store", "take_turn", False),
    ("store", "take_turn", True),
    ("store", "load", False),
    ("store", "load", True),
    ("limiter", "admit", False),
    ("limiter", "admit", True),
    ("store", "append", False),
    ("store", "append", True),
    ("upstream", "", False),
]


def _id(point: tuple[str, str, bool]) -> str:
    target, method, after = point
    return f"{target}.{method}.{'after' if after else 'before'}" if method else target


@pytest.mark.parametrize("path", [STREAM, CHAT])
@pytest.mark.parametrize("point", EXISTING, ids=_id)
async def test_leaving_at_any_await_frees_the_conversation_and_leaves_no_dangling_message(
    make_gateway: MakeGateway,
    limit_store: str | None,
    point: tuple[str, str, bool],
    path: str,
) -> None:
    gw = await make_gateway(redis_url=limit_store, rate_limit_concurrent=5)
    gw.fake.queue(answer("First answer"))
    cid = (await (await gw.post(CHAT, {"message": "Start"})).json())["conversationId"]
    left = await abandon_at(gw, *point, path, {"message": "Abandoned", "conversationId": cid})
    async with asyncio.timeout(1):
        await gw.settled()  # the slot is the last thing given back
        gw.fake.queue([Echo(), Finish()])
        again = await gw.post(CHAT, {"message": "Next", "conversationId": cid})
    assert again.status == 200, await again.text()
    assert asyncio.get_running_loop().time() - left < 1.0
    context = [
        system(),
        {"role": "user", "content": "Start"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Next"},
    ]
    assert gw.fake.seen[-1].body["messages"] == context
    assert (await again.json())["content"] == echoed(context)
    saved = await (await gw.client.get(f"/api/v1/ai/conversations/{cid}")).json()
    kept = [(m["role"], m["status"], m["content"]) for m in saved["messages"]]
    abandoned = (
        # the model was called: the message stays, with the answer that it never got
        [("user", "complete", "Abandoned"), ("assistant", "partial", "")]
        if point[0] == "upstream"
        else []  # the turn never reached the model: it did not happen
    )
    assert kept == [
        ("user", "complete", "Start"),
        ("assistant", "complete", "First answer"),
        *abandoned,
        ("user", "complete", "Next"),
        ("assistant", "complete", echoed(context)),
    ]
    limits = gw.client.app[keys.LIMITS]
    assert await limits.limiter.concurrent("ip:127.0.0.1", limits.clock()) == 0
    assert await gw.client.app[keys.CHATS].store.held_turns() == []


async def reset_after(gw: Gateway, path: str, body: dict[str, Any], delay_s: float) -> None:
    """Send a request on a raw socket and reset it (RST, not FIN) `delay_s` after."""
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    _reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    writer.write(head + payload)
    await writer.drain()
    await asyncio.sleep(delay_s)  # the attack's timing, not a synchronisation
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_clients_resetting_right_after_sending_leave_no_conversation_locked(
    make_gateway: MakeGateway,
) -> None:
    """The reproduction: 20 conversations, each sent a turn whose client resets its socket 1 to
    2 ms after the request left; every conversation takes its next turn at once."""
    gw = await make_gateway(rate_limit_concurrent=50)
    cids = []
    for _ in range(20):
        gw.fake.queue(answer("First answer"))
        cids.append((await (await gw.post(CHAT, {"message": "Start"})).json())["conversationId"])
    gw.fake.default = [Gate(NEVER())]  # an abandoned turn that reaches the model gets no text
    await asyncio.gather(
        *(
            reset_after(gw, STREAM, {"message": "Abandoned", "conversationId": cid}, delay)
            for cid, delay in zip(cids, [0.001 + n * 0.00005 for n in range(20)], strict=True)
        )
    )
    async with asyncio.timeout(1):
        await gw.settled()
        for cid in cids:
            gw.fake.queue([Echo(), Finish()])
            again = await gw.post(CHAT, {"message": "Next", "conversationId": cid})
            assert again.status == 200, await again.text()
            assert gw.fake.seen[-1].body["messages"][1:] == [
                {"role": "user", "content": "Start"},
                {"role": "assistant", "content": "First answer"},
                {"role": "user", "content": "Next"},
            ]
    assert await gw.client.app[keys.CHATS].store.held_turns() == []


# The awaits of a first turn (no conversationId) before its first event.
NEW = [
    ("store", "create", False),
    ("store", "create", True),
    ("store", "take_turn", False),
    ("store", "take_turn", True),
    ("store", "append", False),
    ("store", "append", True),
]


@pytest.mark.parametrize("path", [STREAM, CHAT])
@pytest.mark.parametrize("point", NEW, ids=_id)
async def test_a_first_turn_abandoned_before_the_model_leaves_nothing_behind(
    make_gateway: MakeGateway, tmp_path: Path, point: tuple[str, str, bool], path: str
) -> None:
    db = tmp_path / "conversations.db"
    gw = await make_gateway(chat_db_path=str(db), rate_limit_concurrent=5)
    await abandon_at(gw, *point, path, {"message": "Abandoned"})
    async with asyncio.timeout(1):
        await gw.settled()
    with sqlite3.connect(db) as reader:
        rows = [
            reader.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in ("conversations", "messages")
        ]
    assert rows == [0, 0]
    assert gw.fake.seen == []
    assert len(gw.client.app[keys.LIVE]) == 0


def _message(role: str, content: str) -> Message:
    return Message(f"m_{role}{content}", role, content, "complete", 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("history", "sent"),
    [
        ([("user", "Q1"), ("assistant", "A1")], ["Q1", "A1"]),
        ([("user", "Q1")], []),  # killed before any answer was saved
        ([("user", "Q1"), ("assistant", "")], []),  # cut before the model said anything
        ([("user", "Q1"), ("user", "Q2"), ("assistant", "A2")], ["Q2", "A2"]),
        ([("user", "Q1"), ("assistant", "A1"), ("user", "Q2")], ["Q1", "A1"]),
        ([("user", "Q1"), ("assistant", ""), ("assistant", "A1b")], ["Q1", "A1b"]),
    ],
)
def test_the_context_leaves_out_user_messages_no_answer_followed(
    history: list[tuple[str, str]], sent: list[str]
) -> None:
    context = build_context("S", [_message(r, c) for r, c in history], "New", 10_000)
    assert [m["content"] for m in context] == ["S", *sent, "New"]


@pytest.mark.parametrize(("status", "sent"), [("streaming", []), ("partial", ["Q1", "So far"])])
def test_the_context_never_holds_an_answer_still_streaming(status: str, sent: list[str]) -> None:
    streaming = Message("m_a", "assistant", "So far", status, 0.0)  # type: ignore[arg-type]
    context = build_context("S", [_message("user", "Q1"), streaming], "New", 10_000)
    assert [m["content"] for m in context] == ["S", *sent, "New"]


def upstream_env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "RATE_LIMIT_RPM": "0",
        "CHECKPOINT_S": "0",  # saved only at the end: a kill leaves no text (test_chat_crash)
        **extra,
    }


async def _killed_mid_answer(
    fake: FakeUpstream, env: dict[str, str], tmp_path: Path, session: aiohttp.ClientSession
) -> str:
    """A first turn answered, then a second one killed (SIGKILL) mid-answer: the conversation."""
    fake.queue(answer("First answer"), [Text("Half"), Gate(NEVER())])
    async with service(env, tmp_path) as doomed:
        first = await session.post(f"{doomed.url}{CHAT}", json={"message": "Start"})
        cid = str((await first.json())["conversationId"])
        resp = await session.post(
            f"{doomed.url}{STREAM}", json={"message": "Killed", "conversationId": cid}
        )
        events = await read_events(resp, 2)
        assert [e["type"] for e in events] == ["metadata", "token"]
        doomed.signal(signal.SIGKILL)
        assert await doomed.wait(WAIT) == -signal.SIGKILL
        resp.close()
    return cid


async def _next_turn_at_once(
    fake: FakeUpstream, url: str, cid: str, session: aiohttp.ClientSession
) -> None:
    fake.queue([Echo(), Finish()])
    async with asyncio.timeout(1):
        again = await session.post(f"{url}{CHAT}", json={"message": "Next", "conversationId": cid})
        assert again.status == 200, await again.text()
    # The killed turn's message never got an answer: the model does not see it.
    assert fake.seen[-1].body["messages"][1:] == [
        {"role": "user", "content": "Start"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Next"},
    ]


async def test_after_a_sigkill_a_restart_frees_the_conversation_at_once(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    env = upstream_env(fake)  # SQLite in tmp_path, the same file for both processes
    async with aiohttp.ClientSession() as session:
        cid = await _killed_mid_answer(fake, env, tmp_path, session)
        async with service(env, tmp_path) as restarted:
            await _next_turn_at_once(fake, restarted.url, cid, session)


async def test_after_a_sigkill_an_instance_on_the_same_host_frees_its_turns_in_redis(
    fake: FakeUpstream, tmp_path: Path, redis_server: RedisServer
) -> None:
    env = upstream_env(fake, REDIS_URL=redis_server.url)
    async with aiohttp.ClientSession() as session:
        cid = await _killed_mid_answer(fake, env, tmp_path, session)
        async with service(env, tmp_path) as restarted:
            await _next_turn_at_once(fake, restarted.url, cid, session)


async def test_a_turn_held_by_a_live_process_is_not_freed_by_a_restart(
    fake: FakeUpstream, tmp_path: Path, redis_server: RedisServer
) -> None:
    env = upstream_env(fake, REDIS_URL=redis_server.url)
    fake.queue(answer("First answer"), [Text("Half"), Gate(NEVER())])
    async with service(env, tmp_path) as holder, aiohttp.ClientSession() as session:
        first = await session.post(f"{holder.url}{CHAT}", json={"message": "Start"})
        cid = str((await first.json())["conversationId"])
        resp = await session.post(
            f"{holder.url}{STREAM}", json={"message": "Streaming", "conversationId": cid}
        )
        assert len(await read_events(resp, 2)) == 2
        async with service(env, tmp_path) as other:
            busy = await session.post(
                f"{other.url}{CHAT}", json={"message": "Not now", "conversationId": cid}
            )
            assert busy.status == 409
        resp.close()


def test_a_holder_names_its_process_and_only_a_gone_one_on_this_host_is_gone() -> None:
    me = holders.this_process()
    mine = holders.new_holder()
    assert holders.parse(mine) == me
    assert me.known  # Linux: /proc gives the boot id, the pid namespace and the start time
    assert not holders.gone(mine)  # alive
    dead = holders.SEP.join(["t", me.host, me.boot, me.pidns, str(me.pid), str(me.start + 1)])
    assert holders.gone(dead)  # same pid, another start time: the pid was reused
    for elsewhere in (
        dataclasses.replace(me, host="other-host"),
        dataclasses.replace(me, boot="another-boot"),
        dataclasses.replace(me, pidns="pid:[1]"),  # another container with our hostname
    ):
        assert not holders.gone(dead, elsewhere)
    assert not holders.gone("0123456789abcdef")  # a bare token (no process recorded)
    assert holders.parse("a|b|c|d|x|1") is None
