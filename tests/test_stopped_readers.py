"""Readers that stop reading are found long before `MAX_STREAM_S`, and their upstream request is
cancelled: a vanished peer (acknowledges nothing) within `WRITE_TIMEOUT_S` plus one heartbeat
interval (plus the kernel's first retransmission timeout), a frozen one (acknowledges, never reads)
once a bounded amount is queued for it. Run with `-s` to see the measured figures."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from service import keys, tcp
from service.app import create_app
from service.upstream import OpenAIUpstream
from tests.conftest import API_KEY, MakeGateway, make_settings
from tests.fake_upstream import FakeUpstream, Gate, Repeat, Step, Text
from tests.netns import SERVER_ADDRESS, VethPair, veth_pair
from tests.process import service

# On top of every bound below: the kernel's first retransmission timeout (the user timeout counts
# from it; 0.4 s on these veth links) and scheduling slack on a shared machine.
MARGIN_S = 1.0


def request_bytes(path: str, body: dict[str, Any]) -> bytes:
    data = orjson.dumps(body)
    return (
        b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (path.encode(), len(data), data)
    )


OPTION_NAMES = {
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): "keepalive",
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): "idle",
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): "interval",
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): "probes",
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT): "user_timeout_ms",
}


@pytest.mark.parametrize(
    ("write_timeout_s", "heartbeat_interval_s", "idle", "interval", "user_timeout_ms"),
    [
        (30.0, 15.0, 15, 5, 30_000),  # the defaults: idle after a heartbeat, probes every 5 s
        (30.0, 0.0, 30, 10, 30_000),  # heartbeats off: idle after the write deadline
        (10.0, 60.0, 60, 4, 10_000),  # probes every third of the shorter one
        (2.0, 1.0, 1, 1, 2_000),
        (0.25, 0.1, 1, 1, 250),  # keep-alive counts whole seconds, at least one
    ],
)
def test_peer_options_follow_the_write_deadline_and_the_heartbeat(
    write_timeout_s: float, heartbeat_interval_s: float, idle: int, interval: int,
    user_timeout_ms: int,
) -> None:  # fmt: skip
    options = tcp.peer_options(write_timeout_s, heartbeat_interval_s)
    assert {OPTION_NAMES[level, name]: value for level, name, value in options} == {
        "keepalive": 1,
        "idle": idle,
        "interval": interval,
        "probes": 3,
        "user_timeout_ms": user_timeout_ms,
    }


def test_no_write_deadline_leaves_the_system_defaults() -> None:
    assert tcp.peer_options(0.0, 15.0) == ()


@dataclass
class NamespacedGateway:
    """The gateway listening on the server end of a veth pair (a real AppRunner with handler
    cancellation on, as the process runs it), its upstream the scripted fake on loopback."""

    pair: VethPair
    app: web.Application
    port: int
    registry: CollectorRegistry

    def outcomes(self, route: str) -> float:
        value = self.registry.get_sample_value(
            "ai_stream_outcomes_total", {"route": route, "outcome": "client_disconnect"}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def namespaced_gateway(
    fake: FakeUpstream, **overrides: Any
) -> AsyncIterator[NamespacedGateway]:
    async with veth_pair() as pair:
        settings = make_settings(openai_base_url=fake.url, **overrides)
        upstream = OpenAIUpstream(settings)
        registry = CollectorRegistry()
        app = create_app(settings, upstream=upstream, registry=registry)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        listener = pair.listener()
        try:
            await web.SockSite(runner, listener).start()
            yield NamespacedGateway(pair, app, listener.getsockname()[1], registry)
        finally:
            await runner.cleanup()
            await upstream.aclose()
            listener.close()


async def read_until(sock: socket.socket, marker: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    seen = b""
    async with asyncio.timeout(5):
        while marker not in seen:
            data = await loop.sock_recv(sock, 65536)
            assert data, seen
            seen += data
    return seen


def vanished_case(case: str) -> tuple[str, list[Step], bytes]:
    """The route, the upstream's script, and what the client reads before it vanishes."""
    if case == "stream at token pace":  # data is always in flight when the peer vanishes
        return "/api/ai/generate-stream", [Repeat("tok ", 0.02)], b'"content"'
    if case == "stream with a silent upstream":  # only the heartbeat writes
        return "/api/ai/generate-stream", [Text("a"), Gate(asyncio.Event())], b'"content"'
    # the JSON route writes nothing until the end: only keep-alive probes find the peer gone
    return "/api/ai/generate", [Gate(asyncio.Event())], b""


VANISHED_CASES = [
    "stream at token pace",
    "stream with a silent upstream",
    "JSON answer still generating",
]


