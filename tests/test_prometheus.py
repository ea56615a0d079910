"""Operators' view, proven with the real thing: promtool lints the live exposition and the
shipped alert rules, and a real Prometheus scrapes a running gateway while streams flow."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway, tool_required
from tests.fake_upstream import Gate, Repeat, Text
from tests.process import ROOT, free_port

DEPLOY = ROOT / "deploy"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("promtool") is None:
        tool_required("promtool")
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, timeout=60, check=False
    )


async def exposition(gateway: Gateway) -> bytes:
    return await (await gateway.client.get("/metrics")).read()


async def test_the_live_exposition_passes_promtool_lint(gateway: Gateway) -> None:
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.rest()
    body = await exposition(gateway)
    for family in (
        "ai_stream_outcomes_total",
        "ai_stream_time_to_first_token_seconds_bucket",
        "process_resident_memory_bytes",
    ):
        assert family.encode() in body  # promtool passes empty input too: make sure it is not
    checked = promtool("check", "metrics", stdin=body)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")


def test_the_shipped_alert_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert b"SUCCESS: 6 rules found" in checked.stdout


def test_the_shipped_scrape_config_passes_promtool() -> None:
    checked = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


class Prometheus:
    def __init__(self, url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    async def query(self, session: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        async with session.get(f"{self.url}/api/v1/query", params={"query": promql}) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    async def value(
        self, session: aiohttp.ClientSession, promql: str, ok: Any, seconds: float = 40
    ) -> float:
        """Poll (bounded) until the query has a value that `ok` accepts; the first scrape of a
        new target comes about 6 s after Prometheus starts."""
        seen: list[Any] = []
        for _ in range(int(seconds * 4)):
            if self.proc.returncode is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-1500:]}")
            try:
                result = await self.query(session, promql)
            except aiohttp.ClientConnectionError:
                result = []  # not listening yet
            if result:
                value = float(result[0]["value"][1])
                seen.append(value)
                if ok(value):
                    return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"{promql}: never acceptable, saw {seen[-10:]}")


@pytest.fixture
async def prometheus(gateway: Gateway, tmp_path: Path) -> AsyncIterator[Prometheus]:
    if shutil.which("prometheus") is None:
        tool_required("prometheus")
    target = f"127.0.0.1:{gateway.client.server.port}"
    config = (DEPLOY / "prometheus.yml").read_text()
    config = config.replace("127.0.0.1:3301", target)
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
    config = config.replace("scrape_timeout: 5s", "scrape_timeout: 1s")
    config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    config = config.replace("  - alerts.yml", f"  - {DEPLOY / 'alerts.yml'}")
    assert target in config
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
        )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", proc, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(20):
            await proc.wait()


async def test_prometheus_sees_open_streams_and_tokens_per_second(
    gateway: Gateway, prometheus: Prometheus
) -> None:
    held = asyncio.Event()
    gateway.fake.queue(
        [Text("a"), Gate(held)],
        [Text("b"), Gate(held)],
        [Text("c"), Gate(held)],
        [Repeat(" tok", 0.01)],
        [Repeat(" tok", 0.01)],  # two streams at about 100 tokens/s each
    )
    streams = [await gateway.stream({"prompt": "x"}) for _ in range(5)]
    for _, frames in streams:
        await frames.event()
    async with aiohttp.ClientSession() as session:
        open_streams = await prometheus.value(
            session, "sum(ai_stream_streams_active)", lambda v: v == 5
        )
        assert open_streams == 5
        # two streams at about 100 tokens/s each; early windows hold too few samples, so poll
        rate = await prometheus.value(
            session,
            "sum(rate(ai_stream_completion_tokens_total[5s]))",
            lambda v: 120 <= v <= 240,
        )
        assert 120 <= rate <= 240
        up = await prometheus.value(session, 'up{job="ai-stream-gateway"}', lambda v: v == 1)
        assert up == 1
    for resp, _ in streams:
        resp.close()


@pytest.mark.parametrize("shipped", ["grafana-dashboard.json", "alerts.yml"])
async def test_every_metric_the_shipped_files_query_exists(gateway: Gateway, shipped: str) -> None:
    _, frames = await gateway.stream({"prompt": "x"})
    await frames.rest()
    exposed = (await exposition(gateway)).decode()
    families = {line.split()[2] for line in exposed.splitlines() if line.startswith("# TYPE")}
    named = set(re.findall(r"ai_stream_[a-z_]+", (DEPLOY / shipped).read_text()))
    assert named
    for name in named:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in families or base.removesuffix("_total") in families, name
