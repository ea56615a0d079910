"""Fixtures: a scripted upstream on a loopback port, and the gateway in front of it through the
real `openai` SDK, on aiohttp's test server (real sockets, handler cancellation on)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from service import keys
from service.app import create_app
from service.config import Settings
from service.errors import Outcome
from service.failover import FailoverUpstream
from tests.fake_upstream import FakeUpstream, running
from tests.process import free_port

API_KEY = "sk-test-SECRET-0123456789"
WAIT = 5.0  # every wait in the suite is bounded by this unless it says otherwise


def make_settings(**overrides: Any) -> Settings:
    base = Settings(
        openai_base_url="http://127.0.0.1:9/v1",  # replaced by the fake's URL in `gateway`
        openai_api_key=API_KEY,
        openai_model="test-model",
        # limits are the subject of their own tests; elsewhere they stay out of the way
        rate_limit_rpm=0,
        rate_limit_concurrent=0,
        rate_limit_tpm=0,
        chat_db_path=":memory:",
        # today's disconnect behaviour (cancel at once); the resume tests inject a small grace
        resume_grace_s=0.0,
    )
    return dataclasses.replace(base, **overrides)


class Frames:
    """Reads an SSE body frame by frame, keeping every byte seen."""

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp
        self.raw = b""
        self._buf = b""

    async def frame(self) -> bytes:
        async with asyncio.timeout(WAIT):
            while b"\n\n" not in self._buf:
                data = await self.resp.content.readany()
                if not data:
                    raise EOFError(self._buf)
                self._buf += data
                self.raw += data
        frame, self._buf = self._buf.split(b"\n\n", 1)
        return frame + b"\n\n"

    async def until(self, marker: bytes, count: int = 1) -> bytes:
        """Read on until `marker` has been seen `count` times in all; every byte seen so far."""
        async with asyncio.timeout(WAIT):
            while self.raw.count(marker) < count:
                data = await self.resp.content.readany()
                if not data:
                    raise EOFError(self._buf)
                self._buf += data
                self.raw += data
        return self.raw

    async def event(self) -> dict[str, Any]:
        """The next event's JSON, skipping comments (a `: ping` block of its own, or a lone
        `: ping` line glued to the event after it)."""
        while True:
            lines = [ln for ln in (await self.frame()).split(b"\n") if not ln.startswith(b":")]
            if not any(lines):
                continue
            data = [line[6:] for line in lines if line.startswith(b"data: ")]
            assert len(data) == 1, lines
            return dict(orjson.loads(data[0]))

    async def rest(self) -> list[dict[str, Any]]:
        events = []
        while True:
            try:
                events.append(await self.event())
            except EOFError:
                return events


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    fake: FakeUpstream
    registry: CollectorRegistry
    settings: Settings

    async def post(self, path: str, body: Any, **kwargs: Any) -> ClientResponse:
        return await self.client.post(path, json=body, **kwargs)

    async def stream(self, body: Any, **kwargs: Any) -> tuple[ClientResponse, Frames]:
        resp = await self.client.post("/api/ai/generate-stream", json=body, **kwargs)
        return resp, Frames(resp)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def settled(self) -> None:
        """Wait (bounded) until no stream is in flight: every outcome is accounted."""
        async with asyncio.timeout(WAIT):
            await self.client.app[keys.LIVE].idle()

    def outcomes(self, route: str = "generate_stream") -> dict[str, float]:
        return {
            o.value: self.sample("ai_stream_outcomes_total", route=route, outcome=o.value)
            for o in Outcome
            if self.sample("ai_stream_outcomes_total", route=route, outcome=o.value)
        }


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running() as upstream:
        yield upstream


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(aiohttp_client: Any, fake: FakeUpstream) -> AsyncIterator[MakeGateway]:
    upstreams: list[FailoverUpstream] = []

    async def make(**overrides: Any) -> Gateway:
        base = None if overrides.get("upstreams") else fake.url
        settings = make_settings(**{"openai_base_url": base, **overrides})
        registry = CollectorRegistry()

        def retried() -> None:  # the app's retry counter, as the app counts its own upstream's
            app[keys.METRICS].upstream_retries.inc()

        def attempted(name: str, result: str) -> None:
            app[keys.METRICS].upstream_attempts.labels(name, result).inc()

        upstream = FailoverUpstream.from_settings(settings, on_attempt=attempted, on_retry=retried)
        upstreams.append(upstream)
        app = create_app(settings, upstream=upstream, registry=registry)
        client = await aiohttp_client(app)
        return Gateway(client=client, fake=fake, registry=registry, settings=settings)

    yield make
    for upstream in upstreams:
        await upstream.aclose()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()


def tool_required(name: str) -> None:
    """Skip when a system tool is missing, except on CI where that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required on CI and is missing")
    pytest.skip(f"{name} is not installed")


class RedisServer:
    """A real redis-server on a loopback port, no persistence."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            async with asyncio.timeout(WAIT):
                await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL: no goodbye to its clients, and its data is gone."""
        if self.proc.returncode is None:
            self.proc.kill()
            async with asyncio.timeout(WAIT):
                await self.proc.wait()

    async def start(self) -> None:
        """An empty server on the same port; returns once it answers."""
        self.proc = (await start_redis(self.port)).proc

    async def restart(self) -> None:
        await self.kill()
        await self.start()


async def start_redis(port: int | None = None) -> RedisServer:
    if shutil.which("redis-server") is None:
        tool_required("redis-server")
    port = port or free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client = aioredis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    await client.ping()
                    break
                except RedisConnectionError:
                    await asyncio.sleep(0.02)  # bounded: waiting for the server to listen
    finally:
        await client.aclose()
    return RedisServer(proc, port)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await start_redis()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(params=["memory", "redis"])
async def limit_store(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """Where limits live: in process (None) or in a real Redis (its URL)."""
    if request.param == "memory":
        yield None
        return
    server = await start_redis()
    try:
        yield server.url
    finally:
        await server.stop()
