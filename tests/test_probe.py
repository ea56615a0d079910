"""The stream probe: `GET /api/ai/stream-probe` (wire shape, bounds, limits, shutdown) and the
`python -m service probe URL` client (lag arithmetic, verdict, exit status)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from typing import Any

import orjson
import pytest

from service import keys
from service.buffering import Arrival, ProbeFailed, judge, probe_url
from tests.conftest import MakeGateway
from tests.process import ROOT, free_port

PATH = "/api/ai/stream-probe"


def frames_of(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n")
    return [f + b"\n\n" for f in body[:-2].split(b"\n\n")]


def data(frame: bytes) -> dict[str, Any]:
    """The one `data:` line of a frame; the probe hands out no cursors (it cannot be resumed)."""
    line, rest = frame.split(b"\n", 1)
    assert line.startswith(b"data: ")
    assert rest == b"\n"
    return dict(orjson.loads(line[6:]))


async def test_the_probe_writes_timed_events_shaped_to_trip_buffers(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway()
    resp = await gw.client.get(
        f"{PATH}?count=6&interval_ms=50", headers={"X-Request-ID": "probe-1"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache, no-transform"
    assert resp.headers["X-Accel-Buffering"] == "no"
    frames = frames_of(await resp.read())
    assert len(frames) == 8
    events = [data(f) for f in frames]
    assert [e["type"] for e in events] == ["start"] + ["probe"] * 6 + ["done"]
    assert events[0]["requestId"] == "probe-1"
    assert events[0]["count"] == 6
    assert events[0]["intervalMs"] == 50
    assert [e["seq"] for e in events[1:7]] == [1, 2, 3, 4, 5, 6]
    sizes = [len(f) for f in frames[:7]]
    assert sizes[0] == 1024  # over Caddy's 512-byte encode threshold
    assert sizes[3] == sizes[6] == 6144  # every third probe event: nginx's one-event-late size
    assert max(sizes[1], sizes[2], sizes[4], sizes[5]) < 100
    sent = [e["sentAt"] for e in events]
    assert sent == sorted(sent)
    gaps = [b - a for a, b in itertools.pairwise(sent[1:7])]
    assert min(gaps) >= 0.045  # paced on the interval, not written in one go
    assert events[-1]["requestId"] == "probe-1"
    assert events[-1]["count"] == 6


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("count=0", "count: must be an integer from 1 to 100"),
        ("count=101", "count: must be an integer from 1 to 100"),
        ("count=-1", "count: must be an integer from 1 to 100"),
        ("count=ten", "count: must be an integer from 1 to 100"),
        ("count=", "count: must be an integer from 1 to 100"),
        ("interval_ms=49", "interval_ms: must be an integer from 50 to 2000"),
        ("interval_ms=2001", "interval_ms: must be an integer from 50 to 2000"),
        ("interval_ms=1.5", "interval_ms: must be an integer from 50 to 2000"),
        ("count=100&interval_ms=1000", "count x interval_ms: must be at most 60000 ms"),
        # digits of other scripts, which str.isdigit and int() accept
        ("count=%C2%B2", "count: must be an integer from 1 to 100"),
        ("count=%D9%A3", "count: must be an integer from 1 to 100"),
        ("interval_ms=%EF%BC%95%EF%BC%90", "interval_ms: must be an integer from 50 to 2000"),
        ("count=0000000000000000000000001", "count: must be an integer from 1 to 100"),
    ],
)
async def test_bad_parameters_get_400(make_gateway: MakeGateway, query: str, message: str) -> None:
    gw = await make_gateway()
    resp = await gw.client.get(f"{PATH}?{query}")
    assert resp.status == 400
    assert await resp.json() == {"error": {"code": "bad_request", "message": message}}


async def test_the_probe_counts_as_a_request_and_holds_a_slot(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(rate_limit_rpm=60, rate_limit_concurrent=1)
    first = await gw.client.get(f"{PATH}?count=2&interval_ms=500")
    assert first.status == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "59"
    await first.content.readuntil(b"\n\n")  # open, holding the client's one slot
    busy = await gw.client.get(f"{PATH}?count=1&interval_ms=50")
    assert busy.status == 429
    assert "concurrent streams" in (await busy.json())["error"]["message"]
    assert busy.headers["Retry-After"] == "1"
    await first.read()  # the body ends once the handler returned: the slot is free by now
    assert await gw.client.app[keys.LIMITS].limiter.concurrent("ip:127.0.0.1", 0) == 0
    again = await gw.client.get(f"{PATH}?count=1&interval_ms=50")
    assert again.status == 200
    await again.read()


async def test_the_probe_costs_no_tokens(make_gateway: MakeGateway) -> None:
    """With a budget of one token a minute, admission reserves that token; it is given back at
    the end, so probe after probe is admitted."""
    gw = await make_gateway(rate_limit_tpm=1)
    for _ in range(3):
        resp = await gw.client.get(f"{PATH}?count=1&interval_ms=50")
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
        await resp.read()  # the body ends once the handler returned, the token given back


async def test_shutdown_ends_an_open_probe_with_server_shutdown(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    resp = await gw.client.get(f"{PATH}?count=20&interval_ms=100")
    assert data(await resp.content.readuntil(b"\n\n"))["type"] == "start"
    await gw.client.app[keys.LIVE].drain(1.0)
    events = [data(f) for f in frames_of(await resp.read())]
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "server_shutdown"
    assert events[-1]["reason"] == "shutdown"
    assert len(events) < 5  # ended at the next tick, not after the 20 events
    refused = await gw.client.get(f"{PATH}?count=1&interval_ms=50")
    assert refused.status == 503


# --- the client ------------------------------------------------------------------------------


def arrivals(delays_ms: list[float], spacing_ms: float = 200, offset_s: float = 0) -> list[Arrival]:
    """Events written `spacing_ms` apart, each arriving `delay` later, on a client clock that is
    `offset_s` ahead of the server's."""
    out = []
    for n, delay in enumerate(delays_ms):
        sent = 1000.0 + n * spacing_ms / 1000
        payload = {"type": "probe", "seq": n, "sentAt": sent}
        out.append(Arrival(payload, 70, sent + delay / 1000 + offset_s))
    return out


