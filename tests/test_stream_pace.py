"""The per-token path at model pace: the upstream body read straight from aiohttp (and through
httpx when it is encoded), aiohttp's read timer dropped when the relay's clocks bound silence, and
`STREAM_FLUSH_MS` (deltas read within the interval joined into one frame, never held longer)."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import TestServer

from service.upstream import CompletionRequest, OpenAIUpstream, UpstreamError
from tests.conftest import WAIT, Gateway, MakeGateway, make_settings
from tests.fake_upstream import (
    Done,
    Drop,
    Finish,
    Gate,
    Repeat,
    Sleep,
    Step,
    Text,
    Usage,
    answer,
)

NEVER = asyncio.Event  # a gate nobody opens


def _content(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["delta"], f["tokenCount"]) for f in frames if f["type"] == "content"]


async def _events(gateway: Gateway, body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    _, frames = await gateway.stream(body or {"prompt": "x"})
    return await frames.rest()


# --- the upstream body ------------------------------------------------------------------------


def _chunk(text: str) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return b"data: %b\n\n" % orjson.dumps({**body, "choices": [choice]})


@pytest.fixture
async def gzip_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible server that gzips its event stream (`Content-Encoding: gzip`)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await resp.prepare(request)
        packer = zlib.compressobj(wbits=31)
        for piece in (_chunk("Hel"), _chunk("lo"), b"data: [DONE]\n\n"):
            await resp.write(packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH))
        await resp.write(packer.flush())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()


async def test_an_encoded_body_is_read_through_httpx_and_relayed_whole(
    make_gateway: MakeGateway, gzip_upstream: str
) -> None:
    """The first stream through the SDK's `post`, the later ones through the reused request sent
    to aiohttp straight (upstream design note 11): httpx decodes every one of them."""
    gateway = await make_gateway(openai_base_url=gzip_upstream)
    for _ in range(3):
        events = await _events(gateway)
        assert "".join(d for d, _ in _content(events)) == "Hello"
        assert events[-1]["type"] == "done"
        assert events[-1]["content"] == "Hello"


async def test_a_plain_body_is_read_straight_from_aiohttp(gateway: Gateway) -> None:
    """The SDK's transport still hands back a response whose aiohttp reader is found, so the
    fast path is the one taken (upstream design note 7), and aiohttp's read timer is dropped
    once the relay's clocks bound the silence (note 8)."""
    gateway.fake.queue(answer("a", "b"))
    upstream = OpenAIUpstream(gateway.settings, base_url=gateway.fake.url, max_retries=0)
    try:
        async with upstream.stream(CompletionRequest("m", [], 5)) as stream:
            read = stream._read  # type: ignore[attr-defined]
            assert getattr(read, "__name__", "") == "readany"
            owner = getattr(read, "__self__", None)
            assert type(owner).__module__.startswith("aiohttp")
            batches = [batch async for batch in stream]
        assert "".join(t for t, _ in batches) == "ab"
    finally:
        await upstream.aclose()


