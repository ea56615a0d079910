"""One `request.finished` line per HTTP answer, refusals before a stream included, and structured
tracebacks for the 500s: asserted on the event dicts (structlog's `capture_logs`)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from structlog.typing import EventDict, Processor

from service import logs
from service.app import create_app
from service.config import LogSettings
from tests.conftest import API_KEY, WAIT, MakeGateway, make_settings
from tests.fake_upstream import Gate, Text, answer


def noting(name: str, seen: asyncio.Event) -> Processor:
    """A processor that sets `seen` when a line named `name` is logged."""

    def processor(logger: Any, method: str, line: EventDict) -> EventDict:
        if line["event"] == name:
            seen.set()
        return line

    return processor


def finished(captured: Sequence[EventDict]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in line.items() if k not in ("log_level", "duration_ms")}
        for line in captured
        if line["event"] == "request.finished"
    ]


async def test_a_stream_has_one_request_line_beside_its_stream_line(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway()
    with capture_logs() as captured:
        _, frames = await gateway.stream({"prompt": "x"}, headers={"X-Request-ID": "r-1"})
        await frames.rest()
        await gateway.settled()
    assert finished(captured) == [
        {
            "event": "request.finished",
            "route": "generate_stream",
            "method": "POST",
            "status": 200,
            "request_id": "r-1",
        }
    ]
    assert [line["event"] for line in captured].count("stream.finished") == 1
    line = next(line for line in captured if line["event"] == "request.finished")
    assert line["log_level"] == "info"
    assert isinstance(line["duration_ms"], int)
    assert line["duration_ms"] >= 0


@pytest.mark.parametrize(
    ("overrides", "path", "prompt", "status", "route", "error"),
    [
        ({}, "/api/ai/generate-stream", "", 400, "generate_stream", "bad_request"),
        ({"api_keys": (API_KEY,)}, "/api/ai/generate", "x", 401, "generate", "unauthorized"),
        ({}, "/api/nothing-here", "x", 404, "unmatched", "not_found"),
        ({}, "/api/ai/generate", "x", 200, "generate", None),
    ],
)
async def test_every_answer_has_its_line_and_an_error_its_code(
    make_gateway: MakeGateway,
    overrides: dict[str, Any],
    path: str,
    prompt: str,
    status: int,
    route: str,
    error: str | None,
) -> None:
    gateway = await make_gateway(**overrides)
    with capture_logs() as captured:
        resp = await gateway.post(path, {"prompt": prompt}, headers={"X-Request-ID": "r-2"})
        assert resp.status == status
    expected: dict[str, Any] = {
        "event": "request.finished",
        "route": route,
        "method": "POST",
        "status": status,
        "request_id": "r-2",
    }
    if error is not None:
        expected["error"] = error
    assert finished(captured) == [expected]


async def test_a_rate_limited_request_has_its_line_with_its_code(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(rate_limit_rpm=1)
    assert (await gateway.post("/api/ai/generate", {"prompt": "x"})).status == 200
    with capture_logs() as captured:
        refused = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert refused.status == 429
    [line] = finished(captured)
    assert (line["route"], line["status"], line["error"]) == ("generate", 429, "rate_limited")


async def test_a_client_that_leaves_a_stream_leaves_a_line_with_the_status_it_got(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway()
    gateway.fake.queue([Text("a"), Gate(asyncio.Event()), *answer("b")])
    logged = asyncio.Event()
    with capture_logs(processors=[noting("request.finished", logged)]) as captured:
        resp, frames = await gateway.stream({"prompt": "x"})
        await frames.event()
        await frames.event()
        resp.close()
        async with asyncio.timeout(WAIT):
            await logged.wait()
    [line] = finished(captured)
    assert (line["route"], line["status"]) == ("generate_stream", 200)
    assert "error" not in line


async def test_a_500_has_its_line_and_a_traceback(aiohttp_client: Any) -> None:
    app = create_app(make_settings(), registry=CollectorRegistry())

    async def bug(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_get("/bug", bug, name="bug")
    client = await aiohttp_client(app)
    with capture_logs() as captured:
        resp = await client.get("/bug", headers={"X-Request-ID": "r-3"})
    assert resp.status == 500
    assert finished(captured) == [
        {
            "event": "request.finished",
            "route": "bug",
            "method": "GET",
            "status": 500,
            "request_id": "r-3",
            "error": "internal",
        }
    ]
    [failed] = [line for line in captured if line["event"] == "request.failed"]
    assert failed["exc_info"] is True
    assert [line["log_level"] for line in captured if line["event"] == "request.finished"] == [
        "error"
    ]


def test_a_json_traceback_is_structured_and_keeps_no_locals() -> None:
    _, exceptions = logs.output(LogSettings(log_format="json"))
    secret = "sk-never-logged"
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        line = exceptions(None, "error", {"event": "request.failed", "exc_info": sys.exc_info()})
    assert isinstance(line, dict)
    [exception] = line["exception"]
    assert (exception["exc_type"], exception["exc_value"]) == ("RuntimeError", "a bug")
    assert (
        exception["frames"][-1]["name"] == "test_a_json_traceback_is_structured_and_keeps_no_locals"
    )
    assert secret not in repr(line)
    assert "exc_info" not in line
