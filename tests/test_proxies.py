"""The shipped nginx.conf and Caddyfile, rendered for loopback and run for real in front of the real
service (`python -m service`, demo upstream paced at one token every 4 s, heartbeat 0.5 s, the
default per-client limits) and the admin page (`python -m service admin`).

"Outside" for /metrics: the client binds its socket to 127.0.0.2 while the rendered allowlist holds
only 127.0.0.1, so the proxy sees a source address that is not on the list, exactly as it would a
remote one. Timings compare the server's `sentAt` with the client's clock: same host, same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import WAIT, tool_required
from tests.process import ROOT, free_port
from tests.proxies import (
    NginxPorts,
    caddy,
    caddy_env,
    caddy_validate,
    nginx,
    nginx_check,
    python_service,
    render_caddy,
    render_nginx,
    self_signed,
    sub,
)
from tests.test_probe import cli

# The test client's own TLS sockets to the proxy are closed by asyncio in a callback that can
# miss the end of the test's loop, which `filterwarnings = error` would turn into a failure of an
# unrelated test. What these tests assert is the proxies' behaviour, seen on the wire; the
# client's socket teardown is not part of it (the service's own sockets are in other processes).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_client_sockets() -> Iterator[None]:
    """Collect leftovers here, under this module's filter, not in a later module's test."""
    yield
    gc.collect()


READ_TIMEOUT_S = 2.0  # the proxies' rendered read timeout; the demo upstream is silent for 4 s
EVENT_LAG_S = 0.150
HEADERS_S = 0.100


@dataclass
class Stack:
    tmp: Path
    api: Any
    admin: Any
    cert: tuple[Path, Path]


@dataclass
class Front:
    name: str
    api: str  # base URL of the API site
    admin: str
    api_host: dict[str, str] = field(default_factory=dict)  # Host header selecting the site
    admin_host: dict[str, str] = field(default_factory=dict)
    plain_api: str = ""  # the API site over plain HTTP (probe CLI)
    redirect: str = ""  # nginx's plain HTTP listener (redirects to HTTPS)
    proc: subprocess.Popen[bytes] | None = None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for tool in ("nginx", "caddy", "openssl"):
        if shutil.which(tool) is None:
            tool_required(tool)
    tmp = tmp_path_factory.mktemp("stack")
    env = {"DEMO_TOKENS_PER_S": "0.25", "HEARTBEAT_INTERVAL_S": "0.5", "SHUTDOWN_DRAIN_S": "1"}
    with python_service("api", env, tmp) as api, python_service("admin", {}, tmp) as admin:
        yield Stack(tmp, api, admin, self_signed(tmp))


@contextlib.contextmanager
def running_nginx(stack: Stack, name: str, source: str | None = None) -> Iterator[Front]:
    ports = NginxPorts()
    conf = render_nginx(
        stack.tmp / name,
        api_port=stack.api.port,
        admin_port=stack.admin.port,
        ports=ports,
        cert=stack.cert,
        read_timeout=f"{READ_TIMEOUT_S:g}s",
        source=source,
    )
    front = Front(
        name="nginx",
        api=f"https://127.0.0.1:{ports.https}",
        admin=f"https://127.0.0.1:{ports.https}",
        api_host={"Host": "api.example.com"},
        admin_host={"Host": "admin.example.com"},
        plain_api=f"http://127.0.0.1:{ports.api_plain}",
        redirect=f"http://127.0.0.1:{ports.http}",
    )
    with nginx(conf, ports) as proc:
        front.proc = proc
        yield front


@contextlib.contextmanager
def running_caddy(stack: Stack, name: str, source: str | None = None) -> Iterator[Front]:
    directory = stack.tmp / name
    path = render_caddy(directory, source=source)
    site, admin_site = free_port(), free_port()
    env = caddy_env(
        directory,
        api_port=stack.api.port,
        admin_port=stack.admin.port,
        site_port=site,
        admin_site_port=admin_site,
        read_timeout=f"{READ_TIMEOUT_S:g}s",
    )
    with caddy(path, env, (site, admin_site)) as proc:
        url = f"http://127.0.0.1:{site}"
        yield Front("caddy", url, f"http://127.0.0.1:{admin_site}", plain_api=url, proc=proc)


@pytest.fixture(scope="module")
def nginx_front(stack: Stack) -> Iterator[Front]:
    with running_nginx(stack, "nginx") as front:
        yield front


@pytest.fixture(scope="module")
def caddy_front(stack: Stack) -> Iterator[Front]:
    with running_caddy(stack, "caddy") as front:
        yield front


@pytest.fixture(params=["nginx", "caddy"])
def front(request: pytest.FixtureRequest) -> Front:
    return request.getfixturevalue(f"{request.param}_front")  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def session(local: str = "127.0.0.1") -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=False, local_addr=(local, 0), force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=True
    ) as s:
        yield s


@dataclass
class Probe:
    status: int
    headers: Any
    headers_s: float  # request sent -> headers
    first_s: float  # request sent -> first complete event
    events: list[tuple[dict[str, Any], int, float]]  # payload, frame bytes, arrival (wall clock)


async def read_probe(
    front: Front, query: str = "count=6&interval_ms=200", headers: dict[str, str] | None = None
) -> Probe:
    events: list[tuple[dict[str, Any], int, float]] = []
    async with session() as s:
        sent = time.monotonic()
        async with s.get(
            f"{front.api}/api/ai/stream-probe?{query}",
            headers={**front.api_host, **(headers or {})},
        ) as resp:
            headers_s = time.monotonic() - sent
            first_s = 0.0
            buf = b""
            async with asyncio.timeout(WAIT + 10):
                async for chunk in resp.content.iter_any():
                    arrived = time.time()
                    buf += chunk
                    while b"\n\n" in buf:
                        frame, buf = buf.split(b"\n\n", 1)
                        if not events:
                            first_s = time.monotonic() - sent
                        payload = orjson.loads(frame.split(b"data: ", 1)[1])
                        events.append((payload, len(frame) + 2, arrived))
            return Probe(resp.status, resp.headers, headers_s, first_s, events)


# --- the rendered configs ----------------------------------------------------------------------


def test_rendered_configs_validate(nginx_front: Front, caddy_front: Front, stack: Stack) -> None:
    checked = nginx_check(stack.tmp / "nginx" / "nginx.conf")
    assert checked.returncode == 0
    assert "syntax is ok" in checked.stderr
    env = caddy_env(stack.tmp / "caddy", api_port=1, admin_port=2, site_port=3, admin_site_port=4)
    validated = caddy_validate(stack.tmp / "caddy" / "Caddyfile", env)
    assert validated.returncode == 0, validated.stderr


def test_shipped_files_keep_what_the_tests_cannot_render_away() -> None:
    nginx_conf = (ROOT / "nginx.conf").read_text()
    assert "listen 443 ssl http2;" in nginx_conf
    for line in nginx_conf.splitlines():
        assert not line.strip().startswith(("pid ", "daemon ", "http2 ")), line
    assert "text/event-stream" not in nginx_conf.split("gzip_types", 1)[1].split(";", 1)[0]
    caddyfile = (ROOT / "Caddyfile").read_text()
    assert "grace_period" in caddyfile
    assert "{$API_SITE:" in caddyfile
    assert "{$ADMIN_SITE:" in caddyfile
    assert "auto_https off" not in caddyfile  # real domains get certificates


# --- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_every_probe_event_arrives_within_150_ms(front: Front, encoding: str) -> None:
    probe = await read_probe(front, headers={"Accept-Encoding": encoding})
    assert probe.status == 200
    assert probe.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert probe.headers["Cache-Control"] == "no-cache, no-transform"
    assert "Content-Encoding" not in probe.headers  # never compressed, even when asked
    assert probe.headers_s <= HEADERS_S, probe.headers_s
    assert probe.first_s <= HEADERS_S, probe.first_s
    kinds = [p["type"] for p, _, _ in probe.events]
    assert kinds == ["start"] + ["probe"] * 6 + ["done"]
    sizes = [size for _, size, _ in probe.events]
    assert sizes[0] > 512  # Caddy's encode trap needs a first write over 512 bytes
    assert sizes.count(6144) == 2  # nginx's one-event-late trap needs 6 KB events
    lags = [arrived - payload["sentAt"] for payload, _, arrived in probe.events]
    assert max(lags) <= EVENT_LAG_S, lags


async def test_probe_cli_says_streaming_through_the_shipped_configs(front: Front) -> None:
    done = await cli(front.plain_api, "--count", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("STREAMING: worst lag ")


async def test_a_stream_silent_longer_than_the_read_timeout_survives_on_heartbeats(
    front: Front,
) -> None:
    async with session() as s:
        started = time.monotonic()
        async with s.post(
            f"{front.api}/api/ai/generate-stream",
            json={"prompt": "Write about proxies", "maxTokens": 1},
            headers=front.api_host,
        ) as resp:
            assert resp.status == 200
            frames = []
            first_content = 0.0
            async with asyncio.timeout(20):
                async for line in resp.content:
                    frames.append(line)
                    if line.startswith(b"data: ") and b'"content"' in line and not first_content:
                        first_content = time.monotonic() - started
    pings = frames.count(b": ping\n")
    assert first_content > READ_TIMEOUT_S + 0.5  # the premise: silence beyond the timeout
    assert pings >= 4
    events = [orjson.loads(f[6:]) for f in frames if f.startswith(b"data: ")]
    assert [e["type"] for e in events] == ["start", "content", "done"]


async def test_an_openai_sdk_stream_survives_on_heartbeats_through_the_proxy(
    front: Front,
) -> None:
    """The official SDK, pointed at the proxy's /v1/: the model list, then a stream whose first
    token comes after the proxy's read timeout (the `: ping` blocks keep it open, unseen)."""
    http = openai.DefaultAsyncHttpxClient(verify=False, headers=front.api_host)
    client = openai.AsyncOpenAI(
        base_url=f"{front.api}/v1", api_key="unused", max_retries=0, http_client=http
    )
    async with client:
        model = (await client.models.list()).data[0].id
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Write about proxies"}],
            stream=True,
            max_tokens=1,
        )
        async with asyncio.timeout(20):
            chunks = [c async for c in stream]
        elapsed = time.monotonic() - started
    assert elapsed > READ_TIMEOUT_S + 0.5  # the premise: silence beyond the timeout
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