async def test_a_network_read_costs_the_client_protocol_one_call(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream design note 10: aiohttp's reader would ask its protocol to resume reading after
    every read, re-entering its `data_received` with nothing; here each read is one call."""
    calls = 0
    received = ResponseHandler.data_received

    def counted(self: ResponseHandler, data: bytes) -> None:
        nonlocal calls
        calls += 1
        received(self, data)

    monkeypatch.setattr(ResponseHandler, "data_received", counted)
    gates = [asyncio.Event() for _ in range(3)]
    steps: list[Step] = [Text("a"), Gate(gates[0]), Text("b"), Gate(gates[1]), Text("c")]
    steps.append(Gate(gates[2]))
    gateway.fake.queue([*steps, *answer()])
    upstream = OpenAIUpstream(gateway.settings, base_url=gateway.fake.url, max_retries=0)
    try:
        async with upstream.stream(CompletionRequest("m", [], 5)) as stream:
            batches = aiter(stream)
            async with asyncio.timeout(WAIT):
                assert (await anext(batches))[0] == "a"
                before = calls
                for gate, text in zip(gates, "bc", strict=False):
                    gate.set()  # the next delta, in a network read of its own
                    assert (await anext(batches))[0] == text
            assert calls - before == 2
            gates[2].set()
            rest = [batch async for batch in batches]
        assert [t for t, _ in rest if t] == []
    finally:
        await upstream.aclose()


async def test_a_paused_upstream_read_resumes(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading stops while aiohttp's buffer is past its high-water mark (a relay not reading)
    and resumes once it is read down: everything arrives, in order (upstream design note 10)."""
    paused = asyncio.Event()
    pause = ResponseHandler.pause_reading

    def noted(self: ResponseHandler) -> None:
        paused.set()
        pause(self)

    monkeypatch.setattr(ResponseHandler, "pause_reading", noted)
    texts = [f"{i:05d}" + "x" * 200 for i in range(2000)]  # about 600 KB of events
    gateway.fake.queue(answer(*texts))
    upstream = OpenAIUpstream(gateway.settings, base_url=gateway.fake.url, max_retries=0)
    try:
        async with upstream.stream(CompletionRequest("m", [], 5000)) as stream:
            async with asyncio.timeout(WAIT):
                await paused.wait()  # nothing read yet: the buffer fills past its mark
                joined = "".join([t async for t, _ in stream])
        assert joined == "".join(texts)
    finally:
        await upstream.aclose()


@pytest.mark.parametrize(
    ("clocks", "timed"),
    [
        ({}, False),
        ({"idle_timeout_s": 0}, True),
        ({"first_token_timeout_s": 0}, True),
    ],
    ids=["clocks-on", "idle-off", "first-token-off"],
)
async def test_the_read_timer_is_dropped_only_when_the_clocks_bound_silence(
    gateway: Gateway, clocks: dict[str, float], timed: bool
) -> None:
    settings = make_settings(openai_base_url=gateway.fake.url, **clocks)
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Gate(gate), *answer("b")])
    upstream = OpenAIUpstream(settings, max_retries=0)
    try:
        async with upstream.stream(CompletionRequest("m", [], 5)) as stream:
            read = stream._read  # type: ignore[attr-defined]
            protocol = read.__self__._protocol
            assert (protocol.read_timeout is not None) is timed
            gate.set()
            assert "".join([t async for t, _ in stream]) == "ab"
    finally:
        await upstream.aclose()


@pytest.mark.parametrize("reused", [False, True], ids=["sdk-post", "sent-straight"])
async def test_a_body_cut_mid_stream_is_still_a_connection_failure(
    gateway: Gateway, reused: bool
) -> None:
    """On the SDK's path (a server's first stream) and on the reused request sent to aiohttp
    straight (a later one: upstream design note 11) alike."""
    if reused:
        gateway.fake.queue(answer("ok"))
    gateway.fake.queue([Text("a"), Drop()])
    upstream = OpenAIUpstream(gateway.settings, base_url=gateway.fake.url, max_retries=0)

    async def read_all() -> str:
        async with upstream.stream(CompletionRequest("m", [], 5)) as stream:
            return "".join([text async for text, _ in stream])

    try:
        if reused:
            assert await read_all() == "ok"
            assert upstream._prepared is not None
            assert upstream._prepared.session is not None  # the next one goes straight
        with pytest.raises(UpstreamError) as caught:
            await read_all()
        assert caught.value.kind == "connection"
    finally:
        await upstream.aclose()


