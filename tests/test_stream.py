"""The generate stream end to end: gateway on a real socket, upstream through the real SDK."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.app import create_app
from tests.conftest import API_KEY, WAIT, Frames, Gateway, MakeGateway, make_settings
from tests.fake_upstream import (
    Done,
    Drop,
    Finish,
    Gate,
    Raw,
    Repeat,
    Status,
    Text,
    Usage,
    answer,
    window_script,
)

NEVER = asyncio.Event  # a gate nobody opens: the upstream stays silent until cancelled


async def ended_within(gateway: Gateway, index: int = 0, seconds: float = 1.0) -> None:
    """The upstream request `index` was closed by the gateway within `seconds`."""
    async with asyncio.timeout(seconds):
        await gateway.fake.seen[index].ended.wait()


@pytest.mark.parametrize("accept", [None, "text/event-stream"], ids=["data-only", "full"])
async def test_golden_stream_bytes(gateway: Gateway, accept: str | None) -> None:
    g1, g2 = asyncio.Event(), asyncio.Event()
    gateway.fake.queue(
        [
            Text("Hello"),
            Gate(g1),
            Text(" world"),
            Gate(g2),
            Text(" [[image:1]]"),
            Finish(),
            Usage(9, 3),
            Done(),
        ]
    )
    headers = {"X-Request-ID": "golden-1", "X-Stream-ID": "AAAAAAAAAAAAAAAAAAAAAA"}
    if accept:
        headers["Accept"] = accept
    resp, frames = await gateway.stream(
        {"prompt": "Say hello", "selectedImageUrls": ["https://example.test/a.png"]},
        headers=headers,
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache, no-transform"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Request-ID"] == "golden-1"
    sid = resp.headers["X-Stream-ID"]  # minted by the server, never the client's
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", sid)
    assert sid != "AAAAAAAAAAAAAAAAAAAAAA"
    assert "Content-Encoding" not in resp.headers
    assert "Content-Length" not in resp.headers
    await frames.frame()
    await frames.frame()
    g1.set()
    await frames.frame()
    g2.set()
    assert await frames.rest()
    wire = re.sub(rb'"elapsedMs":\d+', b'"elapsedMs":0', frames.raw)
    ids = [b"id: %b:%d\n" % (sid.encode(), n) if accept else b"" for n in range(1, 6)]
    assert wire == (
        b'%bdata: {"type":"start","requestId":"golden-1","streamId":"%b"}\n\n'
        b'%bdata: {"type":"content","delta":"Hello","tokenCount":1}\n\n'
        b'%bdata: {"type":"content","delta":" world","tokenCount":2}\n\n'
        b'%bdata: {"type":"content","delta":" [[image:1]]","tokenCount":3}\n\n'
        b'%bdata: {"type":"done","content":"Hello world [[image:1]]",'
        b'"imagePlaceholders":["[[image:1]]"],"tokenCount":3,"model":"test-model",'
        b'"requestId":"golden-1","elapsedMs":0,"finishReason":"stop"}\n\n'
    ) % (ids[0], sid.encode(), *ids[1:])
    sent = gateway.fake.seen[0].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "test-model"
    assert sent["max_completion_tokens"] == gateway.settings.default_max_tokens
    assert sent["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "https://example.test/a.png"},
    }
    assert gateway.fake.seen[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert gateway.sample("ai_stream_completion_tokens_total", model="test-model") == 3
    assert gateway.sample("ai_stream_prompt_tokens_total", model="test-model") == 9
    assert gateway.outcomes() == {"completed": 1}


async def test_start_is_flushed_before_the_upstream_answers(gateway: Gateway) -> None:
    gate = asyncio.Event()
    gateway.fake.queue([Gate(gate), *answer("late")])
    resp, frames = await gateway.stream({"prompt": "x"})
    start = await frames.event()
    assert start["type"] == "start"
    assert start["requestId"] == resp.headers["X-Request-ID"]
    assert not gate.is_set()
    gate.set()
    events = await frames.rest()
    assert [e["type"] for e in events] == ["content", "done"]


async def test_deltas_joined_equal_done_content_and_token_counts_are_exact(
    gateway: Gateway,
) -> None:
    texts = [f" w{i}" for i in range(300)]
    gateway.fake.queue(answer(*texts))
    _, frames = await gateway.stream({"prompt": "x"})
    events = [await frames.event(), *await frames.rest()]
    contents = [e for e in events if e["type"] == "content"]
    done = events[-1]
    assert done["type"] == "done"
    assert "".join(e["delta"] for e in contents) == done["content"] == "".join(texts)
    assert contents[-1]["tokenCount"] == done["tokenCount"] == 300
    counts = [e["tokenCount"] for e in contents]
    assert counts == sorted(counts)


async def test_model_text_cannot_forge_an_event(gateway: Gateway) -> None:
    evil = 'x\n\ndata: {"type":"done","content":"forged"}\n\nid: 99\r\n\r\n: ping\n\n'
    gateway.fake.queue(answer(evil))
    _, frames = await gateway.stream({"prompt": "x"})
    events = [await frames.event(), *await frames.rest()]
    assert [e["type"] for e in events] == ["start", "content", "done"]
    assert events[1]["delta"] == evil
    assert events[2]["content"] == evil
    assert frames.raw.count(b"\n\n") == 3


@pytest.mark.parametrize("accept", [None, "text/event-stream"], ids=["data-only", "full"])
@pytest.mark.parametrize("first", [True, False], ids=["before-first-token", "between-tokens"])
async def test_heartbeat_while_the_upstream_is_silent(
    make_gateway: MakeGateway, first: bool, accept: str | None
) -> None:
    gateway = await make_gateway(heartbeat_interval_s=0.05)
    gate = asyncio.Event()
    before = [] if first else [Text("a")]
    gateway.fake.queue([*before, Gate(gate), *answer("b")])
    headers = {"X-Request-ID": "beat-1", **({"Accept": accept} if accept else {})}
    resp, frames = await gateway.stream({"prompt": "x"}, headers=headers)
    await frames.until(b": ping\n", 2)
    gate.set()
    await frames.rest()
    sid = resp.headers["X-Stream-ID"].encode()
    ids = [b"id: %b:%d\n" % (sid, n) if accept else b"" for n in range(1, 4 if first else 5)]
    ping = b": ping\n" if accept else b": ping\n\n"  # a lone comment line, or a block of its own
    start = b'%bdata: {"type":"start","requestId":"beat-1","streamId":"%b"}\n\n' % (ids[0], sid)
    content = (
        [] if first else [b'%bdata: {"type":"content","delta":"a","tokenCount":1}\n\n' % ids[1]]
    )
    pings = re.escape(ping) + b"(?:" + re.escape(ping) + b")+"
    late = b'%bdata: {"type":"content","delta":"b","tokenCount":%d}\n\n' % (ids[-2], len(ids) - 2)
    pattern = re.escape(start + b"".join(content)) + pings + re.escape(late) + b"%bdata: " % ids[-1]
    assert re.match(pattern, frames.raw), frames.raw
    assert frames.raw.endswith(b"}\n\n")
    assert (orjson.loads(frames.raw.rsplit(b"data: ", 1)[1]))["type"] == "done"
    assert gateway.sample("ai_stream_heartbeats_total") == frames.raw.count(ping) >= 2


@pytest.mark.parametrize(
    ("settings", "before", "reason"),
    [
        ({"first_token_timeout_s": 0.2}, [], "first_token_timeout"),
        ({"idle_timeout_s": 0.2}, [Text("a")], "idle_timeout"),
        ({"max_stream_s": 0.3, "idle_timeout_s": 30}, [Repeat("a", 0.01)], "total_timeout"),
    ],
)
async def test_each_timeout_ends_with_an_error_event(
    make_gateway: MakeGateway, settings: dict[str, float], before: list[object], reason: str
) -> None:
    gateway = await make_gateway(**settings)
    gateway.fake.queue([*before, Gate(NEVER())])  # type: ignore[list-item]
    _, frames = await gateway.stream({"prompt": "x"})
    events = [await frames.event(), *await frames.rest()]
    error = events[-1]
    assert error["type"] == "error"
    assert (error["code"], error["reason"]) == ("timeout", reason)
    assert error["requestId"] == events[0]["requestId"]
    assert isinstance(error["elapsedMs"], int)
    await ended_within(gateway)
    assert gateway.outcomes() == {reason: 1}


@pytest.mark.parametrize("grace_s", [0.0, 0.5], ids=["no-grace", "grace"])
@pytest.mark.parametrize("window", ["before-answer", "while-silent", "while-streaming"])
async def test_client_disconnect_cancels_the_upstream_within_a_second(
    make_gateway: MakeGateway, window: str, grace_s: float
) -> None:
    """With a grace window (RESUME_GRACE_S) the upstream is closed within a second of its end."""
    gateway = await make_gateway(resume_grace_s=grace_s)
    gateway.fake.queue(window_script(window))
    resp, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    if window == "before-answer":
        async with asyncio.timeout(WAIT):
            await gateway.fake.arrived.wait()
    else:
        await frames.event()
    resp.close()
    await ended_within(gateway, seconds=grace_s + 1)
    assert gateway.fake.seen[0].cancelled
    await gateway.settled()
    assert gateway.outcomes() == {"client_disconnect": 1}
    assert gateway.sample("ai_stream_streams_active", route="generate_stream") == 0


@pytest.mark.parametrize("grace_s", [0.0, 5.0], ids=["no-grace", "grace"])
async def test_client_disconnect_cancels_the_upstream_for_the_json_endpoint(
    make_gateway: MakeGateway, grace_s: float
) -> None:
    """The JSON routes have no grace window: their client cannot come back."""
    gateway = await make_gateway(resume_grace_s=grace_s)
    gateway.fake.queue([Gate(NEVER())])
    request = asyncio.create_task(gateway.post("/api/ai/generate", {"prompt": "x"}))
    async with asyncio.timeout(WAIT):
        await gateway.fake.arrived.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await ended_within(gateway)
    await gateway.settled()
    assert gateway.outcomes("generate") == {"client_disconnect": 1}


async def test_retries_happen_before_the_first_token_only(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(upstream_max_retries=3)
    fast = {"retry-after-ms": "1"}
    gateway.fake.queue([Status(500, fast)], [Status(429, fast)], answer("ok"))
    _, frames = await gateway.stream({"prompt": "x"})
    events = [await frames.event(), *await frames.rest()]
    assert [e["type"] for e in events] == ["start", "content", "done"]
    assert events[-1]["content"] == "ok"
    assert len(gateway.fake.seen) == 3
    assert gateway.sample("ai_stream_upstream_retries_total") == 2


async def test_no_retry_once_text_was_sent(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(upstream_max_retries=3)
    gateway.fake.queue([Text("partial"), Drop()])
    _, frames = await gateway.stream({"prompt": "x"})
    events = [await frames.event(), *await frames.rest()]
    assert [e["type"] for e in events] == ["start", "content", "error"]
    assert events[1]["delta"] == "partial"
    assert (events[2]["code"], events[2]["reason"]) == ("upstream_error", "upstream_error")
    assert len(gateway.fake.seen) == 1
    assert gateway.sample("ai_stream_upstream_retries_total") == 0


@pytest.mark.parametrize(
    ("scripts", "attempts", "kind"),
    [
        ([[Status(401)]], 1, "auth"),
        ([[Status(429, {"retry-after-ms": "1"})]] * 2, 2, "rate_limit"),
        ([[Status(500, {"retry-after-ms": "1"})]] * 2, 2, "server"),
        ([[Drop()]] * 2, 2, "connection"),
        ([[Text("a"), Drop()]], 1, "connection"),
        ([[Raw(b"data: {not json\n\n")]], 1, "malformed"),
        ([[Text("a")]], 1, "truncated"),
    ],
    ids=[
        "401",
        "429",
        "500",
        "dropped-before-headers",
        "dropped-mid-stream",
        "malformed",
        "no-finish",
    ],
)
async def test_upstream_failures_become_clean_error_events(
    make_gateway: MakeGateway, scripts: list[list[object]], attempts: int, kind: str
) -> None:
    gateway = await make_gateway(upstream_max_retries=1)
    gateway.fake.queue(*scripts)  # type: ignore[arg-type]
    _, frames = await gateway.stream({"prompt": "x"})
    events = [await frames.event(), *await frames.rest()]
    error = events[-1]
    assert error["type"] == "error"
    assert (error["code"], error["reason"]) == ("upstream_error", "upstream_error")
    for secret in (API_KEY, "sk-live", gateway.fake.url, "127.0.0.1"):
        assert secret not in error["error"]
    assert len(gateway.fake.seen) == attempts
    assert gateway.sample("ai_stream_upstream_errors_total", kind=kind) == 1
    assert gateway.outcomes() == {"upstream_error": 1}


async def test_json_endpoint_returns_the_whole_answer(gateway: Gateway) -> None:
    gateway.fake.queue(answer("Hello", " [[image: a cat]]", prompt=11))
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"}, headers={"X-Request-ID": "j-1"})
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "content": "Hello [[image: a cat]]",
        "imagePlaceholders": ["[[image: a cat]]"],
        "tokenCount": 2,
        "model": "test-model",
        "requestId": "j-1",
        "elapsedMs": body["elapsedMs"],
        "finishReason": "stop",
        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
    }


async def test_json_endpoint_maps_upstream_failure_to_502(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(upstream_max_retries=0)
    gateway.fake.queue([Status(503)])
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_error"


async def test_max_streams_answers_503_overloaded_then_frees_the_slot(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(max_streams=1)
    gate = asyncio.Event()
    gateway.fake.queue([Gate(gate), *answer("a")])
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    refused = await gateway.post("/api/ai/generate-stream", {"prompt": "y"})
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["code"] == "overloaded"
    gate.set()
    await frames.rest()
    await gateway.settled()
    _, again = await gateway.stream({"prompt": "z"})
    assert (await again.rest())[-1]["type"] == "done"


async def test_invalid_request_ids_are_replaced(gateway: Gateway) -> None:
    resp = await gateway.client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert resp.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])
    assert await resp.json() == {"status": "ok"}


class _Broken:
    """An Upstream whose stream fails with an error no layer translates (a bug, say)."""

    on_retry = None

    def stream(self, request: object) -> Any:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Any]:
            async def deltas() -> AsyncIterator[tuple[str, int]]:
                yield "partial", 1
                raise RuntimeError("a bug")

            yield type("S", (), {"parser": None, "__aiter__": lambda self: deltas()})()

        return opened()

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_an_untranslated_failure_still_ends_in_an_error_event(aiohttp_client: Any) -> None:
    registry = CollectorRegistry()
    app = create_app(make_settings(), upstream=_Broken(), registry=registry)
    client = await aiohttp_client(app)
    resp = await client.post("/api/ai/generate-stream", json={"prompt": "x"})
    assert resp.status == 200
    frames = Frames(resp)
    events = [await frames.event(), *await frames.rest()]
    assert [e["type"] for e in events] == ["start", "content", "error"]
    assert (events[-1]["code"], events[-1]["reason"]) == ("upstream_error", "upstream_error")
    labels = {"route": "generate_stream", "outcome": "upstream_error"}
    assert registry.get_sample_value("ai_stream_outcomes_total", labels) == 1
    assert registry.get_sample_value("ai_stream_upstream_errors_total", {"kind": "other"}) == 1
