"""The operations view in a real browser (Debian's Chromium through Playwright), against the real
API process (demo upstream at a known pace) and the real admin process, which reads the API's
/metrics itself every `ADMIN_METRICS_INTERVAL_S`.

A bounded load (N streams of a fixed length at the demo's pace, read by aiohttp in a thread of its
own) runs while the page polls; the test reads what the charts drew (their data attributes and
displayed values) and compares it with what the load actually received. Screenshot:
`artifacts/admin/ops.png`.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from playwright.sync_api import Browser, Page

from tests.conftest import tool_required
from tests.process import free_port, service
from tests.test_admin_browser import (
    CHROMIUM,
    Background,
    Stack,
    chromium,
    open_page,
    screenshot,
)

KEY = "sk-ops-browser-1"
STREAMS = 4
PACE = 50.0  # demo tokens per second, per stream
TOKENS = 300  # each stream's length: 6 s at the pace
INTERVAL_S = 0.5  # ADMIN_METRICS_INTERVAL_S
LOAD_S = 30.0  # the whole load is bounded by this


@dataclass
class Load:
    """What the load's clients received: (time, tokens so far over all streams) after every
    content event, and each stream's first-content and end times (Unix seconds)."""

    counts: list[tuple[float, int]] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def delivered(self, at: float) -> float:
        """Tokens received by `at`, interpolated between the events around it."""
        times = [t for t, _ in self.counts]
        i = bisect.bisect_right(times, at)
        if i == 0:
            return 0.0
        if i == len(times):
            return float(self.counts[-1][1])
        (t0, c0), (t1, c1) = self.counts[i - 1], self.counts[i]
        return c0 + (c1 - c0) * (at - t0) / (t1 - t0) if t1 > t0 else float(c1)


async def _stream(session: aiohttp.ClientSession, api: str, n: int, load: Load) -> None:
    body = {"prompt": f"Operations load {n}", "maxTokens": TOKENS}
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"}
    last = 0
    async with session.post(f"{api}/api/ai/generate-stream", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "content":
                now = time.time()
                if last == 0:
                    load.firsts.append(now)
                total = (load.counts[-1][1] if load.counts else 0) + event["tokenCount"] - last
                load.counts.append((now, total))
                last = event["tokenCount"]
            elif event["type"] in ("done", "error"):
                assert event["type"] == "done", event
                load.ends.append(time.time())
                return


def run_load(api: str, load: Load) -> None:
    async def main() -> None:
        async with asyncio.timeout(LOAD_S), aiohttp.ClientSession() as session:
            await asyncio.gather(*(_stream(session, api, n, load) for n in range(STREAMS)))

    try:
        asyncio.run(main())
    except BaseException as exc:  # reported by the test thread
        load.error = exc


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def ops_stack(tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    """The API and the admin page with API_KEYS set; the admin app reads the API and a second
    instance that is not there."""
    if not Path(CHROMIUM).exists():
        tool_required("chromium")
    api_port, admin_port, dead = free_port(), free_port(), free_port()
    env = {
        "PORT": str(api_port),
        "ADMIN_PORT": str(admin_port),
        "API_KEYS": KEY,
        "DEMO_TOKENS_PER_S": str(PACE),
        "ADMIN_METRICS_URLS": f"http://127.0.0.1:{api_port},http://127.0.0.1:{dead}",
        "ADMIN_METRICS_INTERVAL_S": str(INTERVAL_S),
    }
    background = Background()
    try:
        api = background.enter(service(env, tmp_path, "api", api_port))
        admin = background.enter(service(env, tmp_path, "admin", admin_port))
        yield Stack(api, admin), f"http://127.0.0.1:{dead}"
    finally:
        background.close()


def chart(page: Page, name: str) -> tuple[list[float], dict[str, list[float | None]]]:
    figure = page.locator(f"#chart-{name}")
    times = json.loads(figure.get_attribute("data-t") or "[]")
    series = json.loads(figure.get_attribute("data-series") or "{}")
    return times, series


def test_the_charts_show_a_known_load(ops_stack: tuple[Stack, str], browser: Browser) -> None:
    stack, dead = ops_stack
    with open_page(browser, stack.page_url + "#ops") as page:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        # with API_KEYS set the view asks for the key, then shows the data once it is given
        page.wait_for_selector("#ops-status.error")
        assert "needs the API key" in page.inner_text("#ops-status")
        page.fill("#api-key", KEY)
        page.wait_for_selector("#ops-instances li[data-up=true]")
        down = page.locator("#ops-instances li[data-up=false]")
        assert down.count() == 1
        assert dead in down.inner_text()
        assert "ready: ok" in page.locator("#ops-instances li[data-up=true]").inner_text()
        page.wait_for_function(
            "() => document.getElementById('chart-streams').dataset.latest === '0'"
        )

        load = Load()
        thread = threading.Thread(target=run_load, args=(stack.api.url, load), daemon=True)
        thread.start()
        # open streams rise to the load's count ...
        page.wait_for_function(
            "n => document.getElementById('chart-streams').dataset.latest === String(n)",
            arg=STREAMS,
        )
        assert page.locator("#chart-streams .now").inner_text() == str(STREAMS)
        thread.join(LOAD_S)
        assert not thread.is_alive()
        assert load.error is None, load.error
        assert len(load.ends) == STREAMS
        # ... and fall back to zero once it ends
        page.wait_for_function(
            "() => document.getElementById('chart-streams').dataset.latest === '0'"
        )
        ended = max(load.ends)
        page.wait_for_function(
            "t => JSON.parse(document.getElementById('chart-tokens').dataset.t).at(-1) > t + 1",
            arg=ended,
        )
        times, series = chart(page, "tokens")
        rates = series["tokens"]
        # every step that lies wholly within the time all the streams were running
        steady_from, steady_to = max(load.firsts), min(load.ends)
        steps = [
            i
            for i in range(1, len(times))
            if times[i - 1] >= steady_from and times[i] <= steady_to and rates[i] is not None
        ]
        assert len(steps) >= 4, (times, steady_from, steady_to)
        start, end = times[steps[0] - 1], times[steps[-1]]
        shown = sum(float(rates[i] or 0) * (times[i] - times[i - 1]) for i in steps) / (end - start)
        delivered = (load.delivered(end) - load.delivered(start)) / (end - start)
        assert abs(shown - delivered) <= 0.10 * delivered, (shown, delivered)
        assert delivered > 0.5 * STREAMS * PACE, delivered  # the load ran near its pace
        # the streams ended completed, and the time to first token was measured
        _, outcomes = chart(page, "outcomes")
        assert max(v or 0 for v in outcomes["completed"]) == STREAMS  # all within a minute
        _, ttft = chart(page, "ttft")
        assert any(v is not None and v > 0 for v in ttft["p95"])
        assert stack.sample("ai_stream_streams_active") == 0
        # the page read only the admin app: never the API's /metrics or /health/ready
        ops = [url for url in requests if "/admin/api/ops" in url]
        assert len(ops) >= 10
        assert not [url for url in requests if "/metrics" in url or "/health" in url]
        screenshot(page, "ops")
        page.set_viewport_size({"width": 390, "height": 844})
        screenshot(page, "ops-phone")