async def test_a_client_leaving_a_stream_sent_straight_closes_its_upstream_request(
    gateway: Gateway,
) -> None:
    """Upstream design note 11: the stream's upstream request is closed within the bound when
    its client leaves, the half-read connection is not pooled, and the next stream is served."""
    gateway.fake.queue(answer("first"), [Text("a"), Repeat(" more", 0.01)], answer("third"))
    assert (await _events(gateway))[-1]["content"] == "first"
    resp, frames = await gateway.stream({"prompt": "x"})
    assert (await frames.event())["type"] == "start"
    assert (await frames.event())["delta"].startswith("a")
    resp.close()  # the client leaves while the upstream is still streaming
    async with asyncio.timeout(WAIT):
        await gateway.fake.seen[1].ended.wait()
    await gateway.settled()
    assert gateway.fake.open_requests == 0
    assert (
        gateway.sample(
            "ai_stream_outcomes_total", route="generate_stream", outcome="client_disconnect"
        )
        == 1
    )
    assert (await _events(gateway))[-1]["content"] == "third"
    first, left, third = (seen.peer for seen in gateway.fake.seen)
    assert left == first  # the pooled connection carried the stream the client left
    assert third != left  # which was then closed, not pooled half read


# --- STREAM_FLUSH_MS ----------------------------------------------------------------------------


async def test_flush_interval_joins_deltas_read_within_it(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(stream_flush_ms=400)
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Text("b"), Text("c"), Gate(gate), *answer("d")])
    _, frames = await gateway.stream({"prompt": "x"})
    assert (await frames.event())["type"] == "start"
    first = await frames.event()
    assert (first["delta"], first["tokenCount"]) == ("abc", 3)
    gate.set()
    rest = await frames.rest()
    assert _content(rest) == [("d", 4)]  # the answer's end writes what is held at once
    done = rest[-1]
    assert done["type"] == "done"
    assert done["content"] == "abcd"
    assert gateway.outcomes() == {"completed": 1}


async def test_flush_interval_makes_fewer_frames_with_the_same_text(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(stream_flush_ms=50)
    script: list[Any] = []
    for n in range(20):
        script += [Text(f"t{n} "), Sleep(0.005)]
    gateway.fake.queue([*script, Finish(), Usage(3, 20), Done()])
    events = await _events(gateway)
    content = _content(events)
    assert len(content) < 20
    assert (
        "".join(d for d, _ in content)
        == events[-1]["content"]
        == "".join(f"t{n} " for n in range(20))
    )
    counts = [c for _, c in content]
    assert counts == sorted(counts)
    assert counts[-1] == 20  # tokenCount stays exact


async def test_flush_interval_bounds_how_long_text_is_held(make_gateway: MakeGateway) -> None:
    """A delta followed by silence leaves once the interval has passed, not at the answer's end,
    and not before the interval."""
    gateway = await make_gateway(stream_flush_ms=300)
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Gate(gate), *answer("b")])
    _, frames = await gateway.stream({"prompt": "x"})
    assert (await frames.event())["type"] == "start"
    started = time.monotonic()  # the upstream is called after the first event is written
    held = await frames.event()
    waited = time.monotonic() - started
    assert (held["delta"], held["tokenCount"]) == ("a", 1)
    assert not gate.is_set()  # left while the upstream is still silent
    assert 0.25 <= waited < 2.0
    gate.set()
    rest = await frames.rest()
    assert _content(rest) == [("b", 2)]
    assert rest[-1]["type"] == "done"


@pytest.mark.parametrize(
    ("settings", "after", "reason"),
    [
        ({}, [Drop()], "upstream_error"),
        ({"idle_timeout_s": 0.2}, [Gate(NEVER())], "idle_timeout"),
    ],
    ids=["upstream-cut", "idle-timeout"],
)
async def test_held_text_is_written_before_the_error(
    make_gateway: MakeGateway, settings: dict[str, float], after: list[Any], reason: str
) -> None:
    gateway = await make_gateway(stream_flush_ms=1000, **settings)
    gateway.fake.queue([Text("a"), Text("b"), *after])
    _, frames = await gateway.stream({"prompt": "x"})
    events = await frames.rest()
    assert [e["type"] for e in events] == ["start", "content", "error"]
    assert _content(events) == [("ab", 2)]
    assert events[-1]["reason"] == reason
    assert gateway.outcomes() == {reason: 1}


