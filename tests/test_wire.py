"""The wire as clients read it, through the real SDK against the scripted upstream: both frame
shapes byte for byte, stream ids, line separators, UTF-16 halves split across chunks, a malformed
chunk after good text, `finishReason` everywhere, and the upstream's text never reaching a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import ClientResponse
from structlog.testing import capture_logs

from service.chat.conversations import new_conversation_id
from service.chat.stores import SqliteStore
from tests.conftest import WAIT, Frames, Gateway, MakeGateway, start_redis
from tests.fake_upstream import Done, Finish, Gate, Raw, Status, Step, Text, Usage, answer, chunk

STREAM_ID = re.compile(r"[A-Za-z0-9_-]{22}")
SSE = {"Accept": "text/event-stream"}
GENERATE, GENERATE_STREAM = "/api/ai/generate", "/api/ai/generate-stream"
CHAT, CHAT_STREAM = "/api/v1/ai/chat", "/api/v1/ai/chat/stream"


def literal(content: bytes) -> bytes:
    """A chunk whose delta content is the JSON string literal `content`, as it is written
    (orjson cannot write a lone surrogate escape)."""
    return b'data: {"choices":[{"index":0,"delta":{"content":%b},"finish_reason":null}]}\n\n' % (
        content
    )


async def body_of(resp: ClientResponse) -> bytes:
    async with asyncio.timeout(WAIT):
        return await resp.read()


def events_of(body: bytes) -> list[dict[str, Any]]:
    """The JSON of every `data:` line, read the way Python line readers read (splitlines)."""
    lines = body.decode().splitlines()
    return [orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]


async def test_chat_stream_golden_bytes_with_cursors(gateway: Gateway) -> None:
    g1, g2 = asyncio.Event(), asyncio.Event()
    gateway.fake.queue([Text("Baby"), Gate(g1), Text(" sleep"), Gate(g2), *answer(" patterns")])
    resp = await gateway.client.post(CHAT_STREAM, json={"message": "Hi"}, headers=SSE)
    frames = Frames(resp)
    first = await frames.frame()
    meta = orjson.loads(first.split(b"data: ", 1)[1])
    cid, mid = meta["conversationId"].encode(), meta["messageId"].encode()
    assert resp.headers["X-Stream-ID"].encode() == mid  # chat's stream id is the answer's id
    assert STREAM_ID.fullmatch(mid.decode())
    await frames.frame()
    g1.set()
    await frames.frame()
    g2.set()
    await frames.rest()
    assert frames.raw == (
        b'id: %b:1\ndata: {"type":"metadata","conversationId":"%b","messageId":"%b",'
        b'"model":"test-model"}\n\n'
        b'id: %b:2\ndata: {"type":"token","content":"Baby"}\n\n'
        b'id: %b:3\ndata: {"type":"token","content":" sleep"}\n\n'
        b'id: %b:4\ndata: {"type":"token","content":" patterns"}\n\n'
        b'id: %b:5\ndata: {"type":"done","conversationId":"%b","messageId":"%b","usage":'
        b'{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8},"finishReason":"stop"}\n\n'
    ) % (mid, cid, mid, mid, mid, mid, mid, cid, mid)


async def test_every_stream_gets_its_own_server_minted_id(gateway: Gateway) -> None:
    claimed = "AAAAAAAAAAAAAAAAAAAAAA"
    seen = set()
    for path, body in ((GENERATE_STREAM, {"prompt": "x"}), (CHAT_STREAM, {"message": "x"})):
        for _ in range(2):
            gateway.fake.queue(answer("a"))
            resp = await gateway.client.post(
                path, json=body, headers={**SSE, "X-Stream-ID": claimed, "X-Request-ID": claimed}
            )
            sid = resp.headers["X-Stream-ID"]
            events = events_of(await body_of(resp))
            assert STREAM_ID.fullmatch(sid)
            assert sid != claimed
            first = events[0]
            assert first.get("streamId", first.get("messageId")) == sid
            if path == GENERATE_STREAM:
                assert first["requestId"] == claimed  # a trace id a client may choose
            seen.add(sid)
    assert len(seen) == 4


@pytest.mark.parametrize("accept", [None, "text/event-stream"], ids=["data-only", "full"])
async def test_line_separators_in_model_text_are_escaped_on_the_wire(
    gateway: Gateway, accept: str | None
) -> None:
    texts = ["a\u2028b", "\u2029", "c\u0085d", "\u2027\u2030\u0084 é"]
    gateway.fake.queue(answer(*texts))
    headers = {"Accept": accept} if accept else {}
    resp = await gateway.client.post(GENERATE_STREAM, json={"prompt": "x"}, headers=headers)
    raw = await body_of(resp)
    for char in ("\u2028", "\u2029", "\u0085"):
        assert char.encode() not in raw
        assert b"\\u%04x" % ord(char) in raw
    assert "\u2027\u2030\u0084 é".encode() in raw  # only those three are escaped
    events = events_of(raw)  # splitlines splits on the three: nothing may break
    assert [e["type"] for e in events][-1] == "done"
    deltas = "".join(e["delta"] for e in events if e["type"] == "content")
    assert deltas == events[-1]["content"] == "".join(texts)


async def test_utf16_halves_split_across_chunks_reach_the_client_as_one_character(
    gateway: Gateway,
) -> None:
    gate = asyncio.Event()
    gateway.fake.queue(
        [
            Raw(chunk({"content": "a"}) + literal(b'"\\ud83d"')),
            Gate(gate),  # the low half is sent only once the client has the text before it
            Raw(literal(b'"\\ude00b"') + literal(b'"\\udc00"') + literal(b'"c\\ud83d"')),
            Finish(),
            Usage(3, 4),
            Done(),
        ]
    )
    _resp, frames = await gateway.stream({"prompt": "x"}, headers=SSE)
    assert (await frames.event())["type"] == "start"
    assert await frames.event() == {"type": "content", "delta": "a", "tokenCount": 1}
    gate.set()
    events = await frames.rest()
    done = events[-1]
    text = "a\U0001f600b\ufffdc\ufffd"
    assert done["type"] == "done"
    assert "a" + "".join(e["delta"] for e in events if e["type"] == "content") == text
    assert done["content"] == text
    assert done["finishReason"] == "stop"
    assert events[-2]["tokenCount"] == 5  # one per delta: a held half counts with its pair
    await gateway.settled()
    assert gateway.outcomes() == {"completed": 1}


async def test_a_malformed_chunk_keeps_the_text_that_came_before_it(gateway: Gateway) -> None:
    broken = Raw(chunk({"content": "kept"}) + chunk({"content": " too"}) + b"data: {broken\n\n")
    gateway.fake.queue([broken], [broken])
    resp, frames = await gateway.stream({"prompt": "x"}, headers=SSE)
    events = [await frames.event(), *await frames.rest()]
    assert [e["type"] for e in events] == ["start", "content", "error"]
    assert events[1] == {"type": "content", "delta": "kept too", "tokenCount": 2}
    assert (events[2]["code"], events[2]["reason"]) == ("upstream_error", "upstream_error")
    assert events[2]["error"] == "The model server sent a malformed answer."
    assert gateway.sample("ai_stream_upstream_errors_total", kind="malformed") == 1
    resp = await gateway.client.post(CHAT_STREAM, json={"message": "x"})
    events = events_of(await body_of(resp))
    assert [e["type"] for e in events] == ["metadata", "token", "error"]
    assert events[1]["content"] == "kept too"
    await gateway.settled()
    got = await conversation(gateway, events[0]["conversationId"])
    assert [(m["status"], m["content"]) for m in got["messages"]][-1] == ("error", "kept too")


async def conversation(gateway: Gateway, cid: str) -> dict[str, Any]:
    resp = await gateway.client.get(f"/api/v1/ai/conversations/{cid}")
    assert resp.status == 200
    return dict(await resp.json())


REFUSAL: list[Step] = [
    Raw(chunk({"role": "assistant", "content": None, "refusal": "I can't"})),
    Raw(chunk({"refusal": " help."})),
    Finish("stop"),
    Usage(3, 2),
    Done(),
]
FINISHES: dict[str, tuple[list[Step], str, str | None]] = {
    "length": ([Text("cut"), Finish("length"), Usage(3, 1), Done()], "cut", "length"),
    "content_filter": (
        [Text("filt"), Finish("content_filter"), Usage(3, 1), Done()],
        "filt",
        "content_filter",
    ),
    "refusal": (REFUSAL, "I can't help.", "refusal"),
    "none": ([Text("plain"), Usage(3, 1), Done()], "plain", None),
}


@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest.mark.parametrize("case", list(FINISHES))
async def test_finish_reason_on_every_done_event_json_answer_and_saved_answer(
    make_gateway: MakeGateway, case: str, store: str
) -> None:
    redis = await start_redis() if store == "redis" else None
    try:
        gateway = await make_gateway(redis_url=redis.url if redis else None)
        await _finish_reason_everywhere(gateway, case)
    finally:
        if redis is not None:
            await redis.stop()


async def _finish_reason_everywhere(gateway: Gateway, case: str) -> None:
    script, text, reason = FINISHES[case]
    gateway.fake.queue(*[script] * 4)
    resp = await gateway.client.post(GENERATE_STREAM, json={"prompt": "x"}, headers=SSE)
    done = events_of(await body_of(resp))[-1]
    assert (done["type"], done["content"], done["finishReason"]) == ("done", text, reason)
    body = await (await gateway.post(GENERATE, {"prompt": "x"})).json()
    assert (body["content"], body["finishReason"]) == (text, reason)
    resp = await gateway.client.post(CHAT_STREAM, json={"message": "x"})
    events = events_of(await body_of(resp))
    assert events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == text
    assert events[-1]["finishReason"] == reason
    first = events[0]["conversationId"]
    body = await (await gateway.post(CHAT, {"message": "x", "conversationId": first})).json()
    assert (body["content"], body["finishReason"]) == (text, reason)
    await gateway.settled()
    got = await conversation(gateway, first)
    answers = [(m["status"], m["content"], m["finishReason"]) for m in got["messages"]]
    assert answers == [
        ("complete", "x", None),
        ("complete", text, reason),
        ("complete", "x", None),
        ("complete", text, reason),
    ]


async def test_a_saved_answer_cut_short_has_no_finish_reason(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(idle_timeout_s=0.2)
    gateway.fake.queue([Text("half"), Gate(asyncio.Event())])
    resp = await gateway.client.post(CHAT_STREAM, json={"message": "x"})
    events = events_of(await body_of(resp))
    assert events[-1]["type"] == "error"
    await gateway.settled()
    got = await conversation(gateway, events[0]["conversationId"])
    assert [(m["status"], m["finishReason"]) for m in got["messages"]] == [
        ("complete", None),
        ("partial", None),
    ]


async def test_a_sqlite_file_from_before_finish_reasons_reads_back_with_null(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """Messages are JSON records, so a file written before `finish` existed needs no
    migration: the key is absent and reads back as null."""
    path = tmp_path / "chat.db"
    store = SqliteStore(str(path))
    await store.open()
    await store.aclose()
    cid = new_conversation_id()
    old = {"id": "m_old", "role": "assistant", "content": "old answer", "status": "complete"}
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO conversations VALUES (?, '', 1.0, 2.0, NULL, NULL)", (cid,))
        db.execute(
            "INSERT INTO messages (conversation_id, record) VALUES (?, ?)",
            (cid, orjson.dumps({**old, "created": 1.0, "completed": 2.0}).decode()),
        )
    gateway = await make_gateway(chat_db_path=str(path))
    gateway.fake.queue([Text("new"), Finish("length"), Usage(3, 1), Done()])
    resp = await gateway.post(CHAT, {"message": "again", "conversationId": cid})
    assert (await resp.json())["finishReason"] == "length"
    got = await conversation(gateway, cid)
    assert [(m["content"], m["finishReason"]) for m in got["messages"]] == [
        ("old answer", None),
        ("again", None),
        ("new", "length"),
    ]


CANARY = "CANARY-sk-live-7f3c9e2a0b1d"


def _canary_scripts(kind: str) -> list[list[Step]]:
    long = (CANARY + " ") * 40
    error = orjson.dumps({"error": {"type": CANARY, "code": CANARY, "message": long}})
    if kind == "in-stream":
        return [[Raw(b"data: " + error + b"\n\n")]]
    if kind == "after-text":
        return [[Text("partial"), Raw(b"data: " + error + b"\n\n")]]
    return [[Status(500, {"x-canary": CANARY})]]


@pytest.mark.parametrize("kind", ["in-stream", "after-text", "http-status"])
@pytest.mark.parametrize("path", [GENERATE, GENERATE_STREAM, CHAT, CHAT_STREAM])
async def test_the_upstream_s_text_never_reaches_a_client(
    make_gateway: MakeGateway, path: str, kind: str
) -> None:
    gateway = await make_gateway(upstream_max_retries=0)
    gateway.fake.queue(*_canary_scripts(kind))
    body = {"prompt": "x"} if "generate" in path else {"message": "x"}
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        resp = await gateway.client.post(path, json=body, headers=SSE if "stream" in path else {})
        raw = await body_of(resp)
        await gateway.settled()
    wire = b"".join(k + b": " + v for k, v in resp.raw_headers) + raw
    for secret in (CANARY, "sk-live", "ABC123", gateway.fake.url):
        assert secret.encode() not in wire
    stream = "stream" in path
    assert resp.status == (200 if stream else 502)
    error = events_of(raw)[-1] if stream else orjson.loads(raw)["error"]
    expected = {
        "http-status": "The model server failed.",
        "in-stream": "The model server reported an error in its answer.",
        "after-text": "The model server reported an error in its answer.",
    }[kind]
    assert (error["code"], error.get("error", error.get("message"))) == ("upstream_error", expected)
    finished = [e for e in logs if e["event"] == "stream.finished"]
    assert len(finished) == 1
    detail = finished[0]["upstream_detail"]
    assert len(detail) <= 200  # the upstream's text, capped, in one structured field
    assert (CANARY if kind != "http-status" else "sk-live-ABC123") in detail


async def test_browsers_may_read_the_stream_id_and_send_last_event_id(gateway: Gateway) -> None:
    origin = {"Origin": "http://localhost:3300"}
    preflight = await gateway.client.options(
        GENERATE_STREAM,
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,last-event-id",
        },
    )
    assert preflight.status == 200
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower().replace(" ", "")
    assert set(allowed.split(",")) >= {"content-type", "last-event-id"}
    gateway.fake.queue(answer("a"))
    resp = await gateway.client.post(
        GENERATE_STREAM, json={"prompt": "x"}, headers={**origin, **SSE}
    )
    await body_of(resp)
    exposed = resp.headers["Access-Control-Expose-Headers"].lower().replace(" ", "")
    assert "x-stream-id" in exposed.split(",")
