"""Headers every answer carries, its errors included: the admin app's security headers, `Vary:
Origin` wherever the API names an allowed origin, and a `Server` header without versions."""

from __future__ import annotations

from typing import Any

import pytest

from service.admin import create_admin_app
from service.config import Settings
from tests.conftest import Gateway

ADMIN_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Server": "ai-stream-gateway",
}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/nope", 404),
        ("GET", "/static/nope.js", 404),
        ("GET", "/static/", 403),  # a folder: aiohttp refuses to list it
        ("POST", "/config.json", 405),
    ],
)
async def test_admin_answers_carry_its_security_headers_errors_included(
    aiohttp_client: Any, method: str, path: str, status: int
) -> None:
    client = await aiohttp_client(create_admin_app(Settings()))
    resp = await client.request(method, path)
    assert resp.status == status
    for name, value in ADMIN_HEADERS.items():
        assert resp.headers[name] == value, name
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


async def test_answers_that_name_the_allowed_origin_vary_on_origin(gateway: Gateway) -> None:
    origin = {"Origin": "http://localhost:3300"}
    preflight = await gateway.client.options("/api/ai/generate", headers={**origin, **PREFLIGHT})
    answer = await gateway.post("/api/ai/generate", {"prompt": "x"}, headers=origin)
    refused = await gateway.post("/api/ai/generate", {"nope": 1}, headers=origin)
    for resp in (preflight, answer, refused):
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3300"
        assert resp.headers.getall("Vary") == ["Origin"]
    elsewhere = await gateway.post(
        "/api/ai/generate", {"prompt": "x"}, headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in elsewhere.headers
    plain = await gateway.client.get("/health")
    assert "Vary" not in plain.headers


@pytest.mark.parametrize("path", ["/health", "/nope", "/metrics"])
async def test_the_server_header_names_no_versions(gateway: Gateway, path: str) -> None:
    resp = await gateway.client.get(path)
    assert resp.headers["Server"] == "ai-stream-gateway"
