"""Azure OpenAI end to end: the gateway's real SDK Azure client (`AsyncAzureOpenAI`) against an
Azure-shaped server (`fake_azure`), on the native routes and the OpenAI-compatible one (read by
the official SDK), configured by the single-upstream `AZURE_OPENAI_*` settings or as one of
`UPSTREAMS`, with failover from an OpenAI-shaped server to it and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import API_KEY, Gateway, MakeGateway
from tests.fake_azure import API_VERSION, AZURE_KEY, AZURE_MODEL, AzureUpstream, running_azure
from tests.fake_upstream import FakeUpstream, Finish, Status, Text, Usage, answer
from tests.test_failover import azure_server, openai_server

CHAT_STREAM = "/api/v1/ai/chat/stream"


@pytest.fixture
async def azure() -> AsyncIterator[AzureUpstream]:
    async with running_azure() as fake:
        yield fake


async def events_of(gateway: Gateway, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = await gateway.client.post(path, json=body)
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    return [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]


def sdk(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(gateway.client.make_url("/v1")), api_key="unused", max_retries=0
    )


async def single_azure(make_gateway: MakeGateway, azure: AzureUpstream) -> Gateway:
    """The single-upstream settings: AZURE_OPENAI_ENDPOINT, its key and OPENAI_API_VERSION."""
    return await make_gateway(
        openai_base_url=None,
        openai_api_key=None,
        azure_endpoint=azure.endpoint,
        azure_api_key=AZURE_KEY,
        openai_api_version=API_VERSION,
    )


async def test_generate_on_azure_names_the_model_that_answered(
    make_gateway: MakeGateway, azure: AzureUpstream
) -> None:
    gateway = await single_azure(make_gateway, azure)
    azure.queue(answer("Hello", " Azure", prompt=5))
    events = await events_of(gateway, "/api/ai/generate-stream", {"prompt": "x"})
    done = events[-1]
    assert [e["type"] for e in events][:: len(events) - 1] == ["start", "done"]
    assert {e["type"] for e in events[1:-1]} == {"content"}  # deltas of one read may share one
    assert (done["content"], done["model"], done["finishReason"]) == (
        "Hello Azure",
        AZURE_MODEL,  # not the empty model of Azure's first chunk
        "stop",
    )
    assert azure.deployments == ["test-model"]  # the deployment is in the path
    headers = azure.seen[0].headers
    assert headers["api-key"] == AZURE_KEY
    assert API_KEY not in str(headers)


async def test_an_azure_content_filter_finish_is_told_as_the_upstreams_word(
    make_gateway: MakeGateway, azure: AzureUpstream
) -> None:
    gateway = await single_azure(make_gateway, azure)
    azure.queue([Text("Part"), Finish("content_filter"), Usage(5, 1)])
    done = (await events_of(gateway, "/api/ai/generate-stream", {"prompt": "x"}))[-1]
    assert (done["type"], done["content"], done["finishReason"]) == (
        "done",
        "Part",
        "content_filter",
    )


async def test_a_wrong_api_version_is_refused_by_azure_and_not_retried(
    make_gateway: MakeGateway, azure: AzureUpstream
) -> None:
    gateway = await make_gateway(
        openai_base_url=None,
        azure_endpoint=azure.endpoint,
        azure_api_key=AZURE_KEY,
        openai_api_version="1999-01-01",
    )
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert resp.status == 502
    assert azure.deployments == []
    assert gateway.sample("ai_stream_upstream_errors_total", kind="rejected") == 1


async def test_failover_from_openai_to_azure_and_back_on_generate_and_chat(
    make_gateway: MakeGateway, fake: FakeUpstream, azure: AzureUpstream
) -> None:
    servers = (openai_server("openai", fake.url), azure_server("azure", azure, "dep-1"))
    gateway = await make_gateway(upstreams=servers)
    fake.queue([Status(500)])
    azure.queue(answer("from", " azure"))
    done = (await events_of(gateway, "/api/ai/generate-stream", {"prompt": "x"}))[-1]
    assert (done["content"], done["model"]) == ("from azure", AZURE_MODEL)
    assert azure.deployments == ["dep-1"]
    fake.queue(answer("from", " openai"))
    done = (await events_of(gateway, "/api/ai/generate-stream", {"prompt": "x"}))[-1]
    assert (done["content"], done["model"]) == ("from openai", "test-model")

    fake.queue([Status(503)])
    azure.queue(answer("chat", " on", " azure"))
    events = await events_of(gateway, CHAT_STREAM, {"message": "Hi"})
    assert events[0]["type"] == "metadata"
    assert "".join(e["content"] for e in events if e["type"] == "token") == "chat on azure"
    assert (events[-1]["type"], events[-1]["finishReason"]) == ("done", "stop")
    s = gateway.sample
    assert s("ai_stream_upstream_attempts_total", upstream="azure", result="ok") == 2
    assert s("ai_stream_upstream_attempts_total", upstream="openai", result="ok") == 1
    assert s("ai_stream_upstream_attempts_total", upstream="openai", result="server") == 2


async def test_failover_from_azure_to_openai(
    make_gateway: MakeGateway, fake: FakeUpstream, azure: AzureUpstream
) -> None:
    servers = (azure_server("azure", azure, "dep-1"), openai_server("openai", fake.url))
    gateway = await make_gateway(upstreams=servers)
    azure.queue([Status(429, {"retry-after": "20"})])
    fake.queue(answer("from", " openai"))
    done = (await events_of(gateway, "/api/ai/generate-stream", {"prompt": "x"}))[-1]
    assert (done["content"], done["model"]) == ("from openai", "test-model")
    assert (azure.deployments, len(fake.seen)) == (["dep-1"], 1)


@pytest.mark.parametrize("azure_first", [False, True], ids=["openai-to-azure", "azure-to-openai"])
async def test_the_openai_route_fails_over_both_ways_read_by_the_sdk(
    make_gateway: MakeGateway, fake: FakeUpstream, azure: AzureUpstream, azure_first: bool
) -> None:
    servers = (openai_server("openai", fake.url), azure_server("azure", azure, "dep-1"))
    gateway = await make_gateway(upstreams=servers[::-1] if azure_first else servers)
    failing, answering = (azure, fake) if azure_first else (fake, azure)
    failing.queue([Status(500)])
    answering.queue(answer("Hello", " there"))
    client = sdk(gateway)
    try:
        stream = await client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None
    answered = {c.model for c in chunks} - {""}
    assert answered == {"test-model" if azure_first else AZURE_MODEL}
    if not azure_first:  # Azure's own chunks come through as it sent them
        assert chunks[0].choices == []
        assert chunks[0].model_extra is not None
        assert "prompt_filter_results" in chunks[0].model_extra


async def test_the_openai_route_answers_a_non_stream_call_from_azure(
    make_gateway: MakeGateway, azure: AzureUpstream
) -> None:
    gateway = await single_azure(make_gateway, azure)
    azure.queue(answer("Whole", " answer", prompt=4))
    client = sdk(gateway)
    try:
        completion = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "Hi"}]
        )
    finally:
        await client.close()
    assert completion.choices[0].message.content == "Whole answer"
    assert completion.model == AZURE_MODEL
    assert azure.deployments == ["test-model"]
