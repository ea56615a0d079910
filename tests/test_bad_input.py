"""Bad input gets a precise 4xx with the JSON error shape, before any stream or upstream call."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from typing import Any

import orjson
import pytest

from tests.conftest import WAIT, Gateway, MakeGateway

JSON = {"Content-Type": "application/json"}
ROUTES = ["/api/ai/generate", "/api/ai/generate-stream"]

CASES: list[tuple[str, bytes | str, dict[str, str], int, str, str]] = [
    # id, body, headers, status, code, words the message must contain
    ("malformed-json", b'{"prompt": ', JSON, 400, "bad_request", "not valid JSON"),
    ("not-an-object", b'["prompt"]', JSON, 400, "bad_request", "object"),
    ("missing-prompt", b"{}", JSON, 400, "bad_request", "prompt"),
    ("prompt-not-string", b'{"prompt": 5}', JSON, 400, "bad_request", "prompt"),
    ("empty-prompt", b'{"prompt": ""}', JSON, 400, "bad_request", "prompt"),
    ("blank-prompt", b'{"prompt": "  \\n "}', JSON, 400, "bad_request", "prompt"),
    ("prompt-too-long", '{"prompt": "' + "x" * 2001 + '"}', JSON, 400, "bad_request", "2000"),
    (
        "ftp-image",
        b'{"prompt": "x", "selectedImageUrls": ["ftp://a/b.png"]}',
        JSON,
        400,
        "bad_request",
        "selectedImageUrls.0",
    ),
    (
        "js-image",
        b'{"prompt": "x", "referenceImageUrls": ["javascript:alert(1)"]}',
        JSON,
        400,
        "bad_request",
        "referenceImageUrls.0",
    ),
    (
        "data-not-image",
        b'{"prompt": "x", "selectedImageUrls": ["data:text/html;base64,AA"]}',
        JSON,
        400,
        "bad_request",
        "selectedImageUrls.0",
    ),
    (
        "images-not-list",
        b'{"prompt": "x", "selectedImageUrls": "https://a"}',
        JSON,
        400,
        "bad_request",
        "selectedImageUrls",
    ),
    (
        "too-many-images",
        '{"prompt": "x", "selectedImageUrls": [' + ",".join(['"https://a/b"'] * 5) + "]}",
        JSON,
        400,
        "bad_request",
        "images",
    ),
    ("max-tokens-zero", b'{"prompt": "x", "maxTokens": 0}', JSON, 400, "bad_request", "maxTokens"),
    (
        "max-tokens-negative",
        b'{"prompt": "x", "maxTokens": -3}',
        JSON,
        400,
        "bad_request",
        "maxTokens",
    ),
    (
        "max-tokens-absurd",
        b'{"prompt": "x", "maxTokens": 1000000000}',
        JSON,
        400,
        "bad_request",
        "maxTokens",
    ),
    (
        "max-tokens-string",
        b'{"prompt": "x", "maxTokens": "100"}',
        JSON,
        400,
        "bad_request",
        "maxTokens",
    ),
    (
        "max-tokens-bool",
        b'{"prompt": "x", "maxTokens": true}',
        JSON,
        400,
        "bad_request",
        "maxTokens",
    ),
    (
        "max-tokens-float",
        b'{"prompt": "x", "maxTokens": 1.5}',
        JSON,
        400,
        "bad_request",
        "maxTokens",
    ),
    (
        "temperature-high",
        b'{"prompt": "x", "temperature": 9}',
        JSON,
        400,
        "bad_request",
        "temperature",
    ),
    (
        "unknown-model",
        b'{"prompt": "x", "model": "gpt-unlimited"}',
        JSON,
        400,
        "bad_request",
        "model",
    ),
    (
        "text-plain",
        b'{"prompt": "x"}',
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
        "application/json",
    ),
    ("no-content-type", b'{"prompt": "x"}', {}, 415, "unsupported_media_type", "application/json"),
    (
        "form",
        b"prompt=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
        "application/json",
    ),
    (
        "oversized-body",
        b'{"prompt": "' + b"x" * 70_000 + b'"}',
        JSON,
        413,
        "payload_too_large",
        "65536",
    ),
]


@pytest.fixture
async def strict(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway(prompt_max_chars=2000, max_images=4, max_body_bytes=65536)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "words"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_bad_input_is_a_precise_4xx_and_calls_no_upstream(
    strict: Gateway,
    route: str,
    body: bytes | str,
    headers: dict[str, str],
    status: int,
    code: str,
    words: str,
) -> None:
    resp = await strict.client.post(route, data=body, headers=headers)
    assert resp.status == status
    assert resp.content_type == "application/json"
    payload: dict[str, Any] = await resp.json()
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"code", "message"}
    assert payload["error"]["code"] == code
    assert words in payload["error"]["message"]
    assert "Traceback" not in payload["error"]["message"]
    assert resp.headers["X-Request-ID"]
    assert strict.fake.seen == []
    assert strict.sample("ai_stream_requests_total", route=route, status=str(status)) == 1


async def test_unknown_fields_are_ignored_and_data_images_accepted(gateway: Gateway) -> None:
    body = {
        "prompt": "x",
        "stream": True,
        "extra": {"a": 1},
        "selectedImageUrls": ["data:image/png;base64,iVBORw0KGgo="],
    }
    resp = await gateway.post("/api/ai/generate", body)
    assert resp.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/api/ai/generate", 405, "bad_request"), ("GET", "/nope", 404, "not_found")],
)
async def test_unknown_routes_and_methods_answer_json(
    gateway: Gateway, method: str, path: str, status: int, code: str
) -> None:
    resp = await gateway.client.request(method, path)
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


@pytest.mark.parametrize("content_type", [";0*", "application/json;", "APPLICATION/JSON; x=1"])
async def test_odd_content_types_are_read_without_tripping(
    gateway: Gateway, content_type: str
) -> None:
    resp = await gateway.client.post(
        "/api/ai/generate", data=b'{"prompt": "x"}', headers={"Content-Type": content_type}
    )
    assert resp.status == (415 if content_type == ";0*" else 200)


GZIPPED = gzip.compress(b'{"prompt": "x"}')


@pytest.mark.parametrize(
    ("coding", "body", "status", "code"),
    [
        ("gzip", GZIPPED, 200, None),
        ("GZIP", GZIPPED, 200, None),
        ("deflate", zlib.compress(b'{"prompt": "x"}'), 200, None),
        ("identity", b'{"prompt": "x"}', 200, None),
        ("gzip", b'{"prompt": "x"}', 400, "bad_request"),
        ("gzip", b"\x1f\x8b" + b"\x00" * 30, 400, "bad_request"),
        ("deflate", b"not deflate at all", 400, "bad_request"),
        ("compress", b'{"prompt": "x"}', 415, "unsupported_media_type"),
        ("gzip, identity", GZIPPED, 415, "unsupported_media_type"),
        ("x-unheard-of", b'{"prompt": "x"}', 415, "unsupported_media_type"),
    ],
)
@pytest.mark.parametrize("route", ROUTES)
async def test_content_encodings_are_decoded_or_refused_precisely(
    gateway: Gateway, route: str, coding: str, body: bytes, status: int, code: str | None
) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    resp = await gateway.client.post(route, data=body, headers=headers)
    assert resp.status == status
    if code is None:
        await resp.read()
        return
    payload = await resp.json()
    assert list(payload["error"]) == ["code", "message"]
    assert payload["error"]["code"] == code
    assert gateway.fake.seen == []


async def test_a_body_that_does_not_arrive_in_time_is_a_408(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(body_timeout_s=0.3)
    assert gateway.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.client.port)
    writer.write(
        b"POST /api/ai/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50\r\n\r\n{"
    )
    async with asyncio.timeout(WAIT):
        raw = await reader.read()  # the server answers, then closes without waiting for more
    writer.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close\r\n" in head
    assert orjson.loads(body) == {
        "error": {"code": "request_timeout", "message": "The body did not arrive within 0.3 s."}
    }
    assert gateway.fake.seen == []
    assert gateway.sample("ai_stream_requests_total", route="/api/ai/generate", status="408") == 1
