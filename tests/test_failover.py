"""Failover across model servers (`UPSTREAMS`), through the real SDK against real local servers:
one that refuses connections, answers 500 or 429, or accepts and says nothing; an Azure-shaped
one; and the retry rules reproduced from the SDK, pinned against the SDK's own code."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
import pytest
from openai._models import FinalRequestOptions

from service import keys
from service.failover import FailoverUpstream, retry_after, retry_delay, should_retry
from service.parsers import UpstreamServer
from service.upstream import translate
from tests.conftest import API_KEY, WAIT, Gateway, MakeGateway
from tests.fake_azure import API_VERSION, AZURE_KEY, AZURE_MODEL, AzureUpstream, running_azure
from tests.fake_upstream import Drop, FakeUpstream, Gate, Raw, Sleep, Status, Text, answer, running
from tests.process import ROOT, clean_env, service

CHAT_STREAM = "/api/v1/ai/chat/stream"


def refused_url() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def openai_server(name: str, url: str, **models: str) -> UpstreamServer:
    return UpstreamServer(name=name, base_url=url, api_key=API_KEY, models=tuple(models.items()))


def azure_server(name: str, fake: AzureUpstream, deployment: str) -> UpstreamServer:
    return UpstreamServer(
        name=name,
        azure_endpoint=fake.endpoint,
        api_version=API_VERSION,
        api_key=AZURE_KEY,
        models=(("test-model", deployment),),
    )


@pytest.fixture
async def second() -> AsyncIterator[FakeUpstream]:
    async with running() as fake:
        yield fake


@pytest.fixture
async def azure() -> AsyncIterator[AzureUpstream]:
    async with running_azure() as fake:
        yield fake


def attempts(gateway: Gateway, upstream: str, result: str) -> float:
    return gateway.sample("ai_stream_upstream_attempts_total", upstream=upstream, result=result)


async def two(
    make_gateway: MakeGateway, first_url: str, second: FakeUpstream, **kw: Any
) -> Gateway:
    servers = (openai_server("a", first_url), openai_server("b", second.url))
    return await make_gateway(upstreams=servers, **kw)


async def done_of(gateway: Gateway, path: str = "/api/ai/generate-stream") -> dict[str, Any]:
    resp = await gateway.client.post(path, json={"prompt": "x", "message": "x"})
    assert resp.status == 200
    body = await resp.read()
    events = [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "done", events
    return dict(events[-1])


@pytest.mark.parametrize(
    "step",
    [Status(500), Status(429, {"retry-after": "30"}), Status(503, {"retry-after-ms": "20000"})],
    ids=["500", "429-retry-after", "503-retry-after-ms"],
)
async def test_a_failing_server_moves_on_to_the_next_at_once(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream, step: Status
) -> None:
    gateway = await two(make_gateway, fake.url, second, first_token_timeout_s=2.0)
    fake.queue([step])
    second.queue(answer("from", " b"))
    done = await done_of(gateway)  # a Retry-After is for the server that said it: b is not held
    assert (done["content"], done["model"]) == ("from b", "test-model")
    assert (len(fake.seen), len(second.seen)) == (1, 1)
    assert attempts(gateway, "a", "server" if step.status != 429 else "rate_limit") == 1
    assert attempts(gateway, "b", "ok") == 1
    assert gateway.sample("ai_stream_upstream_retries_total") == 1
    assert gateway.sample("ai_stream_upstream_errors_total", kind="server") == 0  # it answered


async def test_a_server_that_refuses_connections_moves_on(
    make_gateway: MakeGateway, second: FakeUpstream
) -> None:
    gateway = await two(make_gateway, refused_url(), second)
    second.queue(answer("b"))
    assert (await done_of(gateway))["content"] == "b"
    assert attempts(gateway, "a", "connection") == 1
    assert attempts(gateway, "b", "ok") == 1


@pytest.mark.parametrize("headers_out", [False, True], ids=["before-headers", "after-headers"])
async def test_a_server_that_accepts_and_says_nothing_is_left_at_its_first_byte_deadline(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream, headers_out: bool
) -> None:
    gateway = await two(
        make_gateway, fake.url, second, upstream_attempt_first_byte_s=0.3, first_token_timeout_s=3
    )
    silent = [Gate(asyncio.Event())]
    nothing = Raw(b": still here\n\n")  # the headers and a comment: no chunk, no text
    fake.queue([nothing, *silent] if headers_out else silent)
    second.queue(answer("b"))
    assert (await done_of(gateway))["content"] == "b"
    async with asyncio.timeout(WAIT):
        await fake.seen[0].ended.wait()  # the silent attempt was closed
    assert attempts(gateway, "a", "timeout") == 1


async def test_a_non_stream_call_is_not_bounded_by_the_first_byte_deadline(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream
) -> None:
    gateway = await two(make_gateway, fake.url, second, upstream_attempt_first_byte_s=0.1)
    fake.queue([Sleep(0.3), *answer("whole")])  # its whole answer comes after the deadline
    resp = await gateway.post(
        "/v1/chat/completions",
        {"model": "test-model", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "whole"
    assert second.seen == []


async def test_never_mid_stream_a_server_that_dies_after_its_first_byte_ends_the_stream(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream
) -> None:
    gateway = await two(make_gateway, fake.url, second)
    fake.queue([Text("partial"), Drop()])
    resp = await gateway.client.post("/api/ai/generate-stream", json={"prompt": "x"})
    body = await resp.read()
    events = [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert [e["type"] for e in events] == ["start", "content", "error"]
    assert (events[2]["code"], events[2]["reason"]) == ("upstream_error", "upstream_error")
    assert second.seen == []
    assert gateway.sample("ai_stream_upstream_retries_total") == 0
    assert attempts(gateway, "a", "ok") == 1


async def test_a_request_error_is_not_failed_over(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream
) -> None:
    gateway = await two(make_gateway, fake.url, second)
    fake.queue([Status(400)])
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert resp.status == 502
    assert second.seen == []
    assert attempts(gateway, "a", "rejected") == 1


async def test_a_server_is_skipped_after_the_threshold_for_the_cooldown_then_tried_again(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream
) -> None:
    gateway = await two(
        make_gateway, fake.url, second, upstream_failure_threshold=2, upstream_cooldown_s=30
    )
    upstream = gateway.client.app[keys.UPSTREAM]
    assert isinstance(upstream, FailoverUpstream)
    now = [1000.0]
    upstream.clock = lambda: now[0]
    fake.queue([Status(500)], [Status(500)])
    for _ in range(2):
        assert (await done_of(gateway))["content"] == "Hello world"
    assert (len(fake.seen), len(second.seen)) == (2, 2)
    assert (await done_of(gateway))["content"] == "Hello world"  # a is cooling: b only
    assert (len(fake.seen), len(second.seen)) == (2, 3)
    now[0] += 30  # the cooldown is over: a is tried again, and answers
    fake.queue(answer("a again"))
    assert (await done_of(gateway))["content"] == "a again"
    assert (len(fake.seen), len(second.seen)) == (3, 3)
    assert attempts(gateway, "a", "server") == 2
    assert attempts(gateway, "a", "ok") == 1


async def test_every_server_cooling_down_are_all_tried_anyway(
    make_gateway: MakeGateway, fake: FakeUpstream
) -> None:
    gateway = await make_gateway(
        upstreams=(openai_server("a", fake.url),),
        upstream_failure_threshold=1,
        upstream_max_retries=0,
    )
    fake.queue([Status(500)])
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert resp.status == 502
    assert (await done_of(gateway))["content"] == "Hello world"  # a alone, cooling, still tried
    assert len(fake.seen) == 2


async def test_a_model_a_server_does_not_map_goes_to_one_that_does(
    make_gateway: MakeGateway, fake: FakeUpstream, second: FakeUpstream
) -> None:
    servers = (
        openai_server("a", fake.url, other="x"),
        openai_server("b", second.url, **{"test-model": "b-model"}),
    )
    gateway = await make_gateway(upstreams=servers)
    assert (await done_of(gateway))["model"] == "b-model"  # the model that answered
    assert (fake.seen, second.seen[0].body["model"]) == ([], "b-model")


async def test_a_retry_after_past_the_first_token_deadline_ends_at_once_naming_the_failure(
    make_gateway: MakeGateway, fake: FakeUpstream
) -> None:
    gateway = await make_gateway(first_token_timeout_s=2.0)  # UPSTREAMS unset: a list of one
    fake.queue([Status(429, {"retry-after": "5"})])
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert resp.status == 502
    assert len(fake.seen) == 1
    assert gateway.sample("ai_stream_upstream_errors_total", kind="rate_limit") == 1
    assert attempts(gateway, "default", "rate_limit") == 1


async def test_one_server_waits_out_a_short_retry_after_then_tries_again(
    make_gateway: MakeGateway, fake: FakeUpstream
) -> None:
    gateway = await make_gateway(first_token_timeout_s=3.0)
    fake.queue([Status(429, {"retry-after-ms": "50"})], answer("again"))
    assert (await done_of(gateway))["content"] == "again"
    assert len(fake.seen) == 2
    assert gateway.sample("ai_stream_upstream_retries_total") == 1


def sdk_delay(retries_taken: int, headers: dict[str, str], max_retries: int = 3) -> float:
    client = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1", max_retries=max_retries)
    options = FinalRequestOptions.construct(method="post", url="/x", max_retries=max_retries)
    remaining = max_retries - retries_taken
    return client._calculate_retry_timeout(remaining, options, httpx2.Headers(headers))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"retry-after": "3"},
        {"retry-after-ms": "250"},
        {"retry-after": "0"},
        {"retry-after": "121"},
        {"retry-after": "soon"},
        {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
    ],
)
@pytest.mark.parametrize("retries_taken", [0, 1, 2, 5])
def test_the_backoff_is_the_sdks(
    monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], retries_taken: int
) -> None:
    for fixed in (0.0, 0.5, 0.999):
        rand = constant(fixed)
        monkeypatch.setattr("openai._base_client.random", rand)
        ours = retry_delay(retries_taken, httpx2.Headers(headers), rand)
        assert ours == pytest.approx(sdk_delay(retries_taken, headers))
    assert retry_after(None) is None


def constant(value: float) -> Callable[[], float]:
    return lambda: value


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504])
@pytest.mark.parametrize(
    "headers",
    [{}, {"x-should-retry": "true"}, {"x-should-retry": "false"}, {"retry-after": "121"}],
)
def test_which_statuses_move_on_is_the_sdks(status: int, headers: dict[str, str]) -> None:
    client = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(status, headers=headers, request=request)
    err = translate(openai.APIStatusError("m", response=response, body=None))
    err.__cause__ = openai.APIStatusError("m", response=response, body=None)
    assert should_retry(err) is client._should_retry(response)


async def test_readiness_names_each_server_and_passes_while_one_answers(
    make_gateway: MakeGateway, azure: AzureUpstream
) -> None:
    servers = (openai_server("down", refused_url()), azure_server("azure", azure, "dep-1"))
    gateway = await make_gateway(upstreams=servers)
    resp = await gateway.client.get("/health/ready")
    body = await resp.json()
    assert resp.status == 200, body
    assert body["checks"]["upstream"] == "ok"
    assert body["upstreams"] == {
        "down": "The connection to the model server failed.",
        "azure": "ok",
    }


async def test_readiness_fails_when_no_server_answers(make_gateway: MakeGateway) -> None:
    servers = (openai_server("a", refused_url()), openai_server("b", refused_url()))
    gateway = await make_gateway(upstreams=servers)
    resp = await gateway.client.get("/health/ready")
    body = await resp.json()
    assert resp.status == 503
    assert body["upstreams"] == dict.fromkeys(("a", "b"), body["checks"]["upstream"])


def test_upstreams_beside_a_single_upstream_stops_start_up() -> None:
    servers = '[{"name": "a", "base_url": "http://127.0.0.1:9/v1"}]'
    env = clean_env({"UPSTREAMS": servers, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    done = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stdout == b""
    line = orjson.loads(done.stderr)
    assert line["event"] == "settings.invalid"
    assert line["problems"] == {
        "UPSTREAMS": "must not be set beside OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT "
        "(name every server in UPSTREAMS, or use the single-upstream variables)"
    }


async def test_the_process_reads_upstreams_and_fails_over_to_azure(
    tmp_path: Path, azure: AzureUpstream
) -> None:
    servers = [
        {"name": "down", "base_url": refused_url(), "api_key_env": "KEY_DOWN"},
        {
            "name": "azure",
            "azure_endpoint": azure.endpoint,
            "api_version": API_VERSION,
            "api_key_env": "KEY_AZURE",
            "models": {"test-model": "dep-1"},
        },
    ]
    env = {
        "UPSTREAMS": orjson.dumps(servers).decode(),
        "KEY_DOWN": API_KEY,
        "KEY_AZURE": AZURE_KEY,
        "OPENAI_MODEL": "test-model",
    }
    async with service(env, tmp_path) as svc, aiohttp.ClientSession() as session:
        resp = await session.post(f"{svc.url}/api/ai/generate-stream", json={"prompt": "x"})
        assert resp.status == 200
        body = await resp.read()
        ready = await session.get(f"{svc.url}/health/ready")
        readiness = await ready.json()
        metrics = await (await session.get(f"{svc.url}/metrics")).text()
    events = [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert (events[-1]["type"], events[-1]["model"]) == ("done", AZURE_MODEL)
    assert azure.deployments == ["dep-1"]
    assert azure.seen[0].headers["api-key"] == AZURE_KEY
    assert ready.status == 200
    assert readiness["upstreams"] == {
        "down": "The connection to the model server failed.",
        "azure": "ok",
    }
    assert 'ai_stream_upstream_attempts_total{result="connection",upstream="down"} 1.0' in metrics
    assert 'ai_stream_upstream_attempts_total{result="ok",upstream="azure"} 1.0' in metrics
