"""The shipped ecosystem.config.js under the real PM2 (`pm2-runtime`, PM2_HOME in a temp dir): both
apps come up healthy on test ports, and SIGINT drains an open stream to its `server_shutdown`
event instead of PM2 killing the API mid-drain.

The drain is 2 s, longer than PM2's default kill_timeout (1.6 s): had the file kept the default,
the API would be SIGKILLed before the drain ends and the stream would be cut without its final
event and without the end of its chunked body (aiohttp raises ClientPayloadError then).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import tool_required
from tests.process import ROOT, clean_env, free_port
from tests.proxies import http_ok, listening, wait_until

DRAIN_S = 2.0


def ecosystem(env: dict[str, str]) -> dict[str, object]:
    """The file as PM2 reads it: evaluated by node with `env`."""
    if shutil.which("node") is None:
        tool_required("node")
    done = subprocess.run(
        ["node", "-e", "console.log(JSON.stringify(require('./ecosystem.config.js')))"],
        cwd=ROOT, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    if done.returncode:
        return {"error": done.stderr}
    return dict(json.loads(done.stdout))


def test_the_ecosystem_file_keeps_what_pm2_needs_for_a_python_app() -> None:
    apps = ecosystem({"SHUTDOWN_DRAIN_S": "25"})["apps"]
    assert isinstance(apps, list)
    api, admin = apps
    assert api["name"] == "ai-stream-api"
    assert api["args"] == ["-m", "service", "api"]
    assert admin["args"] == ["-m", "service", "admin"]
    for app in apps:
        assert app["exec_mode"] == "fork"
        assert app["interpreter"] == "none"
        assert app["script"] == str(ROOT / ".venv" / "bin" / "python")
        assert app["env"]["PYTHONUNBUFFERED"] == "1"
        assert app["exp_backoff_restart_delay"] > 0
        assert app["max_memory_restart"]
        assert app["out_file"]
        assert app["error_file"]
    assert api["env"]["PORT"] == "3301"
    assert api["env"]["ADMIN_PORT"] == "3300"
    assert api["kill_timeout"] > 25 * 1000  # longer than the drain


def test_several_api_instances_take_consecutive_ports_and_need_redis() -> None:
    refused = ecosystem({"API_INSTANCES": "2"})
    assert "needs REDIS_URL" in str(refused["error"])
    apps = ecosystem({"API_INSTANCES": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"})["apps"]
    assert isinstance(apps, list)
    assert [(a["name"], a["env"]["PORT"]) for a in apps[:2]] == [
        ("ai-stream-api-0", "3301"),
        ("ai-stream-api-1", "3302"),
    ]


def pm2_runtime(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            ["pm2-runtime", "start", "ecosystem.config.js"],
            cwd=ROOT, env=env, stdout=out, stderr=out,
        )  # fmt: skip


async def test_pm2_runs_both_apps_and_sigint_drains_an_open_stream(tmp_path: Path) -> None:
    if shutil.which("pm2-runtime") is None:
        tool_required("pm2-runtime")
    api_port, admin_port = free_port(), free_port()
    env = clean_env(
        {
            "PM2_HOME": str(tmp_path / "pm2"),
            "LOG_DIR": str(tmp_path / "logs"),
            "PORT": str(api_port),
            "ADMIN_PORT": str(admin_port),
            "SHUTDOWN_DRAIN_S": f"{DRAIN_S:g}",
            "DEMO_TOKENS_PER_S": "2",
            "HEARTBEAT_INTERVAL_S": "0.5",
        }
    )
    pm2 = pm2_runtime(env, tmp_path / "pm2.log")
    try:
        api, admin = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{admin_port}"
        await asyncio.to_thread(
            wait_until, lambda: http_ok(api + "/health") and http_ok(admin + "/health"), "pm2", pm2
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(admin + "/health") as resp:
                assert await resp.json() == {"status": "ok"}
            async with session.post(
                api + "/api/ai/generate-stream",
                json={"prompt": "Write about restarts", "maxTokens": 100},  # 50 s at 2 tokens/s
            ) as resp:
                assert resp.status == 200
                lines = [await resp.content.readline()]
                pm2.send_signal(signal.SIGINT)
                stopped = time.monotonic()
                async with asyncio.timeout(DRAIN_S + 15):
                    async for line in resp.content:  # ClientPayloadError here = killed mid-drain
                        lines.append(line)
                ended = time.monotonic() - stopped
        events = [orjson.loads(line[6:]) for line in lines if line.startswith(b"data: ")]
        last = events[-1]
        assert last["type"] == "error"
        assert last["code"] == "server_shutdown"
        assert last["reason"] == "shutdown"
        assert ended >= DRAIN_S - 0.2  # it ran through the whole drain, past PM2's 1.6 s default
        code = await asyncio.to_thread(pm2.wait, 20)
        assert code == 0
    finally:
        if pm2.poll() is None:
            pm2.kill()
            pm2.wait()
    assert not listening(api_port)  # nothing left behind
    assert not listening(admin_port)
