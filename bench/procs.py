"""Child processes of the runner and what /proc says about them.

Starting (optionally pinned with `taskset`), waiting for an HTTP readiness URL, stopping with a
signal and a bounded wait before SIGKILL, and reading CPU time (`/proc/<pid>/stat`) and memory
(`/proc/<pid>/status`). Every wait here is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Settings of the parent environment that would point the service somewhere else.
_CLEARED = (
    "OPENAI_",
    "AZURE_OPENAI_",
    "PORT",
    "HOST",
    "ADMIN_PORT",
    "REDIS_URL",
    "API_KEYS",
    "RESUME_",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_plan(enabled: bool) -> tuple[list[str], list[str], str]:
    """`taskset` prefixes for (bench processes, service) and a note saying what was done."""
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled:
        return [], [], "pinning disabled (--no-pin)"
    if taskset is None or len(cpus) < 2:
        return [], [], f"not pinned (taskset {'found' if taskset else 'missing'}, {len(cpus)} CPUs)"
    bench_cpu, service_cpu = cpus[0], cpus[1]
    return (
        [taskset, "-c", str(bench_cpu)],
        [taskset, "-c", str(service_cpu)],
        f"upstream and load generator on CPU {bench_cpu}, service on CPU {service_cpu}",
    )


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED)}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


class Child:
    """One child process with its output going to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_http(self, url: str, seconds: float) -> None:
        """Poll `url` until it answers 200 (bounded); raise if the process dies or time runs out."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1.0) as resp,  # noqa: S310 - loopback URL
            ):
                if resp.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready at {url} after {seconds:.0f} s")

    def wait(self, seconds: float) -> int | None:
        """Wait up to `seconds` for the process to exit; its exit code, or None if still running."""
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: signal.Signals = signal.SIGINT, grace_s: float = 30.0) -> int | None:
        """Send `sig`, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        try:
            if self.running():
                self.proc.send_signal(sig)
                if self.wait(grace_s) is None:
                    print(f"[bench] {self.name} ignored {sig.name}: killing", file=sys.stderr)
                    self.proc.kill()
                    self.wait(10.0)
            return self.proc.returncode
        finally:
            self._out.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def cpu_seconds_fine(pid: int) -> float:
    """CPU time of the process's live threads in nanosecond resolution (`/proc/<pid>/task/*/
    schedstat`), for processes whose cost in one run is a few clock ticks (nginx, redis-server);
    threads that already exited are not counted, so it suits processes with fixed threads."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open(f"/proc/{pid}/task/{tid}/schedstat") as f,
        ):
            total += int(f.read().split()[0])
    return total / 1e9


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KB, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                key, value = line.split(b":", 1)
                found[key.decode()] = int(value.split()[0])
    return found


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