async def test_a_silent_json_answer_is_cut_by_the_same_read_timeout(front: Front) -> None:
    """The control for the test above: with no heartbeat the rendered timeout does cut."""
    async with session() as s:
        started = time.monotonic()
        async with s.post(
            f"{front.api}/api/ai/generate",
            json={"prompt": "Write about proxies", "maxTokens": 1},
            headers=front.api_host,
        ) as resp:
            elapsed = time.monotonic() - started
            assert resp.status in (502, 504)  # nginx: 504 Gateway Timeout; Caddy: 502
    assert READ_TIMEOUT_S - 0.1 <= elapsed < 4.0


# --- headers, addresses, routes ---------------------------------------------------------------


async def test_request_id_passes_through_both_ways(front: Front) -> None:
    probe = await read_probe(
        front, "count=1&interval_ms=50", headers={"X-Request-ID": "trace-7f3c.9e2a"}
    )
    assert probe.headers["X-Request-ID"] == "trace-7f3c.9e2a"
    assert probe.events[0][0]["requestId"] == "trace-7f3c.9e2a"  # it reached the app
    async with session() as s, s.get(f"{front.api}/health", headers=front.api_host) as resp:
        assert resp.status == 200
        assert len(resp.headers["X-Request-ID"]) == 32  # the app made one


