"""The OpenAI-compatible surface on the real process (`python -m service`, `run_app` with
handler cancellation), through the official SDK: SIGTERM drains its streams, and a client that
leaves cancels the upstream at once whatever `RESUME_GRACE_S` says."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import API_KEY, WAIT
from tests.fake_upstream import FakeUpstream, Gate, Text, answer
from tests.process import service

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def env_for(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "API_KEYS": "client-key-1",
        **extra,
    }


async def test_sigterm_drains_sdk_streams_then_ends_the_rest(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    finishing, never = asyncio.Event(), asyncio.Event()
    fake.queue([Text("a"), Gate(finishing), *answer("b")], [Text("x"), Gate(never)])
    async with service(env_for(fake, SHUTDOWN_DRAIN_S="1"), tmp_path) as svc:
        client = openai.AsyncOpenAI(base_url=f"{svc.url}/v1", api_key="client-key-1", max_retries=0)
        async with client:
            quick = await client.chat.completions.create(
                model="test-model", messages=USER, stream=True
            )
            slow = await client.chat.completions.create(
                model="test-model", messages=USER, stream=True
            )
            async with asyncio.timeout(WAIT):
                first_quick, first_slow = await anext(quick), await anext(slow)
            svc.signal(signal.SIGTERM)
            finishing.set()
            async with asyncio.timeout(WAIT):
                rest = [c async for c in quick]
                with pytest.raises(openai.APIError) as cut:
                    [c async for c in slow]
            assert await svc.wait(WAIT) == 0
    text = "".join(c.choices[0].delta.content or "" for c in [first_quick, *rest] if c.choices)
    assert text == "ab"
    assert first_slow.choices[0].delta.content == "x"
    assert cut.value.code == "server_shutdown"
    async with asyncio.timeout(1):
        await fake.seen[1].ended.wait()
    assert fake.seen[1].cancelled


async def test_a_client_leaving_cancels_the_upstream_at_once_despite_a_grace(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.queue([Text("a"), Gate(asyncio.Event())])
    async with service(env_for(fake, RESUME_GRACE_S="30"), tmp_path) as svc:
        client = openai.AsyncOpenAI(base_url=f"{svc.url}/v1", api_key="client-key-1", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="test-model", messages=USER, stream=True
            )
            async with asyncio.timeout(WAIT):
                await anext(stream)
            await stream.close()
            async with asyncio.timeout(1):
                await fake.seen[0].ended.wait()
            assert fake.seen[0].cancelled
            async with aiohttp.ClientSession() as session:
                metrics = (await (await session.get(f"{svc.url}/metrics")).text()).splitlines()
    assert (
        'ai_stream_outcomes_total{outcome="client_disconnect",route="openai_chat_stream"} 1.0'
        in metrics
    )
    # the upstream got the gateway's key, never the client's
    assert fake.seen[0].headers["Authorization"] == f"Bearer {API_KEY}"
