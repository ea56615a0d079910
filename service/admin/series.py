"""The operations view's arithmetic, pure: exposition text in, the view's JSON out.

Design notes (the sampler and the route are `ops`):

1. **What is read.** `parse_exposition` keeps the families the view charts, summed over their
   other labels: `ai_stream_streams_active`, `ai_stream_completion_tokens_total`,
   `ai_stream_outcomes_total` (by outcome), `ai_stream_rate_limited_total` (by limit) and the
   buckets of `ai_stream_time_to_first_token_seconds`. More than `MAX_NAMES` (64) outcomes,
   limits or buckets is no API's exposition (each would be a series in every point): rejected.
2. **Across instances.** Everything is computed per step between two samples, from the instances up
   at both ends of it (an instance down at either end adds nothing to that step): a counter's
   increase is taken per instance and then summed. Any counter of an instance that went down means
   its process restarted: all its counters started again from zero, so each one's new value is its
   increase (Prometheus' `rate()` decides this per series; per instance keeps the histogram's
   buckets cumulative and counts whole an outcome that grew past its old value). Tokens per second
   is a step's summed per-instance rate (each over its own read times). Open streams are the sum of
   the instances up. Outcomes, rate-limit refusals and time to first token are sums of the steps of
   the last `QUANTILE_WINDOW_S` (one minute), kept as running sums; p50/p95 are interpolated from
   the summed histogram buckets within the bucket the rank falls in, as Prometheus'
   `histogram_quantile()` does (a rank in the `+Inf` bucket answers the largest finite bound); no
   first token in that minute is `null`.
3. **What the JSON says** (`ops_payload`): `intervalS`, `windowS`, `instances` (each URL, `up`,
   `error`, and `ready`: `/health/ready`'s body), and `series`: `t` (Unix seconds of each sample),
   `streamsActive`, `tokensPerSecond` (`ai_stream_completion_tokens_total`, counted as tokens
   flow), `ttftP50`/`ttftP95` (seconds), `outcomesLastMinute` (by outcome) and
   `rateLimitedLastMinute` (by limit: requests, concurrency, tokens). Every list has one value per
   sample; a value that cannot be known (the first sample's, every instance down) is `null`; a
   name first seen late reads 0 back to where the window was known.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

WINDOW_S = 900.0  # the view's history
MAX_SAMPLES = 9000
QUANTILE_WINDOW_S = 60.0
MAX_NAMES = 64  # outcomes, limits or buckets per instance: the API has a handful of each
STREAMS_ACTIVE = "ai_stream_streams_active"
TOKENS = "ai_stream_completion_tokens_total"
OUTCOMES = "ai_stream_outcomes_total"
RATE_LIMITED = "ai_stream_rate_limited_total"
TTFT_BUCKET = "ai_stream_time_to_first_token_seconds_bucket"
K = TypeVar("K", str, float)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One instance's word at one moment (`t`: monotonic seconds when its /metrics answered)."""

    url: str
    up: bool
    t: float
    error: str | None = None
    streams_active: float = 0.0
    tokens: float = 0.0
    outcomes: dict[str, float] = field(default_factory=dict)
    rate_limited: dict[str, float] = field(default_factory=dict)
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    ready: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    wall: float  # Unix seconds
    scrapes: tuple[Scrape, ...]


def parse_exposition(url: str, t: float, text: str) -> Scrape:
    """The families the view charts, summed over their other labels. Raises ValueError on text
    that is not the exposition format, or with more than MAX_NAMES names in one family (each
    name becomes a series in every point of the JSON)."""
    streams = tokens = 0.0
    outcomes: dict[str, float] = {}
    limited: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == STREAMS_ACTIVE:
                streams += s.value
            elif s.name == TOKENS:
                tokens += s.value
            elif s.name == OUTCOMES:
                key = s.labels.get("outcome", "")
                outcomes[key] = outcomes.get(key, 0.0) + s.value
            elif s.name == RATE_LIMITED:
                key = s.labels.get("limit", "")
                limited[key] = limited.get(key, 0.0) + s.value
            elif s.name == TTFT_BUCKET:
                le = float(s.labels.get("le", "not a bound"))  # ValueError without one
                buckets[le] = buckets.get(le, 0.0) + s.value
    if max(len(outcomes), len(limited), len(buckets)) > MAX_NAMES:
        raise ValueError(f"more than {MAX_NAMES} outcomes, limits or buckets")
    return Scrape(url, True, t, None, streams, tokens, outcomes, limited, buckets)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' interpolation over cumulative buckets (`le` -> count, `+Inf` included)."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower if len(bounds) > 1 else None
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return None


def _increase(now: float, before: float) -> float:
    return now - before if now >= before else now  # a drop is a restart: count from zero


def _step(now: Scrape, before: Scrape | None) -> Scrape | None:
    return before if before is not None and before.up and now.up else None


def _dropped(now: dict[K, float], before: dict[K, float]) -> bool:
    return any(now.get(key, 0.0) < value for key, value in before.items())


def _restarted(now: Scrape, before: Scrape) -> bool:
    """Whether any counter went down: the process restarted, so every counter starts from 0."""
    return (
        now.tokens < before.tokens
        or _dropped(now.outcomes, before.outcomes)
        or _dropped(now.rate_limited, before.rate_limited)
        or _dropped(now.ttft_buckets, before.ttft_buckets)
    )


