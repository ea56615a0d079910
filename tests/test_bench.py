"""The benchmark harness's own parts, run for real: the shipped nginx.conf's relay rules rendered
for the bench and relaying the bench upstream unbuffered, nginx's CPU read from /proc, arrivals
spread over a ramp, the reconnect scenario's client against a server that follows the resume
contract, variants on the command line, and how rounds become rows."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from bench import load, nginx
from bench.__main__ import parse_args, retained_gauges
from bench.procs import Child, child_env, free_port
from bench.scenarios import (
    MODELS,
    OPENAI_VARIANTS,
    RESUME_VARIANTS,
    Round,
    Scenario,
    build,
    parse_variant,
    rows_for,
    table,
)
from tests.conftest import tool_required
from tests.process import service

SHIPPED = nginx.SHIPPED.read_text()


def test_relay_rules_are_the_shipped_api_site_rules() -> None:
    rules = nginx.relay_rules(SHIPPED)
    assert "proxy_buffering off;" in rules["location"]
    assert "proxy_pass http://bench_upstream;" in rules["location"]
    assert "proxy_http_version 1.1;" in rules["server"]
    assert 'proxy_set_header Connection "";' in rules["server"]
    assert rules["keepalive"] == ["keepalive 64;"]
    assert [d.split()[0] for d in rules["http"]] == [
        "server_tokens",
        "sendfile",
        "tcp_nopush",
        "keepalive_timeout",
    ]


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        ("proxy_buffering off;", "does not turn proxy_buffering off"),
        ("location ~ ^/(?:api|v1)/ {", "the API location matched 0 times"),
        ("keepalive 64;", "no single keepalive"),
    ],
)
def test_a_drifted_shipped_config_breaks_the_render(drift: str, message: str) -> None:
    source = SHIPPED.replace(drift, "", 1)
    with pytest.raises(RuntimeError, match=message):
        nginx.relay_rules(source)


@contextlib.contextmanager
def bench_upstream(tmp: Path) -> Iterator[str]:
    port = free_port()
    child = Child(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--port", str(port)],
        log=tmp / "upstream.log",
        env=child_env({}),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        child.wait_http(url + "/v1/models", 20.0)
        yield url
    finally:
        child.stop(signal.SIGINT, 5.0)


@contextlib.contextmanager
def bench_nginx(tmp: Path, upstream: str) -> Iterator[tuple[str, Child]]:
    if shutil.which("nginx") is None:
        tool_required("nginx")
    port = free_port()
    conf = nginx.render(
        tmp / "nginx",
        port=port,
        upstream_port=int(upstream.rsplit(":", 1)[1]),
        connections=64,
        nofile=4096,
    )
    child = Child("nginx", nginx.command(conf), log=tmp / "nginx.log", env=child_env({}))
    try:
        url = f"http://127.0.0.1:{port}"
        child.wait_http(url + "/v1/models", 20.0)
        yield url, child
    finally:
        child.stop(signal.SIGTERM, 10.0)


def load_args(*argv: str) -> argparse.Namespace:
    return load.parse_args(list(argv))


async def test_nginx_relays_the_bench_upstream_at_model_pace_and_its_cpu_is_read(
    tmp_path: Path,
) -> None:
    with bench_upstream(tmp_path) as upstream, bench_nginx(tmp_path, upstream) as (url, child):
        family = nginx.family(child.pid)
        assert len(family) == 2  # the master and its one worker
        cpu_before = nginx.cpu_of(child.pid)
        args = load_args(
            f"--url={url}", "--mode=direct", "--concurrency=4", "--streams=4", "--tokens=10",
            "--model=bench-d20", "--stream-timeout=20", "--timeout=30",
        )  # fmt: skip
        summary = await load.drive(args)
        cpu = nginx.cpu_of(child.pid) - cpu_before
        rss = nginx.rss_of(child.pid)
    assert (summary["completed"], summary["error_count"], summary["mismatches"]) == (4, 0, 0)
    assert summary["tokens_received"] == 40
    # Unbuffered: every token arrives in a read of its own, about 20 ms after the one before.
    assert summary["gap_ms"]["count"] == 4 * 9
    assert 10 < summary["gap_ms"]["p50"] < 40
    assert cpu > 0
    assert rss["VmRSS"] > 0


@pytest.mark.parametrize(
    ("spread", "least_s"),
    [
        # stream i starts at i * 0.8 / 5 s: the last first token at least 0.64 s after the first
        ("--ramp-s=0.8", 0.6),
        # stream i starts frac(i * φ) * 0.5 s late: 0, 0.309, 0.118, 0.427, 0.236 s for i = 0..4
        ("--phase-s=0.5", 0.4),
    ],
)
async def test_ramp_and_phase_spread_arrivals_over_the_given_time(
    tmp_path: Path, spread: str, least_s: float
) -> None:
    with bench_upstream(tmp_path) as url:
        args = load_args(
            f"--url={url}", "--mode=direct", "--concurrency=5", "--streams=5", "--tokens=2",
            "--model=bench", spread, "--stream-timeout=20", "--timeout=30",
        )  # fmt: skip
        summary = await load.drive(args)
    assert (summary["completed"], summary["mismatches"]) == (5, 0)
    assert least_s <= summary["first_token_spread_s"] < 5


@pytest.mark.parametrize("parse", [False, True], ids=["as-it-came", "parsed"])
async def test_the_floor_relay_relays_every_token_read_by_read(tmp_path: Path, parse: bool) -> None:
    """`bench.floor`, the README's measuring stick for a relay in Python: the load's direct mode
    through it checks every text, and every token still arrives in a read of its own."""
    with bench_upstream(tmp_path) as upstream:
        port = free_port()
        argv = ["--port", str(port), "--upstream-port", upstream.rsplit(":", 1)[1]]
        child = Child(
            "floor",
            [sys.executable, "-m", "bench.floor", *argv, *(["--parse"] if parse else [])],
            log=tmp_path / "floor.log",
            env=child_env({}),
        )
        try:
            url = f"http://127.0.0.1:{port}"
            child.wait_http(url + "/v1/models", 20.0)
            args = load_args(
                f"--url={url}", "--mode=direct", "--concurrency=4", "--streams=8",
                "--tokens=10", "--model=bench-d20", "--stream-timeout=20", "--timeout=30",
            )  # fmt: skip
            summary = await load.drive(args)
        finally:
            child.stop(signal.SIGINT, 5.0)
    assert (summary["completed"], summary["error_count"], summary["mismatches"]) == (8, 0, 0)
    assert summary["tokens_received"] == 80
    assert summary["gap_ms"]["count"] == 8 * 9  # one arrival per token: nothing joined
    assert 10 < summary["gap_ms"]["p50"] < 40


# --- the OpenAI route's client ------------------------------------------------------------------


async def test_openai_mode_reads_the_services_openai_route_and_checks_the_text(
    tmp_path: Path,
) -> None:
    with bench_upstream(tmp_path) as upstream:
        env = {
            "OPENAI_BASE_URL": upstream + "/v1",
            "OPENAI_API_KEY": "bench",
            "OPENAI_MODEL": "bench",
            "ALLOWED_MODELS": ",".join(MODELS),
            "HEARTBEAT_INTERVAL_S": "0.05",  # `: ping` frames between the chunks, skipped
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_CONCURRENT": "0",
            "RATE_LIMIT_TPM": "0",
        }
        async with service(env, tmp_path) as svc:
            args = load_args(
                f"--url={svc.url}", "--mode=openai", "--concurrency=4", "--streams=6",
                "--tokens=12", "--model=bench-d20", "--stream-timeout=20", "--timeout=30",
            )  # fmt: skip
            summary = await load.drive(args)
    assert (summary["completed"], summary["error_count"], summary["mismatches"]) == (6, 0, 0)
    assert summary["tokens_received"] == 6 * 12
    assert summary["gap_ms"]["count"] == 6 * 11  # one read per token at model pace


@contextlib.asynccontextmanager
async def openai_route(body: bytes) -> AsyncIterator[str]:
    """A server whose `/v1/chat/completions` answers every stream with `body`."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"


