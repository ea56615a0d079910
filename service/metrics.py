"""The contract's metric families, bound to a registry the app owns (never the global one).

Labels are bounded: routes are the fixed route names, outcomes the Outcome vocabulary, models
pass through `model_label` (configured models only, anything else is "other").
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

PREFIX = "ai_stream"
M = TypeVar("M", Counter, Gauge, Histogram)
# Long articles take minutes; a first token can take a while on a busy model.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

_ = (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR)  # the global ones stay unused


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    models: frozenset[str]
    requests: Counter
    streams_active: Gauge
    outcomes: Counter
    time_to_first_token: Histogram
    upstream_time_to_first_token: Histogram
    inter_token_latency: Histogram
    duration: Histogram
    output_tokens_per_second: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    rate_limited: Counter
    upstream_errors: Counter
    upstream_retries: Counter
    upstream_attempts: Counter
    heartbeats: Counter
    limiter_errors: Counter
    checkpoints: Counter
    checkpoint_answers: Counter
    resumes: Counter
    generations_unread: Gauge
    grace_expiries: Counter
    retained_streams: Gauge
    retained_bytes: Gauge
    resume_redis_flushes: Counter
    resume_redis_events: Counter
    resume_orphans: Counter
    _children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)

    def model_label(self, model: str) -> str:
        return model if model in self.models else "other"

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, cached: prometheus_client validates and locks on every
        `labels()` call, which was a tenth of the CPU spent opening a stream. Label values are
        bounded (see the module docstring), so the cache is too."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(M, found)


def create_metrics(registry: CollectorRegistry, models: Collection[str]) -> Metrics:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    r = registry
    return Metrics(
        registry=r,
        models=frozenset(models),
        requests=Counter(f"{PREFIX}_requests", "HTTP answers", ["route", "status"], registry=r),
        streams_active=Gauge(f"{PREFIX}_streams_active", "Open SSE streams", ["route"], registry=r),
        outcomes=Counter(
            f"{PREFIX}_outcomes", "How streams ended", ["route", "outcome"], registry=r
        ),
        time_to_first_token=Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Request arrival to the first content written to the client",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ),
        upstream_time_to_first_token=Histogram(
            f"{PREFIX}_upstream_time_to_first_token_seconds",
            "Upstream call to its first content delta",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ),
        inter_token_latency=Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Gaps between content events written",
            ["route", "model"],
            buckets=GAP_BUCKETS,
            registry=r,
        ),
        duration=Histogram(
            f"{PREFIX}_duration_seconds",
            "Whole stream, arrival to end",
            ["route", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        ),
        output_tokens_per_second=Histogram(
            f"{PREFIX}_output_tokens_per_second",
            "Each stream's decode rate, first to last token",
            ["route", "model"],
            buckets=RATE_BUCKETS,
            registry=r,
        ),
        prompt_tokens=Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens", ["model"], registry=r),
        completion_tokens=Counter(
            f"{PREFIX}_completion_tokens", "Completion tokens", ["model"], registry=r
        ),
        rate_limited=Counter(
            f"{PREFIX}_rate_limited", "Rate-limit rejections and cuts", ["limit"], registry=r
        ),
        upstream_errors=Counter(
            f"{PREFIX}_upstream_errors", "Upstream failures by kind", ["kind"], registry=r
        ),
        upstream_retries=Counter(
            f"{PREFIX}_upstream_retries", "Upstream retries before the first token", registry=r
        ),
        upstream_attempts=Counter(
            f"{PREFIX}_upstream_attempts",
            "Upstream attempts by server and result",
            ["upstream", "result"],
            registry=r,
        ),
        heartbeats=Counter(f"{PREFIX}_heartbeats", "Heartbeat comments written", registry=r),
        limiter_errors=Counter(
            f"{PREFIX}_limiter_errors", "Rate-limit store (Redis) failures", registry=r
        ),
        checkpoints=Counter(
            f"{PREFIX}_checkpoints", "Checkpoint writes of open chat answers", registry=r
        ),
        checkpoint_answers=Counter(
            f"{PREFIX}_checkpoint_answers", "Open chat answers written by checkpoints", registry=r
        ),
        resumes=Counter(
            f"{PREFIX}_resumes",
            "Readers coming back to a stream by its cursor, by what they got",
            ["route", "outcome"],
            registry=r,
        ),
        generations_unread=Gauge(
            f"{PREFIX}_generations_unread",
            "Generations running with no reader (in their grace window)",
            ["route"],
            registry=r,
        ),
        grace_expiries=Counter(
            f"{PREFIX}_grace_expiries",
            "Generations ended because no reader came back within the grace window",
            ["route"],
            registry=r,
        ),
        retained_streams=Gauge(
            f"{PREFIX}_resume_retained_streams",
            "Finished streams kept readable for RESUME_TTL_S",
            registry=r,
        ),
        retained_bytes=Gauge(
            f"{PREFIX}_resume_retained_bytes",
            "Event bytes of the finished streams kept readable",
            registry=r,
        ),
        resume_redis_flushes=Counter(
            f"{PREFIX}_resume_redis_flushes",
            "Pipelines of stream events sent to Redis",
            registry=r,
        ),
        resume_redis_events=Counter(
            f"{PREFIX}_resume_redis_events", "Stream events appended to Redis", registry=r
        ),
        resume_orphans=Counter(
            f"{PREFIX}_resume_orphans",
            "Streams whose producer was found dead",
            registry=r,
        ),
    )
