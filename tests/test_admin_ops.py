"""The operations view's data (`service.admin.ops` and `series`): the key rule, no CORS,
instances that do not answer, and the arithmetic across instances (rates summed per instance,
quantiles from summed buckets), against the real API app and real exposition text."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.admin import create_admin_app
from service.admin.ops import SAMPLER, OpsSampler, metrics_urls
from service.admin.series import (
    Sample,
    Scrape,
    histogram_quantile,
    ops_payload,
    parse_exposition,
)
from service.config import Settings
from service.metrics import Metrics, create_metrics
from service.parsers import UpstreamServer
from tests.conftest import Gateway, MakeGateway
from tests.fake_upstream import Done, FakeUpstream, Finish, Gate, Text
from tests.process import free_port

QUIET = 60.0  # the admin app's own loop samples once at start, then waits: tests sample by hand


def admin_settings(**overrides: Any) -> Settings:
    return Settings(**{"admin_metrics_interval_s": QUIET, **overrides})


async def sampled(client: Any, times: int = 1) -> dict[str, Any]:
    """Take `times` samples now (deterministic, no waiting on the loop) and read the JSON."""
    sampler: OpsSampler = client.app[SAMPLER]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for _ in range(times):
            await sampler.sample_once(session)
    resp = await client.get("/admin/api/ops")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def test_with_api_keys_the_ops_data_needs_a_key(aiohttp_client: Any) -> None:
    settings = admin_settings(api_keys=("sk-ops-1", "sk-ops-2"), admin_metrics_urls=("http://a",))
    client = await aiohttp_client(create_admin_app(settings))
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-ops-1"}):
        resp = await client.get("/admin/api/ops", headers=headers)
        assert resp.status == 401, headers
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        body = await resp.json()
        assert body["error"]["code"] == "unauthorized"
        assert "series" not in body
    resp = await client.get("/admin/api/ops", headers={"Authorization": "Bearer sk-ops-2"})
    assert resp.status == 200
    assert set(await resp.json()) == {"intervalS", "windowS", "instances", "series"}


async def test_without_api_keys_the_ops_data_is_open_and_has_no_cors(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_admin_app(admin_settings()))
    origin = {"Origin": "https://elsewhere.example"}
    resp = await client.get("/admin/api/ops", headers=origin)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert not any(h.lower().startswith("access-control-") for h in resp.headers)
    preflight = await client.options(
        "/admin/api/ops",
        headers={**origin, "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status == 405
    assert not any(h.lower().startswith("access-control-") for h in preflight.headers)


async def test_an_instance_that_does_not_answer_is_shown_down(
    aiohttp_client: Any, gateway: Gateway
) -> None:
    api = str(gateway.client.make_url("")).rstrip("/")
    dead = f"http://127.0.0.1:{free_port()}"
    missing = f"{api}/elsewhere"  # answers, but 404 for /metrics
    settings = admin_settings(admin_metrics_urls=(api, dead, missing))
    client = await aiohttp_client(create_admin_app(settings))

    gate = asyncio.Event()
    gateway.fake.queue([Text("Hello"), Gate(gate), Text(" world"), Finish(), Done()])
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.until(b"Hello")
    open_ = await sampled(client)
    gate.set()
    await frames.rest()
    await gateway.settled()
    ended = await sampled(client)

    assert [(i["url"], i["up"], i["error"]) for i in ended["instances"]] == [
        (api, True, None),
        (dead, False, "no answer (ClientConnectorError)"),
        (missing, False, "/metrics answered 404"),
    ]
    assert ended["instances"][0]["ready"]["status"] == "ok"
    assert ended["instances"][1]["ready"] is None
    series = ended["series"]
    assert series["streamsActive"][-2:] == [1, 0]  # the one up instance's gauge
    assert open_["series"]["streamsActive"][-1] == 1
    assert series["outcomesLastMinute"]["completed"][-1] == 1
    assert series["tokensPerSecond"][-1] > 0
    assert len(series["t"]) == len(series["ttftP95"]) == len(series["streamsActive"])


def test_the_default_instance_is_the_local_api() -> None:
    assert metrics_urls(Settings(host="0.0.0.0", port=4000)) == ("http://127.0.0.1:4000",)
    assert metrics_urls(Settings(host="::", port=4000)) == ("http://[::1]:4000",)
    assert metrics_urls(Settings(host="10.1.2.3", port=4000)) == ("http://10.1.2.3:4000",)
    assert metrics_urls(Settings(host="fd00::5", port=4000)) == ("http://[fd00::5]:4000",)
    urls = ("http://a:1", "http://b:2")
    assert metrics_urls(Settings(admin_metrics_urls=urls)) == urls


@pytest.fixture
def instances() -> tuple[Metrics, Metrics]:
    return (
        create_metrics(CollectorRegistry(), ["m"]),
        create_metrics(CollectorRegistry(), ["m"]),
    )


def scrape(metrics: Metrics, url: str, t: float) -> Scrape:
    return parse_exposition(url, t, generate_latest(metrics.registry).decode())


def test_rates_are_per_instance_then_summed(instances: tuple[Metrics, Metrics]) -> None:
    a, b = instances
    down = Scrape("b", False, 0.0, "no answer")
    samples = []
    a.completion_tokens.labels("m").inc(100)
    b.completion_tokens.labels("m").inc(5000)
    samples.append(Sample(1000.0, (scrape(a, "a", 10.0), scrape(b, "b", 20.0))))
    a.completion_tokens.labels("m").inc(40)  # 40 tokens in 2 s: 20/s
    b.completion_tokens.labels("m").inc(90)  # 90 tokens in 3 s: 30/s
    b.streams_active.labels("generate_stream").set(3)
    b.outcomes.labels("generate_stream", "completed").inc(2)
    b.rate_limited.labels("requests").inc(1)
    samples.append(Sample(1002.0, (scrape(a, "a", 12.0), scrape(b, "b", 23.0))))
    a.completion_tokens.labels("m").inc(10)  # 5/s; b restarted: its 60 since zero in 1 s
    fresh = create_metrics(CollectorRegistry(), ["m"])
    fresh.completion_tokens.labels("m").inc(60)
    samples.append(Sample(1004.0, (scrape(a, "a", 14.0), scrape(fresh, "b", 24.0))))
    samples.append(Sample(1006.0, (scrape(a, "a", 16.0), down)))  # b down: adds nothing
    a.completion_tokens.labels("m").inc(20)
    fresh.completion_tokens.labels("m").inc(20)  # b back: its step from a down sample is unknown
    samples.append(Sample(1008.0, (scrape(a, "a", 18.0), scrape(fresh, "b", 25.0))))
    series = ops_payload(samples, 2.0)["series"]
    assert series["t"] == [1000.0, 1002.0, 1004.0, 1006.0, 1008.0]
    assert series["tokensPerSecond"] == [None, 50.0, 65.0, 0.0, 10.0]
    assert series["streamsActive"] == [0, 3, 0, 0, 0]
    # b's 2 completions and 1 refusal stay counted while they are within the last minute
    assert series["outcomesLastMinute"] == {"completed": [None, 2, 2, 2, 2]}
    assert series["rateLimitedLastMinute"] == {"requests": [None, 1, 1, 1, 1]}
    later = Sample(1063.0, (scrape(a, "a", 73.0), scrape(fresh, "b", 80.0)))
    series = ops_payload([*samples, later], 2.0)["series"]
    assert series["outcomesLastMinute"]["completed"][-1] == 0
    # a name seen late reads 0 back to where the window was known
    b.outcomes.labels("generate_stream", "timeout").inc()
    last = Sample(1064.0, (scrape(a, "a", 74.0), scrape(b, "b", 81.0)))
    series = ops_payload([*samples, later, last], 2.0)["series"]
    assert series["outcomesLastMinute"]["timeout"] == [None, 0, 0, 0, 0, 0, 1]


def test_time_to_first_token_comes_from_the_summed_buckets(
    instances: tuple[Metrics, Metrics],
) -> None:
    a, b = instances
    first = Sample(0.0, (scrape(a, "a", 0.0), scrape(b, "b", 0.0)))
    for _ in range(60):
        a.time_to_first_token.labels("generate_stream", "m").observe(0.07)  # (0.05, 0.1]
    for _ in range(40):
        b.time_to_first_token.labels("generate_stream", "m").observe(0.3)  # (0.25, 0.5]
    second = Sample(5.0, (scrape(a, "a", 5.0), scrape(b, "b", 5.0)))
    series = ops_payload([first, second], 5.0)["series"]
    assert series["ttftP50"][0] is None  # nothing observed yet
    # rank 50 of 100 falls in (0.05, 0.1] holding 60: 0.05 + 0.05 * 50/60
    assert series["ttftP50"][1] == pytest.approx(0.05 + 0.05 * 50 / 60)
    # rank 95 in (0.25, 0.5] holding ranks 61..100: 0.25 + 0.25 * 35/40
    assert series["ttftP95"][1] == pytest.approx(0.25 + 0.25 * 35 / 40)
    # beyond a minute the old observations fall out of the window
    later = Sample(70.0, (scrape(a, "a", 70.0), scrape(b, "b", 70.0)))
    assert ops_payload([first, second, later], 5.0)["series"]["ttftP50"][2] is None


def test_histogram_quantile_edges() -> None:
    inf = math.inf
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0, inf: 0}) is None
    assert histogram_quantile(0.5, {1.0: 4, 2.0: 4}) is None  # no +Inf: not a histogram
    assert histogram_quantile(0.99, {1.0: 1, 2.0: 1, inf: 10}) == 2.0  # in +Inf: largest bound
    assert histogram_quantile(0.5, {1.0: 10, inf: 10}) == 0.5


def test_the_ring_holds_fifteen_minutes() -> None:
    assert OpsSampler(("http://a",), 5.0).samples.maxlen == 180
    assert OpsSampler(("http://a",), 2.0).samples.maxlen == 450
    assert OpsSampler(("http://a",), 0.1).samples.maxlen == 9000


async def test_each_model_servers_readiness_and_no_cors_on_metrics(
    aiohttp_client: Any, fake: FakeUpstream, make_gateway: MakeGateway
) -> None:
    gateway = await make_gateway(
        upstreams=(
            UpstreamServer(name="first", base_url=fake.url, api_key="sk-upstream"),
            UpstreamServer(
                name="gone", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="sk-upstream"
            ),
        ),
    )
    metrics = await gateway.client.get("/metrics", headers={"Origin": "http://127.0.0.1:3300"})
    assert metrics.status == 200
    assert not any(h.lower().startswith("access-control-") for h in metrics.headers)
    api = str(gateway.client.make_url("")).rstrip("/")
    client = await aiohttp_client(create_admin_app(admin_settings(admin_metrics_urls=(api,))))
    [instance] = (await sampled(client))["instances"]
    assert instance["up"] is True
    assert instance["ready"]["status"] == "ok"  # one server answering is enough
    assert instance["ready"]["upstreams"]["first"] == "ok"
    assert instance["ready"]["upstreams"]["gone"] != "ok"


def test_a_restart_resets_every_counter_of_the_instance() -> None:
    """One counter going down means the process restarted: every counter's new value is its
    increase, so the buckets stay cumulative and no outcome is taken as a difference."""
    inf = math.inf
    before = Scrape(
        "a", True, 0.0, None, 0.0, 500.0, {"completed": 4, "error": 3}, {}, {0.1: 5, inf: 10}
    )
    after = Scrape(
        "a", True, 2.0, None, 0.0, 40.0, {"completed": 6, "error": 0}, {}, {0.1: 3, inf: 12}
    )
    series = ops_payload([Sample(0.0, (before,)), Sample(2.0, (after,))], 2.0)["series"]
    assert series["tokensPerSecond"][-1] == 20.0
    assert series["outcomesLastMinute"] == {"completed": [None, 6], "error": [None, 0]}
    # 12 first tokens since the restart, 3 within 0.1 s: the median is past 0.1 s, in +Inf
    assert series["ttftP50"][-1] == 0.1
    assert series["ttftP95"][-1] == 0.1
