"""LangChain's `ChatOpenAI` (the `langchain-openai` package, built on the official `openai` SDK)
against the live gateway's OpenAI-compatible surface, configured as its users configure it for an
OpenAI-compatible server: `base_url` the gateway's `/v1`, `api_key` the gateway's client key.

A real `python -m service api` process with `API_KEYS` on, in front of the fake upstream. The
client reads a stream (`astream`, with `stream_usage` so the usage chunk is asked for and comes
back) and a whole answer (`ainvoke`); a wrong key surfaces as the SDK's `AuthenticationError`.
The async calls keep the fake upstream, which runs on the test's event loop, serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.conftest import API_KEY, WAIT
from tests.fake_upstream import FakeUpstream, answer
from tests.process import ServiceProcess, service

CLIENT_KEY = "client-key-langchain"


@pytest.fixture
async def live(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "API_KEYS": CLIENT_KEY,
        "UPSTREAM_MAX_RETRIES": "0",
    }
    async with service(env, tmp_path) as svc:
        yield svc


def chat(svc: ServiceProcess, key: str = CLIENT_KEY) -> ChatOpenAI:
    return ChatOpenAI(
        model="test-model",
        base_url=f"{svc.url}/v1",
        api_key=SecretStr(key),
        max_retries=0,
        timeout=WAIT,
        stream_usage=True,
    )


async def test_chatopenai_streams_an_answer_with_its_usage(
    live: ServiceProcess, fake: FakeUpstream
) -> None:
    fake.queue(answer("Hello", " from", " LangChain", prompt=5, completion=3))
    chunks: list[AIMessageChunk] = []
    async for piece in chat(live).astream("hi"):
        chunks.append(piece)
        assert len(chunks) < 100  # bounded: the answer has a handful of chunks
    texts = [c.content for c in chunks if c.content]
    assert texts == ["Hello", " from", " LangChain"]
    whole = chunks[0]
    for piece in chunks[1:]:
        whole += piece
    assert whole.content == "Hello from LangChain"
    assert whole.response_metadata.get("finish_reason") == "stop"
    assert whole.usage_metadata is not None
    assert (whole.usage_metadata["input_tokens"], whole.usage_metadata["output_tokens"]) == (5, 3)
    sent = fake.seen[0]
    assert sent.body["stream"] is True
    assert sent.body["messages"] == [{"role": "user", "content": "hi"}]
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"  # the gateway's key upstream


async def test_chatopenai_reads_a_whole_answer(live: ServiceProcess, fake: FakeUpstream) -> None:
    fake.queue(answer("Whole", " answer", prompt=4, completion=2))
    message = await chat(live).ainvoke("hi")
    assert isinstance(message, AIMessage)
    assert message.content == "Whole answer"
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.usage_metadata is not None
    assert message.usage_metadata["total_tokens"] == 6
    assert fake.seen[0].body.get("stream") in (None, False)


async def test_chatopenai_with_a_wrong_key_gets_the_sdk_error(
    live: ServiceProcess, fake: FakeUpstream
) -> None:
    with pytest.raises(openai.AuthenticationError) as denied:
        await chat(live, key="wrong").ainvoke("hi")
    assert denied.value.status_code == 401
    assert fake.seen == []  # refused at the gateway
