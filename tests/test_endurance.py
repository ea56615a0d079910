"""Endurance: 10,000 streams through one service, a third cancelled by the client at random
points, with limits on (in process, then in Redis). Afterwards tasks, file descriptors, open
upstream requests and RSS are back at baseline, and every concurrency slot is free.

The service runs in this process on a real socket (so its tasks, descriptors and memory can be
read) with the scripted upstream; the clients run in a separate process. Idle keep-alive
connections in the upstream pool are expected (at most the concurrency); each holds one
descriptor on each side and one server task, so counts are compared net of open connections:
tasks exactly, descriptors within 5, RSS within 40 MB of the baseline taken after a warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from service import keys
from service.app import create_app
from service.upstream import OpenAIUpstream
from tests.conftest import make_settings
from tests.fake_upstream import Done, FakeUpstream, Finish, Sleep, Text, Usage
from tests.process import ROOT

pytestmark = pytest.mark.slow

STREAMS = 10_000
CONCURRENCY = 400
TOKENS = 20
RETAINED_S = 1.0


async def forgotten(served: Served) -> None:
    """Wait (bounded) until every finished stream kept for readers has been swept."""
    live = served.app[keys.LIVE]
    async with asyncio.timeout(RETAINED_S + 10):
        while live.retained:  # noqa: ASYNC110 (the sweep has no event to wait on)
            await asyncio.sleep(0.05)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def load(url: str, streams: int, seed: int) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.loadgen",
        url,
        str(streams),
        str(CONCURRENCY),
        "0.33",
        str(seed),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(600):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    return dict(orjson.loads(out.splitlines()[-1]))


class Served:
    def __init__(self, app: web.Application, runner: web.AppRunner, url: str) -> None:
        self.app, self.runner, self.url = app, runner, url

    @property
    def connections(self) -> int:
        assert self.runner.server is not None
        return len(self.runner.server.connections)

    def sample(self, name: str, **labels: str) -> float:
        return self.app[keys.METRICS].registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def served(fake: FakeUpstream, limit_store: str | None) -> AsyncIterator[Served]:
    paced = [step for i in range(TOKENS) for step in (Text(f" t{i}"), Sleep(0.002))]
    fake.default = [*paced, Finish(), Usage(7, TOKENS), Done()]
    fake.record = False
    settings = make_settings(
        openai_base_url=fake.url,
        log_level="warning",
        redis_url=limit_store,
        rate_limit_rpm=1_000_000,
        rate_limit_concurrent=CONCURRENCY * 2,
        rate_limit_tpm=10**9,
        resume_ttl_s=RETAINED_S,  # finished streams kept for readers, then swept
    )
    # info lines filtered, as in production, but without caching loggers process-wide
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    upstream = OpenAIUpstream(settings)
    app = create_app(settings, upstream=upstream, registry=CollectorRegistry())
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(app, runner, f"http://127.0.0.1:{port}/api/ai/generate-stream")
    finally:
        await runner.cleanup()
        await upstream.aclose()
        structlog.reset_defaults()


async def test_ten_thousand_streams_leave_nothing_behind(
    served: Served, fake: FakeUpstream
) -> None:
    warm = await load(served.url, 1_000, seed=1)
    assert warm["failed"] == 0
    await asyncio.wait_for(served.app[keys.LIVE].idle(), 10)
    await forgotten(served)
    gc.collect()

    def net() -> tuple[int, int]:
        """Tasks and descriptors, net of open connections (pooled upstream ones count twice)."""
        open_ = fake.connections + served.connections
        return len(asyncio.all_tasks()) - open_, fds() - open_ - fake.connections

    (base_tasks, base_fds), base_rss = net(), rss_kb()

    counts = await load(served.url, STREAMS, seed=2)

    await asyncio.wait_for(served.app[keys.LIVE].idle(), 10)
    await forgotten(served)
    gc.collect()
    assert counts["failed"] == 0, counts
    assert counts["completed"] + counts["cancelled"] == STREAMS
    assert 0.25 * STREAMS < counts["cancelled"] < 0.41 * STREAMS
    tasks, descriptors = net()
    assert tasks == base_tasks
    assert abs(descriptors - base_fds) <= 5, (descriptors, base_fds)
    assert fake.connections <= CONCURRENCY
    assert rss_kb() - base_rss < 40_000, (rss_kb(), base_rss)
    assert fake.open_requests == 0
    assert served.sample("ai_stream_streams_active", route="generate_stream") == 0
    outcomes = {
        outcome: served.sample("ai_stream_outcomes_total", route="generate_stream", outcome=outcome)
        for outcome in ("completed", "client_disconnect")
    }
    assert sum(outcomes.values()) == STREAMS + 1_000
    total = sum(
        m.value
        for m in next(iter(served.app[keys.METRICS].outcomes.collect())).samples
        if m.name.endswith("_total")
    )
    assert total == STREAMS + 1_000
    assert outcomes["completed"] >= counts["completed"] + warm["completed"]
    limits = served.app[keys.LIMITS]
    assert await limits.limiter.concurrent("ip:127.0.0.1", limits.clock()) == 0
    assert served.sample("ai_stream_rate_limited_total", limit="concurrency") == 0
    assert served.sample("ai_stream_limiter_errors_total") == 0
