"""The official `openai` npm package under Node, unmodified, against the live gateway's
OpenAI-compatible surface (a real `python -m service api` process with `API_KEYS` on, in front of
the fake upstream).

The client is `tests/clients/openai_sdk.mjs`, installed and pinned by
`tests/clients/package-lock.json`
(`npm ci`, by the `node` fixture of `tests/test_sse_clients.py`). Each call is one run of it: a
streamed `chat.completions.create` read with `for await`, a whole one, `models.list()`; tool-call
deltas arrive as the upstream sent them; statuses arrive as the SDK's `APIError` subclasses; and a
stream cut by the token budget surfaces as an `APIError`, never as a normal end of the iteration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_sse_clients
from tests.conftest import API_KEY
from tests.fake_upstream import Chunk, FakeUpstream, Finish, Repeat, Usage, answer
from tests.process import ServiceProcess, service

CLIENTS_DIR = Path(__file__).parent / "clients"
CLIENT_KEY = "client-key-node"
RUN_S = 30.0  # a generous bound on one Node run (start-up included)
USER = [{"role": "user", "content": "hi"}]

node = test_sse_clients.node  # the fixture: Node with tests/clients installed by `npm ci`


def env_for(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "ALLOWED_MODELS": "test-model,other-model",
        "API_KEYS": CLIENT_KEY,
        "UPSTREAM_MAX_RETRIES": "0",
        **extra,
    }


@pytest.fixture
async def live(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    async with service(env_for(fake), tmp_path) as svc:
        yield svc


async def sdk(node: str, svc: ServiceProcess, call: str, **job: Any) -> dict[str, Any]:
    """One run of the Node client; the fake upstream keeps serving while it runs."""
    job = {
        "baseURL": f"{svc.url}/v1",
        "apiKey": CLIENT_KEY,
        "call": call,
        "timeoutMs": int(RUN_S * 1000),
        **job,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        str(CLIENTS_DIR / "openai_sdk.mjs"),
        json.dumps(job),
        cwd=CLIENTS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(RUN_S + 10):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    report["stderr"] = err.decode()
    return report


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_streamed_and_whole_answers_and_the_models_list(
    node: str, live: ServiceProcess, fake: FakeUpstream
) -> None:
    fake.queue(answer("Hello", " from", " Node"), answer("Whole", " answer"))
    body = {"model": "test-model", "messages": USER}
    streamed = await sdk(node, live, "stream", body=body)
    assert streamed["error"] is None, streamed
    assert streamed["ended"] is True
    assert text_of(streamed["chunks"]) == "Hello from Node"
    assert streamed["chunks"][-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in streamed["chunks"])

    whole = await sdk(node, live, "create", body=body)
    assert whole["error"] is None, whole
    assert whole["result"]["choices"][0]["message"]["content"] == "Whole answer"
    assert whole["result"]["choices"][0]["finish_reason"] == "stop"

    models = await sdk(node, live, "models")
    assert models["error"] is None, models
    assert sorted(m["id"] for m in models["result"]) == ["other-model", "test-model"]
    assert all(m["object"] == "model" for m in models["result"])
    # the client's key went to the gateway; the upstream saw only the gateway's own
    assert [s.headers["Authorization"] for s in fake.seen] == [f"Bearer {API_KEY}"] * 2


async def test_tool_call_deltas_pass_through(
    node: str, live: ServiceProcess, fake: FakeUpstream
) -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    first = {**call, "function": {"name": "get_weather", "arguments": ""}}
    fake.queue(
        [
            Chunk({"choices": [{"index": 0, "delta": {"tool_calls": [first]}}]}),
            Chunk(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]
                            },
                        }
                    ]
                }
            ),
            Chunk(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]
                            },
                        }
                    ]
                }
            ),
            Finish("tool_calls"),
            Usage(7, 3),
        ]
    )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    body = {"model": "test-model", "messages": USER, "tools": [tool], "tool_choice": "auto"}
    got = await sdk(node, live, "stream", body=body)
    assert got["error"] is None, got
    assert got["ended"] is True
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in got["chunks"][:3]]
    assert calls[0] == first
    assert [c["function"]["arguments"] for c in calls] == ["", '{"city":', '"Paris"}']
    assert got["chunks"][3]["choices"][0]["finish_reason"] == "tool_calls"
    assert fake.seen[0].body["tools"] == [tool]
    assert fake.seen[0].body["tool_choice"] == "auto"


async def test_statuses_are_the_sdk_error_classes(
    node: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    async with service(env_for(fake, RATE_LIMIT_RPM="1"), tmp_path) as svc:
        unknown = await sdk(node, svc, "create", body={"model": "nope", "messages": USER})
        wrong_key = await sdk(
            node, svc, "create", apiKey="wrong", body={"model": "test-model", "messages": USER}
        )
        ok = await sdk(node, svc, "stream", body={"model": "test-model", "messages": USER})
        limited = await sdk(node, svc, "stream", body={"model": "test-model", "messages": USER})
    assert ok["error"] is None, ok
    for got, status, cls in [
        (unknown, 400, "BadRequestError"),
        (wrong_key, 401, "AuthenticationError"),
        (limited, 429, "RateLimitError"),
    ]:
        assert got["error"] is not None, got
        assert got["error"]["isAPIError"] is True, got
        assert got["error"]["classes"][:2] == [cls, "APIError"], got
        assert got["error"]["status"] == status, got
        assert got["ended"] is False
    assert limited["error"]["type"] == "rate_limit_error"


async def test_a_stream_cut_by_the_token_budget_is_an_error_not_an_end(
    node: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    limits = {"RATE_LIMIT_TPM": "60", "RATE_LIMIT_CHARGE_INTERVAL_S": "0.01"}
    fake.queue([Repeat("tok", 0.002)])
    async with service(env_for(fake, **limits), tmp_path) as svc:
        body = {"model": "test-model", "messages": USER, "max_tokens": 50}
        got = await sdk(node, svc, "stream", body=body)
    assert got["ended"] is False, got
    assert got["error"] is not None, got
    assert got["error"]["isAPIError"] is True
    assert "APIError" in got["error"]["classes"], got
    assert got["error"]["code"] == "rate_limited"
    assert got["error"]["type"] == "rate_limit_error"
    # what came before the cut came through, and none of it claimed a finish
    assert got["chunks"], got
    assert text_of(got["chunks"]) == "tok" * len(got["chunks"])
    assert all(c["choices"][0]["finish_reason"] is None for c in got["chunks"])