@pytest.mark.parametrize(
    ("tail", "error", "mismatches"),
    [
        (b"data: [DONE]\n\n", None, 0),
        (
            b'data: {"error":{"code":"rate_limited","type":"rate_limit_error"}}\n\n',
            "error_chunk:rate_limited",
            0,
        ),
        (b"", "truncated", 0),  # ended without [DONE]: never a completed stream
    ],
)
async def test_openai_mode_counts_an_error_chunk_and_a_missing_done(
    tail: bytes, error: str | None, mismatches: int
) -> None:
    body = b": ping\n\n" + b"".join(_chunk(f" w{i}") for i in range(3)) + tail
    async with openai_route(body) as url:
        args = load_args(
            f"--url={url}", "--mode=openai", "--concurrency=2", "--streams=2", "--tokens=3",
            "--stream-timeout=20", "--timeout=30",
        )  # fmt: skip
        summary = await load.drive(args)
    assert summary["mismatches"] == mismatches
    if error is None:
        assert (summary["completed"], summary["error_count"]) == (2, 0)
    else:
        assert summary["completed"] == 0
        assert summary["errors"] == {error: 2}


# --- the reconnect scenario's client, against a server that follows the resume contract --------

TOKENS = 30


class ResumeServer:
    """Generate-stream in full SSE (`id: <streamId>:<seq>`) at 5 ms a token, events kept per
    stream, `GET /api/v1/ai/streams/{id}` replaying after `Last-Event-ID` then following live."""

    def __init__(self, *, route: bool = True) -> None:
        self.route = route
        self.events: dict[str, list[bytes]] = {}
        self.changed: dict[str, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.resumes: list[str] = []
        self.resume_hosts: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/ai/generate-stream", self.generate)
        if self.route:
            app.router.add_get("/api/v1/ai/streams/{sid}", self.read)
        return app

    def emit(self, sid: str, obj: dict[str, Any]) -> None:
        log = self.events[sid]
        log.append(b"id: %s:%d\ndata: %s\n\n" % (sid.encode(), len(log), orjson.dumps(obj)))
        self.changed[sid].set()
        self.changed[sid] = asyncio.Event()

    async def produce(self, sid: str, tokens: int) -> None:
        text = ""
        for i in range(tokens):  # bounded by the token count
            await asyncio.sleep(0.005)  # the model's pace
            text += f" w{i}"
            self.emit(sid, {"type": "content", "delta": f" w{i}", "tokenCount": i + 1})
        self.emit(sid, {"type": "done", "content": text, "tokenCount": tokens})

    async def follow(self, request: web.Request, sid: str, after: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Stream-ID": sid})
        await resp.prepare(request)
        seq = after
        for _ in range(10_000):  # bounded: a stream has far fewer events
            log = self.events[sid]
            while seq < len(log):
                frame = log[seq]
                seq += 1
                # A heartbeat comment line glued before a frame must not hide it.
                await resp.write(b": ping\n" + frame if seq % 7 == 0 else frame)
                if b'"type":"done"' in frame:
                    return resp
            await asyncio.wait_for(self.changed[sid].wait(), 5.0)
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sid = f"s{len(self.events)}x"
        self.events[sid] = []
        self.changed[sid] = asyncio.Event()
        self.emit(sid, {"type": "start", "requestId": sid})
        task = asyncio.create_task(self.produce(sid, int(body["maxTokens"])))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return await self.follow(request, sid, 0)

    async def read(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        cursor = request.headers["Last-Event-ID"]
        assert cursor.startswith(sid + ":")
        self.resumes.append(cursor)
        self.resume_hosts.add(request.host)
        return await self.follow(request, sid, int(cursor.rsplit(":", 1)[1]) + 1)


@contextlib.asynccontextmanager
async def resume_server(server: ResumeServer) -> AsyncIterator[str]:
    """The server on a loopback port; a second port (`instances[server]`) serves the same
    streams, as two instances sharing them through Redis would."""
    runner = web.AppRunner(server.app())
    await runner.setup()
    ports = [free_port(), free_port()]
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    instances[server] = f"http://127.0.0.1:{ports[1]}"
    try:
        yield f"http://127.0.0.1:{ports[0]}"
    finally:
        for task in list(server.tasks):
            task.cancel()
        await runner.cleanup()


instances: dict[ResumeServer, str] = {}


def resume_args(url: str, streams: int) -> argparse.Namespace:
    return load_args(
        f"--url={url}", "--mode=resume", f"--concurrency={streams}", f"--streams={streams}",
        f"--tokens={TOKENS}", "--model=bench-d20", "--away-min-s=0.01", "--away-max-s=0.03",
        "--stream-timeout=20", "--timeout=30",
    )  # fmt: skip


async def test_reconnect_client_cuts_resumes_from_its_cursor_and_checks_the_text() -> None:
    server = ResumeServer()
    async with resume_server(server) as url:
        summary = await load.drive(resume_args(url, 12))
    assert (summary["completed"], summary["error_count"], summary["mismatches"]) == (12, 0, 0)
    assert summary["resumed"] == 12
    assert summary["resume_ms"]["count"] == 12
    assert summary["resume_ms"]["p99"] is not None
    assert summary["resume_ms"]["p99"] < 1000
    assert len(server.resumes) == 12
    # Cut points vary: at least two different cursors among the streams' own numbering.
    assert len({cursor.rsplit(":", 1)[1] for cursor in server.resumes}) > 1
    assert server.resume_hosts == {url.removeprefix("http://")}


async def test_reconnect_client_resumes_on_another_instance_with_resume_url() -> None:
    server = ResumeServer()
    async with resume_server(server) as url:
        args = resume_args(url, 4)
        args.resume_url = instances[server]
        summary = await load.drive(args)
    assert (summary["resumed"], summary["mismatches"], summary["error_count"]) == (4, 0, 0)
    assert server.resume_hosts == {instances[server].removeprefix("http://")}


async def test_reconnect_client_sees_a_repeated_event_as_a_mismatch() -> None:
    class Repeating(ResumeServer):
        async def read(self, request: web.Request) -> web.StreamResponse:
            sid = request.match_info["sid"]
            cursor = request.headers["Last-Event-ID"]
            self.resumes.append(cursor)
            return await self.follow(request, sid, int(cursor.rsplit(":", 1)[1]))  # one too early

    async with resume_server(Repeating()) as url:
        summary = await load.drive(resume_args(url, 3))
    assert summary["completed"] == 3
    assert summary["mismatches"] == 3


async def test_reconnect_client_stops_early_when_the_route_is_not_served() -> None:
    server = ResumeServer(route=False)
    async with resume_server(server) as url:
        args = resume_args(url, 40)
        args.concurrency = 2
        summary = await load.drive(args)
    assert summary["resumed"] == 0
    assert summary["route_missing"] == 2  # the two workers' first streams, then no more
    assert summary["errors"] == {"resume_http_404": 2}


# --- variants and rows -------------------------------------------------------------------------


def test_variant_parsing() -> None:
    variant = parse_variant("redis@S2,s2b,R1:REDIS_URL=@redis,RESUME_FLUSH_MS=20")
    assert variant.name == "redis"
    assert variant.only == ("S2", "S2b", "R1")
    assert variant.env == {"REDIS_URL": "@redis", "RESUME_FLUSH_MS": "20"}
    assert variant.uses_redis
    assert variant.applies("S2b")
    assert not variant.applies("S1")
    assert parse_variant("off:RESUME_GRACE_S=0").applies("S4")
    for bad in ("noequals", "x:K", ":K=V", "a b:K=V"):
        with pytest.raises(ValueError, match="expected"):
            parse_variant(bad)
    assert [v.name for v in RESUME_VARIANTS] == ["resume-off", "redis"]
    assert all(v.route == "native" for v in RESUME_VARIANTS)


def test_openai_variant_parsing_and_the_preset() -> None:
    variant = parse_variant("oa@S1,S2:ROUTE=openai,HEARTBEAT_INTERVAL_S=5")
    assert (variant.route, variant.only) == ("openai", ("S1", "S2"))
    assert variant.env == {"HEARTBEAT_INTERVAL_S": "5"}  # ROUTE is the bench's, not the service's
    assert parse_variant("x:K=V").route == "native"
    with pytest.raises(ValueError, match="ROUTE is one of"):
        parse_variant("x:ROUTE=graphql")
    [preset] = OPENAI_VARIANTS
    assert (preset.name, preset.env, preset.only, preset.route) == (
        "openai", {}, ("S1", "S2"), "openai",
    )  # fmt: skip
    args = parse_args(["--no-nginx", "--resume-rows", "--openai-rows"])
    assert [v.name for v in args.variant] == ["resume-off", "redis", "openai"]
    assert [v.name for v in parse_args(["--no-nginx"]).variant] == []


def test_openai_rows_compare_cpu_per_token_with_the_native_route() -> None:
    s2 = build(True)["S2"]
    native = Round(None, None, _summary(1000, 12.0), service_proc={"cpu_s": 0.040})

    def openai(cpu_s: float) -> Round:
        return Round(
            None, None, _summary(1000, 12.5), service_proc={"cpu_s": cpu_s},
            baseline=native.service, baseline_proc=native.service_proc,
        )  # fmt: skip

    cheaper = {r.metric: r for r in rows_for(s2, [openai(0.036)], "openai")}
    assert cheaper["CPU per token"].service == pytest.approx(36.0)
    assert cheaper["CPU per token"].vs_default == pytest.approx(0.9)
    assert cheaper["CPU per token"].target == "≤ native"
    assert cheaper["CPU per token"].met is True
    dearer = {r.metric: r for r in rows_for(s2, [openai(0.044)], "openai")}
    assert dearer["CPU per token"].met is False
    s1 = {r.metric: r for r in rows_for(build(True)["S1"], [openai(0.044)], "openai")}
    assert s1["CPU per token"].target == ""  # reported at S1, bounded at model pace only
    assert "S2 openai  CPU per token" in table(rows_for(s2, [openai(0.036)], "openai"))


def test_quick_scenarios_keep_the_shapes_and_drop_s4() -> None:
    full, quick = build(False), build(True)
    assert list(full) == ["S1", "S2", "S2b", "S3", "S4", "R1"]
    assert "S4" not in quick
    assert (full["S2"].concurrency, full["S2b"].concurrency) == (200, 20)
    assert (full["S3"].streams, full["S3"].ramp_s, full["S3"].tokens) == (2000, 3.0, 10)
    assert quick["S3"].streams == 500
    # model pace in its steady state: a new stream every 2 s / concurrency, so that the given
    # number are open at any time (10,000 tokens/s offered at S2), never a wave opening at once
    for scenarios in (full, quick):
        for key, every_s in (("S2", 0.010), ("S2b", 0.100)):
            s = scenarios[key]
            assert (s.tokens, s.delay_s) == (100, 0.020)
            assert s.ramp_s / s.streams == pytest.approx(every_s)
            assert s.streams * s.tokens / (s.ramp_s + s.tokens * s.delay_s) < s.concurrency * 50


def _summary(tokens: int, ttft_p99: float, streams: int = 10) -> dict[str, Any]:
    return {
        "tokens_received": tokens,
        "streams": streams,
        "ttft_ms": {"p50": ttft_p99 / 2, "p99": ttft_p99},
        "gap_ms": {"p50": 20.0, "p99": 22.0},
        "error_count": 0,
        "mismatches": 0,
    }


def test_rows_compare_service_with_direct_nginx_and_the_default_service() -> None:
    s2 = build(True)["S2"]
    direct, ngx = _summary(1000, 4.0), _summary(1000, 5.0)
    default = Round(
        direct=direct,
        nginx=ngx,
        service=_summary(1000, 12.0),
        service_proc={"cpu_s": 0.040},
        nginx_proc={"cpu_s": 0.010},
    )
    variant = Round(
        direct=direct,
        nginx=ngx,
        service=_summary(1000, 9.0),
        service_proc={"cpu_s": 0.036},
        nginx_proc={"cpu_s": 0.010},
        baseline=default.service,
        baseline_proc=default.service_proc,
    )
    rows = {r.metric: r for r in rows_for(s2, [default])}
    cpu = rows["CPU per token"]
    assert (cpu.direct, cpu.nginx, cpu.service) == (None, 10.0, 40.0)
    assert cpu.service_per_nginx == 4.0
    assert cpu.met is False  # ≤ 30 µs
    ttft = rows["TTFT p99"]
    assert (ttft.nginx_vs_direct, ttft.service_vs_direct) == (1.0, 8.0)
    assert ttft.met is True  # added ≤ 10 ms
    off = {r.metric: r for r in rows_for(s2, [variant], "resume-off")}
    assert "gap p50" not in off  # variant rows: the key metrics only
    assert off["CPU per token"].vs_default == pytest.approx(0.9)
    assert off["CPU per token"].target == "on ≤ off × 1.15"
    assert off["CPU per token"].met is True
    assert off["TTFT p99"].vs_default == pytest.approx(-3.0)
    text = table(rows_for(s2, [default]) + rows_for(s2, [variant], "resume-off"))
    assert "S2 resume-off  CPU per token" in text
    assert "×4.00" in text


def test_reconnect_rows_have_no_direct_or_nginx() -> None:
    r1 = Scenario("R1", "reconnect", "reconnect", "bench-d20", 100, 10, 10, 0.02)
    summary = {"resume_ms": {"p50": 1.5, "p99": 4.0}, "resumed": 10, "error_count": 0}
    rows = {r.metric: r for r in rows_for(r1, [Round(None, None, summary | {"mismatches": 0})])}
    p99 = rows["reconnect to first missed p99"]
    assert (p99.direct, p99.nginx, p99.service, p99.met) == (None, None, 4.0, True)
    assert rows["streams resumed (all rounds)"].service == 10


async def test_retained_gauges_are_read_from_the_services_metrics() -> None:
    body = (
        "# HELP ai_stream_resume_retained_streams Finished streams kept readable for RESUME_TTL_S\n"
        "# TYPE ai_stream_resume_retained_streams gauge\n"
        "ai_stream_resume_retained_streams 12.0\n"
        "ai_stream_resume_retained_bytes 3456.0\n"
        'ai_stream_streams_active{route="generate"} 0.0\n'
    )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=body)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}"
        found = await asyncio.to_thread(retained_gauges, url)
        missing = await asyncio.to_thread(retained_gauges, f"http://127.0.0.1:{free_port()}")
    finally:
        await runner.cleanup()
    assert found == {"retained_streams": 12.0, "retained_bytes": 3456.0}
    assert missing == {}
