"""The real process: settings errors at start-up, the demo upstream, SIGINT/SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import API_KEY, WAIT
from tests.fake_upstream import FakeUpstream, Gate, Text, answer
from tests.process import ROOT, clean_env, curl_events, service


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    async with asyncio.timeout(WAIT):
        while len(events) < count:
            line = await resp.content.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append(orjson.loads(line[6:]))
    return events


def start_up(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """`python -m service` run to its exit (start-up refusals), with what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_bad_settings_stop_start_up_naming_every_variable() -> None:
    env = clean_env({"PORT": "eighty", "IDLE_TIMEOUT_S": "-2", "LOG_FORMAT": "xml"})
    done = start_up(env)
    assert done.returncode == 2
    err = done.stderr.decode()
    for name in ("PORT", "IDLE_TIMEOUT_S", "LOG_FORMAT"):
        assert name in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "log_format"),
    [
        ("OPENAI_BASE_URL", "json"),
        ("AZURE_OPENAI_ENDPOINT", "json"),
        ("OPENAI_BASE_URL", "console"),
    ],
)
def test_a_url_with_credentials_stops_start_up_naming_it_not_its_secret(
    name: str, log_format: str
) -> None:
    url = "http://gateway:Secret-Canary-0451@127.0.0.1:9/v1"
    env = clean_env({name: url, "OPENAI_API_KEY": API_KEY, "LOG_FORMAT": log_format})
    done = start_up(env)
    assert done.returncode == 2
    assert done.stdout == b""
    assert b"Secret-Canary" not in done.stderr
    assert b"gateway:" not in done.stderr
    if log_format == "json":
        line = orjson.loads(done.stderr)
        assert line["event"] == "settings.invalid"
        assert list(line["problems"]) == [name]
        assert "credentials" in line["problems"][name]
    else:
        assert name in done.stderr.decode()


async def test_with_no_key_the_demo_upstream_streams_the_seed_example(tmp_path: Path) -> None:
    async with service({"DEMO_TOKENS_PER_S": "2000"}, tmp_path) as svc:
        events = await curl_events(
            "-sN",
            "-X",
            "POST",
            f"{svc.url}/api/ai/generate-stream",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"prompt": "Write a short article about TypeScript"}',
        )
    assert events[0]["type"] == "start"
    assert {e["type"] for e in events[1:-1]} == {"content"}
    done = events[-1]
    assert done["type"] == "done"
    assert done["model"] == "demo-writer-1"
    assert done["content"].startswith("# TypeScript\n\n")
    assert done["content"] == "".join(e["delta"] for e in events[1:-1])
    assert done["imagePlaceholders"] == ["[[image: a picture of TypeScript]]"]
    assert done["tokenCount"] == 350


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signal_drains_open_streams_then_ends_the_rest(
    fake: FakeUpstream, tmp_path: Path, sig: signal.Signals
) -> None:
    finishing, never = asyncio.Event(), asyncio.Event()
    fake.queue([Text("a"), Gate(finishing), *answer("b")], [Text("x"), Gate(never)])
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "SHUTDOWN_DRAIN_S": "1",
    }
    async with service(env, tmp_path) as svc, aiohttp.ClientSession() as session:
        url = f"{svc.url}/api/ai/generate-stream"
        quick = await session.post(url, json={"prompt": "quick"})
        assert len(await read_events(quick, 2)) == 2
        slow = await session.post(url, json={"prompt": "slow"})
        assert len(await read_events(slow, 2)) == 2
        svc.signal(sig)
        finishing.set()
        quick_rest = await read_events(quick, 99)
        slow_rest = await read_events(slow, 99)
        assert await svc.wait(WAIT) == 0
    assert [e["type"] for e in quick_rest] == ["content", "done"]
    assert quick_rest[-1]["content"] == "ab"
    assert slow_rest == [
        {
            "type": "error",
            "error": "The server is restarting; please retry.",
            "code": "server_shutdown",
            "reason": "shutdown",
            "requestId": slow_rest[0]["requestId"],
            "elapsedMs": slow_rest[0]["elapsedMs"],
        }
    ]
    async with asyncio.timeout(1):
        await fake.seen[1].ended.wait()
    assert fake.seen[1].cancelled


@pytest.mark.parametrize("grace_s", [0.0, 0.5], ids=["no-grace", "grace"])
async def test_a_client_leaving_the_real_process_cancels_the_upstream(
    fake: FakeUpstream, tmp_path: Path, grace_s: float
) -> None:
    """Within a second of the client leaving, or of the end of its grace window."""
    never = asyncio.Event()
    fake.queue([Text("a"), Gate(never)])
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "RESUME_GRACE_S": str(grace_s),
    }
    async with service(env, tmp_path) as svc, aiohttp.ClientSession() as session:
        resp = await session.post(f"{svc.url}/api/ai/generate-stream", json={"prompt": "x"})
        assert len(await read_events(resp, 2)) == 2
        resp.close()
        async with asyncio.timeout(grace_s + 1):
            await fake.seen[0].ended.wait()
        assert fake.seen[0].cancelled
        metrics = await (await session.get(f"{svc.url}/metrics")).text()
    assert (
        'ai_stream_outcomes_total{outcome="client_disconnect",route="generate_stream"} 1.0'
        in metrics
    )