async def test_the_client_address_is_forwarded(front: Front) -> None:
    """Limits are per client address: two requests from one address and one from another each
    count against their own (fresh) budget, not the proxy's."""
    net = "127.0.1" if front.name == "nginx" else "127.0.2"
    remaining = []
    for local in (f"{net}.1", f"{net}.1", f"{net}.2"):
        async with (
            session(local) as s,
            s.get(
                f"{front.api}/api/ai/stream-probe?count=1&interval_ms=50", headers=front.api_host
            ) as resp,
        ):
            assert resp.status == 200
            await resp.read()
            remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
    rpm = 120  # RATE_LIMIT_RPM (the default): remaining counts down from it
    assert remaining == [rpm - 1, rpm - 2, rpm - 1]


async def test_metrics_are_refused_from_outside(front: Front) -> None:
    async with (
        session("127.0.0.2") as s,
        s.get(f"{front.api}/metrics", headers=front.api_host) as resp,
    ):
        assert resp.status == 403
        assert b"ai_stream" not in await resp.read()
    async with (
        session() as s,
        s.get(
            f"{front.api}/metrics", headers={**front.api_host, "Accept-Encoding": "gzip"}
        ) as resp,
    ):
        assert resp.status == 200
        if front.name == "caddy":  # compression for other content (nginx: see its gzip_types)
            assert resp.headers["Content-Encoding"] == "gzip"
        assert b"ai_stream_requests_total" in await resp.read()


