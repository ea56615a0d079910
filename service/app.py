"""The application factory: everything long-lived is made here or in a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp_cors
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import demo_upstream, keys, logs, shared_streams, tcp
from .chat.stores import ConversationStore, RedisStore, SqliteStore, StoreUnavailable
from .chat.turns import Chats
from .config import Settings
from .failover import FailoverUpstream
from .health import Check, ReadinessProbe, UpstreamCheck, ping
from .limits.access import Access
from .limits.accounts import Limits
from .limits.core import LimitConfig, Limiter, MemoryLimiter
from .limits.redis_backend import LimiterUnavailable, RedisLimiter
from .metrics import create_metrics
from .mirror import Mirror, instance_name, save_orphan
from .relay import Generations
from .routes import chat, generate, health, openai_compat, probe, streams
from .upstream import Upstream
from .web import errors, on_prepare, require_key, vary_on_origin

log = structlog.get_logger("service.app")


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The API application. Pass `upstream` to use one you own: it is not closed here, and its
    retries are counted by the `on_retry` it was built with."""
    app = web.Application(
        middlewares=[logs.request_context, errors, require_key],
        client_max_size=settings.max_body_bytes,
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = create_metrics(registry or CollectorRegistry(), settings.model_allowlist)
    live = app[keys.LIVE] = Generations(settings.resume_ttl_s, settings.resume_keep_bytes)
    metrics = app[keys.METRICS]
    metrics.retained_streams.set_function(lambda: live.retained)
    metrics.retained_bytes.set_function(lambda: live.retained_bytes)
    app[keys.ACCESS] = Access.build(settings.api_keys, settings.trusted_proxies)
    if upstream is not None:
        app[keys.UPSTREAM] = upstream
    else:
        app.cleanup_ctx.append(_sdk_upstream)
    app.cleanup_ctx.append(_limits)
    app.cleanup_ctx.append(_conversations)
    if settings.redis_url:
        app.cleanup_ctx.append(_shared_streams)  # closed before the store its orphans use
    app.cleanup_ctx.append(_readiness)  # after every dependency it checks
    app.on_response_prepare.append(on_prepare)
    app.on_response_prepare.append(logs.note_answer)
    tcp.setup(app, settings.write_timeout_s, settings.heartbeat_interval_s)
    app.on_shutdown.append(_drain)
    generate.setup(app)
    chat.setup(app)
    streams.setup(app)
    openai_compat.setup(app)
    probe.setup(app)
    health.setup(app)
    _cors(app, settings)
    app.on_response_prepare.append(vary_on_origin)  # after aiohttp-cors's hook
    return app


def _cors(app: web.Application, settings: Settings) -> None:
    """The API answers browsers from the allowed origins only; they may read the request id, the
    stream id and the quota headers, and send `Last-Event-ID` to resume a stream."""
    exposed = ["X-Request-ID", "X-Stream-ID", "Retry-After"] + [
        f"x-ratelimit-{what}-{kind}"
        for kind in ("requests", "tokens")
        for what in ("limit", "remaining", "reset")
    ]
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        expose_headers=exposed,
        allow_headers=["Content-Type", "Authorization", "X-Request-ID", "Last-Event-ID"],
        allow_methods=["GET", "POST", "DELETE"],
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(settings.allowed_origins, options))
    for route in list(app.router.routes()):
        if route.resource is not None and route.resource.canonical.startswith(("/api/", "/v1/")):
            cors.add(route)


async def _limits(app: web.Application) -> AsyncIterator[None]:
    """The limiter (Redis when REDIS_URL is set) and its upkeep task."""
    settings = app[keys.SETTINGS]
    config = LimitConfig(
        rpm=settings.rate_limit_rpm,
        concurrent=settings.rate_limit_concurrent,
        tpm=settings.rate_limit_tpm,
        lease_s=settings.rate_limit_lease_s,
    )
    limiter: Limiter
    if settings.redis_url:
        limiter = RedisLimiter(config, settings.redis_url)
    else:
        limiter = MemoryLimiter(config)
    limits = app[keys.LIMITS] = Limits(
        limiter,
        metrics=app[keys.METRICS],
        fail_open=settings.rate_limit_redis_failure == "open",
        charge_interval_s=settings.rate_limit_charge_interval_s,
    )
    upkeep = asyncio.create_task(limits.upkeep()) if config.enabled else None
    try:
        yield
    finally:
        if upkeep is not None:
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
        await limiter.aclose()


