"""The application factory: everything long-lived is made here or in a cleanup context."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import demo_upstream, http, keys, logs
from .config import Settings
from .health import ReadinessProbe
from .metrics import create_metrics
from .relay import LiveStreams
from .routes import generate, health
from .upstream import OpenAIUpstream, Upstream

log = structlog.get_logger("service.app")


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The API application. Pass `upstream` to use one you own (it is not closed here)."""
    app = web.Application(
        middlewares=[logs.request_context, http.errors],
        client_max_size=settings.max_body_bytes,
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = create_metrics(registry or CollectorRegistry(), settings.model_allowlist)
    app[keys.LIVE] = LiveStreams()
    if upstream is not None:
        _use_upstream(app, upstream)
    else:
        app.cleanup_ctx.append(_sdk_upstream)
    app.on_response_prepare.append(http.on_prepare)
    app.on_shutdown.append(_drain)
    generate.setup(app)
    health.setup(app)
    return app


def _use_upstream(app: web.Application, upstream: Upstream) -> None:
    upstream.on_retry = app[keys.METRICS].upstream_retries.inc
    app[keys.UPSTREAM] = upstream
    app[keys.READINESS] = ReadinessProbe(upstream)


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
    upstream = OpenAIUpstream(settings, base_url=base_url)
    _use_upstream(app, upstream)
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
