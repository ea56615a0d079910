"""Streams that outlive their connection, in process: the grace window, the three ways back (GET
with `Last-Event-ID` or `?after=N`, a POST retried with `Last-Event-ID`), finished streams kept
for RESUME_TTL_S within RESUME_KEEP_MB, the cancel route, the reader cap, and what the chat
store keeps. Gateway on a real socket, upstream through the real SDK."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from prometheus_client import CollectorRegistry

from service import keys
from service.app import create_app
from service.relay import Generation, Generations
from service.routes.generate import GenerateVocabulary
from service.upstream import CompletionRequest, OpenAIUpstream
from tests.conftest import WAIT, Frames, Gateway, MakeGateway, make_settings
from tests.fake_upstream import Done, Finish, Gate, Step, Text, Usage

NEVER = asyncio.Event
ACCEPTS = {"full": "text/event-stream", "data-only": "*/*"}
PIECES = ("Hel", "lo ", "wor", "ld")
STREAMS = "/api/v1/ai/streams/"
GRACE_S = 5.0  # long enough never to pass in a test that comes back


def gated(gates: list[asyncio.Event], pieces: tuple[str, ...] = PIECES) -> list[Step]:
    """An answer whose pieces after the first each wait for a gate."""
    steps: list[Step] = [Text(pieces[0])]
    for gate, piece in zip(gates, pieces[1:], strict=True):
        steps += [Gate(gate), Text(piece)]
    return [*steps, Finish(), Usage(5, len(pieces)), Done()]


def frames_of(raw: bytes) -> list[bytes]:
    """The complete frames in `raw` (what a client has fully read), pings left out."""
    *complete, _ = raw.split(b"\n\n")
    blocks = [b.split(b"\n") for b in complete]
    return [b"\n".join(ln for ln in block if not ln.startswith(b":")) for block in blocks if block]


def parse(frame: bytes) -> tuple[str | None, dict[str, Any]]:
    """A frame's `id:` (None in the data-only shape) and its JSON."""
    ident = None
    data = None
    for line in frame.split(b"\n"):
        if line.startswith(b"id: "):
            ident = line[4:].decode()
        elif line.startswith(b"data: "):
            data = orjson.loads(line[6:])
    assert isinstance(data, dict), frame
    return ident, data


async def read_all(resp: ClientResponse) -> bytes:
    async with asyncio.timeout(WAIT):
        return await resp.read()


async def until(condition: Any, what: str) -> None:
    """Wait (bounded) until `condition()` holds."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 (no event marks a reader count or a log length)
            await asyncio.sleep(0.01)


def generation(gateway: Gateway, sid: str) -> Generation | None:
    live: Generations = gateway.client.app[keys.LIVE]
    return live.find(sid)


def readers(gateway: Gateway, sid: str) -> int:
    found = generation(gateway, sid)
    return -1 if found is None else found.readers


def logged(gateway: Gateway, sid: str, events: int) -> bool:
    found = generation(gateway, sid)
    return found is not None and len(found.log) >= events


async def unread(gateway: Gateway, sid: str) -> None:
    """Wait until the stream's generation has no reader (its grace window runs)."""

    def no_reader() -> bool:
        found = generation(gateway, sid)
        return found is not None and found.readers == 0

    await until(no_reader, "no reader")


def check_joined(events: list[tuple[str | None, dict[str, Any]]], sid: str, full: bool) -> None:
    """Nothing lost, nothing repeated: ids contiguous from 1, text joined equals done.content."""
    if full:
        assert [ident for ident, _ in events] == [f"{sid}:{n}" for n in range(1, len(events) + 1)]
    else:
        assert all(ident is None for ident, _ in events)
    payloads = [data for _, data in events]
    assert payloads[0]["type"] == "start"
    assert payloads[-1]["type"] == "done"
    content = [p for p in payloads if p["type"] == "content"]
    counts = [p["tokenCount"] for p in content]  # deltas of one network read share a frame
    assert counts == sorted(set(counts))
    assert counts[-1] == len(PIECES)
    assert "".join(p["delta"] for p in content) == payloads[-1]["content"] == "".join(PIECES)