async def test_routes_health_admin_and_unknown_paths(front: Front) -> None:
    async with session() as s:
        async with s.get(f"{front.api}/health/ready", headers=front.api_host) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        # chat routes live under /api/v1/ai/: they reach the app (its JSON error, its request id)
        unknown = {"message": "hi", "conversationId": "c_AAAAAAAAAAAAAAAAAAAAAA"}
        async with s.post(
            f"{front.api}/api/v1/ai/chat/stream", json=unknown, headers=front.api_host
        ) as resp:
            assert resp.status == 404
            assert "X-Request-ID" in resp.headers
            assert await resp.json() == {
                "error": {"code": "not_found", "message": "No such conversation."}
            }
        # The admin site sends /api/ to the API too, unbuffered: the page calls its own origin.
        async with s.get(
            f"{front.admin}/api/ai/stream-probe?count=1&interval_ms=50", headers=front.admin_host
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert "Content-Encoding" not in resp.headers
            assert b'"type":"done"' in await resp.read()
        async with s.get(f"{front.api}/elsewhere", headers=front.api_host) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
            assert "X-Request-ID" not in resp.headers  # answered by the proxy
        async with s.get(f"{front.admin}/health", headers=front.admin_host) as resp:
            assert await resp.json() == {"status": "ok"}
        async with s.get(f"{front.admin}/", headers=front.admin_host) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")


async def test_nginx_redirects_plain_http_and_strips_x_accel_buffering(
    nginx_front: Front, stack: Stack
) -> None:
    redirect = nginx_front.redirect
    async with session() as s:
        async with s.get(
            f"{redirect}/api/ai/generate", headers=nginx_front.api_host, allow_redirects=False
        ) as resp:
            assert resp.status == 301
            assert resp.headers["Location"] == "https://api.example.com/api/ai/generate"
        async with s.get(f"{stack.api.url}/api/ai/stream-probe?count=1&interval_ms=50") as resp:
            assert resp.headers["X-Accel-Buffering"] == "no"  # the app sends it
            await resp.read()
    probe = await read_probe(nginx_front, "count=1&interval_ms=50")
    assert "X-Accel-Buffering" not in probe.headers  # nginx consumes it


# --- traps: each guard alone, the buffering configs, bounded stops ----------------------------

_NGINX = (ROOT / "nginx.conf").read_text() if (ROOT / "nginx.conf").exists() else ""
_BUFFERING_OFF = "            proxy_buffering off;\n"
_IGNORE_HEADER = "            proxy_ignore_headers X-Accel-Buffering;\n"


@pytest.mark.parametrize(
    "guard",
    ["proxy_buffering off alone", "X-Accel-Buffering alone"],
)
async def test_nginx_each_guard_alone_streams(stack: Stack, guard: str) -> None:
    assert _BUFFERING_OFF in _NGINX
    if guard == "proxy_buffering off alone":
        source = _NGINX.replace(_BUFFERING_OFF, _BUFFERING_OFF + _IGNORE_HEADER)
    else:
        source = _NGINX.replace(_BUFFERING_OFF, "")
    with running_nginx(stack, guard.replace(" ", "-"), source) as front:
        probe = await read_probe(front)
    lags = [arrived - payload["sentAt"] for payload, _, arrived in probe.events]
    assert len(lags) == 8
    assert max(lags) <= EVENT_LAG_S, lags


_CADDY = (ROOT / "Caddyfile").read_text() if (ROOT / "Caddyfile").exists() else ""


@pytest.mark.parametrize(
    "config",
    ["nginx default proxy_pass", "nginx keepalive without buffering off", "caddy encode all"],
)
async def test_probe_cli_says_buffered_through_a_buffering_config(
    stack: Stack, config: str
) -> None:
    name = config.replace(" ", "-")
    if config.startswith("nginx"):
        # The app's X-Accel-Buffering is ignored, as a CDN or another proxy would.
        source = _NGINX.replace(_BUFFERING_OFF, _IGNORE_HEADER)
        if config == "nginx default proxy_pass":
            source = source.replace("        proxy_http_version 1.1;", "        #")
            source = source.replace('        proxy_set_header Connection "";', "        #")
        runner = running_nginx(stack, name, source)
    else:
        source = sub(_CADDY, r"encode gzip zstd \{[\s\S]*?\n\t\}\n", "encode gzip zstd\n", 1)
        runner = running_caddy(stack, name, source)
    with runner as front:
        done = await cli(front.plain_api, "--count", "6")
    assert done.returncode == 1, done.stdout + done.stderr
    verdict = done.stdout.splitlines()[-1]
    assert verdict.startswith("BUFFERED: worst lag "), verdict
    assert int(verdict.split()[3]) > 150


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
async def test_stopping_the_proxy_with_an_open_stream_is_bounded(stack: Stack, proxy: str) -> None:
    """nginx waits for open streams forever on quit unless worker_shutdown_timeout bounds it
    (rendered 1 s); Caddy's grace_period (rendered 1 s) does the same."""
    runner = running_nginx(stack, "quit") if proxy == "nginx" else running_caddy(stack, "stop")
    with runner as front:
        assert front.proc is not None
        frames: list[bytes] = []
        async with (
            session() as s,
            s.post(
                f"{front.api}/api/ai/generate-stream",
                json={"prompt": "Write about shutdown", "maxTokens": 3},  # 12 s at the demo's pace
                headers=front.api_host,
            ) as resp,
        ):
            frames.append(await resp.content.readline())
            assert frames[0].startswith(b'data: {"type":"start",')
            stopped = time.monotonic()
            front.proc.send_signal(signal.SIGQUIT if proxy == "nginx" else signal.SIGINT)
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async with asyncio.timeout(WAIT):
                    async for line in resp.content:
                        frames.append(line)
        code = await asyncio.to_thread(front.proc.wait, WAIT)
        assert time.monotonic() - stopped < WAIT
    assert code == 0
    assert not any(b'"done"' in f for f in frames)  # cut by the bound, not ended by the answer
