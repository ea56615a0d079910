"""The OpenAI-compatible surface as a user meets it: the official `openai` SDK (async and sync,
streamed and not, raw responses, the stream helper) pointed at the gateway on a real socket, in
front of the scripted upstream; and the exact bytes on the wire."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam
from structlog.testing import capture_logs

from tests.conftest import API_KEY, WAIT, Gateway, MakeGateway
from tests.fake_upstream import (
    Chunk,
    Done,
    Finish,
    Gate,
    Raw,
    Repeat,
    Status,
    Text,
    Usage,
    Whole,
    answer,
    window_script,
)

NEVER = asyncio.Event  # a gate nobody opens: the upstream stays silent until cancelled
DONE = b"data: [DONE]\n\n"


def base_url(gateway: Gateway) -> str:
    return str(gateway.client.make_url("/v1"))


@pytest.fixture
async def sdk(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=base_url(gateway), api_key="unused", max_retries=0)
    yield client
    await client.close()


def async_sdk(gateway: Gateway, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(gateway), api_key=api_key, max_retries=0)


async def ended_within(gateway: Gateway, index: int = 0, seconds: float = 1.0) -> None:
    """The upstream request `index` was closed by the gateway within `seconds`."""
    async with asyncio.timeout(seconds):
        await gateway.fake.arrived.wait()
        await gateway.fake.seen[index].ended.wait()


async def raw_stream(gateway: Gateway, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
    """POST a stream as plain HTTP; its status and every byte of its body."""
    payload = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], **body}
    resp = await gateway.client.post("/v1/chat/completions", json=payload, headers=headers)
    async with asyncio.timeout(WAIT):
        return resp.status, await resp.read()


def chunks_of(wire: bytes) -> list[Any]:
    """The `data:` payloads of a body (JSON, or the `[DONE]` marker as bytes)."""
    out: list[Any] = []
    for block in wire.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
                out.append(data if data == b"[DONE]" else orjson.loads(data))
    return out


USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


# --- the wire --------------------------------------------------------------------------------


async def test_golden_stream_bytes(gateway: Gateway) -> None:
    """Each upstream chunk comes back as its own `data:` line, unchanged; the usage chunk only
    because the client asked; `[DONE]` last; no `id:` lines."""
    gateway.fake.queue(answer("Hello", " world", prompt=9, completion=2))
    status, wire = await raw_stream(
        gateway,
        {"stream": True, "stream_options": {"include_usage": True}},
        **{"X-Request-ID": "golden-openai"},
    )
    assert status == 200
    head = b'data: {"id":"chatcmpl-test","object":"chat.completion.chunk","created":0,'
    head += b'"model":"test-model",'
    assert wire == (
        head + b'"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
        + head + b'"choices":[{"index":0,"delta":{"content":" world"},"finish_reason":null}]}\n\n'
        + head + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        + head + b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,'
        b'"total_tokens":11}}\n\n'
        + DONE
    )  # fmt: skip
    sent = gateway.fake.seen[0].body
    assert sent["stream_options"] == {"include_usage": True}
    assert "Authorization" in gateway.fake.seen[0].headers
    assert gateway.fake.seen[0].headers["Authorization"] == f"Bearer {API_KEY}"


async def test_stream_headers_and_usage_only_when_asked(gateway: Gateway) -> None:
    gateway.fake.queue(answer("Hi", prompt=5, completion=1))
    resp = await gateway.client.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": USER, "stream": True},
        headers={"X-Request-ID": "req-7"},
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache, no-transform"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Request-ID"] == "req-7"
    assert "X-Stream-ID" not in resp.headers
    wire = await resp.read()
    assert b"id:" not in wire
    assert b"usage" not in wire
    assert wire.endswith(b'"finish_reason":"stop"}]}\n\n' + DONE)
    # the gateway asked for usage anyway, and counted it
    assert gateway.fake.seen[0].body["stream_options"] == {"include_usage": True}
    await gateway.settled()
    assert gateway.sample("ai_stream_prompt_tokens_total", model="test-model") == 5
    assert gateway.sample("ai_stream_completion_tokens_total", model="test-model") == 1
    assert gateway.outcomes("openai_chat_stream") == {"completed": 1}


# --- the SDK ---------------------------------------------------------------------------------


async def test_async_sdk_stream(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    gateway.fake.queue(answer("Hello", " world", prompt=4, completion=2))
    stream = await sdk.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


async def test_unread_fields_pass_through_and_back(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    """Tools, tool choice, seed, logprobs and the rest reach the upstream as sent; tool-call
    deltas (with their index), logprobs and system_fingerprint come back chunk for chunk."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    call = {"index": 0, "id": "call_1", "type": "function"}
    logprobs = {"content": [{"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": []}]}
    gateway.fake.queue(
        [
            Chunk({"system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}),  # noqa: E501
            Chunk({"system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": {"tool_calls": [{**call, "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]}),  # noqa: E501
            Chunk({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}, "finish_reason": None}]}),  # noqa: E501
            Chunk({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "logprobs": logprobs, "finish_reason": None}]}),  # noqa: E501
            Finish("tool_calls"),
            Usage(11, 3),
            Done(),
        ]
    )  # fmt: skip
    extra = {
        "tools": [tool],
        "tool_choice": "auto",
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "text"},
        "user": "u1",
    }
    opened = sdk.chat.completions.stream(model="test-model", messages=USER, **extra)  # type: ignore[arg-type]
    async with opened as stream:
        chunks = [e.chunk async for e in stream if e.type == "chunk"]
        final = await stream.get_final_completion()
    sent = gateway.fake.seen[0].body
    for name, value in extra.items():
        assert sent[name] == value
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.system_fingerprint for c in chunks[:2]] == ["fp_1", "fp_1"]
    choice = chunks[3].choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.model_dump(exclude_unset=True) == logprobs
    assert message.tool_calls is not None
    assert message.tool_calls[0].id == "call_1"
    assert message.tool_calls[0].function.name == "get_weather"
    assert message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    await gateway.settled()
    # tool-call argument chunks count as relayed tokens; the upstream's usage is the total
    assert gateway.sample("ai_stream_completion_tokens_total", model="test-model") == 3