# --- cut and resume -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["full", "data-only"])
@pytest.mark.parametrize("way", ["get-last-event-id", "get-after", "post-last-event-id"])
@pytest.mark.parametrize("cut", ["after-first-event", "mid-stream", "inside-a-frame"])
async def test_a_cut_stream_resumes_with_nothing_lost_or_repeated(
    make_gateway: MakeGateway, shape: str, way: str, cut: str
) -> None:
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    gates = [asyncio.Event() for _ in PIECES[1:]]
    gateway.fake.queue(gated(gates))
    accept = {"Accept": ACCEPTS[shape]}
    resp, frames = await gateway.stream({"prompt": "x"}, headers=accept)
    sid = resp.headers["X-Stream-ID"]
    await frames.event()  # start
    if cut != "after-first-event":
        await frames.event()  # "Hel"
    if cut == "inside-a-frame":
        gates[0].set()
        async with asyncio.timeout(WAIT):
            frames.raw += await resp.content.readexactly(12)  # part of the next frame
    resp.close()
    seen = [parse(f) for f in frames_of(frames.raw)]
    await unread(gateway, sid)
    cursor = len(seen)
    if way == "get-after":
        back = await gateway.client.get(f"{STREAMS}{sid}?after={cursor}", headers=accept)
    elif way == "get-last-event-id":
        headers = {**accept, "Last-Event-ID": f"{sid}:{cursor}"}
        back = await gateway.client.get(STREAMS + sid, headers=headers)
    else:  # what fetch-event-source retries: the same POST, its body not even looked at
        headers = {**accept, "Last-Event-ID": f"{sid}:{cursor}"}
        back = await gateway.client.post("/api/ai/generate-stream", data=b"{", headers=headers)
    assert back.status == 200
    assert back.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert back.headers["X-Stream-ID"] == sid
    for gate in gates:  # the rest is produced while the resumed reader follows
        gate.set()
    rest = [parse(f) for f in frames_of(await read_all(back))]
    check_joined(seen + rest, sid, full=shape == "full")
    await gateway.settled()
    assert gateway.outcomes() == {"completed": 1}
    assert len(gateway.fake.seen) == 1  # one generation, never a second
    route = "generate_stream" if way.startswith("post") else "stream"
    assert gateway.sample("ai_stream_resumes_total", route=route, outcome="resumed") == 1
    assert gateway.sample("ai_stream_generations_unread", route="generate_stream") == 0


async def test_a_wire_transcript_of_a_cut_and_resumed_stream(make_gateway: MakeGateway) -> None:
    """The exact bytes of both connections (the README's transcript is of these)."""
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    gates = [asyncio.Event() for _ in PIECES[1:]]
    gateway.fake.queue(gated(gates))
    accept = {"Accept": "text/event-stream", "X-Request-ID": "req-1"}
    resp, frames = await gateway.stream({"prompt": "x"}, headers=accept)
    sid = resp.headers["X-Stream-ID"]
    await frames.event()
    await frames.event()
    resp.close()
    assert frames.raw == (
        b'id: %b:1\ndata: {"type":"start","requestId":"req-1","streamId":"%b"}\n\n'
        b'id: %b:2\ndata: {"type":"content","delta":"Hel","tokenCount":1}\n\n'
    ) % (sid.encode(), sid.encode(), sid.encode())
    await unread(gateway, sid)
    back = await gateway.client.get(
        STREAMS + sid, headers={**accept, "Last-Event-ID": f"{sid}:2", "X-Request-ID": "req-2"}
    )
    for events, gate in enumerate(gates, start=3):  # one at a time: one frame each
        gate.set()
        await until(functools.partial(logged, gateway, sid, events), "a frame")
    body = await read_all(back)
    done = re.sub(rb'"elapsedMs":\d+', b'"elapsedMs":0', body.split(b"\n\n")[-2])
    assert body.split(b"\n\n")[:-2] == [
        b'id: %b:3\ndata: {"type":"content","delta":"lo ","tokenCount":2}' % sid.encode(),
        b'id: %b:4\ndata: {"type":"content","delta":"wor","tokenCount":3}' % sid.encode(),
        b'id: %b:5\ndata: {"type":"content","delta":"ld","tokenCount":4}' % sid.encode(),
    ]
    assert done == (
        b'id: %b:6\ndata: {"type":"done","content":"Hello world","imagePlaceholders":[],'
        b'"tokenCount":4,"model":"test-model","requestId":"req-1","elapsedMs":0,'
        b'"finishReason":"stop"}' % sid.encode()
    )


