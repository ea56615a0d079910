"""`python -m service`: read settings, configure logging, serve the API until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

from . import logs
from .app import create_app
from .config import SettingsError, from_env


def main() -> int:
    try:
        settings = from_env(os.environ)
    except SettingsError as err:
        print(err, file=sys.stderr)
        return 2
    logs.configure(settings)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # Without this, aiohttp lets a handler run on after its client left (STYLE.md).
        handler_cancellation=True,
        # _drain (on_shutdown) bounds the wait for streams; this only has to outlast it.
        shutdown_timeout=settings.shutdown_drain_s + 10,
        backlog=settings.listen_backlog,
        access_log=None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
