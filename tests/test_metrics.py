"""Every stream moves the right counters exactly once, and the latency histograms observe what
the client saw."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from service import keys
from service.errors import Outcome
from tests.conftest import Gateway, MakeGateway
from tests.fake_upstream import Gate, Repeat, Status, Text, answer

NEVER = asyncio.Event
ROUTE = "generate_stream"

CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "completed": ({}, answer("a", "b")),
    "client_disconnect": ({}, [Text("a"), Gate(NEVER())]),
    "first_token_timeout": ({"first_token_timeout_s": 0.1}, [Gate(NEVER())]),
    "idle_timeout": ({"idle_timeout_s": 0.1}, [Text("a"), Gate(NEVER())]),
    "total_timeout": ({"max_stream_s": 0.2}, [Repeat("a", 0.01)]),
    "upstream_error": ({"upstream_max_retries": 0}, [Status(500)]),
    "rate_limited": (
        {"rate_limit_tpm": 600, "rate_limit_charge_interval_s": 0.05},
        [Repeat("a", 0.002)],
    ),
    "shutdown": ({}, [Text("a"), Gate(NEVER())]),
}


@pytest.mark.parametrize("outcome", list(CASES))
async def test_each_outcome_moves_its_counters_exactly_once(
    make_gateway: MakeGateway, outcome: str
) -> None:
    settings, script = CASES[outcome]
    gateway = await make_gateway(**settings)
    gateway.fake.queue(script)
    resp, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    if outcome == "client_disconnect":
        await frames.event()
        resp.close()
    elif outcome == "shutdown":
        await frames.event()
        await gateway.client.app[keys.LIVE].drain(0)
    else:
        await frames.rest()
    await gateway.settled()
    assert gateway.outcomes() == {outcome: 1}
    for other in Outcome:
        count = gateway.sample("ai_stream_duration_seconds_count", route=ROUTE, outcome=other.value)
        assert count == (1 if other.value == outcome else 0)
    assert gateway.sample("ai_stream_streams_active", route=ROUTE) == 0
    assert (
        gateway.sample("ai_stream_requests_total", route="/api/ai/generate-stream", status="200")
        == 1
    )


async def test_latency_histograms_observe_what_the_client_saw(gateway: Gateway) -> None:
    gates = [asyncio.Event() for _ in range(3)]
    gateway.fake.queue(
        [Gate(gates[0]), Text("a"), Gate(gates[1]), Text("b"), Gate(gates[2]), *answer("c")]
    )
    sent = time.monotonic()
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.event()
    arrivals = []
    for gate in gates:
        await asyncio.sleep(0.05)  # the upstream's pace, which the histograms must reflect
        gate.set()
        await frames.event()
        arrivals.append(time.monotonic())
    await frames.rest()
    model = {"route": ROUTE, "model": "test-model"}
    ttft = gateway.sample("ai_stream_time_to_first_token_seconds_sum", **model)
    assert abs(ttft - (arrivals[0] - sent)) < 0.03
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert gateway.sample("ai_stream_inter_token_latency_seconds_count", **model) == 2
    observed = gateway.sample("ai_stream_inter_token_latency_seconds_sum", **model)
    assert abs(observed - sum(gaps)) < 0.03
    assert gateway.sample("ai_stream_completion_tokens_total", model="test-model") == 3


def test_model_labels_stay_bounded(gateway: Gateway) -> None:
    metrics = gateway.client.app[keys.METRICS]
    assert metrics.model_label("test-model") == "test-model"
    assert metrics.model_label("anything-a-request-might-say") == "other"
