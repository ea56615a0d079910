"""`python -m service [api|admin|probe URL]`.

- `api` (the default): read settings, configure logging, serve the API until SIGTERM/SIGINT.
- `admin`: serve the admin page on `ADMIN_PORT` (PM2 runs it as the second app).
- `probe URL`: check whether a proxy in front of the service streams or buffers.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

from . import logs
from .config import Settings, SettingsError, from_env


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "api"
    if command == "probe":
        from .probe import main as probe_main

        return probe_main(args[1:])
    if command not in ("api", "admin"):
        print(f"usage: python -m service [api|admin|probe URL], not {command!r}", file=sys.stderr)
        return 2
    try:
        settings = from_env(os.environ)
    except SettingsError as err:
        print(err, file=sys.stderr)
        return 2
    logs.configure(settings)
    _use_uvloop()
    if command == "admin":
        return _serve_admin(settings)
    return _serve_api(settings)


def _use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass


def _serve_api(settings: Settings) -> int:
    from .app import create_app

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


def _serve_admin(settings: Settings) -> int:
    from .admin import create_admin_app

    web.run_app(
        create_admin_app(settings),
        host=settings.host,
        port=settings.admin_port,
        handler_cancellation=True,
        shutdown_timeout=5,
        access_log=None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
