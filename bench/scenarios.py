"""The scenarios, the service variants, and how a scenario's rounds become rows of the report.

1. Targets. Each round runs the scenario against `direct` (the load generator straight to the
   upstream), `nginx` (the shipped config's relay rules in front of the same upstream,
   `bench.nginx`), the service, and every variant of the service that applies to the scenario (a
   service process of its own with extra settings, `Variant`). The reconnect scenario (R1) runs
   against the services only: it needs the resume route, which neither the upstream nor nginx has.
2. Cost is per upstream token (CPU seconds of the relay divided by the tokens the upstream sent and
   the client received, never by events, so joining deltas into fewer frames is neither rewarded
   nor punished) or, for the scale scenarios, per stream (open, all its tokens, close). nginx's
   cost is read from /proc the same way as the service's (master and worker together).
3. A row takes one value per round for each target and, within the round, compares them: nginx and
   the service against direct (the added amount for latencies, the ratio for throughput), the
   service against nginx (ratio, for costs), and a variant against the default service (ratio for
   costs, added amount for latencies). The table shows medians over rounds; error and mismatch
   counts are totals over all rounds.
4. Memory is RSS growth from before a run to its peak, per stream. What finished streams keep
   for `RESUME_TTL_S` once every stream ended cannot be read from RSS (the allocator keeps freed
   memory): the scale scenarios report the service's own gauges
   (`ai_stream_resume_retained_streams`, `ai_stream_resume_retained_bytes`, from `/metrics`), in
   total and per stream; a version without them shows none.
5. Variant rows carry only the key metrics (cost, first token, memory, errors); their targets are
   the resume feature's bounds where the variant is one of the `--resume-rows` presets, and the
   OpenAI-compatible surface's where it is the `--openai-rows` one (`VARIANT_TARGETS`), none
   otherwise.
6. Routes. A variant's load reads the native route (`POST /api/ai/generate-stream`) unless its
   `route` is "openai": then it streams `POST /v1/chat/completions` (`stream: true`), reads
   OpenAI chunks as it reads the upstream's, and checks their joined text against what the bench
   upstream sent. `ROUTE=openai` in a `--variant`'s settings sets it (it is not passed to the
   service). The `openai` preset (S1 and S2) runs the default service's settings, so its CPU per
   token next to the default row is the cost of relaying OpenAI chunks against native events,
   same run; its target at model pace (S2) is "no more than native" (vs_default ≤ 1).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Summary = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    kind: str  # "saturation", "latency", "scale" or "reconnect"
    model: str
    tokens: int
    concurrency: int
    streams: int
    delay_s: float
    fresh_service: bool = False  # a new service (and nginx) process per run: RSS growth visible
    ramp_s: float = 0.0  # arrivals spread evenly over this many seconds
    phase_s: float = 0.0  # stream i's start moved by frac(i * φ) * this (bench.load --phase-s)

    @property
    def stream_timeout_s(self) -> float:
        return 60.0 + 3 * self.tokens * self.delay_s

    @property
    def run_timeout_s(self) -> float:
        waves = -(-self.streams // self.concurrency)
        return min(600.0, 60.0 + self.ramp_s + waves * (self.stream_timeout_s / 2))

    def describe(self) -> str:
        pace = f"{self.delay_s * 1000:g} ms apart" if self.delay_s else "no delay"
        arrival = f" arriving over {self.ramp_s:g} s" if self.ramp_s else ""
        return (
            f"{self.tokens} tokens {pace}, {self.concurrency:,} concurrent, "
            f"{self.streams:,} streams{arrival}"
        )


def _steady(key: str, title: str, concurrency: int, streams: int) -> Scenario:
    """A model-pace scenario in its steady state: 100 tokens 20 ms apart per stream, arrivals
    spread evenly so that `concurrency` streams are open at any time (a new one every
    2 s / concurrency), as users arrive at a service already serving, rather than in waves that
    all open in the same instant (that is the burst scenarios' shape, S3 and S4); each start
    moved within one token interval so that the streams' tokens do not fall in step."""
    tokens, delay_s = 100, 0.020
    ramp_s = streams * tokens * delay_s / concurrency
    return Scenario(
        key, title, "latency", "bench-d20", tokens, concurrency, streams, delay_s,
        ramp_s=ramp_s, phase_s=delay_s,
    )  # fmt: skip


def build(quick: bool) -> dict[str, Scenario]:
    """The scenarios; `quick` shrinks the counts (and drops S4) for a smoke run."""
    s3_streams = 500 if quick else 2000
    scenarios = [
        Scenario("S1", "saturation", "saturation", "bench", 500, 32, 128, 0.0),
        _steady("S2", "model pace", 200, 400 if quick else 600),
        _steady("S2b", "light load", 20, 40 if quick else 60),
        Scenario("S3", "burst", "scale", "bench-d1000", 10, s3_streams, s3_streams, 1.0, True, 3.0),
        Scenario("S4", "10k streams", "scale", "bench-d1000", 10, 10_000, 10_000, 1.0, True),
        Scenario(
            "R1",
            "reconnect",
            "reconnect",
            "bench-d20",
            100,
            50 if quick else 100,
            100 if quick else 300,
            0.020,
        ),
    ]
    return {s.key: s for s in scenarios if not (quick and s.key == "S4")}


MODELS = ("bench", "bench-d20", "bench-d1000")
ROUTES = ("native", "openai")
ROUTE_KEY = "ROUTE"  # in a variant's settings: the route its load reads, not an env variable
REDIS_PLACEHOLDER = "@redis"  # a variant's REDIS_URL value: the bench's own redis-server


@dataclass(frozen=True, slots=True)
class Variant:
    """A service configuration of its own: `name[@S1,S2]:K=V[,K=V...]` on the command line."""

    name: str
    env: dict[str, str]
    only: tuple[str, ...] = ()  # scenario keys; empty: every scenario
    route: str = "native"  # the streaming route the load reads: "native" or "openai" (note 6)

    def applies(self, key: str) -> bool:
        return not self.only or key in self.only

    @property
    def uses_redis(self) -> bool:
        return self.env.get("REDIS_URL") == REDIS_PLACEHOLDER


def parse_variant(text: str) -> Variant:
    head, sep, settings = text.partition(":")
    name, _, only = head.partition("@")
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"expected NAME[@S1,S2]:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    env: dict[str, str] = {}
    route = "native"
    for pair in settings.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"variant {name}: expected KEY=VALUE, got {pair!r}")
        if key.strip() == ROUTE_KEY:
            route = value.strip()
            if route not in ROUTES:
                raise ValueError(f"variant {name}: {ROUTE_KEY} is one of {ROUTES}, got {route!r}")
            continue
        env[key.strip()] = value.strip()
    keys = tuple(k.strip().upper().replace("S2B", "S2b") for k in only.split(",") if k.strip())
    return Variant(name, env, keys, route)


