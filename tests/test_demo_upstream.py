"""The bundled demo upstream speaks the OpenAI API well enough for the SDK's own parser."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam

from service.demo_upstream import DemoUpstream, start


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    runner, url = await start("127.0.0.1", 0, DemoUpstream(tokens_per_s=0, length=200))
    sdk = openai.AsyncOpenAI(api_key="demo", base_url=url, max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()
        await runner.cleanup()


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo-writer-1"]


async def test_streamed_and_whole_answers_agree(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write about sourdough bread"}
    ]
    whole = await client.chat.completions.create(
        model="demo-writer-1",
        messages=messages,
        max_completion_tokens=40,
    )
    text = whole.choices[0].message.content or ""
    assert text.startswith("# Sourdough bread\n\n## Why it matters")
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 40

    stream = await client.chat.completions.create(
        model="demo-writer-1",
        messages=messages,
        max_completion_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert finish == "length"
    assert usage is not None
    assert usage.completion_tokens == 40


async def test_a_whole_article_ends_with_stop_and_places_images(client: openai.AsyncOpenAI) -> None:
    content: list[ChatCompletionContentPartParam] = [
        {"type": "text", "text": "Write about owls"},
        {"type": "image_url", "image_url": {"url": "https://example.test/owl.png"}},
    ]
    whole = await client.chat.completions.create(
        model="demo-writer-1",
        messages=[{"role": "user", "content": content}],
        max_completion_tokens=1000,
    )
    text = whole.choices[0].message.content or ""
    assert whole.choices[0].finish_reason == "stop"
    assert "[[image:1]]" in text
    assert "[[image: a picture of owls]]" in text
    assert text.index("[[image:1]]") < text.index("[[image: a picture of owls]]")
