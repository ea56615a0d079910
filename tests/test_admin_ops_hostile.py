"""An instance listed in ADMIN_METRICS_URLS that answers badly: hugely, endlessly, with garbage the
parser chokes on, with a redirect, or with readiness JSON nested past any parser's depth. Each one
is shown down (or its readiness unknown) and the admin app's sampler keeps sampling; real sockets,
a real aiohttp server playing the instance, the sampler's own session and loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.admin import create_admin_app
from service.admin.ops import MAX_METRICS_BYTES, SAMPLER, OpsSampler
from service.admin.series import MAX_NAMES
from service.config import Settings
from tests.process import free_port

GOOD = b"# TYPE ai_stream_streams_active gauge\nai_stream_streams_active 2\n"
READY = b'{"status": "ok"}'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Instance:
    """A fake instance: `/metrics` and `/health/ready` answer with the given handlers; `hits`
    counts requests per path, and `served` is set on every answer (bounded waits on it)."""

    def __init__(self, metrics: Handler, ready: Handler | None = None) -> None:
        self.hits: dict[str, int] = {}
        self.sent = 0  # bytes an endless answer got out before the reader gave up
        self.served = asyncio.Event()
        app = web.Application()
        app.router.add_get("/metrics", self._counted(metrics))
        app.router.add_get("/health/ready", self._counted(ready or self.ready))
        self.server = TestServer(app)

    def _counted(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            try:
                return await handler(request)
            finally:
                self.served.set()

        return wrapped

    @staticmethod
    async def ready(_: web.Request) -> web.Response:
        return web.Response(body=READY, content_type="application/json")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def serve() -> Any:
    started: list[Instance] = []

    async def start(metrics: Handler, ready: Handler | None = None) -> Instance:
        instance = Instance(metrics, ready)
        await instance.server.start_server()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.server.close()


async def sample(*urls: str) -> list[dict[str, Any]]:
    sampler = OpsSampler(urls, 5.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await sampler.sample_once(session)
    instances: list[dict[str, Any]] = orjson.loads(sampler.payload_json())["instances"]
    return instances


async def good(_: web.Request) -> web.Response:
    return web.Response(body=GOOD, content_type="text/plain")


def answer(body: bytes) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    return handler


async def test_an_endless_metrics_body_is_cut_at_the_bound(serve: Any) -> None:
    """A 1 GiB /metrics (no Content-Length) is given up on past the bound, not read whole."""
    instance: Instance

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"ai_stream_streams_active 1\n" * 40_000  # about 1 MiB
        for _ in range(1024):  # 1 GiB at most
            try:
                await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                break
            instance.sent += len(chunk)
        return resp

    instance = await serve(endless)
    started = time.monotonic()
    [shown] = await sample(instance.url)
    assert shown["up"] is False
    assert shown["error"] == f"/metrics is larger than {MAX_METRICS_BYTES} bytes"
    assert time.monotonic() - started < 4.0
    await asyncio.wait_for(instance.served.wait(), 5)
    assert instance.sent < 64 * 1024 * 1024  # the writer stopped: the reader hung up


async def test_a_declared_huge_body_is_refused_before_reading(serve: Any) -> None:
    async def declared(_: web.Request) -> web.Response:
        return web.Response(body=b"#" * (MAX_METRICS_BYTES + 1), content_type="text/plain")

    instance = await serve(declared)
    [shown] = await sample(instance.url)
    assert (shown["up"], shown["error"]) == (
        False,
        f"/metrics is larger than {MAX_METRICS_BYTES} bytes",
    )


async def test_a_redirect_is_never_followed(serve: Any) -> None:
    target = await serve(good)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{target.url}{request.path}")

    listed = await serve(redirect, redirect)
    [shown] = await sample(listed.url)
    assert (shown["up"], shown["error"]) == (False, "/metrics answered 302")
    assert target.hits == {}


async def test_garbage_the_parser_chokes_on_is_shown_down(serve: Any) -> None:
    bodies = [
        b"ai_stream_time_to_first_token_seconds_bucket 3\n",  # a bucket with no bound
        b"\xff\xfe not text\n",
        b'ai_stream_streams_active{a="\n',
    ]

    listed = [await serve(answer(body)) for body in bodies]
    shown = await sample(*(i.url for i in listed))
    assert [(s["up"], s["error"]) for s in shown] == [
        (False, "/metrics is not the exposition format")
    ] * len(bodies)


async def test_readiness_json_nested_deeply_or_hugely_is_unknown(serve: Any) -> None:
    async def deep(_: web.Request) -> web.Response:
        return web.Response(body=b"[" * 50_000, content_type="application/json")

    async def huge(_: web.Request) -> web.Response:
        return web.Response(body=b'{"s": "' + b"x" * 1_000_000 + b'"}', status=503)

    async def down(_: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "unavailable"}', status=503)

    listed = [await serve(good, deep), await serve(good, huge), await serve(good, down)]
    shown = await sample(*(i.url for i in listed))
    assert [(s["up"], s["ready"]) for s in shown] == [
        (True, None),
        (True, None),
        (True, {"status": "unavailable"}),  # the model servers' word on 503 is kept
    ]


async def test_sampling_goes_on_after_a_sample_that_fails(serve: Any) -> None:
    """The loop survives anything one sample raises, and stops cleanly when cancelled."""
    instance = await serve(good)
    sampler = OpsSampler((instance.url,), 0.05)
    calls = 0
    real = sampler.sample_once

    async def flaky(session: aiohttp.ClientSession) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a sample that fails")
        return await real(session)

    sampler.sample_once = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(sampler.run())
    for _ in range(200):  # bounded: each wait ends on an answer or after 5 s
        if len(sampler.samples) >= 2:
            break
        instance.served.clear()
        await asyncio.wait_for(instance.served.wait(), 5)
    assert len(sampler.samples) >= 2
    assert sampler.samples[-1].streams_active == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_instance_with_thousands_of_label_values_is_shown_down(serve: Any) -> None:
    """Each outcome name would be a series in every point of the JSON: past MAX_NAMES, down."""
    lines = [f'ai_stream_outcomes_total{{outcome="o{i}"}} 1' for i in range(MAX_NAMES + 1)]
    body = ("# TYPE ai_stream_outcomes_total counter\n" + "\n".join(lines) + "\n").encode()

    async def many(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    fine = body.replace(f'"o{MAX_NAMES}"'.encode(), b'"o0"')  # MAX_NAMES names: still read
    instance, ok = await serve(many), await serve(answer(fine))
    shown = await sample(instance.url, ok.url)
    assert [(s["up"], s["error"]) for s in shown] == [
        (False, "/metrics is not the exposition format"),
        (True, None),
    ]


async def test_with_every_instance_down_the_values_are_null(serve: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sampler = OpsSampler((dead,), 5.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for _ in range(3):
            await sampler.sample_once(session)
    series = orjson.loads(sampler.payload_json())["series"]
    assert series["streamsActive"] == [None, None, None]
    assert series["tokensPerSecond"] == [None, None, None]
    assert series["ttftP50"] == [None, None, None]
    assert series["outcomesLastMinute"] == {}


async def test_the_admin_app_stops_at_once_while_an_instance_hangs(serve: Any) -> None:
    """The sampler task is cancelled on shutdown even mid-read of an instance that never ends."""
    never = asyncio.Event()
    reading = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        reading.set()
        await never.wait()
        return web.Response(body=GOOD)

    instance = await serve(hang)
    settings = Settings(admin_metrics_urls=(instance.url,), admin_metrics_interval_s=60.0)
    client = TestClient(TestServer(create_admin_app(settings)))
    await client.start_server()
    try:
        await asyncio.wait_for(reading.wait(), 5)  # the first sample is waiting on it
        sampler = client.app[SAMPLER]
        assert len(sampler.samples) == 0
    finally:
        started = time.monotonic()
        await asyncio.wait_for(client.close(), 5)
    assert time.monotonic() - started < 5.0  # not the 10 s read timeout
    never.set()


async def test_a_read_that_never_ends_is_cut_at_the_interval(serve: Any) -> None:
    never = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await never.wait()
        return web.Response(body=GOOD)

    instance = await serve(hang)
    sampler = OpsSampler((instance.url,), 1.0)  # reads bounded by 1 s
    sampled = asyncio.Event()
    real = sampler.sample_once

    async def noted(session: aiohttp.ClientSession) -> Any:
        try:
            return await real(session)
        finally:
            sampled.set()

    sampler.sample_once = noted  # type: ignore[method-assign]
    task = asyncio.create_task(sampler.run())
    started = time.monotonic()
    try:
        await asyncio.wait_for(sampled.wait(), 5)
        elapsed = time.monotonic() - started
        [shown] = sampler.latest
        assert (shown.up, shown.error) == (False, "no answer (TimeoutError)")
        assert 0.9 < elapsed < 5.0  # the 1 s bound, not the 10 s one
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        never.set()


def test_reads_are_bounded_by_the_interval_from_one_to_ten_seconds() -> None:
    bounds = {i: OpsSampler(("http://a",), i).timeout_s for i in (0.1, 1.0, 5.0, 10.0, 60.0)}
    assert bounds == {0.1: 1.0, 1.0: 1.0, 5.0: 5.0, 10.0: 10.0, 60.0: 10.0}
