"""The admin page: a small aiohttp app on `ADMIN_PORT` serving static HTML, CSS and ES modules.

No build step and nothing fetched from elsewhere: `static/` is served as it is. The page reads
`config.json` (where the API is, its models and limits) and then talks to the API from the
browser, directly (CORS) or through the proxy in front of both. Model text enters the page only
as `static/markdown.js` renders it (its notes say how that stays harmless); the headers below are
the second line of defence.

The operations view is the one exception: its numbers come from this app, which reads the API's
`/metrics` and `/health/ready` itself (`ops`, `GET /admin/api/ops`, keyed like the API when
`API_KEYS` is set), so the API's `/metrics` never needs CORS.

Design notes:
1. `static/aiStream.js` is the app developers' client package's own module (`client/aiStream.js`,
   `@ai-stream-gateway/client`), reached through a symbolic link: one file, no copy, no build
   step. The link points out of `static/`, which the static route rightly refuses to follow, so
   that one URL has its own route, which serves the link's target. A wheel holds the target's
   bytes in place of the link (setuptools copies what a link points to), and the route serves
   those the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import Settings
from ..edge import SERVER
from . import ops

STATIC = Path(__file__).parent / "static"
CLIENT_MODULE = "aiStream.js"  # served from the client package (note 1)
SETTINGS = web.AppKey("admin_settings", Settings)

# Scripts, styles and images only from this origin: model text rendered as Markdown can neither
# run as code nor make the browser fetch an image from a URL it chose (static/markdown.js renders
# images as links anyway). API calls may go to any http(s) origin, because where the API is
# depends on ADMIN_API_BASE and on the host name the browser used.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Always revalidate: an upgraded service never runs against a stale module.
    "Cache-Control": "no-cache",
    "Server": SERVER,  # the product, never its versions
}


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, the app's own errors (403, 404, 405) included: a signal, not a
    middleware, because those are raised past middlewares as exceptions."""
    response.headers.update(_HEADERS)


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _index(_: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page needs to know about the API: where it is, its models and token limits, and
    whether it asks for a key (never the keys themselves)."""
    return {
        "apiBase": settings.admin_api_base,
        "apiPort": settings.port,
        "adminPort": settings.admin_port,
        "model": settings.openai_model,
        "models": sorted(settings.model_allowlist),
        "defaultMaxTokens": settings.default_max_tokens,
        "maxTokensLimit": settings.max_tokens_limit,
        "authRequired": bool(settings.api_keys),
    }


async def _client_module(_: web.Request) -> web.FileResponse:
    return web.FileResponse((STATIC / CLIENT_MODULE).resolve())


async def _config(request: web.Request) -> web.Response:
    return web.json_response(page_config(request.app[SETTINGS]))


def create_admin_app(settings: Settings) -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(_headers)
    app[SETTINGS] = settings
    app.router.add_get("/health", _health)
    app.router.add_get("/", _index)
    app.router.add_get("/config.json", _config)
    app.router.add_get(f"/static/{CLIENT_MODULE}", _client_module)
    app.router.add_static("/static/", STATIC)
    ops.setup(app, settings)
    return app
