"""A clock that runs out while the model server keeps failing (the attempt loop backing off
between retries) ends the stream naming the failure, not a timeout: through the real `openai` SDK
against a local server that answers 500 (or drops the connection) to every try."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import Outcome
from tests.conftest import MakeGateway
from tests.fake_upstream import Drop, Gate, Status, Step

TRIES = 4  # the first try and three retries (UPSTREAM_MAX_RETRIES)


@pytest.mark.parametrize(
    ("step", "kind"), [(Status(500), "server"), (Drop(), "connection")], ids=["500", "drop"]
)
async def test_a_first_token_clock_that_runs_out_while_the_upstream_fails_names_the_failure(
    make_gateway: MakeGateway, step: Step, kind: str
) -> None:
    # the first backoff (0.375 to 0.5 s, the SDK's) outlasts the clock: not waited (failover
    # note 3), the stream ends at once naming the failure
    gateway = await make_gateway(first_token_timeout_s=0.3)
    gateway.fake.queue(*([step] for _ in range(TRIES)))
    resp, frames = await gateway.stream({"prompt": "x"})
    assert resp.status == 200
    events = [await frames.event(), *await frames.rest()]
    error = events[-1]
    assert (error["type"], error["code"], error["reason"]) == (
        "error",
        "upstream_error",
        "upstream_error",
    )
    await gateway.settled()
    assert gateway.outcomes() == {Outcome.UPSTREAM_ERROR.value: 1}
    assert gateway.sample("ai_stream_upstream_errors_total", kind=kind) == 1
    assert len(gateway.fake.seen) < TRIES  # the clock did run out between the tries


async def test_the_json_route_answers_502_for_it(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(first_token_timeout_s=0.3)
    gateway.fake.queue(*([Status(500)] for _ in range(TRIES)))
    resp = await gateway.post("/api/ai/generate", {"prompt": "x"})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_error"
    assert gateway.sample("ai_stream_upstream_errors_total", kind="server") == 1


async def test_a_silent_upstream_is_still_a_first_token_timeout(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(first_token_timeout_s=0.3)
    gateway.fake.queue([Gate(asyncio.Event())])
    _resp, frames = await gateway.stream({"prompt": "x"})
    error = (await frames.rest())[-1]
    assert (error["code"], error["reason"]) == ("timeout", "first_token_timeout")
    await gateway.settled()
    assert gateway.outcomes() == {Outcome.FIRST_TOKEN_TIMEOUT.value: 1}