# --- the grace window ---------------------------------------------------------------------


@pytest.mark.parametrize("grace_s", [0.0, 0.5])
async def test_nobody_back_ends_the_stream_after_the_grace(
    make_gateway: MakeGateway, grace_s: float
) -> None:
    gateway = await make_gateway(resume_grace_s=grace_s)
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    await frames.event()
    loop = asyncio.get_running_loop()
    left = loop.time()
    resp.close()
    async with asyncio.timeout(grace_s + 1):
        await gateway.fake.seen[0].ended.wait()
    assert loop.time() - left >= grace_s * 0.9  # not before the grace has passed
    assert gateway.fake.seen[0].cancelled
    await gateway.settled()
    assert gateway.outcomes() == {"client_disconnect": 1}
    expiries = gateway.sample("ai_stream_grace_expiries_total", route="generate_stream")
    assert expiries == (1 if grace_s else 0)
    assert gateway.sample("ai_stream_generations_unread", route="generate_stream") == 0


async def test_a_reader_that_leaves_before_its_first_event_cancels_at_once(
    make_gateway: MakeGateway,
) -> None:
    """Its client never got the stream id, so it has nothing to come back with: no grace."""
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    app = gateway.client.app
    loop = asyncio.get_running_loop()
    g = Generation(
        settings=app[keys.SETTINGS],
        upstream=app[keys.UPSTREAM],
        metrics=app[keys.METRICS],
        route="generate_stream",
        request=CompletionRequest("test-model", [{"role": "user", "content": "x"}], 16),
        request_id="r-1",
        arrived=loop.time(),
        vocabulary=GenerateVocabulary,
        opening={"type": "start"},
    )
    reader = object()
    g.attach(reader)  # a reader that never writes its first event
    app[keys.LIVE].start(g)
    g.leave(reader)
    async with asyncio.timeout(1):
        result = await g.finished()
    assert result.outcome.value == "client_disconnect"
    assert gateway.sample("ai_stream_generations_unread", route="generate_stream") == 0
    assert gateway.sample("ai_stream_grace_expiries_total", route="generate_stream") == 0


async def test_a_reader_back_in_time_disarms_the_grace(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_grace_s=0.5)
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Gate(gate), Text("b"), Finish(), Usage(1, 2), Done()])
    resp, frames = await gateway.stream({"prompt": "x"}, headers={"Accept": "text/event-stream"})
    sid = resp.headers["X-Stream-ID"]
    await frames.event()
    await frames.event()
    resp.close()
    await unread(gateway, sid)
    assert gateway.sample("ai_stream_generations_unread", route="generate_stream") == 1
    back = await gateway.client.get(STREAMS + sid, headers={"Last-Event-ID": f"{sid}:2"})
    back_frames = Frames(back)
    await until(lambda: readers(gateway, sid) == 1, "a reader")
    assert gateway.sample("ai_stream_generations_unread", route="generate_stream") == 0
    # well past the grace: still running, since a reader is attached
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await gateway.fake.seen[0].ended.wait()
    gate.set()
    events = await back_frames.rest()
    assert [e["type"] for e in events] == ["content", "done"]
    assert events[-1]["content"] == "ab"


# --- finished streams ---------------------------------------------------------------------


async def finished_stream(gateway: Gateway, accept: str = "text/event-stream") -> tuple[str, int]:
    gateway.fake.queue(gated([], ("one",)))
    resp, frames = await gateway.stream({"prompt": "x"}, headers={"Accept": accept})
    events = await frames.rest()
    assert events[-1]["type"] == "done"
    await gateway.settled()
    return resp.headers["X-Stream-ID"], len(events)