# The resume feature's bounds, measured by `--resume-rows` (resume on is the default service).
RESUME_VARIANTS = (
    Variant("resume-off", {"RESUME_GRACE_S": "0"}, ("S1", "S2", "S3")),
    Variant("redis", {"REDIS_URL": REDIS_PLACEHOLDER}, ("S2", "S3", "R1")),
)

# The OpenAI-compatible route's row, measured by `--openai-rows`: the same settings as the
# default service, its load streaming `POST /v1/chat/completions` (design note 6).
OPENAI_VARIANTS = (Variant("openai", {}, ("S1", "S2"), "openai"),)


@dataclass(slots=True)
class Round:
    """One round's summaries as one target sees them: `service` is the default service's or a
    variant's; `baseline` is the default service's when `service` is a variant's."""

    direct: Summary | None
    nginx: Summary | None
    service: Summary
    service_proc: dict[str, Any] = field(default_factory=dict)
    nginx_proc: dict[str, Any] = field(default_factory=dict)
    baseline: Summary | None = None
    baseline_proc: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Row:
    scenario: str
    variant: str  # "" for the default service
    metric: str
    direct: float | None
    nginx: float | None
    service: float | None
    nginx_vs_direct: float | None
    service_vs_direct: float | None
    service_per_nginx: float | None
    vs_default: float | None
    compare_kind: str  # how the *_vs_direct columns compare: "ratio", "added" or ""
    default_kind: str  # how vs_default compares: "ratio", "added" or ""
    target: str
    met: bool | None
    unit: str = ""
    per_round: list[dict[str, float | None]] = field(default_factory=list)