async def test_refusal_streams_through(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    gateway.fake.queue(
        [
            Chunk({"choices": [{"index": 0, "delta": {"refusal": "I can't"}, "finish_reason": None}]}),  # noqa: E501
            Chunk({"choices": [{"index": 0, "delta": {"refusal": " help."}, "finish_reason": None}]}),  # noqa: E501
            Finish("stop"),
            Done(),
        ]
    )  # fmt: skip
    stream = await sdk.chat.completions.create(model="test-model", messages=USER, stream=True)
    refusal = "".join([c.choices[0].delta.refusal or "" async for c in stream if c.choices])
    assert refusal == "I can't help."


async def test_non_stream_returns_the_upstreams_json_as_given(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    body = {
        "id": "chatcmpl-whole",
        "object": "chat.completion",
        "created": 1,
        "model": "test-model",
        "system_fingerprint": "fp_9",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
        "vendor_extension": {"kept": True},
    }
    gateway.fake.queue([Whole(body)])
    raw = await sdk.chat.completions.with_raw_response.create(
        model="test-model", messages=USER, temperature=0.3
    )
    assert raw.http_response.status_code == 200
    assert orjson.loads(raw.http_response.content) == body
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello there"
    sent = gateway.fake.seen[0].body
    assert sent.get("stream") is None
    assert "stream_options" not in sent
    assert sent["temperature"] == 0.3
    assert sent["max_completion_tokens"] == gateway.settings.default_max_tokens
    await gateway.settled()
    assert gateway.outcomes("openai_chat") == {"completed": 1}
    assert gateway.sample("ai_stream_prompt_tokens_total", model="test-model") == 12
    assert gateway.sample("ai_stream_completion_tokens_total", model="test-model") == 2


async def test_sync_sdk_stream_and_whole(gateway: Gateway) -> None:
    gateway.fake.queue(answer("Hel", "lo"), answer("Whole", prompt=3, completion=1))

    def call() -> tuple[str, str | None]:
        with openai.OpenAI(base_url=base_url(gateway), api_key="x", max_retries=0) as client:
            stream = client.chat.completions.create(model="test-model", messages=USER, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            whole = client.chat.completions.create(model="test-model", messages=USER)
            return text, whole.choices[0].message.content

    async with asyncio.timeout(WAIT):
        assert await asyncio.to_thread(call) == ("Hello", "Whole")


async def test_models_lists_the_allowed_models(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(allowed_models=("zeta", "alpha"))
    client = async_sdk(gateway)
    try:
        listed = [m.id async for m in client.models.list()]
    finally:
        await client.close()
    assert listed == ["test-model", "alpha", "zeta"]


# --- errors ----------------------------------------------------------------------------------


async def test_errors_are_openai_shaped_and_map_to_sdk_exceptions(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(api_keys=(API_KEY,), upstream_max_retries=0)
    client = async_sdk(gateway, api_key=API_KEY)
    try:
        with pytest.raises(openai.BadRequestError) as bad_model:
            await client.chat.completions.create(model="gpt-nope", messages=USER)
        assert bad_model.value.code == "model_not_found"
        assert bad_model.value.param == "model"
        assert bad_model.value.type == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as two:
            await client.chat.completions.create(model="test-model", messages=USER, n=2)
        assert two.value.param == "n"
        async with async_sdk(gateway, api_key="wrong") as stranger:
            with pytest.raises(openai.AuthenticationError) as auth:
                await stranger.chat.completions.create(model="test-model", messages=USER)
            with pytest.raises(openai.AuthenticationError):
                await stranger.models.list()
        assert auth.value.type == "authentication_error"
        assert not gateway.fake.seen
        with pytest.raises(openai.NotFoundError):
            await client.get("/nowhere", cast_to=object)
        gateway.fake.queue([Status(500)])
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="test-model", messages=USER, stream=True)
        assert failed.value.status_code == 502
        assert "sk-live" not in failed.value.message
        gateway.fake.queue([Status(400)])  # a field the upstream refused
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="test-model", messages=USER, stream=True)
    finally:
        await client.close()


async def test_rate_limit_and_overload_statuses(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(rate_limit_rpm=1, max_streams=1)
    client = async_sdk(gateway)
    gate = asyncio.Event()
    gateway.fake.queue([Gate(gate), *answer("a")])
    try:
        first = asyncio.create_task(
            client.chat.completions.create(model="test-model", messages=USER)
        )
        async with asyncio.timeout(WAIT):
            await gateway.fake.arrived.wait()
        with pytest.raises(openai.InternalServerError) as full:
            await client.chat.completions.create(model="test-model", messages=USER)
        assert full.value.status_code == 503
        assert full.value.response.headers["Retry-After"] == "1"
        gate.set()
        assert (await first).choices[0].message.content == "a"
        await gateway.settled()
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="test-model", messages=USER)
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        assert limited.value.type == "rate_limit_error"
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"model":"test-model","messages":[{"role":"user","content":"x"}],"n":"2"}', 400),
        (b'{"model":"test-model","messages":[{"role":"user","content":"x"}],"stream":"yes"}', 400),
        (b'{"model":"test-model","messages":[]}', 400),
        (b'{"model":"test-model","messages":[{"role":"user","content":"x"}],"max_tokens":0}', 400),
        (b'{"model":"test-model","messages":"x"}', 400),
        (b"[]", 400),
        (b'{"model":"test-model","messages":[{"role":"user","content":"' + b"x" * (5 << 20) + b'"}]}', 413),  # noqa: E501
    ],
    ids=["malformed", "n-type", "stream-type", "no-messages", "max-tokens", "messages-type", "array", "5mb"],  # noqa: E501
)  # fmt: skip
async def test_bad_input_gets_an_openai_shaped_4xx(
    gateway: Gateway, body: bytes, status: int
) -> None:
    resp = await gateway.client.post(
        "/v1/chat/completions", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    )
    assert resp.status == status
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert not gateway.fake.seen