async def test_a_finished_stream_replays_from_a_cursor_and_ends(gateway: Gateway) -> None:
    sid, count = await finished_stream(gateway)
    assert count == 3
    back = await gateway.client.get(f"{STREAMS}{sid}?after=1")
    assert back.status == 200
    body = await read_all(back)
    assert [parse(f)[1]["type"] for f in frames_of(body)] == ["content", "done"]
    at_end = await gateway.client.get(STREAMS + sid, headers={"Last-Event-ID": f"{sid}:3"})
    assert at_end.status == 204
    assert await at_end.read() == b""
    whole = await gateway.client.get(STREAMS + sid, headers={"Accept": "text/event-stream"})
    assert [parse(f)[0] for f in frames_of(await read_all(whole))] == [
        f"{sid}:1",
        f"{sid}:2",
        f"{sid}:3",
    ]
    assert gateway.sample("ai_stream_resumes_total", route="stream", outcome="ended") == 1
    assert gateway.sample("ai_stream_resumes_total", route="stream", outcome="resumed") == 2
    assert gateway.sample("ai_stream_resume_retained_streams") == 1
    assert gateway.sample("ai_stream_resume_retained_bytes") > 0


async def test_a_post_at_the_end_of_a_finished_stream_gets_an_empty_stream(
    gateway: Gateway,
) -> None:
    sid, count = await finished_stream(gateway)
    resp = await gateway.client.post(
        "/api/ai/generate-stream", headers={"Last-Event-ID": f"{sid}:{count}"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert await read_all(resp) == b""
    assert gateway.sample("ai_stream_resumes_total", route="generate_stream", outcome="ended") == 1


async def test_a_finished_stream_is_gone_after_its_ttl(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_ttl_s=0.3)
    sid, _ = await finished_stream(gateway)
    assert (await gateway.client.get(STREAMS + sid)).status == 200
    await until(lambda: gateway.client.app[keys.LIVE].retained == 0, "expired")
    resp = await gateway.client.get(STREAMS + sid)
    assert resp.status == 404
    assert await resp.json() == {
        "error": {"code": "not_found", "message": "No such stream, or it has expired."}
    }


async def test_no_ttl_keeps_nothing(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_ttl_s=0)
    sid, _ = await finished_stream(gateway)
    assert (await gateway.client.get(STREAMS + sid)).status == 404


async def test_the_byte_cap_drops_the_oldest_finished_first(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_keep_mb=800 / 1024 / 1024)  # 800 bytes
    live = gateway.client.app[keys.LIVE]
    first, _ = await finished_stream(gateway)
    size = live.retained_bytes
    assert 267 <= size <= 400  # so two fit in 800 bytes and three do not
    second, _ = await finished_stream(gateway)
    third, _ = await finished_stream(gateway)
    assert live.retained == 2
    assert live.retained_bytes <= 800
    assert (await gateway.client.get(STREAMS + first)).status == 404
    assert (await gateway.client.get(STREAMS + second)).status == 200
    assert (await gateway.client.get(STREAMS + third)).status == 200


# --- bad cursors --------------------------------------------------------------------------


def bad(message: str) -> dict[str, Any]:
    return {"error": {"code": "bad_request", "message": message}}


async def test_the_read_route_answers_every_bad_cursor_before_any_event(gateway: Gateway) -> None:
    sid, count = await finished_stream(gateway)
    other = "B" * 22
    cases: list[tuple[str, dict[str, str], int, dict[str, Any]]] = [
        ("not-an-id", {}, 400, bad("streamId: not a stream id.")),
        (
            sid,
            {"Last-Event-ID": "garbage"},
            400,
            bad("Last-Event-ID: must be <streamId>:<n>, as the stream's id lines."),
        ),
        (sid, {"Last-Event-ID": f"{other}:1"}, 400, bad("Last-Event-ID: names another stream.")),
        (
            sid,
            {"Last-Event-ID": f"{sid}:9"},
            400,
            bad(
                f"The cursor is beyond the end of the stream: event 9, and the stream has {count}."
            ),
        ),
        (
            other,
            {},
            404,
            {"error": {"code": "not_found", "message": "No such stream, or it has expired."}},
        ),
    ]
    for path, headers, status, body in cases:
        resp = await gateway.client.get(STREAMS + path, headers=headers)
        assert (resp.status, await resp.json()) == (status, body), path
    for after in ("x", "-1", "1.5", "9" * 13):
        resp = await gateway.client.get(f"{STREAMS}{sid}?after={after}")
        message = "after: must be a whole number of events, 0 or more."
        assert (resp.status, await resp.json()) == (400, bad(message)), after
    # Last-Event-ID wins over ?after
    resp = await gateway.client.get(
        f"{STREAMS}{sid}?after=x", headers={"Last-Event-ID": f"{sid}:3"}
    )
    assert resp.status == 204
    assert gateway.sample("ai_stream_resumes_total", route="stream", outcome="bad_cursor") == 8
    assert gateway.sample("ai_stream_resumes_total", route="stream", outcome="not_found") == 1


NOT_FOUND_GENERATE = {
    "type": "error",
    "error": "No such stream to resume, or it has expired.",
    "code": "not_found",
    "reason": None,
}


async def test_a_post_with_a_bad_cursor_gets_one_not_found_event(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(api_keys=("key-one", "key-two"))
    one = {"Authorization": "Bearer key-one", "Accept": "text/event-stream"}
    gateway.fake.queue(gated([], ("one",)))
    resp = await gateway.client.post("/api/ai/generate-stream", json={"prompt": "x"}, headers=one)
    sid = resp.headers["X-Stream-ID"]
    assert len(frames_of(await read_all(resp))) == 3
    await gateway.settled()
    two = {**one, "Authorization": "Bearer key-two"}
    cases = [
        (one, "garbage"),  # malformed
        (one, f"{'C' * 22}:1"),  # unknown
        (two, f"{sid}:1"),  # another client's
        (one, f"{sid}:4"),  # beyond the end
    ]
    for headers, cursor in cases:
        resp = await gateway.client.post(
            "/api/ai/generate-stream",
            data=b"not json",
            headers={**headers, "Last-Event-ID": cursor, "X-Request-ID": "r-1"},
        )
        assert resp.status == 200, cursor
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        body = await read_all(resp)
        assert body == b"data: %b\n\n" % orjson.dumps(
            {**NOT_FOUND_GENERATE, "requestId": "r-1", "elapsedMs": 0}
        )
    # another route's: the generate stream's id on the chat route
    resp = await gateway.client.post(
        "/api/v1/ai/chat/stream", headers={**one, "Last-Event-ID": f"{sid}:1"}
    )
    assert resp.status == 200
    assert await read_all(resp) == (
        b'data: {"type":"error","error":"No such stream to resume, or it has expired.",'
        b'"code":"not_found","reason":null}\n\n'
    )
    # an empty or blank header is no resume: a normal POST, validated as one
    resp = await gateway.client.post(
        "/api/ai/generate-stream", data=b"{", headers={**one, "Last-Event-ID": "  "}
    )
    assert resp.status == 415
    # the owner resumes
    resp = await gateway.client.post(
        "/api/ai/generate-stream", headers={**one, "Last-Event-ID": f"{sid}:1"}
    )
    assert [parse(f)[1]["type"] for f in frames_of(await read_all(resp))] == ["content", "done"]
    route = "generate_stream"
    assert gateway.sample("ai_stream_resumes_total", route=route, outcome="not_found") == 2
    assert gateway.sample("ai_stream_resumes_total", route=route, outcome="bad_cursor") == 2
    assert gateway.sample("ai_stream_resumes_total", route="chat_stream", outcome="not_found") == 1


# --- cancel, keys, the reader cap, MAX_STREAMS --------------------------------------------


async def test_cancel_ends_the_generation_and_every_reader_sees_it(gateway: Gateway) -> None:
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp, frames = await gateway.stream({"prompt": "x"})
    sid = resp.headers["X-Stream-ID"]
    await frames.event()
    await frames.event()
    other = await gateway.client.get(f"{STREAMS}{sid}?after=2")
    cancel = await gateway.client.post(f"{STREAMS}{sid}/cancel")
    assert cancel.status == 204
    async with asyncio.timeout(1):
        await gateway.fake.seen[0].ended.wait()
    for events in (await frames.rest(), await Frames(other).rest()):
        assert len(events) == 1
        assert events[0]["code"] == "cancelled"
        assert events[0]["reason"] == "cancelled"
    await gateway.settled()
    assert gateway.outcomes() == {"cancelled": 1}
    again = await gateway.client.post(f"{STREAMS}{sid}/cancel")  # finished, retained
    assert again.status == 204
    assert gateway.outcomes() == {"cancelled": 1}
    unknown = await gateway.client.post(f"{STREAMS}{'D' * 22}/cancel")
    assert unknown.status == 404
    assert await unknown.json() == {
        "error": {"code": "not_found", "message": "No such stream, or it has expired."}
    }


async def test_with_keys_reading_needs_none_and_stopping_needs_the_owners(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(api_keys=("key-one", "key-two"), resume_grace_s=GRACE_S)
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    one = {"Authorization": "Bearer key-one"}
    resp = await gateway.client.post("/api/ai/generate-stream", json={"prompt": "x"}, headers=one)
    sid = resp.headers["X-Stream-ID"]
    frames = Frames(resp)
    await frames.event()
    await frames.event()
    reader = await gateway.client.get(f"{STREAMS}{sid}?after=2")  # no key at all
    assert reader.status == 200
    for headers in ({}, {"Authorization": "Bearer key-two"}):
        stop = await gateway.client.post(f"{STREAMS}{sid}/cancel", headers=headers)
        assert stop.status == (401 if not headers else 404)
    assert not gateway.fake.seen[0].ended.is_set()
    stop = await gateway.client.post(f"{STREAMS}{sid}/cancel", headers=one)
    assert stop.status == 204
    async with asyncio.timeout(1):
        await gateway.fake.seen[0].ended.wait()
    assert [e["code"] for e in await Frames(reader).rest()] == ["cancelled"]
    # every other route still needs a key
    assert (
        await gateway.client.post("/api/ai/generate-stream", json={"prompt": "x"})
    ).status == 401


async def test_readers_are_capped_per_stream(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_max_readers=2)
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp, frames = await gateway.stream({"prompt": "x"})
    sid = resp.headers["X-Stream-ID"]
    await frames.event()
    second = await gateway.client.get(STREAMS + sid)
    assert second.status == 200
    await until(lambda: readers(gateway, sid) == 2, "two readers")
    third = await gateway.client.get(STREAMS + sid)
    assert third.status == 429
    assert third.headers["Retry-After"] == "1"
    assert await third.json() == {
        "error": {
            "code": "rate_limited",
            "message": "This stream has 2 readers already; retry when one leaves.",
        }
    }
    post = await gateway.client.post(
        "/api/ai/generate-stream", headers={"Last-Event-ID": f"{sid}:1"}
    )
    assert post.status == 200
    (event,) = [parse(f)[1] for f in frames_of(await read_all(post))]
    assert event["code"] == "rate_limited"
    outcome = "too_many_readers"
    assert gateway.sample("ai_stream_resumes_total", route="stream", outcome=outcome) == 1
    assert gateway.sample("ai_stream_resumes_total", route="generate_stream", outcome=outcome) == 1
    resp.close()
    second.close()


async def test_a_generation_in_grace_holds_its_slot_and_readers_take_none(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(max_streams=1, resume_grace_s=GRACE_S)
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp, frames = await gateway.stream({"prompt": "x"})
    sid = resp.headers["X-Stream-ID"]
    await frames.event()
    resp.close()
    await unread(gateway, sid)
    refused = await gateway.client.post("/api/ai/generate-stream", json={"prompt": "y"})
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "overloaded"
    readers = [await gateway.client.get(STREAMS + sid) for _ in range(3)]
    assert [r.status for r in readers] == [200, 200, 200]
    for reader in readers:
        reader.close()
    assert (await gateway.client.post(f"{STREAMS}{sid}/cancel")).status == 204
    await gateway.settled()


async def test_shutdown_drains_a_generation_in_grace_and_its_reader_gets_server_shutdown(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp, frames = await gateway.stream({"prompt": "x"})
    sid = resp.headers["X-Stream-ID"]
    await frames.event()
    await frames.event()
    resp.close()
    await unread(gateway, sid)
    live = gateway.client.app[keys.LIVE]
    drain = asyncio.create_task(live.drain(0.3))
    back = await gateway.client.get(f"{STREAMS}{sid}?after=2")
    events = await Frames(back).rest()
    await asyncio.wait_for(drain, WAIT)
    assert [(e["type"], e["code"], e["reason"]) for e in events] == [
        ("error", "server_shutdown", "shutdown")
    ]
    assert gateway.outcomes() == {"shutdown": 1}


# --- chat ---------------------------------------------------------------------------------


async def chat_turn(
    gateway: Gateway, body: dict[str, Any]
) -> tuple[ClientResponse, Frames, dict[str, Any]]:
    resp = await gateway.client.post(
        "/api/v1/ai/chat/stream", json=body, headers={"Accept": "text/event-stream"}
    )
    assert resp.status == 200, await resp.text()
    frames = Frames(resp)
    return resp, frames, await frames.event()


async def test_a_chat_answer_completes_while_its_user_is_away(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    gate = asyncio.Event()
    gateway.fake.queue([Text("Hi "), Gate(gate), Text("there"), Finish(), Usage(3, 2), Done()])
    resp, frames, metadata = await chat_turn(gateway, {"message": "hello"})
    sid, cid = metadata["messageId"], metadata["conversationId"]
    assert resp.headers["X-Stream-ID"] == sid
    await frames.event()
    resp.close()
    await unread(gateway, sid)
    # a new turn while the answer is in its grace window: 409, naming the stream to resume
    busy = await gateway.client.post(
        "/api/v1/ai/chat", json={"message": "again", "conversationId": cid}
    )
    assert busy.status == 409
    assert (await busy.json())["error"]["streamId"] == sid
    gate.set()
    await gateway.settled()
    conversation = await (await gateway.client.get(f"/api/v1/ai/conversations/{cid}")).json()
    answer = conversation["messages"][-1]
    assert (answer["messageId"], answer["content"], answer["status"]) == (
        sid,
        "Hi there",
        "complete",
    )


async def test_a_chat_answer_abandoned_after_the_grace_is_saved_partial(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(resume_grace_s=0.3)
    gateway.fake.queue([Text("Hi "), Gate(NEVER())])
    resp, frames, metadata = await chat_turn(gateway, {"message": "hello"})
    await frames.event()
    resp.close()
    await gateway.settled()
    cid = metadata["conversationId"]
    conversation = await (await gateway.client.get(f"/api/v1/ai/conversations/{cid}")).json()
    answer = conversation["messages"][-1]
    assert (answer["content"], answer["status"]) == ("Hi ", "partial")
    assert gateway.outcomes("chat_stream") == {"client_disconnect": 1}
    assert gateway.sample("ai_stream_grace_expiries_total", route="chat_stream") == 1


# --- the shared-streams seam --------------------------------------------------------------


class FakeRemote:
    """A stream of another instance: its events come from an async source."""

    def __init__(self, events: list[bytes], ended: bool) -> None:
        self.route = "generate_stream"
        self.owner = ""
        self._events = events
        self.ended = ended
        self.more = asyncio.Event()
        self.closed = False

    @property
    def length(self) -> int:
        return len(self._events)

    async def events(self, after: int) -> AsyncIterator[bytes]:
        for payload in self._events[after:]:
            yield payload
        if not self.ended:
            await self.more.wait()
            yield b'{"type":"done"}'

    async def reach(self, cursor: int) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True


class FakeShared:
    def __init__(self, streams: dict[str, FakeRemote]) -> None:
        self.streams = streams
        self.asked: list[str] = []

    async def open(self, stream_id: str, cursor: int) -> FakeRemote | None:
        self.asked.append(stream_id)
        return self.streams.get(stream_id)

    async def request_cancel(self, stream_id: str, owner: str) -> bool:
        return False


async def test_a_stream_not_here_is_asked_of_the_shared_streams(
    aiohttp_client: Any, fake: Any
) -> None:
    settings = make_settings(openai_base_url=fake.url, heartbeat_interval_s=0.2)
    upstream = OpenAIUpstream(settings)
    app = create_app(settings, upstream=upstream, registry=CollectorRegistry())
    running, done = "R" * 22, "E" * 22
    remote = FakeRemote([b'{"type":"start"}', b'{"type":"content"}'], ended=False)
    finished = FakeRemote([b'{"type":"start"}', b'{"type":"done"}'], ended=True)
    shared = FakeShared({running: remote, done: finished})
    app[keys.SHARED_STREAMS] = shared
    client = await aiohttp_client(app)
    try:
        resp = await client.get(
            STREAMS + running,
            headers={"Accept": "text/event-stream", "Last-Event-ID": f"{running}:1"},
        )
        assert resp.status == 200
        frames = Frames(resp)
        assert await frames.frame() == b'id: %b:2\ndata: {"type":"content"}\n\n' % running.encode()
        await frames.until(b": ping\n")  # the remote is silent: heartbeats go on
        remote.more.set()
        await frames.until(b'{"type":"done"}')
        assert frames.raw.endswith(b'id: %b:3\ndata: {"type":"done"}\n\n' % running.encode())
        assert (await client.get(f"{STREAMS}{done}?after=2")).status == 204
        assert (await client.get(f"{STREAMS}{done}?after=3")).status == 400
        assert (await client.get(STREAMS + "U" * 22)).status == 404
        assert shared.asked == [running, done, done, "U" * 22]
        assert remote.closed
        assert finished.closed
    finally:
        await upstream.aclose()


async def test_a_cancelled_chat_answer_is_saved_partial(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    gateway.fake.queue([Text("Hi "), Gate(NEVER())])
    _, frames, metadata = await chat_turn(gateway, {"message": "hello"})
    await frames.event()
    stop = await gateway.client.post(f"{STREAMS}{metadata['messageId']}/cancel")
    assert stop.status == 204
    (error,) = await frames.rest()
    assert (error["code"], error["reason"]) == ("cancelled", "cancelled")
    cid = metadata["conversationId"]
    conversation = await (await gateway.client.get(f"/api/v1/ai/conversations/{cid}")).json()
    answer = conversation["messages"][-1]
    assert (answer["content"], answer["status"]) == ("Hi ", "partial")


async def test_after_the_cancels_204_the_answer_is_saved_and_the_next_turn_accepted(
    make_gateway: MakeGateway,
) -> None:
    """The 204 comes once the generation has ended: the client sends its next turn at once,
    without reading the stream to its end, and gets no 409."""
    gateway = await make_gateway(resume_grace_s=GRACE_S)
    gateway.fake.queue([Text("Hi "), Gate(NEVER())])
    gateway.fake.queue([Text("Again"), Finish(), Usage(3, 1), Done()])
    resp, frames, metadata = await chat_turn(gateway, {"message": "hello"})
    await frames.event()
    sid, cid = metadata["messageId"], metadata["conversationId"]
    stop = await gateway.client.post(f"{STREAMS}{sid}/cancel")
    assert stop.status == 204
    generation = gateway.client.app[keys.LIVE].find(sid)
    assert generation is not None
    assert generation.ended
    conversation = await (await gateway.client.get(f"/api/v1/ai/conversations/{cid}")).json()
    assert [(m["content"], m["status"]) for m in conversation["messages"]] == [
        ("hello", "complete"),
        ("Hi ", "partial"),
    ]
    again = await gateway.client.post(
        "/api/v1/ai/chat", json={"message": "and now?", "conversationId": cid}
    )
    assert again.status == 200, await again.text()
    assert (await again.json())["content"] == "Again"
    resp.close()


async def test_a_reader_held_elsewhere_restarts_the_grace(make_gateway: MakeGateway) -> None:
    """The shared streams' seam: while a reader on another instance holds the stream, the grace
    timer looks again every third of the lease instead of ending it; once the reader elsewhere
    has gone, a grace window of its own starts."""
    gateway = await make_gateway(resume_grace_s=0.3, resume_lease_s=0.3)
    asked: list[float] = []
    loop = asyncio.get_running_loop()

    def held() -> bool:
        asked.append(loop.time())
        return len(asked) < 3  # held for two windows, then let go

    def hook(g: Generation) -> None:
        g.held_elsewhere = held

    gateway.client.app[keys.LIVE].on_start.append(hook)
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    await frames.event()
    left = loop.time()
    resp.close()
    async with asyncio.timeout(WAIT):
        await gateway.fake.seen[0].ended.wait()
    assert len(asked) == 4  # held, held (0.1 s later), not held: a fresh grace, not held
    assert asked[1] - asked[0] >= 0.9 * 0.1
    assert asked[-1] - asked[-2] >= 0.9 * 0.3
    assert asked[-1] - left >= 0.9 * (0.3 + 0.1 + 0.1 + 0.3)
    await gateway.settled()
    assert gateway.outcomes() == {"client_disconnect": 1}
    assert gateway.sample("ai_stream_grace_expiries_total", route="generate_stream") == 1
    assert gateway.sample("ai_stream_generations_unread", route="generate_stream") == 0