Getter = Callable[[Summary | None, dict[str, Any]], float | None]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _get(summary: Summary | None, *path: str) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


def _compare(kind: str, value: float | None, base: float | None) -> float | None:
    if value is None or base is None:
        return None
    if kind == "ratio":
        return value / base if base else None
    if kind == "added":
        return value - base
    return None


Check = Callable[[dict[str, float | None]], bool]


def _row(
    scenario: Scenario,
    variant: str,
    rounds: list[Round],
    metric: str,
    get: Getter,
    *,
    relayed: bool,
    compare: str = "",
    per_nginx: bool = False,
    vs_default: str = "",
    unit: str = "",
    target: str = "",
    check: Check | None = None,
    total: bool = False,
) -> Row:
    """One row; `get(summary, proc)` reads a target's value (`relayed`: direct has one too);
    `check(medians)` decides whether the target is met."""
    per_round: list[dict[str, float | None]] = []
    for r in rounds:
        d = get(r.direct, {}) if relayed and r.direct is not None else None
        n = get(r.nginx, r.nginx_proc) if r.nginx is not None else None
        s = get(r.service, r.service_proc)
        b = get(r.baseline, r.baseline_proc) if r.baseline is not None else None
        per_round.append(
            {
                "direct": d,
                "nginx": n,
                "service": s,
                "nginx_vs_direct": _compare(compare, n, d),
                "service_vs_direct": _compare(compare, s, d),
                "service_per_nginx": _compare("ratio", s, n) if per_nginx else None,
                "vs_default": _compare(vs_default, s, b),
            }
        )

    def agg(key: str) -> float | None:
        values = [p[key] for p in per_round]
        if total:
            present = [v for v in values if v is not None]
            return sum(present) if present else None
        return _median(values)

    medians = {key: agg(key) for key in per_round[0]} if per_round else {}
    met = check(medians) if check and medians else None
    return Row(
        scenario.key,
        variant,
        metric,
        medians.get("direct"),
        medians.get("nginx"),
        medians.get("service"),
        medians.get("nginx_vs_direct"),
        medians.get("service_vs_direct"),
        medians.get("service_per_nginx"),
        medians.get("vs_default"),
        compare,
        vs_default,
        target,
        met,
        unit,
        per_round,
    )


def _at_most(limit: float, key: str = "service") -> Check:
    def check(m: dict[str, float | None]) -> bool:
        value = m.get(key)
        return value is not None and value <= limit

    return check


def _at_least(limit: float, key: str) -> Check:
    def check(m: dict[str, float | None]) -> bool:
        value = m.get(key)
        return value is not None and value >= limit

    return check


def _path(*path: str) -> Getter:
    return lambda summary, proc: _get(summary, *path)


def _cost(amount: str, scale: float, denominator: str) -> Getter:
    """A relay's own `amount` (from /proc) per unit of `denominator` (from its load summary)."""

    def get(summary: Summary | None, proc: dict[str, Any]) -> float | None:
        value, count = proc.get(amount), _get(summary, denominator)
        if not isinstance(value, int | float) or not count:
            return None
        return value * scale / count

    return get


CPU_PER_TOKEN = _cost("cpu_s", 1e6, "tokens_received")
CPU_PER_STREAM = _cost("cpu_s", 1e3, "streams")
RSS_PER_STREAM = _cost("rss_growth_kb", 1, "streams")
RETAINED_PER_STREAM = _cost("retained_bytes", 1 / 1024, "streams")


def _retained(key: str, scale: float) -> Getter:
    def get(summary: Summary | None, proc: dict[str, Any]) -> float | None:
        value = proc.get(key)
        return value * scale if isinstance(value, int | float) else None

    return get


# (variant, scenario, metric) -> (target text, check on the medians), for `--resume-rows`.
# vs_default is variant / default: resume off at 0.87 means resume on costs 15 % more.
VARIANT_TARGETS: dict[tuple[str, str, str], tuple[str, Check]] = {
    ("resume-off", "S1", "CPU per token"): ("on ≤ off × 1.15", _at_least(1 / 1.15, "vs_default")),
    ("resume-off", "S2", "CPU per token"): ("on ≤ off × 1.15", _at_least(1 / 1.15, "vs_default")),
    ("resume-off", "S3", "RSS per stream"): ("on ≤ off × 1.20", _at_least(1 / 1.2, "vs_default")),
    ("redis", "S2", "Redis round trips per token"): ("≤ 0.5 (batched)", _at_most(0.5)),
    ("redis", "R1", "reconnect to first missed p99"): ("< 20 ms", _at_most(20)),
    ("openai", "S2", "CPU per token"): ("≤ native", _at_most(1.0, "vs_default")),
}