# --- stream behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["before-answer", "while-silent", "while-streaming"])
async def test_disconnect_cancels_the_upstream_at_once_whatever_the_grace(
    make_gateway: MakeGateway, window: str
) -> None:
    """No resume on these routes: a large RESUME_GRACE_S changes nothing."""
    gateway = await make_gateway(resume_grace_s=60.0)
    gateway.fake.queue(window_script(window))
    client = async_sdk(gateway)
    try:
        if window == "before-answer":
            call = asyncio.create_task(
                client.chat.completions.create(model="test-model", messages=USER, stream=True)
            )
            async with asyncio.timeout(WAIT):
                await gateway.fake.arrived.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        else:
            stream = await client.chat.completions.create(
                model="test-model", messages=USER, stream=True
            )
            async with asyncio.timeout(WAIT):
                await anext(aiter(stream))
            await stream.close()
        await ended_within(gateway)
    finally:
        await client.close()
    assert gateway.fake.seen[0].cancelled
    await gateway.settled()
    assert gateway.outcomes("openai_chat_stream") == {"client_disconnect": 1}


async def test_disconnect_cancels_a_non_stream_call(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(resume_grace_s=60.0)
    gateway.fake.queue([Gate(NEVER())])
    client = async_sdk(gateway)
    try:
        call = asyncio.create_task(
            client.chat.completions.create(model="test-model", messages=USER)
        )
        async with asyncio.timeout(WAIT):
            await gateway.fake.arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await ended_within(gateway)
    finally:
        await client.close()
    await gateway.settled()
    assert gateway.outcomes("openai_chat") == {"client_disconnect": 1}


async def test_heartbeats_are_comment_blocks_the_sdk_skips(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(heartbeat_interval_s=0.05)
    gate = asyncio.Event()
    gateway.fake.queue([Text("a"), Gate(gate), *answer("b")])
    resp = await gateway.client.post(
        "/v1/chat/completions", json={"model": "test-model", "messages": USER, "stream": True}
    )
    seen = b""
    async with asyncio.timeout(WAIT):
        while seen.count(b": ping\n\n") < 2:
            seen += await resp.content.readany()
    gate.set()
    async with asyncio.timeout(WAIT):
        wire = seen + await resp.read()
    assert b": ping\n\n" in wire
    assert wire.endswith(DONE)
    texts = [c["choices"][0]["delta"].get("content") for c in chunks_of(wire)[:-1] if c["choices"]]
    assert "".join(t or "" for t in texts) == "ab"


@pytest.mark.parametrize(
    ("settings", "before", "reason"),
    [
        ({"idle_timeout_s": 0.2}, [Text("a")], "idle_timeout"),
        ({"max_stream_s": 0.3, "idle_timeout_s": 30}, [Repeat("a", 0.01)], "total_timeout"),
        ({"idle_timeout_s": 0.2}, [Text("a"), Finish("stop")], "idle_timeout"),
        (
            {"first_token_timeout_s": 0.2},
            [Raw(b": answered, says nothing\n\n")],
            "first_token_timeout",
        ),
    ],
    ids=["idle", "total", "after-finish", "first-token-after-headers"],
)
async def test_a_stream_cut_short_ends_with_an_error_chunk_never_success(
    make_gateway: MakeGateway, settings: dict[str, float], before: list[Any], reason: str
) -> None:
    """No `[DONE]` and no finish reason that claims success: the SDK raises."""
    gateway = await make_gateway(**settings)
    gateway.fake.queue([*before, Gate(NEVER())])
    status, wire = await raw_stream(gateway, {"stream": True})
    assert status == 200
    chunks = chunks_of(wire)
    assert DONE not in wire
    assert chunks[-1] == {
        "error": {
            "message": chunks[-1]["error"]["message"],
            "type": "server_error",
            "param": None,
            "code": "timeout",
        }
    }
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    await gateway.settled()
    assert gateway.outcomes("openai_chat_stream") == {reason: 1}
    gateway.fake.queue([*before, Gate(NEVER())])
    client = async_sdk(gateway)
    try:
        stream = await client.chat.completions.create(
            model="test-model", messages=USER, stream=True
        )
        async with asyncio.timeout(WAIT):
            with pytest.raises(openai.APIError) as raised:
                [c async for c in stream]
        assert raised.value.code == "timeout"
    finally:
        await client.close()


async def test_first_token_timeout_before_the_upstream_answers_is_a_status(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(first_token_timeout_s=0.2)
    gateway.fake.queue([Gate(NEVER())])
    status, body = await raw_stream(gateway, {"stream": True})
    assert status == 504
    assert orjson.loads(body)["error"]["code"] == "timeout"
    await ended_within(gateway)


async def test_token_budget_cut_mid_stream(
    make_gateway: MakeGateway, limit_store: str | None
) -> None:
    gateway = await make_gateway(
        rate_limit_tpm=60, rate_limit_charge_interval_s=0.0, redis_url=limit_store
    )
    gateway.fake.queue([Repeat("tok", 0.002)])
    status, wire = await raw_stream(gateway, {"stream": True, "max_tokens": 50})
    assert status == 200
    chunks = chunks_of(wire)
    assert DONE not in wire
    assert chunks[-1]["error"]["code"] == "rate_limited"
    assert chunks[-1]["error"]["type"] == "rate_limit_error"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    await ended_within(gateway)
    await gateway.settled()
    assert gateway.outcomes("openai_chat_stream") == {"rate_limited": 1}


async def test_shutdown_ends_open_streams_with_an_error_chunk(gateway: Gateway) -> None:
    gateway.fake.queue([Text("a"), Gate(NEVER())])
    resp = await gateway.client.post(
        "/v1/chat/completions", json={"model": "test-model", "messages": USER, "stream": True}
    )
    async with asyncio.timeout(WAIT):
        first = await resp.content.readuntil(b"\n\n")
    assert b'"content":"a"' in first
    from service import keys

    await gateway.client.app[keys.LIVE].drain(0.0)
    async with asyncio.timeout(WAIT):
        rest = await resp.read()
    assert chunks_of(rest)[-1]["error"]["code"] == "server_shutdown"
    assert DONE not in rest
    await ended_within(gateway)


async def test_golden_bytes_of_a_stream_cut_short(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(idle_timeout_s=0.2)
    gateway.fake.queue([Text("Hello"), Gate(NEVER())])
    with capture_logs() as captured:
        status, wire = await raw_stream(gateway, {"stream": True})
        await gateway.settled()
    assert status == 200
    assert wire == (
        b'data: {"id":"chatcmpl-test","object":"chat.completion.chunk","created":0,'
        b'"model":"test-model","choices":[{"index":0,"delta":{"content":"Hello"},'
        b'"finish_reason":null}]}\n\n'
        b'data: {"error":{"message":"The model stopped sending text for too long.",'
        b'"type":"server_error","param":null,"code":"timeout"}}\n\n'
    )
    line = next(e for e in captured if e["event"] == "stream.finished")
    assert line["route"] == "openai_chat_stream"
    assert line["usage_estimated"] is True
    assert line["completion_tokens"] == 1


async def test_whole_answer_usage_is_exact_in_the_log(gateway: Gateway) -> None:
    gateway.fake.queue(answer("a", "b", prompt=21, completion=5))
    with capture_logs() as captured:
        resp = await gateway.client.post(
            "/v1/chat/completions", json={"model": "test-model", "messages": USER}
        )
        assert resp.status == 200
        await gateway.settled()
    line = next(e for e in captured if e["event"] == "stream.finished")
    assert (line["route"], line["usage_estimated"]) == ("openai_chat", False)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (21, 5)
    assert (await resp.json())["choices"][0]["message"]["content"] == "ab"


async def test_browsers_from_an_allowed_origin_may_call_the_surface(gateway: Gateway) -> None:
    origin = "http://localhost:3300"
    preflight = await gateway.client.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert preflight.status == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    models = await gateway.client.get("/v1/models", headers={"Origin": origin})
    assert models.headers["Access-Control-Allow-Origin"] == origin


async def test_an_upstream_error_inside_its_stream_becomes_the_gateways_own(
    gateway: Gateway,
) -> None:
    secret = b'data: {"error":{"message":"key sk-live-ABC123 is over quota","type":"x"}}\n\n'
    gateway.fake.queue([Text("a"), Raw(secret)])
    status, wire = await raw_stream(gateway, {"stream": True})
    assert status == 200
    assert b"sk-live" not in wire
    assert DONE not in wire
    assert chunks_of(wire)[-1]["error"]["code"] == "upstream_error"
    await gateway.settled()
    assert gateway.outcomes("openai_chat_stream") == {"upstream_error": 1}


async def test_a_whole_answer_without_done_still_ends_with_done(gateway: Gateway) -> None:
    """An upstream that ends after its finish reason without `[DONE]` answered whole."""
    gateway.fake.queue([Text("a"), Finish("length")])
    status, wire = await raw_stream(gateway, {"stream": True})
    assert status == 200
    assert wire.endswith(b'"finish_reason":"length"}]}\n\n' + DONE)
