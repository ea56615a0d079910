"""The four scenarios, and how a scenario's rounds become rows of the report.

Each round yields a direct summary, a service summary (both from `bench.load`) and the service's
own numbers (CPU seconds, RSS). A row takes one value per round for direct and service and, where
it makes sense, the ratio or the added amount (service minus direct, computed within the round);
the table shows medians over rounds. Error and mismatch counts are totals over all rounds.
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
    kind: str  # "saturation", "latency" or "scale"
    model: str
    tokens: int
    concurrency: int
    streams: int
    delay_s: float
    fresh_service: bool = False  # a new service process per run, so RSS growth is visible

    @property
    def stream_timeout_s(self) -> float:
        return 60.0 + 3 * self.tokens * self.delay_s

    @property
    def run_timeout_s(self) -> float:
        waves = -(-self.streams // self.concurrency)
        return min(600.0, 60.0 + waves * (self.stream_timeout_s / 2))

    def describe(self) -> str:
        pace = f"{self.delay_s * 1000:g} ms apart" if self.delay_s else "no delay"
        return (
            f"{self.tokens} tokens {pace}, {self.concurrency:,} concurrent, "
            f"{self.streams:,} streams"
        )


def build(quick: bool) -> dict[str, Scenario]:
    s3_streams = 500 if quick else 2000
    scenarios = [
        Scenario("S1", "saturation", "saturation", "bench", 500, 32, 128, 0.0),
        Scenario("S2", "latency", "latency", "bench-d20", 100, 200, 600, 0.020),
        Scenario("S3", "scale", "scale", "bench-d1000", 10, s3_streams, s3_streams, 1.0, True),
        Scenario("S4", "10k streams", "scale", "bench-d1000", 10, 10_000, 10_000, 1.0, True),
    ]
    return {s.key: s for s in scenarios if not (quick and s.key == "S4")}


MODELS = ("bench", "bench-d20", "bench-d1000")


@dataclass(slots=True)
class Round:
    direct: Summary
    service: Summary
    service_proc: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Row:
    scenario: str
    metric: str
    direct: float | None
    service: float | None
    compare: float | None
    compare_kind: str  # "ratio", "added" or ""
    target: str
    met: bool | None
    unit: str = ""
    per_round: list[dict[str, float | None]] = field(default_factory=list)


Getter = Callable[[Round], float | None]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _get(summary: Summary, *path: str) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


def _row(
    scenario: Scenario,
    rounds: list[Round],
    metric: str,
    *,
    direct: Getter | None,
    service: Getter | None,
    compare: str = "",
    unit: str = "",
    target: str = "",
    check: Callable[[float | None, float | None], bool] | None = None,
    total: bool = False,
) -> Row:
    """One row; `check(service, compare)` decides whether the target is met."""
    per_round: list[dict[str, float | None]] = []
    for r in rounds:
        d = direct(r) if direct else None
        s = service(r) if service else None
        c: float | None = None
        if compare == "ratio" and d and s is not None:
            c = s / d
        elif compare == "added" and d is not None and s is not None:
            c = s - d
        per_round.append({"direct": d, "service": s, "compare": c})

    def agg(key: str) -> float | None:
        values = [p[key] for p in per_round]
        if total:
            present = [v for v in values if v is not None]
            return sum(present) if present else None
        return _median(values)

    d_val, s_val, c_val = agg("direct"), agg("service"), agg("compare")
    met = check(s_val, c_val) if check else None
    return Row(scenario.key, metric, d_val, s_val, c_val, compare, target, met, unit, per_round)


def _le(limit: float, on: str) -> Callable[[float | None, float | None], bool]:
    def check(service: float | None, compare: float | None) -> bool:
        value = compare if on == "compare" else service
        return value is not None and value <= limit

    return check


def rows_for(scenario: Scenario, rounds: list[Round]) -> list[Row]:
    rows: list[Row] = []

    def add(metric: str, **kwargs: Any) -> None:
        rows.append(_row(scenario, rounds, metric, **kwargs))

    def both(*path: str) -> dict[str, Getter]:
        return {
            "direct": lambda r: _get(r.direct, *path),
            "service": lambda r: _get(r.service, *path),
        }

    if scenario.kind == "saturation":
        add("tokens/s", **both("tokens_per_s"), compare="ratio")
        add(
            "service CPU per token",
            direct=None,
            service=lambda r: _per(r.service_proc.get("cpu_s"), r.service, 1e6, "tokens_received"),
            unit="µs",
            target="≤ 30 µs",
            check=_le(30, "service"),
        )
    elif scenario.kind == "latency":
        add("TTFT p50", **both("ttft_ms", "p50"), compare="added", unit="ms")
        add(
            "TTFT p99",
            **both("ttft_ms", "p99"),
            compare="added",
            unit="ms",
            target="added ≤ 10 ms",
            check=_le(10, "compare"),
        )
        add("gap p50", **both("gap_ms", "p50"), compare="added", unit="ms")
        add(
            "gap p99",
            **both("gap_ms", "p99"),
            compare="added",
            unit="ms",
            target="added ≤ 5 ms",
            check=_le(5, "compare"),
        )
    else:
        is_s3 = scenario.key == "S3"
        add(
            "flowing at once",
            **both("flowing_share"),
            unit="share",
            target="100%" if is_s3 else "",
            check=(lambda s, c: s is not None and s >= 1.0) if is_s3 else None,
        )
        add(
            "service streams open at peak",
            direct=None,
            service=_open_at_peak,
            unit="count",
        )
        add("first-token spread", **both("first_token_spread_s"), compare="added", unit="s")
        add("TTFT p99", **both("ttft_ms", "p99"), compare="added", unit="ms")
        add(
            "service RSS per stream",
            direct=None,
            service=lambda r: _per(r.service_proc.get("rss_growth_kb"), r.service, 1, "streams"),
            unit="KB",
            target="≤ 25 KB" if is_s3 else "",
            check=_le(25, "service") if is_s3 else None,
        )
        add(
            "service CPU per stream",
            direct=None,
            service=lambda r: _per(r.service_proc.get("cpu_s"), r.service, 1e3, "streams"),
            unit="ms",
        )
    add(
        "errors (all rounds)",
        **both("error_count"),
        total=True,
        unit="count",
        target="0",
        check=lambda s, c: s == 0,
    )
    add(
        "mismatches (all rounds)",
        **both("mismatches"),
        total=True,
        unit="count",
        target="0",
        check=lambda s, c: s == 0,
    )
    return rows


def _open_at_peak(r: Round) -> float | None:
    """Streams the service held at once, from its peak socket count (client + upstream each)."""
    peak, before = r.service_proc.get("open_fds_peak"), r.service_proc.get("open_fds_before")
    if not isinstance(peak, int) or not isinstance(before, int):
        return None
    return max(0, peak - before) / 2


def _per(amount: Any, summary: Summary, scale: float, denominator: str) -> float | None:
    count = _get(summary, denominator)
    if not isinstance(amount, int | float) or not count:
        return None
    return amount * scale / count


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "share":
        return f"{value * 100:.1f}%"
    if unit == "count":
        return f"{value:,.0f}"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}" if unit else text


def _fmt_compare(row: Row) -> str:
    if row.compare is None:
        return ""
    if row.compare_kind == "ratio":
        return f"×{row.compare:.2f}"
    sign = "+" if row.compare >= 0 else "−"
    return sign + _fmt(abs(row.compare), row.unit)


def table(rows: list[Row]) -> str:
    header = ("scenario", "metric", "direct", "service", "ratio/added", "target", "met?")
    lines = [
        (
            r.scenario,
            r.metric,
            _fmt(r.direct, r.unit),
            _fmt(r.service, r.unit),
            _fmt_compare(r),
            r.target,
            "" if r.met is None else ("yes" if r.met else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 or i >= 5 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [fmt(header), fmt(tuple("-" * w for w in widths))]
    previous = None
    for row, cells in zip(rows, lines, strict=True):
        if previous is not None and row.scenario != previous:
            out.append("")
        previous = row.scenario
        out.append(fmt(cells))
    return "\n".join(out)