@pytest.mark.parametrize("case", VANISHED_CASES)
async def test_a_vanished_peer_is_found_within_the_write_deadline_plus_a_heartbeat(
    fake: FakeUpstream, case: str
) -> None:
    path, script, started = vanished_case(case)
    write_timeout_s, heartbeat_s = 2.0, 1.0
    fake.queue(script)
    async with namespaced_gateway(
        fake,
        write_timeout_s=write_timeout_s,
        heartbeat_interval_s=heartbeat_s,
        idle_timeout_s=0,
        first_token_timeout_s=0,
    ) as gateway:
        loop = asyncio.get_running_loop()
        client = gateway.pair.client()
        try:
            async with asyncio.timeout(5):
                await loop.sock_connect(client, (SERVER_ADDRESS, gateway.port))
                await loop.sock_sendall(client, request_bytes(path, {"prompt": "x"}))
                await fake.arrived.wait()
            if started:
                await read_until(client, started)  # the stream is flowing
            await gateway.pair.vanish_client()
            vanished = loop.time()
            async with asyncio.timeout(write_timeout_s + heartbeat_s + MARGIN_S):
                await fake.seen[0].ended.wait()
            detected_s = loop.time() - vanished
            async with asyncio.timeout(5):
                await gateway.app[keys.LIVE].idle()
        finally:
            client.close()
    print(f"\n{case}: vanished peer found after {detected_s:.2f} s")
    assert fake.seen[0].cancelled
    route = "generate" if path == "/api/ai/generate" else "generate_stream"
    assert gateway.outcomes(route) == 1


FROZEN_WRITE_TIMEOUT_S = 2.0
FROZEN_INTERVAL_S = 0.01  # a 200-character delta every 10 ms: frames of ~270 bytes, ~25 KB/s


@dataclass
class Frozen:
    detected_s: float
    received: bytes  # what the client's kernel took for it (it never read)


async def freeze_reader(fake: FakeUpstream, host: str, port: int) -> Frozen:
    """Start a stream from a real socket that never reads; return once the upstream request is
    cancelled (bounded by the fill time at the stream's pace plus the write deadline)."""
    fake.queue([Repeat("x" * 200, FROZEN_INTERVAL_S)])
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, request_bytes("/api/ai/generate-stream", {"prompt": "x"}))
            await fake.arrived.wait()
        started = loop.time()
        window = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        rate = 270 / (FROZEN_INTERVAL_S * 1.5)  # bytes/s, with the fake's scheduling slack
        fill_s = (window + tcp.STREAM_QUEUE_BOUND) / rate
        async with asyncio.timeout(fill_s + FROZEN_WRITE_TIMEOUT_S + MARGIN_S):
            await fake.seen[0].ended.wait()
        detected_s = loop.time() - started
        return Frozen(detected_s, await drain(sock))
    finally:
        sock.close()


def assert_bounded(frozen: Frozen, relayed: float) -> None:
    """What the server had queued (frames relayed but not received, at the frames' own size) is
    within `STREAM_QUEUE_BOUND` plus the frame being written."""
    counts = [(m.start(), int(m[1])) for m in re.finditer(rb'"tokenCount":(\d+)', frozen.received)]
    (first_at, first), (last_at, last) = counts[0], counts[-1]
    per_delta = (last_at - first_at) / (last - first)
    queued = (relayed - last) * per_delta
    print(
        f"\nfrozen reader: cut after {frozen.detected_s:.2f} s, {len(frozen.received)} bytes in "
        f"the client's buffer, about {queued:.0f} bytes queued on the server "
        f"({relayed:.0f} deltas relayed)"
    )
    assert queued <= tcp.STREAM_QUEUE_BOUND + 2 * per_delta


async def test_a_frozen_reader_is_cut_once_a_bounded_amount_is_queued(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(write_timeout_s=FROZEN_WRITE_TIMEOUT_S, heartbeat_interval_s=1.0)
    server = gateway.client.server
    assert server.port is not None
    frozen = await freeze_reader(gateway.fake, server.host, server.port)
    await gateway.settled()
    assert gateway.fake.seen[0].cancelled
    assert gateway.outcomes() == {"client_disconnect": 1}
    assert_bounded(frozen, gateway.sample("ai_stream_completion_tokens_total", model="test-model"))


async def test_the_real_process_cuts_a_frozen_reader(fake: FakeUpstream, tmp_path: Path) -> None:
    """The same under `python -m service` (uvloop, the process's own HTTP layer)."""
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "test-model",
        "WRITE_TIMEOUT_S": str(FROZEN_WRITE_TIMEOUT_S),
        "HEARTBEAT_INTERVAL_S": "1",
        "RATE_LIMIT_RPM": "0",
        "RESUME_GRACE_S": "0",  # a dropped reader's generation would otherwise wait for it
    }
    async with service(env, tmp_path) as svc:
        frozen = await freeze_reader(fake, "127.0.0.1", svc.port)
        async with aiohttp.ClientSession() as session, asyncio.timeout(5):
            while True:  # the outcome is counted once the handler has finished its teardown
                metrics = await (await session.get(f"{svc.url}/metrics")).text()
                if OUTCOME in metrics:
                    break
                await asyncio.sleep(0.05)  # bounded polling of another process's state
    assert fake.seen[0].cancelled
    relayed = re.search(r'ai_stream_completion_tokens_total\{model="test-model"\} (\S+)', metrics)
    assert relayed is not None
    assert_bounded(frozen, float(relayed[1]))


OUTCOME = 'ai_stream_outcomes_total{outcome="client_disconnect",route="generate_stream"} 1.0'


async def drain(sock: socket.socket) -> bytes:
    """Everything the client's kernel holds for it, up to the end of the connection."""
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(5):
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                return received
            if not data:
                return received
            received += data