async def test_flush_interval_off_writes_each_read_as_it_comes(gateway: Gateway) -> None:
    """The default (0): a frame leaves as soon as its read does, before the next delta exists."""
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Gate(gate), *answer("b")])
    _, frames = await gateway.stream({"prompt": "x"})
    assert (await frames.event())["type"] == "start"
    assert (await frames.event())["delta"] == "a"
    gate.set()
    assert _content(await frames.rest()) == [("b", 2)]


async def test_flush_frames_bytes(make_gateway: MakeGateway) -> None:
    """A joined frame is the same frame a single read of those deltas makes."""
    gateway = await make_gateway(stream_flush_ms=400)
    gate = asyncio.Event()
    gateway.fake.queue([Text("x"), Text("\u2028y"), Gate(gate), *answer()])
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    raw = await frames.frame()
    assert raw == b'data: {"type":"content","delta":"x\\u2028y","tokenCount":2}\n\n'
    gate.set()
    assert (await frames.rest())[-1]["type"] == "done"


async def test_flush_interval_leaves_openai_chunks_as_they_came(make_gateway: MakeGateway) -> None:
    """The OpenAI-compatible route relays chunk for chunk, whatever `STREAM_FLUSH_MS` says."""
    gateway = await make_gateway(stream_flush_ms=400)
    gateway.fake.queue(answer("a", "b", "c"))
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    resp = await gateway.client.post("/v1/chat/completions", json=body)
    wire = await resp.read()
    deltas = [
        orjson.loads(line[6:])["choices"][0]["delta"].get("content")
        for line in wire.split(b"\n\n")
        if line.startswith(b"data: {")
    ]
    assert deltas == ["a", "b", "c", None]  # one chunk each, then the finish chunk
    assert wire.endswith(b"data: [DONE]\n\n")


# --- the frame's write ------------------------------------------------------------------------


async def test_frames_go_out_as_one_http_chunk_each(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers design note 4: after the first, every frame is written to the transport as one
    chunk of the chunked body, byte for byte what aiohttp's writer would send, without it."""
    writes = 0
    write = StreamWriter.write

    async def counted(self: StreamWriter, chunk: Any, **kwargs: Any) -> None:
        nonlocal writes
        writes += b'"type":"' in bytes(chunk)  # the gateway's frames, not the fake upstream's
        await write(self, chunk, **kwargs)

    monkeypatch.setattr(StreamWriter, "write", counted)
    gateway.fake.queue([Text("Hel"), Sleep(0.01), Text("lo"), Sleep(0.01), *answer(" there")])
    body = b'{"prompt":"x"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.client.port)
    try:
        writer.write(
            b"POST /api/ai/generate-stream HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (len(body), body)
        )
        async with asyncio.timeout(WAIT):
            wire = await reader.read()  # to the end: the server closes after the answer
    finally:
        writer.close()
    head, _, rest = wire.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    frames = []
    while True:  # bounded: each pass consumes one chunk of `rest`
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            break
        frame, crlf, rest = rest[:size], rest[size : size + 2], rest[size + 2 :]
        assert crlf == b"\r\n"
        assert frame.startswith(b"data: ")
        assert frame.endswith(b"\n\n")
        assert frame.count(b"\n\n") == 1  # one SSE frame per chunk
        frames.append(orjson.loads(frame[6:]))
    assert frames[0]["type"] == "start"
    assert frames[-1]["type"] == "done"
    assert frames[-1]["content"] == "Hello there"
    assert "".join(f["delta"] for f in frames if f["type"] == "content") == "Hello there"
    assert len(frames) >= 3
    assert writes == 1  # the first frame (with the headers) only: the rest went straight
