"""Chat turns through the real SDK against the scripted upstream: the wire, the context the
model is sent (the upstream echoes it), saved history with statuses, concurrency, ownership,
trimming and the limits. Conversations live in SQLite here; `test_chat_redis` runs the shared
cases on Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse

from service import keys
from service.config import CHAT_SYSTEM_PROMPT
from tests.conftest import API_KEY, WAIT, Frames, Gateway, MakeGateway
from tests.fake_upstream import (
    Done,
    Drop,
    Echo,
    FakeUpstream,
    Finish,
    Gate,
    Text,
    Usage,
    answer,
    echoed,
)

STREAM = "/api/v1/ai/chat/stream"
CHAT = "/api/v1/ai/chat"


async def chat_stream(gw: Gateway, body: Any, **kwargs: Any) -> tuple[ClientResponse, Frames]:
    resp = await gw.client.post(STREAM, json=body, **kwargs)
    return resp, Frames(resp)


async def conversation(gw: Gateway, cid: str, **kwargs: Any) -> dict[str, Any]:
    resp = await gw.client.get(f"/api/v1/ai/conversations/{cid}", **kwargs)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def saved(gw: Gateway, cid: str) -> list[tuple[str, str, str]]:
    """(role, status, content) of every saved message, once the turn has settled."""
    await gw.settled()
    messages = (await conversation(gw, cid))["messages"]
    return [(m["role"], m["status"], m["content"]) for m in messages]


def system() -> dict[str, str]:
    return {"role": "system", "content": CHAT_SYSTEM_PROMPT}


async def test_a_stream_is_metadata_then_tokens_then_done_on_the_wire(gateway: Gateway) -> None:
    gateway.fake.queue(answer("Baby", " sleep", " patterns", prompt=21, completion=3))
    resp, frames = await chat_stream(gateway, {"message": "Tell me about baby sleep patterns"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["X-Accel-Buffering"] == "no"
    first = await frames.frame()
    meta = orjson.loads(first.split(b"data: ", 1)[1])
    cid, mid = meta["conversationId"], meta["messageId"]
    assert mid == resp.headers["X-Stream-ID"]  # the answer's message id is its stream id
    assert first == (
        b'data: {"type":"metadata","conversationId":"%s","messageId":"%s",'
        b'"model":"test-model"}\n\n' % (cid.encode(), mid.encode())
    )
    rest = b""
    while True:
        try:
            rest += await frames.frame()
        except EOFError:
            break
    tokens = b"".join(
        b'data: {"type":"token","content":"%s"}\n\n' % t for t in (b"Baby", b" sleep", b" patterns")
    )
    done = (
        b'data: {"type":"done","conversationId":"%s","messageId":"%s","usage":'
        b'{"prompt_tokens":21,"completion_tokens":3,"total_tokens":24},"finishReason":"stop"}\n\n'
    ) % (cid.encode(), mid.encode())
    # Deltas of one read may share a frame.
    joined = rest.replace(b'"}\n\ndata: {"type":"token","content":"', b"")
    assert rest == tokens + done or joined == (
        b'data: {"type":"token","content":"Baby sleep patterns"}\n\n' + done
    )
    assert gateway.fake.seen[0].body["messages"] == [
        system(),
        {"role": "user", "content": "Tell me about baby sleep patterns"},
    ]
    await gateway.settled()
    assert gateway.outcomes("chat_stream") == {"completed": 1}


async def test_turns_build_on_the_saved_history(gateway: Gateway) -> None:
    gateway.fake.queue(answer("Hello!"), [Echo(), Finish(), Done()])
    _resp, frames = await chat_stream(gateway, {"message": "Hi, I am Ada."})
    cid = (await frames.event())["conversationId"]
    await frames.rest()
    _resp, frames = await chat_stream(
        gateway, {"message": "What is my name?", "conversationId": cid}
    )
    events = await frames.rest()
    assert events[0]["conversationId"] == cid
    assert events[-1]["type"] == "done"
    context = [
        system(),
        {"role": "user", "content": "Hi, I am Ada."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is my name?"},
    ]
    assert gateway.fake.seen[1].body["messages"] == context
    text = "".join(e["content"] for e in events if e["type"] == "token")
    assert text == echoed(context)
    assert await saved(gateway, cid) == [
        ("user", "complete", "Hi, I am Ada."),
        ("assistant", "complete", "Hello!"),
        ("user", "complete", "What is my name?"),
        ("assistant", "complete", text),
    ]


async def test_the_json_turn_is_the_same_turn(gateway: Gateway) -> None:
    gateway.fake.queue(answer("One", " two", prompt=9, completion=2), [Echo(), Finish(), Done()])
    resp = await gateway.post(CHAT, {"message": "Count"})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {
        "conversationId",
        "messageId",
        "model",
        "content",
        "usage",
        "finishReason",
    }
    assert body["finishReason"] == "stop"
    assert body["content"] == "One two"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    cid = body["conversationId"]
    second = await gateway.post(CHAT, {"message": "Again", "conversationId": cid})
    assert (await second.json())["content"] == echoed(
        [
            system(),
            {"role": "user", "content": "Count"},
            {"role": "assistant", "content": "One two"},
            {"role": "user", "content": "Again"},
        ]
    )
    assert gateway.outcomes("chat") == {"completed": 2}


async def test_a_conversation_reads_back_with_roles_statuses_times_and_usage(
    gateway: Gateway,
) -> None:
    gateway.fake.queue(answer("Fine", prompt=12, completion=1))
    resp = await gateway.post(CHAT, {"message": "How are you?"})
    body = await resp.json()
    got = await conversation(gateway, body["conversationId"])
    assert set(got) == {"conversationId", "createdAt", "updatedAt", "messages"}
    user, assistant = got["messages"]
    assert user["role"] == "user"
    assert user["status"] == "complete"
    assert user["finishReason"] is None
    assert user["usage"] is None
    assert assistant == {
        "messageId": body["messageId"],
        "role": "assistant",
        "content": "Fine",
        "status": "complete",
        "finishReason": "stop",
        "createdAt": assistant["createdAt"],
        "completedAt": assistant["completedAt"],
        "model": "test-model",
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
    for stamp in (got["createdAt"], got["updatedAt"], user["createdAt"], assistant["completedAt"]):
        assert stamp.endswith("Z")
        assert len(stamp) == len("2026-01-01T00:00:00.000Z")
    assert user["createdAt"] <= assistant["createdAt"] <= assistant["completedAt"]
    assert got["updatedAt"] == assistant["completedAt"]


async def test_delete_forgets_a_conversation(gateway: Gateway) -> None:
    resp = await gateway.post(CHAT, {"message": "Remember this"})
    cid = (await resp.json())["conversationId"]
    deleted = await gateway.client.delete(f"/api/v1/ai/conversations/{cid}")
    assert deleted.status == 204
    assert await deleted.read() == b""
    for call in (
        gateway.client.get(f"/api/v1/ai/conversations/{cid}"),
        gateway.client.delete(f"/api/v1/ai/conversations/{cid}"),
        gateway.client.post(CHAT, json={"message": "Still there?", "conversationId": cid}),
    ):
        gone = await call
        assert gone.status == 404
        assert await gone.json() == {
            "error": {"code": "not_found", "message": "No such conversation."}
        }


@pytest.mark.parametrize("cid", ["c_AAAAAAAAAAAAAAAAAAAAAA", "nope", "../../etc", "c_" + "x" * 500])
async def test_an_unknown_conversation_is_404_before_anything_starts(
    gateway: Gateway, cid: str
) -> None:
    resp = await gateway.client.post(STREAM, json={"message": "hi", "conversationId": cid})
    assert resp.status == 404
    assert resp.headers["Content-Type"] == "application/json"
    assert (await resp.json())["error"]["code"] == "not_found"
    assert gateway.fake.seen == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"message": ""}, "message: must not be empty"),
        ({"message": " \x00\x07\u2028 "}, "message: must not be empty"),
        ({"message": "x" * 101}, "message: longer than 100 characters (101 given)"),
        ({"message": 5}, "message: Input should be a valid string"),
        ({}, "message: Field required"),
        ({"message": "hi", "conversationId": 7}, "conversationId: Input should be a valid string"),
    ],
)
async def test_bad_messages_get_a_clear_400(
    make_gateway: MakeGateway, body: dict[str, Any], message: str
) -> None:
    gw = await make_gateway(chat_message_max_chars=100)
    resp = await gw.client.post(STREAM, json=body)
    assert resp.status == 400
    assert await resp.json() == {"error": {"code": "bad_request", "message": message}}
    assert gw.fake.seen == []


async def test_control_characters_are_removed_before_saving_and_sending(gateway: Gateway) -> None:
    raw = "Hello\x00 there\x1b[31m\r\nsecond\tline\x7f\u2028"
    resp = await gateway.post(CHAT, {"message": raw})
    cid = (await resp.json())["conversationId"]
    clean = "Hello there[31m\nsecond\tline"
    assert gateway.fake.seen[0].body["messages"][-1] == {"role": "user", "content": clean}
    assert (await saved(gateway, cid))[0] == ("user", "complete", clean)


@pytest.mark.parametrize("grace_s", [0.0, 0.5], ids=["no-grace", "grace"])
async def test_a_disconnect_mid_answer_saves_the_text_produced_as_partial(
    make_gateway: MakeGateway, grace_s: float
) -> None:
    """At once, or once nobody has come back within the grace window."""
    gateway = await make_gateway(resume_grace_s=grace_s)
    gate = asyncio.Event()
    gateway.fake.queue([Text("The first"), Text(" half"), Gate(gate)])
    resp, frames = await chat_stream(gateway, {"message": "Tell me a long story"})
    cid = (await frames.event())["conversationId"]
    text = ""
    while text != "The first half":
        text += (await frames.event())["content"]
    resp.close()
    async with asyncio.timeout(WAIT):
        await gateway.fake.seen[0].ended.wait()
    assert gateway.fake.seen[0].cancelled
    assert await saved(gateway, cid) == [
        ("user", "complete", "Tell me a long story"),
        ("assistant", "partial", "The first half"),
    ]
    assert gateway.outcomes("chat_stream") == {"client_disconnect": 1}
    # The turn is free again, and the partial answer is part of the next context.
    gateway.fake.queue([Echo(), Finish(), Done()])
    again = await gateway.post(CHAT, {"message": "Go on", "conversationId": cid})
    assert again.status == 200
    assert gateway.fake.seen[1].body["messages"][-2:] == [
        {"role": "assistant", "content": "The first half"},
        {"role": "user", "content": "Go on"},
    ]


async def test_a_failed_upstream_saves_an_error_answer_and_sends_an_error_event(
    gateway: Gateway,
) -> None:
    gateway.fake.queue([Text("Partly"), Drop()])
    _resp, frames = await chat_stream(gateway, {"message": "Try"})
    events = await frames.rest()
    cid = events[0]["conversationId"]
    assert events[1] == {"type": "token", "content": "Partly"}
    assert events[-1] == {
        "type": "error",
        "error": events[-1]["error"],
        "code": "upstream_error",
        "reason": "upstream_error",
    }
    assert await saved(gateway, cid) == [
        ("user", "complete", "Try"),
        ("assistant", "error", "Partly"),
    ]


async def test_a_timeout_saves_a_partial_answer(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(idle_timeout_s=0.3)
    gw.fake.queue([Text("Slow"), Gate(asyncio.Event())])
    _resp, frames = await chat_stream(gw, {"message": "Wait"})
    events = await frames.rest()
    assert events[-1] == {
        "type": "error",
        "error": "The model stopped sending text for too long.",
        "code": "timeout",
        "reason": "idle_timeout",
    }
    assert await saved(gw, events[0]["conversationId"]) == [
        ("user", "complete", "Wait"),
        ("assistant", "partial", "Slow"),
    ]


async def test_a_second_turn_while_one_streams_gets_409_and_history_never_interleaves(
    gateway: Gateway,
) -> None:
    gateway.fake.queue(answer("First answer"))
    cid = (await (await gateway.post(CHAT, {"message": "Start"})).json())["conversationId"]
    gate = asyncio.Event()
    gateway.fake.queue([Text("Second"), Gate(gate), Text(" answer"), Finish(), Usage(5, 2), Done()])
    _resp, frames = await chat_stream(gateway, {"message": "Two", "conversationId": cid})
    await frames.event()
    assert (await frames.event())["content"] == "Second"
    for path in (STREAM, CHAT):
        busy = await gateway.client.post(path, json={"message": "Three", "conversationId": cid})
        assert busy.status == 409
        assert (await busy.json())["error"]["code"] == "conflict"
    # Other conversations are not held up.
    other = await gateway.post(CHAT, {"message": "Elsewhere"})
    assert other.status == 200
    gate.set()
    await frames.rest()
    after = await gateway.post(CHAT, {"message": "Three", "conversationId": cid})
    assert after.status == 200
    assert [(r, c) for r, _, c in await saved(gateway, cid)] == [
        ("user", "Start"),
        ("assistant", "First answer"),
        ("user", "Two"),
        ("assistant", "Second answer"),
        ("user", "Three"),
        ("assistant", "Hello world"),
    ]


async def test_racing_turns_on_one_conversation_admit_exactly_one(gateway: Gateway) -> None:
    cid = (await (await gateway.post(CHAT, {"message": "Start"})).json())["conversationId"]
    gate = asyncio.Event()
    for _ in range(8):
        gateway.fake.queue([Gate(gate), *answer("ok")])
    calls = [
        gateway.client.post(CHAT, json={"message": f"race {n}", "conversationId": cid})
        for n in range(8)
    ]
    pending = [asyncio.ensure_future(c) for c in calls]
    first: list[int] = []
    async with asyncio.timeout(WAIT):
        for answered in asyncio.as_completed(pending):
            first.append((await answered).status)
            if len(first) == 7:
                break
    assert first == [409] * 7  # refused while the one admitted turn waits on the upstream
    gate.set()
    statuses = sorted([(await p).status for p in pending])
    assert statuses == [200] + [409] * 7
    roles = [r for r, _, _ in await saved(gateway, cid)]
    assert roles == ["user", "assistant", "user", "assistant"]


async def test_a_conversation_belongs_to_the_key_that_made_it(make_gateway: MakeGateway) -> None:
    other = "sk-other-KEY-9876543210"
    gw = await make_gateway(api_keys=(API_KEY, other))
    mine = {"Authorization": f"Bearer {API_KEY}"}
    theirs = {"Authorization": f"Bearer {other}"}
    resp = await gw.post(CHAT, {"message": "Private"}, headers=mine)
    cid = (await resp.json())["conversationId"]
    assert (await conversation(gw, cid, headers=mine))["messages"][0]["content"] == "Private"
    for call in (
        gw.client.get(f"/api/v1/ai/conversations/{cid}", headers=theirs),
        gw.client.delete(f"/api/v1/ai/conversations/{cid}", headers=theirs),
        gw.client.post(CHAT, json={"message": "x", "conversationId": cid}, headers=theirs),
        gw.client.post(STREAM, json={"message": "x", "conversationId": cid}, headers=theirs),
    ):
        refused = await call
        assert refused.status == 404
        assert (await refused.json())["error"]["code"] == "not_found"
    assert len((await conversation(gw, cid, headers=mine))["messages"]) == 2
    nobody = await gw.client.get(f"/api/v1/ai/conversations/{cid}")
    assert nobody.status == 401


async def test_long_histories_are_trimmed_by_whole_turns_from_the_oldest(
    make_gateway: MakeGateway,
) -> None:
    # Budget: system (~19) + new message (~5) + two turns of ~64 tokens each, not three.
    gw = await make_gateway(chat_context_tokens=170, chat_message_max_chars=200)
    cid = ""
    for n in range(4):
        gw.fake.queue(answer(f"answer {n} " + "a" * 96))
        body: dict[str, Any] = {"message": f"question {n} " + "q" * 100}
        if cid:
            body["conversationId"] = cid
        cid = (await (await gw.post(CHAT, body)).json())["conversationId"]
    gw.fake.queue([Echo(), Finish(), Done()])
    await gw.post(CHAT, {"message": "Last", "conversationId": cid})
    sent = gw.fake.seen[-1].body["messages"]
    assert sent[0] == system()
    assert sent[-1] == {"role": "user", "content": "Last"}
    history = sent[1:-1]
    assert [m["content"].split(" ", 2)[:2] for m in history] == [
        ["question", "2"],
        ["answer", "2"],
        ["question", "3"],
        ["answer", "3"],
    ]
    assert history[0]["content"] == "question 2 " + "q" * 100  # whole messages only
    assert len(await saved(gw, cid)) == 10  # trimming changes what is sent, never what is kept


async def test_a_refused_turn_saves_nothing_and_frees_the_conversation(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(rate_limit_rpm=1)
    cid = (await (await gw.post(CHAT, {"message": "One"})).json())["conversationId"]
    refused = await gw.post(CHAT, {"message": "Two", "conversationId": cid})
    assert refused.status == 429
    assert "Retry-After" in refused.headers
    assert [c for _, _, c in await saved(gw, cid)] == ["One", "Hello world"]
    # The turn was not left held: once the limit allows, the next turn runs.
    limits = gw.client.app[keys.LIMITS]
    limits.clock = lambda: 1e10
    again = await gw.post(CHAT, {"message": "Three", "conversationId": cid})
    assert again.status == 200


async def test_a_conversation_deleted_mid_answer_stays_deleted(gateway: Gateway) -> None:
    gate = asyncio.Event()
    gateway.fake.queue([Text("Going"), Gate(gate), *answer(" on")])
    _resp, frames = await chat_stream(gateway, {"message": "Forget me"})
    cid = (await frames.event())["conversationId"]
    await frames.event()
    deleted = await gateway.client.delete(f"/api/v1/ai/conversations/{cid}")
    assert deleted.status == 204
    gate.set()
    events = await frames.rest()
    assert events[-1]["type"] == "done"
    await gateway.settled()
    gone = await gateway.client.get(f"/api/v1/ai/conversations/{cid}")
    assert gone.status == 404


async def test_heartbeats_and_first_event_before_the_upstream_answers(
    make_gateway: MakeGateway, fake: FakeUpstream
) -> None:
    gw = await make_gateway(heartbeat_interval_s=0.1)
    gate = asyncio.Event()
    fake.queue([Gate(gate), *answer("late")])
    _resp, frames = await chat_stream(gw, {"message": "Hello?"})
    assert (await frames.event())["type"] == "metadata"
    assert await frames.frame() == b": ping\n\n"
    gate.set()
    events = await frames.rest()
    assert [e["type"] for e in events] == ["token", "done"]


async def test_an_unreachable_store_is_a_clear_503_and_no_upstream_call(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(redis_url="redis://127.0.0.1:9/0")  # nothing listens on port 9
    for path in (STREAM, CHAT):
        resp = await gw.client.post(path, json={"message": "Hello"})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert await resp.json() == {
            "error": {
                "code": "internal",
                "message": "Conversation storage is unavailable; retry shortly.",
            }
        }
    assert gw.fake.seen == []
    assert len(gw.client.app[keys.LIVE]) == 0


async def test_each_turn_runs_on_its_own_model_and_options(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(allowed_models=("model-a", "model-b"), default_max_tokens=64)
    _resp, frames = await chat_stream(
        gw, {"message": "One", "model": "model-a", "maxTokens": 50, "temperature": 0.2}
    )
    events = await frames.rest()
    assert events[0]["model"] == "model-a"
    cid = events[0]["conversationId"]
    second = await gw.post(
        CHAT,
        {
            "message": "Two",
            "conversationId": cid,
            "model": "model-b",
            "maxTokens": 7,
            "temperature": 1.5,
        },
    )
    assert second.status == 200
    assert (await second.json())["model"] == "model-b"
    _resp, frames = await chat_stream(gw, {"message": "Three", "conversationId": cid})
    events = await frames.rest()
    assert events[0]["model"] == "test-model"  # no model: the configured one
    third = await gw.post(CHAT, {"message": "Four", "conversationId": cid, "model": "model-a"})
    assert (await third.json())["model"] == "model-a"

    sent = [
        (s.body["model"], s.body["max_completion_tokens"], s.body.get("temperature"))
        for s in gw.fake.seen
    ]
    assert sent == [
        ("model-a", 50, 0.2),
        ("model-b", 7, 1.5),
        ("test-model", 64, None),
        ("model-a", 64, None),
    ]
    await gw.settled()
    messages = (await conversation(gw, cid))["messages"]
    assert [(m["role"], m["model"]) for m in messages] == [
        ("user", None),
        ("assistant", "model-a"),
        ("user", None),
        ("assistant", "model-b"),
        ("user", None),
        ("assistant", "test-model"),
        ("user", None),
        ("assistant", "model-a"),
    ]
    assert gw.outcomes("chat_stream") == {"completed": 2}
    assert gw.outcomes("chat") == {"completed": 2}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "model-c"}, "model: not offered here (see ALLOWED_MODELS)"),
        ({"maxTokens": 0}, "maxTokens: must be from 1 to 100"),
        ({"maxTokens": 101}, "maxTokens: must be from 1 to 100"),
        ({"maxTokens": "50"}, "maxTokens: Input should be a valid integer"),
        ({"maxTokens": 1.5}, "maxTokens: Input should be a valid integer"),
        ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
        ({"temperature": "0.5"}, "temperature: Input should be a valid number"),
    ],
)
async def test_bad_options_are_generates_400_and_take_nothing(
    make_gateway: MakeGateway, options: dict[str, Any], message: str
) -> None:
    gw = await make_gateway(
        allowed_models=("model-a",), max_tokens_limit=100, default_max_tokens=10
    )
    cid = (await (await gw.post(CHAT, {"message": "First"})).json())["conversationId"]
    await gw.settled()
    before = await conversation(gw, cid)
    error = {"error": {"code": "bad_request", "message": message}}
    generated = await gw.post("/api/ai/generate", {"prompt": "x", **options})
    assert generated.status == 400
    assert await generated.json() == error
    for path in (STREAM, CHAT):
        for body in ({"message": "Again", "conversationId": cid}, {"message": "New"}):
            resp = await gw.client.post(path, json={**body, **options})
            assert resp.status == 400
            assert resp.headers["Content-Type"] == "application/json"
            assert await resp.json() == error
    assert len(gw.fake.seen) == 1  # the first turn's only
    assert len(gw.client.app[keys.LIVE]) == 0
    assert await conversation(gw, cid) == before
    # The conversation's turn was never taken: the next good turn runs.
    again = await gw.post(CHAT, {"message": "Again", "conversationId": cid, "model": "model-a"})
    assert again.status == 200
    assert gw.outcomes("chat_stream") == {}
    assert gw.outcomes("chat") == {"completed": 2}
