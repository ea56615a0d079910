"""Hostile input: 10,000 generated bodies and header sets (content codings included, valid or
not) to each POST endpoint, and generated query strings (digits of every script included) for
every query parameter the service reads. Every answer is a 2xx or a precise 4xx with the JSON
error shape, never a 500, and nothing is left running. The gateway is served as the process
serves it (`edge.Runner`), so the HTTP layer's own answers are held to the same rule.

Hypothesis tests are synchronous, so the gateway (and its scripted upstream) runs on its own
event loop in a thread, and the test speaks HTTP to it with the standard library's client.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service import keys
from service.app import create_app
from service.edge import Runner
from service.errors import STATUS_BY_CODE
from service.upstream import OpenAIUpstream
from tests.conftest import make_settings
from tests.fake_upstream import FakeUpstream

EXAMPLES = 10_000
ROUTES = (
    "/api/ai/generate",
    "/api/ai/generate-stream",
    "/api/v1/ai/chat",
    "/api/v1/ai/chat/stream",
)


class Served:
    """The gateway on a loop of its own, in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port, self.app, self.fake, self._close = self.call(self._start())

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=30)

    async def _start(self) -> Any:
        fake = FakeUpstream()
        fake.record = False
        await fake.start()
        config = make_settings(
            openai_base_url=fake.url,
            prompt_max_chars=500,
            chat_message_max_chars=500,
            max_body_bytes=8192,
            max_images=3,
        )
        upstream = OpenAIUpstream(config)
        app = create_app(config, upstream=upstream, registry=CollectorRegistry())
        runner = Runner(app, header_timeout_s=10, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()

        async def close() -> None:
            await runner.cleanup()
            await upstream.aclose()
            await fake.stop()

        return runner.addresses[0][1], app, fake, close

    async def _idle(self) -> tuple[int, int]:
        await asyncio.wait_for(self.app[keys.LIVE].idle(), 10)
        return len(self.app[keys.LIVE]), self.fake.open_requests

    def idle(self) -> tuple[int, int]:
        return tuple(self.call(self._idle()))

    def stop(self) -> None:
        self.call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    server = Served()
    try:
        yield server
    finally:
        server.stop()


# Latin-1 text without line breaks: what an HTTP client can put in a header at all.
header_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"), max_size=80
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=60),
    st.lists(st.text(max_size=30), max_size=5),
    json_values,
)
urls = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "https://a.example/x.png",
            "http://b.example/y",
            "ftp://c/z",
            "data:image/png;base64,iVBORw0KGgo=",
            "data:text/html;base64,PHA+",
            "javascript:alert(1)",
            "https://",
            "https://a b",
        ]
    ),
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=600), anything),
        "selectedImageUrls": st.one_of(st.lists(urls, max_size=5), anything),
        "referenceImageUrls": st.one_of(st.lists(urls, max_size=5), anything),
        "model": st.one_of(st.sampled_from(["test-model", "gpt-x", ""]), anything),
        "maxTokens": st.one_of(st.integers(-5, 20_000), anything),
        "temperature": st.one_of(st.floats(-1, 3), anything),
        "stream": anything,
    },
)
chat_shaped = st.fixed_dictionaries(
    {},
    optional={
        "message": st.one_of(st.text(max_size=600), anything),
        "conversationId": st.one_of(
            st.sampled_from(["c_AAAAAAAAAAAAAAAAAAAAAA", "", "c_", "../x"]), anything
        ),
    },
)
bodies = st.one_of(
    shaped.map(lambda v: json.dumps(v).encode()),
    chat_shaped.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.just(b'{"prompt": "' + b"x" * 9000 + b'"}'),
)
headers = st.fixed_dictionaries(
    {
        "Content-Type": st.one_of(
            st.sampled_from(
                [
                    "application/json",
                    "application/json; charset=utf-8",
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "",
                ]
            ),
            header_text,
        ),
    },
    optional={
        "X-Request-ID": header_text,
        "Authorization": header_text,
        "X-Forwarded-For": header_text,
        "Accept": header_text,
    },
)


CODINGS = ["gzip", "deflate", "br", "zstd", "identity", "x-gzip", "compress", "gzip, gzip", ""]


@st.composite
def encoded(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A body and its Content-Encoding: well encoded, mislabelled, or a coding nobody knows."""
    body = draw(bodies)
    coding = draw(st.one_of(st.sampled_from(CODINGS), header_text))
    if coding and draw(st.booleans()):
        if coding == "gzip":
            body = gzip.compress(body)
        elif coding == "deflate":
            body = zlib.compress(body)
    return body, {"Content-Encoding": coding} if coding else {}


def check(served: Served, route: str, body: bytes, sent: dict[str, str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    try:
        conn.request("POST", route, body=body, headers=sent)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status < 500, (resp.status, payload[:300])
    if resp.status >= 400:
        assert resp.getheader("Content-Type", "").startswith("application/json")
        error = orjson.loads(payload)["error"]
        assert set(error) == {"code", "message"}
        assert STATUS_BY_CODE[error["code"]] == resp.status or resp.status == 405
        assert error["message"]
        return
    assert resp.status == 200
    if route.endswith("stream"):
        last = payload.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        assert orjson.loads(last.removeprefix(b"data: "))["type"] in ("done", "error")
    else:
        assert "content" in orjson.loads(payload)


@pytest.mark.parametrize("route", ROUTES)
def test_generated_bodies_and_headers_never_break_the_gateway(served: Served, route: str) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=st.one_of(bodies, encoded()), sent=headers)
    def one(body: bytes | tuple[bytes, dict[str, str]], sent: dict[str, str]) -> None:
        if isinstance(body, tuple):
            body, coding = body
            sent = {**sent, **coding}
        check(served, route, body, sent)

    one()
    assert served.idle() == (0, 0)


# Every query parameter the service reads, by route.
QUERY_ROUTES = {"/api/ai/stream-probe": ("count", "interval_ms")}
QUERY_EXAMPLES = 3_000
digits = st.characters(categories=["Nd"])  # the decimal digits of every script
query_values = st.one_of(
    st.integers(-5, 5000).map(str),
    st.text(digits, min_size=1, max_size=4),
    st.sampled_from(["²", "³", "¹", "½", "Ⅻ", "①", "1e2", "0x10", " 5", "5 ", "+5", "٣", "１０"]),
    st.text(max_size=8),
)


def check_query(served: Served, route: str, query: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    try:
        conn.request("GET", f"{route}?{query}")
        resp = conn.getresponse()
        status = resp.status
        content_type = resp.getheader("Content-Type", "")
        payload = resp.read() if status >= 400 else b""  # a 200 is a stream: leave it
    finally:
        conn.close()
    assert status < 500, (status, query, payload[:300])
    if status >= 400:
        assert content_type.startswith("application/json")
        error = orjson.loads(payload)["error"]
        assert set(error) == {"code", "message"}
        assert STATUS_BY_CODE[error["code"]] == status
        return
    assert status == 200
    assert content_type.startswith("text/event-stream")


@pytest.mark.parametrize("route", sorted(QUERY_ROUTES))
def test_generated_query_strings_never_break_the_gateway(served: Served, route: str) -> None:
    names = QUERY_ROUTES[route]

    @settings(
        max_examples=QUERY_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        params=st.lists(
            st.tuples(st.one_of(st.sampled_from(names), st.text(max_size=5)), query_values),
            max_size=4,
        )
    )
    def one(params: list[tuple[str, str]]) -> None:
        check_query(served, route, urllib.parse.urlencode(params))

    one()
    assert served.idle() == (0, 0)