def rows_for(scenario: Scenario, rounds: list[Round], variant: str = "") -> list[Row]:
    """The rows of one scenario for the default service (`variant` "") or one variant."""
    rows: list[Row] = []
    is_variant = bool(variant)

    def add(metric: str, get: Getter, *, key: bool = False, **kwargs: Any) -> None:
        if is_variant and not key:
            return  # variant rows: the key metrics only (design note 5)
        if is_variant:
            kwargs.pop("target", None)
            kwargs.pop("check", None)
            found = VARIANT_TARGETS.get((variant, scenario.key, metric))
            if found:
                kwargs["target"], kwargs["check"] = found
        rows.append(_row(scenario, variant, rounds, metric, get, **kwargs))

    cost: dict[str, Any] = {"relayed": False, "per_nginx": True, "vs_default": "ratio"}
    latency: dict[str, Any] = {
        "relayed": True,
        "compare": "added",
        "vs_default": "added",
        "unit": "ms",
    }
    if scenario.kind == "saturation":
        add("tokens/s", _path("tokens_per_s"), relayed=True, compare="ratio", vs_default="ratio")
        add(
            "CPU per token", CPU_PER_TOKEN, key=True, unit="µs", target="≤ 30 µs",
            check=_at_most(30), **cost,
        )  # fmt: skip
    elif scenario.kind == "latency":
        s2 = scenario.key == "S2"
        add(
            "CPU per token", CPU_PER_TOKEN, key=True, unit="µs",
            target="≤ 30 µs" if s2 else "", check=_at_most(30) if s2 else None, **cost,
        )  # fmt: skip
        add(
            "TTFT p50", _path("ttft_ms", "p50"), key=True,
            target="" if s2 else "added ≤ 0.5 ms",
            check=None if s2 else _at_most(0.5, "service_vs_direct"), **latency,
        )  # fmt: skip
        add(
            "TTFT p99", _path("ttft_ms", "p99"), key=True,
            target="added ≤ 10 ms" if s2 else "added ≤ 2 ms",
            check=_at_most(10 if s2 else 2, "service_vs_direct"), **latency,
        )  # fmt: skip
        add("gap p50", _path("gap_ms", "p50"), **latency)
        add(
            "gap p99", _path("gap_ms", "p99"), target="added ≤ 5 ms",
            check=_at_most(5, "service_vs_direct"), **latency,
        )  # fmt: skip
    elif scenario.kind == "scale":
        is_s3 = scenario.key == "S3"
        add(
            "flowing at once", _path("flowing_share"), relayed=True, unit="share",
            target="100%" if is_s3 else "",
            check=_at_least(1.0, "service") if is_s3 else None,
        )  # fmt: skip
        add("streams open at peak", _open_at_peak, relayed=False, unit="count")
        add(
            "CPU per stream", CPU_PER_STREAM, key=True, unit="ms",
            target="≤ 0.8 ms" if is_s3 else "", check=_at_most(0.8) if is_s3 else None, **cost,
        )  # fmt: skip
        add("TTFT p50", _path("ttft_ms", "p50"), key=True, **latency)
        add(
            "TTFT p99", _path("ttft_ms", "p99"), key=True,
            target="added < 100 ms" if is_s3 else "",
            check=_at_most(100, "service_vs_direct") if is_s3 else None, **latency,
        )  # fmt: skip
        add(
            "first-token spread", _path("first_token_spread_s"), relayed=True,
            compare="added", unit="s",
        )  # fmt: skip
        add(
            "RSS per stream", RSS_PER_STREAM, key=True, unit="KB",
            target="≤ 25 KB" if is_s3 else "", check=_at_most(25) if is_s3 else None, **cost,
        )  # fmt: skip
        # Finished streams kept for RESUME_TTL_S once every stream ended: the service's own
        # gauges (RSS cannot show it: the allocator keeps freed memory).
        keep: dict[str, Any] = {"key": True, "relayed": False, "vs_default": "ratio"}
        add("finished streams retained", _retained("retained_streams", 1), unit="count", **keep)
        add("retained bytes, total", _retained("retained_bytes", 1 / 1024**2), unit="MB", **keep)
        add("retained bytes, per stream", RETAINED_PER_STREAM, unit="KB", **keep)
    else:  # reconnect
        add(
            "reconnect to first missed p50", _path("resume_ms", "p50"), key=True,
            relayed=False, vs_default="added", unit="ms",
        )  # fmt: skip
        add(
            "reconnect to first missed p99", _path("resume_ms", "p99"), key=True,
            relayed=False, vs_default="added", unit="ms", target="< 10 ms", check=_at_most(10),
        )  # fmt: skip
        add(
            "streams resumed (all rounds)", _path("resumed"), key=True, relayed=False,
            total=True, unit="count",
        )  # fmt: skip
    if variant and any(r.service_proc.get("redis_commands") is not None for r in rounds):
        per = "token" if scenario.kind in ("saturation", "latency") else "stream"
        count = "tokens_received" if per == "token" else "streams"
        add(
            f"Redis commands per {per}", _cost("redis_commands", 1, count), key=True,
            relayed=False, unit="count" if per == "stream" else "",
        )  # fmt: skip
        add(
            f"Redis round trips per {per}", _cost("redis_reads", 1, count), key=True,
            relayed=False, unit="count" if per == "stream" else "",
        )  # fmt: skip
        add(
            f"Redis CPU per {per}",
            _cost("redis_cpu_s", 1e6 if per == "token" else 1e3, count), key=True,
            relayed=False, unit="µs" if per == "token" else "ms",
        )  # fmt: skip
    both = scenario.kind != "reconnect"
    add(
        "errors (all rounds)", _path("error_count"), key=True, relayed=both, total=True,
        unit="count", target="0", check=_at_most(0),
    )  # fmt: skip
    add(
        "mismatches (all rounds)", _path("mismatches"), key=True, relayed=both, total=True,
        unit="count", target="0", check=_at_most(0),
    )  # fmt: skip
    return rows