async def _conversations(app: web.Application) -> AsyncIterator[None]:
    """The conversation store: Redis when REDIS_URL is set (shared by instances), else SQLite."""
    settings = app[keys.SETTINGS]
    store: ConversationStore
    if settings.redis_url:
        redis = RedisStore(settings.redis_url)
        try:
            await redis.open()  # records the layout's version
        except StoreUnavailable as err:  # requests answer 503 until Redis answers
            log.warning("chat.store_unavailable", error=str(err))
        store = redis
    else:
        sqlite = SqliteStore(settings.chat_db_path)
        await sqlite.open()
        store = sqlite
    chats = app[keys.CHATS] = Chats(store, settings, metrics=app[keys.METRICS])
    await chats.recover()  # turns held by a killed process of this host are free at once
    try:
        yield
    finally:
        await chats.aclose()


async def _shared_streams(app: web.Application) -> AsyncIterator[None]:
    """Streams mirrored to Redis (`mirror`): published as they start, readable and stoppable
    from any instance. Closed after the generations drain (cleanup runs after `on_shutdown`),
    so their terminal events reach Redis."""
    settings = app[keys.SETTINGS]
    assert settings.redis_url is not None
    redis = shared_streams.connect(settings.redis_url, lease_s=settings.resume_lease_s)
    store = app[keys.CHATS].store

    async def on_orphan(meta: shared_streams.StreamMeta, text: str) -> None:
        await save_orphan(store, meta, text)

    shared = shared_streams.SharedStreams(
        redis,
        instance=instance_name(),
        flush_ms=settings.resume_flush_ms,
        ttl_s=settings.resume_ttl_s,
        lease_s=settings.resume_lease_s,
        metrics=app[keys.METRICS],
        on_orphan=on_orphan,
    )
    await shared.start()
    mirror = app[keys.SHARED_STREAMS] = Mirror(shared)
    live = app[keys.LIVE]
    live.on_start.append(mirror.publish)
    try:
        yield
    finally:
        live.on_start.remove(mirror.publish)
        try:
            await shared.aclose()
        finally:
            await redis.aclose()


async def _readiness(app: web.Application) -> AsyncIterator[None]:
    """Readiness checks every dependency the contexts before this one made: the model server,
    the limiter's Redis (when limits live there) and the conversation store."""
    checks: list[tuple[str, Check]] = [("upstream", UpstreamCheck(app[keys.UPSTREAM]))]
    limiter = app[keys.LIMITS].limiter
    if isinstance(limiter, RedisLimiter):
        redis = ping(limiter.ping, failure="Redis does not answer.", errors=(LimiterUnavailable,))
        checks.append(("redis", redis))
    store = app[keys.CHATS].store
    failure = "The conversation store does not answer."
    checks.append(("conversations", ping(store.ping, failure=failure, errors=(StoreUnavailable,))))
    app[keys.READINESS] = ReadinessProbe(checks)
    yield


async def _sdk_upstream(app: web.Application) -> AsyncIterator[None]:
    """The SDK client (and, with no upstream configured, the bundled demo upstream)."""
    settings = app[keys.SETTINGS]
    runner = None
    base_url = None
    if settings.uses_demo_upstream:
        demo = demo_upstream.DemoUpstream(tokens_per_s=settings.demo_tokens_per_s)
        runner, base_url = await demo_upstream.start("127.0.0.1", 0, demo)
        log.warning(
            "upstream.demo",
            message="No OPENAI_API_KEY or OPENAI_BASE_URL: answers are SYNTHETIC, "
            "from the bundled demo upstream.",
            base_url=base_url,
        )
    metrics = app[keys.METRICS]
    upstream = app[keys.UPSTREAM] = FailoverUpstream.from_settings(
        settings,
        base_url=base_url,
        on_attempt=lambda name, result: metrics.child(
            metrics.upstream_attempts, name, result
        ).inc(),
        on_retry=metrics.upstream_retries.inc,
    )
    try:
        yield
    finally:
        await upstream.aclose()
        if runner is not None:
            await runner.cleanup()


async def _drain(app: web.Application) -> None:
    """Listeners are closed by now: let streams finish, then end the rest with `shutdown`."""
    live = app[keys.LIVE]
    log.info("shutdown.draining", streams=len(live), drain_s=app[keys.SETTINGS].shutdown_drain_s)
    await live.drain(app[keys.SETTINGS].shutdown_drain_s)
