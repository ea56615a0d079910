"""`python -m bench`: run the scenarios against the service, nginx and the upstream directly.

Starts `bench.upstream`, nginx in front of it (`bench.nginx`, one worker on the service's CPU),
then `python -m service` pointed at the upstream (and one more service process per `--variant`),
waits for each to be ready, and runs each scenario for `--rounds` rounds against every target
(`bench.scenarios` design note 1), a different target first every round. Around each nginx or
service run it reads that relay's CPU time from /proc and samples its RSS every 0.5 s. The scale
scenarios (S3, S4) get a fresh, warmed-up service (and nginx) process for every run, so RSS growth
is not hidden by memory the allocator kept from earlier runs. Prints a table of medians and writes
everything to `bench/results/<UTC>.json` (logs of every process next to it, in `<UTC>-logs/`).
Children are always stopped on exit (Ctrl-C and SIGTERM included).

The service's per-client rate limits are off by default (`RATE_LIMIT_RPM`, `_CONCURRENT`, `_TPM`
set to 0): all bench traffic comes from one loopback client, which the default limits would turn
away with 429 after a handful of streams. To measure with limits on, pass them back with
`--service-env` and spread the streams over many client addresses with `--clients`, e.g.
`--clients 20000 --service-env RATE_LIMIT_CONCURRENT=8 --service-env RATE_LIMIT_RPM=120`.

Variants (`--variant NAME[@S1,S2]:K=V,...`, `--resume-rows` for the resume feature's two) are
service processes of their own, kept running side by side (idle ones cost nothing measurable) and
restarted like the default one for the scale scenarios. `REDIS_URL=@redis` points a variant at a
`redis-server` the bench starts on the bench CPU (no persistence); around each run of such a
variant the runner reads `INFO` (commands by name without INFO's own, and `total_reads_processed`:
socket reads, so a pipelined batch is one round trip) and the server's CPU, so the table shows
Redis commands, round trips and CPU per token or per stream. The reconnect scenario (R1)
runs against the services only; for a variant on the bench's Redis each client reconnects to a
second process of that variant on the same Redis (`+peer`), so the resume is read through Redis
by another instance. When the service answers its reconnects with 404 or 405 (a version without
the resume route) R1 is reported as skipped, not failed. A variant with `route` "openai"
(`--openai-rows`, or `ROUTE=openai` in a `--variant`'s settings) is measured through the
OpenAI-compatible route (`bench.load --mode openai`; `bench.scenarios` design note 6).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from . import nginx
from .common import raise_nofile
from .procs import (
    ROOT,
    Child,
    child_env,
    cpu_plan,
    cpu_seconds,
    cpu_seconds_fine,
    free_port,
    memory_kb,
    open_fds,
)
from .scenarios import (
    MODELS,
    OPENAI_VARIANTS,
    RESUME_VARIANTS,
    Round,
    Row,
    Scenario,
    Variant,
    build,
    parse_variant,
    rows_for,
    table,
)

RESULTS = ROOT / "bench" / "results"
SERVICE_STOP_S = 30.0
SAMPLE_S = 0.5


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    """The upstream, nginx, the services and the load runs, with everything they measured."""

    def __init__(self, args: argparse.Namespace, logs: Path, variants: list[Variant]) -> None:
        self.logs = logs
        self.bench_pin, self.service_pin, self.pin_note = cpu_plan(not args.no_pin)
        self.overrides: dict[str, str] = dict(args.service_env)
        self.clients: int = args.clients
        self.variants = {v.name: v for v in variants}
        self.with_nginx: bool = not args.no_nginx
        self.upstream: Child | None = None
        self.upstream_url = ""
        self.upstream_port = 0
        self.nginx: Child | None = None
        self.nginx_url = ""
        self.nginx_runs = 0
        self.redis: Child | None = None
        self.redis_port = 0
        self.redis_client: redis.Redis | None = None
        self.services: dict[str, Child] = {}  # by target: "service" or "service:<variant>"
        self.service_urls: dict[str, str] = {}
        self.service_runs = 0
        self.warmed: dict[str, int] = {}  # the most concurrent streams each service has served
        self.load: Child | None = None
        self.notes: list[str] = [self.pin_note]
        self.service_logs: list[dict[str, Any]] = []

    # -- processes ------------------------------------------------------------------------------

    def start_upstream(self) -> None:
        port = free_port()
        self.upstream = Child(
            "upstream",
            [*self.bench_pin, sys.executable, "-m", "bench.upstream", "--port", str(port)],
            log=self.logs / "upstream.log",
            env=child_env({}),
        )
        self.upstream_url = f"http://127.0.0.1:{port}"
        self.upstream_port = port
        self.upstream.wait_http(self.upstream_url + "/v1/models", 20.0)
        log(f"upstream pid {self.upstream.pid} on {self.upstream_url}")

    def start_nginx(self, connections: int) -> None:
        """nginx (one worker, on the service's CPU) in front of the upstream (`bench.nginx`)."""
        self.stop_nginx()
        self.nginx_runs += 1
        port = free_port()
        prefix = self.logs / f"nginx-{self.nginx_runs}"
        conf = nginx.render(
            prefix,
            port=port,
            upstream_port=self.upstream_port,
            connections=2 * connections + 256,
            nofile=raise_nofile()[1],
        )
        self.nginx = Child(
            "nginx",
            [*self.service_pin, *nginx.command(conf)],
            log=self.logs / f"nginx-{self.nginx_runs}.log",
            env=child_env({}),
        )
        self.nginx_url = f"http://127.0.0.1:{port}"
        self.nginx.wait_http(self.nginx_url + "/v1/models", 20.0)
        warm = Scenario("warmup", "warm-up", "saturation", "bench", 50, 8, 32, 0.0)
        summary, _ = self.run_load(warm, "nginx", "warmup8", sample=False)
        if summary.get("error_count") or summary.get("mismatches"):
            raise RuntimeError(f"nginx warm-up failed: {summary.get('errors')}")
        log(f"nginx pid {self.nginx.pid} on {self.nginx_url}")

    def stop_nginx(self) -> None:
        proc, self.nginx = self.nginx, None
        if proc is not None:
            code = proc.stop(signal.SIGTERM, 10.0)
            if code not in (0, -signal.SIGTERM):
                self.notes.append(f"nginx {proc.log.name} exited with code {code}")
            errors = self.logs / f"nginx-{self.nginx_runs}" / "error.log"
            with contextlib.suppress(OSError):
                lines = [line for line in errors.read_text().splitlines() if line.strip()]
                if lines:
                    self.notes.append(f"nginx {errors}: {len(lines)} lines at warn or above")

    def redis_url(self) -> str:
        """The bench's own redis-server (on the bench CPU, no persistence), started once."""
        if self.redis is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server not found (scripts/ensure-tools.sh installs it)")
            self.redis_port = free_port()
            self.redis = Child(
                "redis",
                [
                    *self.bench_pin,
                    binary,
                    *("--port", str(self.redis_port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                ],
                log=self.logs / "redis.log",
                env=child_env({}),
            )
            deadline = time.monotonic() + 20.0
            while True:  # bounded by the deadline
                try:
                    self.redis_info()
                    break
                except (OSError, redis.RedisError) as err:
                    if not self.redis.running() or time.monotonic() > deadline:
                        tail = self.redis.log_tail()
                        raise RuntimeError(f"redis-server not ready:\n{tail}") from err
                    time.sleep(0.05)
            log(f"redis-server pid {self.redis.pid} on port {self.redis_port}")
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def redis_info(self) -> tuple[dict[str, int], int]:
        """Calls per command since redis started (`INFO commandstats`, without INFO's own), and
        `total_reads_processed`: socket reads, so a pipelined batch counts once (a round trip).
        One connection for the whole run, so the bench's own connection setup is counted once,
        before any run."""
        if self.redis_client is None:
            self.redis_client = redis.Redis(
                port=self.redis_port, socket_timeout=5.0, socket_connect_timeout=1.0
            )
        stats = self.redis_client.info("all")
        calls = {
            key.removeprefix("cmdstat_"): int(value["calls"])
            for key, value in stats.items()
            if key.startswith("cmdstat_") and isinstance(value, dict) and "calls" in value
        }
        calls.pop("info", None)
        return calls, int(stats.get("total_reads_processed", 0))

    def service_environment(self, port: int, variant: Variant | None = None) -> dict[str, str]:
        env = {
            "OPENAI_BASE_URL": self.upstream_url + "/v1",
            "OPENAI_API_KEY": "bench",
            "OPENAI_MODEL": "bench",
            "ALLOWED_MODELS": ",".join(MODELS),
            "PORT": str(port),
            "LOG_LEVEL": "warning",
            "MAX_STREAMS": "20000",
            "UPSTREAM_MAX_CONNECTIONS": "30000",
            "MAX_TOKENS_LIMIT": "100000",
            "HEARTBEAT_INTERVAL_S": "15",
            # One loopback client would hit the per-client limits at once (module docstring).
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_CONCURRENT": "0",
            "RATE_LIMIT_TPM": "0",
        }
        env.update(self.overrides)
        if variant is not None:
            env.update(variant.env)
            if variant.uses_redis and port:
                env["REDIS_URL"] = self.redis_url()
        env["PORT"] = str(port)  # the runner owns the port
        return env

    def start_service(self, target: str) -> None:
        self.stop_service(target)
        variant = self.variant_of(target)
        port = free_port()
        self.service_runs += 1
        name = target.replace(":", "-")
        child = Child(
            target,
            [*self.service_pin, sys.executable, "-m", "service"],
            log=self.logs / f"{name}-{self.service_runs}.log",
            env=child_env(self.service_environment(port, variant)),
        )
        self.services[target] = child
        self.service_urls[target] = url = f"http://127.0.0.1:{port}"
        child.wait_http(url + "/health", 30.0)
        self.warmed[target] = 0
        # Lazy imports, the SDK's client, the first upstream connections; not measured.
        self.warm_up(target, Scenario("warmup", "warm-up", "saturation", "bench", 50, 8, 32, 0.0))
        log(f"{target} pid {child.pid} on {url}")

    def warm_up(self, target: str, warm: Scenario) -> None:
        summary, _ = self.run_load(warm, target, f"warmup{warm.concurrency}", sample=False)
        if summary.get("error_count") or summary.get("mismatches"):
            raise RuntimeError(f"{target} warm-up failed: {summary.get('errors')}")
        self.warmed[target] = max(self.warmed.get(target, 0), warm.concurrency)

    def warm_pool(self, target: str, concurrency: int) -> None:
        """Hold `concurrency` streams open at once (two tokens a second apart), so the service's
        upstream pool has a connection for each before a measured run, as in every later round."""
        if self.warmed.get(target, 0) < concurrency:
            warm = Scenario(
                "warmup", "warm-up", "scale", "bench-d1000", 2, concurrency, concurrency, 1.0
            )
            self.warm_up(target, warm)
            log(f"{target} warmed with {concurrency} concurrent streams")

    def stop_service(self, target: str) -> None:
        service = self.services.pop(target, None)
        if service is None:
            return
        code = service.stop(signal.SIGINT, SERVICE_STOP_S)
        lines = [line for line in service.log_tail(200_000).splitlines() if line.strip()]
        self.service_logs.append(
            {"log": str(service.log), "exit_code": code, "lines": len(lines), "first": lines[:5]}
        )
        if code not in (0, -signal.SIGINT):
            self.notes.append(f"{target} {service.log.name} exited with code {code}")
        if lines:
            self.notes.append(f"{target} {service.log.name}: {len(lines)} log lines at warning+")

    def close(self) -> None:
        if self.load is not None:
            self.load.stop(signal.SIGKILL, 5.0)
            self.load = None
        for target in list(self.services):
            with contextlib.suppress(Exception):
                self.stop_service(target)
        with contextlib.suppress(Exception):
            self.stop_nginx()
        if self.redis_client is not None:
            with contextlib.suppress(Exception):
                self.redis_client.close()
            self.redis_client = None
        for name in ("redis", "upstream"):
            child = getattr(self, name)
            if child is not None:
                child.stop(signal.SIGTERM if name == "redis" else signal.SIGINT, 5.0)
                setattr(self, name, None)

    # -- runs -----------------------------------------------------------------------------------

    def variant_of(self, target: str) -> Variant | None:
        """The variant a service target runs: `service:NAME`, or `service:NAME+peer` (a second
        process of the same variant, the reconnect scenario's other instance)."""
        if ":" not in target:
            return None
        return self.variants.get(target.split(":", 1)[1].removesuffix(PEER))

    def targets(self, scenario: Scenario) -> list[str]:
        """What a round of `scenario` runs against (scenarios design note 1)."""
        variants = [f"service:{v.name}" for v in self.variants.values() if v.applies(scenario.key)]
        if scenario.kind == "reconnect":
            return ["service", *variants]
        return ["direct", *(["nginx"] if self.with_nginx else []), "service", *variants]

    def run_load(
        self, scenario: Scenario, target: str, tag: str, *, sample: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One load-generator run; with `sample`, the relay's CPU and RSS around it (and Redis's
        command count when the target is a service on the bench's redis-server)."""
        if target == "direct":
            url, mode = self.upstream_url, "direct"
        elif target == "nginx":
            url, mode = self.nginx_url, "direct"
        else:
            url = self.service_urls[target]
            variant = self.variant_of(target)
            if scenario.kind == "reconnect":
                mode = "resume"
            elif variant is not None and variant.route == "openai":
                mode = "openai"
            else:
                mode = "service"
        peer = self.service_urls.get(target + PEER) if mode == "resume" else None
        out = self.logs / f"{scenario.key}-{tag}-{target.replace(':', '-')}.json"
        argv = [
            *self.bench_pin,
            sys.executable,
            "-m",
            "bench.load",
            f"--url={url}",
            f"--mode={mode}",
            f"--concurrency={scenario.concurrency}",
            f"--streams={scenario.streams}",
            f"--tokens={scenario.tokens}",
            f"--model={scenario.model}",
            f"--ramp-s={scenario.ramp_s}",
            f"--phase-s={scenario.phase_s}",
            f"--stream-timeout={scenario.stream_timeout_s}",
            f"--timeout={scenario.run_timeout_s}",
            f"--clients={self.clients}",
            f"--out={out}",
            *([f"--resume-url={peer}"] if peer else []),
        ]
        relay: Child | None = None
        cpu_of: Callable[[int], float] = cpu_seconds
        rss_of: Callable[[int], dict[str, int]] = memory_kb
        fds_of: Callable[[int], int | None] = open_fds
        if sample and target == "nginx":
            relay, cpu_of, rss_of = self.nginx, nginx.cpu_of, nginx.rss_of
            fds_of = _family_fds
        elif sample and target.startswith("service"):
            relay = self.services.get(target)
        with_redis = relay is not None and self.redis is not None and _uses_redis(self, target)
        proc: dict[str, Any] = {}
        count_fds = scenario.kind == "scale"
        peak_rss = peak_fds = 0
        redis_before: tuple[dict[str, int], int] = ({}, 0)
        if relay is not None:
            mem = rss_of(relay.pid)
            proc.update(cpu_before_s=cpu_of(relay.pid), rss_before_kb=mem["VmRSS"])
            peak_rss, peak_fds = mem["VmRSS"], fds_of(relay.pid) or 0
            if count_fds:
                proc["open_fds_before"] = peak_fds
            if with_redis and self.redis is not None:
                redis_before = self.redis_info()
                proc["redis_cpu_before_s"] = cpu_seconds_fine(self.redis.pid)
        self.load = load = Child("load", argv, log=self.logs / "load.log", env=child_env({}))
        deadline = time.monotonic() + scenario.run_timeout_s + 30
        while load.running() and time.monotonic() < deadline:  # bounded by the deadline
            if relay is not None and relay.running():
                with contextlib.suppress(OSError, KeyError):
                    peak_rss = max(peak_rss, rss_of(relay.pid)["VmRSS"])
                    if count_fds:
                        peak_fds = max(peak_fds, fds_of(relay.pid) or 0)
            load.wait(SAMPLE_S)
        timed_out = load.running()
        load.stop(signal.SIGKILL, 5.0)
        self.load = None
        if relay is not None:
            if not relay.running():
                raise RuntimeError(f"{target} died during {scenario.key}:\n{relay.log_tail()}")
            time.sleep(0.25)  # let the relay finish tearing the streams down
            mem = rss_of(relay.pid)
            proc.update(
                cpu_s=round(cpu_of(relay.pid) - proc["cpu_before_s"], 6),
                rss_peak_kb=max(peak_rss, mem["VmRSS"]),
                rss_after_kb=mem["VmRSS"],
                vm_hwm_kb=mem["VmHWM"],
            )
            proc["rss_growth_kb"] = proc["rss_peak_kb"] - proc["rss_before_kb"]
            if target.startswith("service") and scenario.kind == "scale":
                proc.update(retained_gauges(self.service_urls[target]))
            if count_fds:
                proc["open_fds_peak"] = peak_fds
            if with_redis and self.redis is not None:
                calls, reads = self.redis_info()
                delta = {k: v - redis_before[0].get(k, 0) for k, v in calls.items()}
                delta = {k: v for k, v in sorted(delta.items()) if v}
                proc["redis_commands"] = sum(delta.values())
                proc["redis_commandstats"] = delta
                proc["redis_reads"] = reads - redis_before[1] - 1  # less this INFO's own read
                proc["redis_cpu_s"] = round(
                    cpu_seconds_fine(self.redis.pid) - proc.pop("redis_cpu_before_s"), 6
                )
        try:
            summary: dict[str, Any] = json.loads(out.read_text())
        except (OSError, ValueError):
            reason = "load_timeout" if timed_out else f"load_exit_{load.proc.returncode}"
            log(f"{scenario.key} {target}: load generator failed ({reason}), see {load.log}")
            summary = {
                "mode": mode,
                "streams": scenario.streams,
                "errors": {reason: scenario.streams},
                "error_count": scenario.streams,
                "mismatches": 0,
            }
        summary["target"] = target
        return summary, proc

    def run_scenario(self, scenario: Scenario, rounds: int, results: list[RoundRuns]) -> None:
        """Append each finished round to `results` (kept if a later round fails)."""
        self.check_fds(scenario)
        targets = self.targets(scenario)
        for i in range(rounds):
            shift = i % len(targets)
            order = targets[shift:] + targets[:shift]  # a different target first every round
            got: RoundRuns = {}
            for target in order:
                if target == "nginx" and (scenario.fresh_service or self.nginx is None):
                    self.start_nginx(scenario.concurrency)
                elif target.startswith("service"):
                    if scenario.fresh_service or target not in self.services:
                        self.start_service(target)
                    if not scenario.fresh_service:
                        self.warm_pool(target, scenario.concurrency)
                    variant = self.variant_of(target)
                    if scenario.kind == "reconnect" and variant and variant.uses_redis:
                        # Streams in Redis: reconnect to another instance on the same Redis.
                        if target + PEER not in self.services:
                            self.start_service(target + PEER)
                        self.warm_pool(target + PEER, scenario.concurrency)
                started = time.monotonic()
                got[target] = self.run_load(scenario, target, f"r{i + 1}")
                summary, proc = got[target]
                log(
                    f"{scenario.key} round {i + 1}/{rounds} {target:18s} "
                    f"{time.monotonic() - started:5.1f} s: {_brief(summary, proc)}"
                )
                if _route_missing(summary):
                    log(f"{scenario.key} {target}: {ROUTE_MISSING}")
            results.append(got)

    def check_fds(self, scenario: Scenario) -> None:
        """Note when the service cannot hold a client and an upstream socket per stream."""
        soft = raise_nofile()[0]
        needed = 2 * scenario.concurrency + 64
        if scenario.kind == "scale" and needed > soft:
            self.notes.append(
                f"{scenario.key}: the service needs about {needed:,} file descriptors "
                f"({scenario.concurrency:,} client + {scenario.concurrency:,} upstream sockets "
                f"+ its own) but RLIMIT_NOFILE is {soft:,}: streams past the limit would fail "
                "(they show up as errors)"
            )


RoundRuns = dict[str, tuple[dict[str, Any], dict[str, Any]]]  # target -> (summary, proc)
PEER = "+peer"
ROUTE_MISSING = "the service does not serve GET /api/v1/ai/streams/{streamId} (404/405)"


RETAINED = {
    "ai_stream_resume_retained_streams": "retained_streams",
    "ai_stream_resume_retained_bytes": "retained_bytes",
}


def retained_gauges(url: str) -> dict[str, float]:
    """The service's gauges of finished streams kept for `RESUME_TTL_S` (none on a version
    without them), read from its `/metrics` once the run's streams have ended."""
    found: dict[str, float] = {}
    with (
        contextlib.suppress(OSError, ValueError),
        urllib.request.urlopen(url + "/metrics", timeout=5.0) as resp,  # noqa: S310 - loopback
    ):
        for line in resp.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in RETAINED:
                found[RETAINED[name]] = float(value)
    return found


def _uses_redis(bench: Bench, target: str) -> bool:
    variant = bench.variant_of(target)
    return variant is not None and variant.uses_redis


def _family_fds(pid: int) -> int | None:
    counts = [open_fds(p) for p in nginx.family(pid)]
    present = [c for c in counts if c is not None]
    return sum(present) if present else None


def _route_missing(summary: dict[str, Any]) -> bool:
    return bool(summary.get("route_missing")) and not summary.get("resumed")


def views(rounds: list[RoundRuns], target: str) -> list[Round]:
    """Each round as the rows of `target` (the default service or a variant) see it."""
    out: list[Round] = []
    for got in rounds:
        if target not in got:
            continue
        summary, proc = got[target]
        direct, ngx = got.get("direct"), got.get("nginx")
        base = got.get("service") if target != "service" else None
        out.append(
            Round(
                direct=direct[0] if direct else None,
                nginx=ngx[0] if ngx else None,
                service=summary,
                service_proc=proc,
                nginx_proc=ngx[1] if ngx else {},
                baseline=base[0] if base else None,
                baseline_proc=base[1] if base else {},
            )
        )
    return out


def _brief(summary: dict[str, Any], proc: dict[str, Any]) -> str:
    parts = [
        f"{summary.get('completed', 0)}/{summary.get('streams')} completed",
        f"errors {summary.get('error_count')}",
        f"mismatches {summary.get('mismatches')}",
    ]
    if "tokens_per_s" in summary:
        parts.append(f"{summary['tokens_per_s']:,.0f} tok/s")
    ttft = summary.get("ttft_ms") or {}
    if ttft.get("p99") is not None:
        parts.append(f"TTFT p99 {ttft['p99']:.1f} ms")
    if "flowing_at_once" in summary:
        parts.append(f"flowing {summary['flowing_at_once']:,}")
    if "cpu_s" in proc:
        parts.append(f"CPU {proc['cpu_s']:.2f} s, RSS +{proc['rss_growth_kb']:,} KB")
    if "redis_commands" in proc:
        parts.append(f"Redis commands {proc['redis_commands']:,}, reads {proc['redis_reads']:,}")
    resume = summary.get("resume_ms") or {}
    if resume.get("p99") is not None:
        parts.append(f"resumed {summary.get('resumed')}, first missed p99 {resume['p99']:.1f} ms")
    if summary.get("errors"):
        parts.append(f"{summary['errors']}")
    return ", ".join(parts)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _variant(text: str) -> Variant:
    try:
        return parse_variant(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    parser.add_argument("--only", default="", help="comma-separated scenarios, e.g. S1,S2")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, smaller counts (S3 500 streams), no S4: a smoke run",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="KEY=VALUE",
        help="extra environment for the service (repeatable), e.g. to turn a feature off",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=0,
        help="spread streams over this many client addresses (X-Forwarded-For); 0: one client",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=_variant,
        metavar="NAME[@S1,S2]:K=V[,K=V]",
        help="also run a service with these settings (a process of its own, rows of its own), "
        "in every scenario or only the listed ones; REDIS_URL=@redis: a redis-server the bench "
        "starts (repeatable)",
    )
    parser.add_argument(
        "--resume-rows",
        action="store_true",
        help="add the resume feature's variants: resume-off@S1,S2,S3:RESUME_GRACE_S=0 and "
        "redis@S2,S3,R1:REDIS_URL=@redis",
    )
    parser.add_argument(
        "--openai-rows",
        action="store_true",
        help="add the OpenAI-compatible route's variant: openai@S1,S2:ROUTE=openai (the default "
        "settings, its load streaming POST /v1/chat/completions)",
    )
    parser.add_argument("--no-nginx", action="store_true", help="no nginx row")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 0 <= args.clients <= 1 << 24:
        parser.error("--clients must be from 0 to 16777216")
    if args.openai_rows:
        args.variant = [*OPENAI_VARIANTS, *args.variant]
    if args.resume_rows:
        args.variant = [*RESUME_VARIANTS, *args.variant]
    names = [v.name for v in args.variant]
    if len(set(names)) != len(names):
        parser.error(f"variant names must differ: {names}")
    if not args.no_nginx and shutil.which("nginx") is None:
        parser.error("nginx not found: install it (scripts/ensure-tools.sh) or pass --no-nginx")
    return args


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("aiohttp", "openai", "orjson", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "nofile": list(raise_nofile()),
        "git": commit,
    }


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C: children stopped, partial report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    raise_nofile()  # inherited by all three child processes; each also raises its own
    scenarios = build(args.quick)
    if args.only:
        by_upper = {key.upper(): key for key in scenarios}
        asked = [key.strip() for key in args.only.split(",") if key.strip()]
        wanted = [by_upper.get(key.upper(), key) for key in asked]
        unknown = [key for key in wanted if key not in scenarios]
        if unknown:
            print(f"unknown or skipped scenarios: {', '.join(unknown)}", file=sys.stderr)
            return 2
        scenarios = {key: scenarios[key] for key in wanted}
    rounds = 1 if args.quick else args.rounds
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = RESULTS / f"{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)

    machine = machine_info()
    bench = Bench(args, logs, args.variant)
    if bench.bench_pin:  # keep the runner's own sampling off the service's CPU
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {int(bench.bench_pin[-1])})
    results: dict[str, list[RoundRuns]] = {}
    all_rows: list[Row] = []
    failure = ""
    began = time.monotonic()
    try:
        bench.start_upstream()
        for key, scenario in scenarios.items():
            log(f"{key} {scenario.title}: {scenario.describe()}, {rounds} round(s)")
            bench.run_scenario(scenario, rounds, results.setdefault(key, []))
    except (RuntimeError, OSError, KeyboardInterrupt) as err:
        failure = str(err) or type(err).__name__
        log(f"FAILED: {failure}")
    finally:
        bench.close()
    for key, done in results.items():
        for target in ("service", *(f"service:{name}" for name in bench.variants)):
            if any(_route_missing(got[target][0]) for got in done if target in got):
                peer = " (reconnecting to a second instance on the same Redis)"
                where = peer if _uses_redis(bench, target) else ""
                bench.notes.append(f"{key} {target} skipped{where}: {ROUTE_MISSING}")
                continue
            seen = views(done, target)
            if seen:
                all_rows.extend(rows_for(scenarios[key], seen, target.partition(":")[2]))

    report = {
        "started_utc": stamp,
        "duration_s": round(time.monotonic() - began, 1),
        "machine": machine,
        "settings": {
            "rounds": rounds,
            "quick": args.quick,
            "only": list(scenarios),
            "pinning": bench.pin_note,
            "service_env": bench.service_environment(0) | {"PORT": "<free port>"},
            "service_env_overrides": bench.overrides,
            "variants": {
                v.name: {"env": v.env, "only": list(v.only), "route": v.route} for v in args.variant
            },
            "nginx": not args.no_nginx,
            "clients": args.clients,
            "scenarios": {k: dataclasses.asdict(s) for k, s in scenarios.items()},
        },
        "table": [dataclasses.asdict(row) for row in all_rows],
        "rounds": {
            k: [{t: {"summary": run[0], "proc": run[1]} for t, run in got.items()} for got in v]
            for k, v in results.items()
        },
        "service_logs": bench.service_logs,
        "notes": bench.notes,
        "failure": failure or None,
    }
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    print()
    print(table(all_rows) if all_rows else "(no results)")
    print()
    for note in bench.notes:
        print(f"note: {note}")
    print(f"results: {out.relative_to(ROOT)} ({report['duration_s']:.0f} s)")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