@pytest.mark.parametrize(
    ("delays_ms", "offset_s", "streaming", "worst_ms"),
    [
        ([1, 2, 1, 3, 1], 0, True, 2),
        ([1, 2, 1, 3, 1], -7200.5, True, 2),  # clocks two hours apart
        ([1, 2, 1, 3, 1], 31.25, True, 2),
        ([800, 600, 400, 200, 0], 3.0, False, 800),  # all released at the end
        ([1, 201, 1, 201, 1], 0, False, 200),  # large events one interval late
        ([1, 150, 1], 0, True, 149),  # the threshold itself still streams
    ],
)
def test_lag_is_measured_against_the_fastest_event(
    delays_ms: list[float], offset_s: float, streaming: bool, worst_ms: float
) -> None:
    verdict = judge(arrivals(delays_ms, offset_s=offset_s))
    assert verdict.streaming is streaming
    assert verdict.worst_ms == pytest.approx(worst_ms, abs=0.01)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com", "https://api.example.com/api/ai/stream-probe"),
        ("https://api.example.com/", "https://api.example.com/api/ai/stream-probe"),
        ("http://lb:8080/gateway", "http://lb:8080/gateway/api/ai/stream-probe"),
        ("http://h/api/ai/stream-probe", "http://h/api/ai/stream-probe"),
    ],
)
def test_probe_url(url: str, expected: str) -> None:
    assert probe_url(url, 5, 300) == expected + "?count=5&interval_ms=300"


def test_probe_url_refuses_what_is_not_http() -> None:
    with pytest.raises(ProbeFailed):
        probe_url("api.example.com", 5, 300)


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "probe", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())


async def test_cli_streaming_against_the_service(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(api_keys=("sk-probe-key",))
    url = str(gw.client.make_url("/"))
    done = await cli(url, "--count", "4", "--interval-ms", "50", "--key", "sk-probe-key")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"probe {url.rstrip('/')}{PATH}?count=4&interval_ms=50"
    assert lines[1].startswith("HTTP 200, Content-Encoding: none, X-Request-ID: ")
    names = [line.split()[0] for line in lines[4:10]]
    assert names == ["start", "probe", "probe", "probe", "probe", "done"]
    assert lines[-1].startswith("STREAMING: worst lag ")
    assert lines[-1].endswith(" over 6 events; threshold 150 ms")


async def test_cli_errors_exit_2(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(api_keys=("sk-probe-key",))
    url = str(gw.client.make_url("/"))
    unauthorized = await cli(url, "--count", "2")
    assert unauthorized.returncode == 2
    assert unauthorized.stderr.startswith("probe failed: HTTP 401: A valid API key is required")
    bad = await cli(url, "--count", "0", "--key", "sk-probe-key")
    assert bad.returncode == 2
    assert "HTTP 400: count: must be an integer from 1 to 100" in bad.stderr
    nobody = await cli(f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 2
    assert nobody.stderr.startswith("probe failed: ClientConnectorError")