def _open_at_peak(summary: Summary | None, proc: dict[str, Any]) -> float | None:
    """Streams a relay held at once, from its peak socket count (client + upstream each)."""
    peak, before = proc.get("open_fds_peak"), proc.get("open_fds_before")
    if not isinstance(peak, int) or not isinstance(before, int):
        return None
    return max(0, peak - before) / 2


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "share":
        return f"{value * 100:.1f}%"
    if unit == "count":
        return f"{value:,.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.3g}"
    if value and abs(value) < 0.001:
        text = f"{value:.6f}"
    elif abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}" if unit else text


def _fmt_compare(value: float | None, kind: str, unit: str) -> str:
    if value is None or not kind:
        return ""
    if kind == "ratio":
        return f"×{value:.2f}"
    sign = "+" if value >= 0 else "−"
    return sign + _fmt(abs(value), unit)


HEADER = (
    "scenario",
    "metric",
    "direct",
    "nginx",
    "service",
    "nginx vs direct",
    "service vs direct",
    "service/nginx",
    "vs default",
    "target",
    "met?",
)


def table(rows: list[Row]) -> str:
    lines = [
        (
            f"{r.scenario} {r.variant}" if r.variant else r.scenario,
            r.metric,
            _fmt(r.direct, r.unit),
            _fmt(r.nginx, r.unit),
            _fmt(r.service, r.unit),
            _fmt_compare(r.nginx_vs_direct, r.compare_kind, r.unit),
            _fmt_compare(r.service_vs_direct, r.compare_kind, r.unit),
            _fmt_compare(r.service_per_nginx, "ratio", r.unit),
            _fmt_compare(r.vs_default, r.default_kind, r.unit),
            r.target,
            "" if r.met is None else ("yes" if r.met else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *lines, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 or i >= 9 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [fmt(HEADER), fmt(tuple("-" * w for w in widths))]
    previous = None
    for row, cells in zip(rows, lines, strict=True):
        group = (row.scenario, row.variant)
        if previous is not None and group != previous:
            out.append("")
        previous = group
        out.append(fmt(cells))
    return "\n".join(out)
