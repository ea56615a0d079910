"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import keys
from ..failover import FailoverUpstream
from ..web import json_response


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks = await request.app[keys.READINESS].checks()
    if request.app[keys.LIVE].draining:
        checks["shutdown"] = "the server is shutting down"
    ok = all(value == "ok" for value in checks.values())
    body: dict[str, object] = {"status": "ok" if ok else "unavailable", "checks": checks}
    upstream = request.app[keys.UPSTREAM]
    if request.app[keys.SETTINGS].upstreams and isinstance(upstream, FailoverUpstream):
        body["upstreams"] = dict(upstream.reports)  # each server's word (failover note 8)
    return json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/health/ready", ready, name="ready")
    app.router.add_get("/metrics", metrics, name="metrics")
