"""The admin page: a small aiohttp app on `ADMIN_PORT` serving static HTML, CSS and ES modules."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..config import Settings

STATIC = Path(__file__).parent / "static"


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _index(_: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def create_admin_app(settings: Settings) -> web.Application:
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC)
    return app
