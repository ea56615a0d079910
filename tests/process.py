"""Run `python -m service` as a real process on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
_CLEARED = (
    "OPENAI_",
    "AZURE_OPENAI_",
    "PORT",
    "HOST",
    "ADMIN_PORT",
    "REDIS_URL",
    "API_KEYS",
    "CHAT_",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED)}
    env.update({"PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json", **extra})
    return env


class ServiceProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    async def wait_healthy(self, seconds: float = 20.0) -> None:
        """Poll /health until it answers (bounded); fail early if the process died."""
        async with asyncio.timeout(seconds), aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"service exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, seconds: float) -> int:
        async with asyncio.timeout(seconds):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def service(
    env: Mapping[str, str],
    tmp: Path,
    command: str = "api",
    port: int | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[ServiceProcess]:
    """`python -m service [command]` on `port` or a free one (PORT, or ADMIN_PORT for the admin
    page); `preexec_fn` runs in the child before it starts (e.g. to set its resource limits)."""
    port = port or free_port()
    log = tmp / f"service-{command}-{port}.log"
    port_variable = "ADMIN_PORT" if command == "admin" else "PORT"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            command,
            cwd=ROOT,
            env=clean_env(
                {port_variable: str(port), "CHAT_DB_PATH": str(tmp / "conversations.db"), **env}
            ),
            stdout=out,
            stderr=out,
            preexec_fn=preexec_fn,
        )
    running = ServiceProcess(proc, port, log)
    try:
        await running.wait_healthy()
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def curl_events(*args: str) -> list[dict[str, Any]]:
    """Run curl as a user would (bounded) and return the JSON of every `data: ` line it printed."""
    proc = await asyncio.create_subprocess_exec("curl", *args, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return [orjson.loads(line[6:]) for line in out.splitlines() if line.startswith(b"data: ")]
