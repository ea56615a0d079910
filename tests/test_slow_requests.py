"""Slow request heads and bodies against the real process: each is answered 408 within its
deadline, the process takes its whole descriptor limit, and `/health` keeps answering while more
slow clients than the default soft limit allows are connected, each re-opened as soon as it is
answered.

The child's limits are lowered (soft 256, hard 1024) so that exhaustion is reachable with a few
hundred sockets: 400 slow clients would exhaust the soft limit, and fit under the hard one.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tests.process import ServiceProcess, service

SOFT, HARD = 256, 1024
ATTACKERS = 400
ATTACK_S = 8.0
DEADLINE_S = 1.0  # BODY_TIMEOUT_S and HEADER_TIMEOUT_S
DRIBBLE_S = 0.4  # one byte this often: never a whole body or head within the deadline
PROBE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 2.0


def low_fd_limits() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


@dataclass
class Tally:
    lifetimes: dict[str, list[float]] = field(default_factory=lambda: {"body": [], "head": []})
    answers: dict[str, list[bytes]] = field(default_factory=lambda: {"body": [], "head": []})
    probes_sent: int = 0
    probes_answered: int = 0


HEADS = {
    "body": b"POST /api/ai/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{",
    "head": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
}


async def slow_client(port: int, kind: str, until: float, tally: Tally) -> None:
    """Connect, dribble a head or a body, read the answer; again at once, until `until`."""
    loop = asyncio.get_running_loop()
    for _ in range(100):  # bounded in count as well as in time
        if loop.time() >= until:
            return
        started = loop.time()
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except (OSError, TimeoutError):
            continue
        answer = b""
        try:
            writer.write(HEADS[kind])
            read = asyncio.ensure_future(reader.read())  # until the server closes
            while loop.time() < started + 5:
                done, _ = await asyncio.wait([read], timeout=DRIBBLE_S)
                if done:
                    answer = read.result()
                    break
                writer.write(b"x")
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
        except OSError:
            pass  # reset after the answer: it ended all the same
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        tally.lifetimes[kind].append(loop.time() - started)
        tally.answers[kind].append(answer)


async def probe(port: int, tally: Tally) -> None:
    tally.probes_sent += 1
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.0\r\n\r\n")
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return
    if answer.split(b"\r\n", 1)[0].endswith(b" 200 OK") and answer.endswith(b'{"status":"ok"}'):
        tally.probes_answered += 1


async def probes(port: int, until: float, tally: Tally) -> None:
    """One probe every PROBE_EVERY_S on a fixed schedule, each on its own (bounded) task."""
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as group:
        tick = loop.time()
        while tick < until:
            group.create_task(probe(port, tally))
            tick += PROBE_EVERY_S
            await asyncio.sleep(max(0.0, tick - loop.time()))  # the cadence is the subject


def open_files_limits(svc: ServiceProcess) -> tuple[int, int]:
    for line in Path(f"/proc/{svc.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


async def test_slow_heads_and_bodies_are_cut_and_health_keeps_answering(tmp_path: Path) -> None:
    env = {
        "BODY_TIMEOUT_S": str(DEADLINE_S),
        "HEADER_TIMEOUT_S": str(DEADLINE_S),
        "RATE_LIMIT_RPM": "0",
        "LISTEN_BACKLOG": "1024",
    }
    tally = Tally()
    async with service(env, tmp_path, preexec_fn=low_fd_limits) as svc:
        assert open_files_limits(svc) == (HARD, HARD)
        until = asyncio.get_running_loop().time() + ATTACK_S
        async with asyncio.TaskGroup() as group:
            for n in range(ATTACKERS):
                group.create_task(slow_client(svc.port, ("body", "head")[n % 2], until, tally))
            group.create_task(probes(svc.port, until, tally))
        log = svc.log.read_bytes()
    body_408 = sum(a.startswith(b"HTTP/1.1 408 ") for a in tally.answers["body"])
    head_408 = sum(a.startswith(b"HTTP/1.1 408 ") for a in tally.answers["head"])
    print(  # the figures, for -s
        f"probes answered {tally.probes_answered}/{tally.probes_sent}; "
        f"slow bodies answered 408: {body_408}/{len(tally.answers['body'])}, longest "
        f"{max(tally.lifetimes['body']):.2f} s; slow heads answered 408: "
        f"{head_408}/{len(tally.answers['head'])}, longest {max(tally.lifetimes['head']):.2f} s"
    )
    assert tally.probes_answered >= 0.99 * tally.probes_sent
    for kind in ("body", "head"):
        # every slow client was cut near its deadline, and re-opened several times meanwhile
        assert len(tally.lifetimes[kind]) >= ATTACKERS // 2 * 3
        assert max(tally.lifetimes[kind]) <= DEADLINE_S + 1.5
    assert body_408 >= 0.9 * len(tally.answers["body"])
    assert head_408 >= 0.9 * len(tally.answers["head"])
    body = next(a for a in tally.answers["body"] if a.startswith(b"HTTP/1.1 408 "))
    assert orjson.loads(body.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    for line in log.splitlines():
        orjson.loads(line)
