"""`python -m bench`: run the scenarios against the service and against the upstream directly.

Starts `bench.upstream`, then `python -m service` pointed at it, waits for `/health`, and runs each
scenario for `--rounds` rounds, alternating a direct run (load generator straight to the upstream)
and a service run, the order swapped every round. Around each service run it reads the service's
CPU time from /proc and samples its RSS every 0.5 s. The scale scenarios (S3, S4) get a fresh,
warmed-up service process for every run, so RSS growth is not hidden by memory the allocator kept
from earlier runs. Prints a table of medians and writes everything to `bench/results/<UTC>.json`
(logs of every process next to it, in `<UTC>-logs/`). Children are always stopped on exit.

The service's per-client rate limits are off by default (`RATE_LIMIT_RPM`, `_CONCURRENT`, `_TPM`
set to 0): all bench traffic comes from one loopback client, which the default limits would turn
away with 429 after a handful of streams. To measure with limits on, pass them back with
`--service-env` and spread the streams over many client addresses with `--clients`, e.g.
`--clients 20000 --service-env RATE_LIMIT_CONCURRENT=8 --service-env RATE_LIMIT_RPM=120`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from .common import raise_nofile
from .procs import ROOT, Child, child_env, cpu_plan, cpu_seconds, free_port, memory_kb, open_fds
from .scenarios import MODELS, Round, Row, Scenario, build, rows_for, table

RESULTS = ROOT / "bench" / "results"
SERVICE_STOP_S = 30.0
SAMPLE_S = 0.5


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    """The upstream, the service and the load runs, with everything they measured."""

    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.logs = logs
        self.bench_pin, self.service_pin, self.pin_note = cpu_plan(not args.no_pin)
        self.overrides: dict[str, str] = dict(args.service_env)
        self.clients: int = args.clients
        self.upstream: Child | None = None
        self.upstream_url = ""
        self.service: Child | None = None
        self.service_url = ""
        self.service_runs = 0
        self.warmed = 0  # the most concurrent streams the running service has served
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
        self.upstream.wait_http(self.upstream_url + "/v1/models", 20.0)
        log(f"upstream pid {self.upstream.pid} on {self.upstream_url}")

    def service_environment(self, port: int) -> dict[str, str]:
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
        env["PORT"] = str(port)  # the runner owns the port
        return env

    def start_service(self) -> None:
        self.stop_service()
        port = free_port()
        self.service_runs += 1
        self.service = Child(
            "service",
            [*self.service_pin, sys.executable, "-m", "service"],
            log=self.logs / f"service-{self.service_runs}.log",
            env=child_env(self.service_environment(port)),
        )
        self.service_url = f"http://127.0.0.1:{port}"
        self.service.wait_http(self.service_url + "/health", 30.0)
        self.warmed = 0
        # Lazy imports, the SDK's client, the first upstream connections; not measured.
        self.warm_up(Scenario("warmup", "warm-up", "saturation", "bench", 50, 8, 32, 0.0))
        log(f"service pid {self.service.pid} on {self.service_url}")

    def warm_up(self, warm: Scenario) -> None:
        summary, _ = self.run_load(warm, "service", f"warmup{warm.concurrency}", sample=False)
        if summary.get("error_count") or summary.get("mismatches"):
            raise RuntimeError(f"service warm-up failed: {summary.get('errors')}")
        self.warmed = max(self.warmed, warm.concurrency)

    def warm_pool(self, concurrency: int) -> None:
        """Hold `concurrency` streams open at once (two tokens a second apart), so the service's
        upstream pool has a connection for each before a measured run, as in every later round."""
        if self.warmed < concurrency:
            warm = Scenario(
                "warmup", "warm-up", "scale", "bench-d1000", 2, concurrency, concurrency, 1.0
            )
            self.warm_up(warm)
            log(f"service warmed with {concurrency} concurrent streams")

    def stop_service(self) -> None:
        service, self.service = self.service, None
        if service is None:
            return
        code = service.stop(signal.SIGINT, SERVICE_STOP_S)
        lines = [line for line in service.log_tail(200_000).splitlines() if line.strip()]
        self.service_logs.append(
            {"log": str(service.log), "exit_code": code, "lines": len(lines), "first": lines[:5]}
        )
        if code not in (0, -signal.SIGINT):
            self.notes.append(f"service {service.log.name} exited with code {code}")
        if lines:
            self.notes.append(
                f"service {service.log.name}: {len(lines)} log lines at warning or above"
            )

    def close(self) -> None:
        if self.load is not None:
            self.load.stop(signal.SIGKILL, 5.0)
            self.load = None
        with contextlib.suppress(Exception):
            self.stop_service()
        if self.upstream is not None:
            self.upstream.stop(signal.SIGINT, 5.0)
            self.upstream = None

    # -- runs -----------------------------------------------------------------------------------

    def run_load(
        self, scenario: Scenario, mode: str, tag: str, *, sample: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One load-generator run; with `sample`, the service's CPU and RSS around it."""
        url = self.service_url if mode == "service" else self.upstream_url
        out = self.logs / f"{scenario.key}-{tag}-{mode}.json"
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
            f"--stream-timeout={scenario.stream_timeout_s}",
            f"--timeout={scenario.run_timeout_s}",
            f"--clients={self.clients}",
            f"--out={out}",
        ]
        service = self.service if mode == "service" and sample else None
        proc: dict[str, Any] = {}
        count_fds = scenario.kind == "scale"
        peak_rss = peak_fds = 0
        if service is not None:
            mem = memory_kb(service.pid)
            proc.update(cpu_before_s=cpu_seconds(service.pid), rss_before_kb=mem["VmRSS"])
            peak_rss, peak_fds = mem["VmRSS"], open_fds(service.pid) or 0
            if count_fds:
                proc["open_fds_before"] = peak_fds
        self.load = load = Child("load", argv, log=self.logs / "load.log", env=child_env({}))
        deadline = time.monotonic() + scenario.run_timeout_s + 30
        while load.running() and time.monotonic() < deadline:  # bounded by the deadline
            if service is not None and service.running():
                with contextlib.suppress(OSError, KeyError):
                    peak_rss = max(peak_rss, memory_kb(service.pid)["VmRSS"])
                    if count_fds:
                        peak_fds = max(peak_fds, open_fds(service.pid) or 0)
            load.wait(SAMPLE_S)
        timed_out = load.running()
        load.stop(signal.SIGKILL, 5.0)
        self.load = None
        if service is not None:
            if not service.running():
                raise RuntimeError(f"service died during {scenario.key}:\n{service.log_tail()}")
            time.sleep(0.25)  # let the service finish tearing the streams down
            mem = memory_kb(service.pid)
            proc.update(
                cpu_s=round(cpu_seconds(service.pid) - proc["cpu_before_s"], 3),
                rss_peak_kb=max(peak_rss, mem["VmRSS"]),
                rss_after_kb=mem["VmRSS"],
                vm_hwm_kb=mem["VmHWM"],
            )
            proc["rss_growth_kb"] = proc["rss_peak_kb"] - proc["rss_before_kb"]
            if count_fds:
                proc["open_fds_peak"] = peak_fds
        try:
            summary: dict[str, Any] = json.loads(out.read_text())
        except (OSError, ValueError):
            reason = "load_timeout" if timed_out else f"load_exit_{load.proc.returncode}"
            log(f"{scenario.key} {mode}: load generator failed ({reason}), see {load.log}")
            summary = {
                "mode": mode,
                "streams": scenario.streams,
                "errors": {reason: scenario.streams},
                "error_count": scenario.streams,
                "mismatches": 0,
            }
        return summary, proc

    def run_scenario(self, scenario: Scenario, rounds: int, results: list[Round]) -> None:
        """Append each finished round to `results` (kept if a later round fails)."""
        self.check_fds(scenario)
        for i in range(rounds):
            order = ("direct", "service") if i % 2 == 0 else ("service", "direct")
            got: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
            for mode in order:
                if mode == "service" and (scenario.fresh_service or self.service is None):
                    self.start_service()
                if mode == "service" and not scenario.fresh_service:
                    self.warm_pool(scenario.concurrency)
                started = time.monotonic()
                got[mode] = self.run_load(scenario, mode, f"r{i + 1}")
                summary, proc = got[mode]
                log(
                    f"{scenario.key} round {i + 1}/{rounds} {mode:7s} "
                    f"{time.monotonic() - started:5.1f} s: {_brief(summary, proc)}"
                )
            results.append(
                Round(
                    direct=got["direct"][0],
                    service=got["service"][0],
                    service_proc=got["service"][1],
                )
            )

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
        parts.append(f"service CPU {proc['cpu_s']:.2f} s, RSS +{proc['rss_growth_kb']:,} KB")
    if summary.get("errors"):
        parts.append(f"{summary['errors']}")
    return ", ".join(parts)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    parser.add_argument("--only", default="", help="comma-separated scenarios, e.g. S1,S2")
    parser.add_argument(
        "--quick", action="store_true", help="1 round, S3 with 500 streams, no S4: a smoke run"
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
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 0 <= args.clients <= 1 << 24:
        parser.error("--clients must be from 0 to 16777216")
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
        wanted = [key.strip().upper() for key in args.only.split(",") if key.strip()]
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
    bench = Bench(args, logs)
    if bench.bench_pin:  # keep the runner's own sampling off the service's CPU
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {int(bench.bench_pin[-1])})
    results: dict[str, list[Round]] = {}
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
        if done:
            all_rows.extend(rows_for(scenarios[key], done))

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
            "clients": args.clients,
            "scenarios": {k: dataclasses.asdict(s) for k, s in scenarios.items()},
        },
        "table": [dataclasses.asdict(row) for row in all_rows],
        "rounds": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()},
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