@dataclass(slots=True)
class _Step:
    """What the instances up at both ends of one step between samples added in it."""

    known: bool = False
    tokens_per_s: float = 0.0
    outcomes: dict[str, float] = field(default_factory=dict)
    rate_limited: dict[str, float] = field(default_factory=dict)
    ttft_buckets: dict[float, float] = field(default_factory=dict)


def _add(into: dict[K, float], now: dict[K, float], before: dict[K, float]) -> None:
    for key, value in now.items():
        into[key] = into.get(key, 0.0) + _increase(value, before.get(key, 0.0))


def _shift(into: dict[K, float], values: dict[K, float], sign: float) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + sign * value


def _step_between(now: Sample, before: Sample) -> _Step:
    step = _Step()
    for scrape, earlier in zip(now.scrapes, before.scrapes, strict=True):
        prev = _step(scrape, earlier)
        if prev is None or scrape.t <= prev.t:
            continue
        step.known = True
        if _restarted(scrape, prev):
            prev = Scrape(prev.url, True, prev.t)  # every counter counts from zero
        step.tokens_per_s += _increase(scrape.tokens, prev.tokens) / (scrape.t - prev.t)
        _add(step.outcomes, scrape.outcomes, prev.outcomes)
        _add(step.rate_limited, scrape.rate_limited, prev.rate_limited)
        _add(step.ttft_buckets, scrape.ttft_buckets, prev.ttft_buckets)
    return step


@dataclass(frozen=True, slots=True)
class Point:
    """One sample's values as the view charts them (None: not known)."""

    t: float
    streams_active: float | None
    tokens_per_s: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    outcomes: dict[str, float] | None  # over the last minute
    rate_limited: dict[str, float] | None


class Derived:
    """Turns samples, fed oldest first, into points, each in constant time: the steps of the
    last QUANTILE_WINDOW_S are kept with running sums (note 2)."""

    def __init__(self, maxlen: int | None = None) -> None:
        self.points: deque[Point] = deque(maxlen=maxlen)
        self._last: Sample | None = None
        self._steps: deque[tuple[float, _Step]] = deque()  # (wall of the step's start, step)
        self._outcomes: dict[str, float] = {}
        self._limited: dict[str, float] = {}
        self._buckets: dict[float, float] = {}

    def _move(self, step: _Step, sign: float) -> None:
        _shift(self._outcomes, step.outcomes, sign)
        _shift(self._limited, step.rate_limited, sign)
        _shift(self._buckets, step.ttft_buckets, sign)

    def add(self, sample: Sample) -> Point:
        step = _step_between(sample, self._last) if self._last is not None else _Step()
        if step.known and self._last is not None:
            self._steps.append((self._last.wall, step))
            self._move(step, 1.0)
        self._last = sample
        while self._steps and sample.wall - self._steps[0][0] > QUANTILE_WINDOW_S:
            self._move(self._steps.popleft()[1], -1.0)
        ups = [sc for sc in sample.scrapes if sc.up]
        known = bool(self._steps)

        def counts(values: dict[str, float]) -> dict[str, float] | None:
            return {k: round(max(v, 0.0), 3) for k, v in values.items()} if known else None

        point = Point(
            t=round(sample.wall, 3),
            streams_active=sum(sc.streams_active for sc in ups) if ups else None,
            tokens_per_s=round(step.tokens_per_s, 3) if step.known else None,
            ttft_p50=histogram_quantile(0.5, self._buckets) if known else None,
            ttft_p95=histogram_quantile(0.95, self._buckets) if known else None,
            outcomes=counts(self._outcomes),
            rate_limited=counts(self._limited),
        )
        self.points.append(point)
        return point


def _named(values: Sequence[dict[str, float] | None]) -> dict[str, list[float | None]]:
    """One list per name over the points: a name a known point lacks is 0 (nothing of it
    happened in its window), an unknown point is None."""
    names = sorted({name for v in values if v for name in v})
    return {n: [None if v is None else v.get(n, 0.0) for v in values] for n in names}


def render(
    points: Sequence[Point], instances: Sequence[Scrape], interval_s: float
) -> dict[str, Any]:
    """The view's JSON (note 3)."""
    return {
        "intervalS": interval_s,
        "windowS": WINDOW_S,
        "instances": [
            {"url": sc.url, "up": sc.up, "error": sc.error, "ready": sc.ready} for sc in instances
        ],
        "series": {
            "t": [p.t for p in points],
            "streamsActive": [p.streams_active for p in points],
            "tokensPerSecond": [p.tokens_per_s for p in points],
            "ttftP50": [p.ttft_p50 for p in points],
            "ttftP95": [p.ttft_p95 for p in points],
            "outcomesLastMinute": _named([p.outcomes for p in points]),
            "rateLimitedLastMinute": _named([p.rate_limited for p in points]),
        },
    }


def ops_payload(samples: Sequence[Sample], interval_s: float) -> dict[str, Any]:
    """The JSON for these samples, oldest first (what the sampler serves, built at once)."""
    derived = Derived()
    for sample in samples:
        derived.add(sample)
    return render(derived.points, samples[-1].scrapes if samples else (), interval_s)
