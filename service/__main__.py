"""`python -m service [api|admin|probe URL]`.

- `api` (the default): read settings, configure logging, serve the API until SIGTERM/SIGINT.
- `admin`: serve the admin page on `ADMIN_PORT` (PM2 runs it as the second app).
- `probe URL`: check whether a proxy in front of the service streams or buffers.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from datetime import UTC, datetime

import orjson
import structlog

from . import edge, logs
from .config import Settings, SettingsError, from_env


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "api"
    if command == "probe":
        from .buffering import main as probe_main

        return probe_main(args[1:])
    if command not in ("api", "admin"):
        print(f"usage: python -m service [api|admin|probe URL], not {command!r}", file=sys.stderr)
        return 2
    try:
        settings = from_env(os.environ)
    except SettingsError as err:
        _refuse(err, os.environ.get("LOG_FORMAT") in (None, "", "json"))
        return 2
    logs.configure(settings)
    _raise_fd_limit()
    _use_uvloop()
    if command == "admin":
        return _serve_admin(settings)
    return _serve_api(settings)


def _refuse(err: SettingsError, as_json: bool) -> None:
    """Bad settings: one JSON line (the log format the process would have used), else text.
    The problems name variables and never repeat a value that could be a secret."""
    if as_json:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line = {"event": "settings.invalid", "level": "error", "timestamp": now}
        sys.stderr.write(orjson.dumps({**line, "problems": err.problems}).decode() + "\n")
        return
    print(err, file=sys.stderr)


def _raise_fd_limit() -> None:
    """Every connection is a descriptor: take the whole hard limit, not the soft default (often
    1024, which a few hundred slow clients and the streams' upstream sockets exhaust)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            raised = hard
        except (ValueError, OSError):  # an unlimited hard limit the kernel will not grant
            raised = soft
    structlog.get_logger("service.main").info(
        "process.fd_limit", soft_was=soft, soft=raised, hard=hard
    )


def _use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass


def _serve_api(settings: Settings) -> int:
    from .app import create_app

    edge.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # _drain (on_shutdown) bounds the wait for streams; this only has to outlast it.
        shutdown_timeout=settings.shutdown_drain_s + 10,
        backlog=settings.listen_backlog,
        header_timeout_s=settings.header_timeout_s,
    )
    return 0


def _serve_admin(settings: Settings) -> int:
    from .admin import create_admin_app

    edge.run(
        create_admin_app(settings),
        host=settings.host,
        port=settings.admin_port,
        shutdown_timeout=5,
        backlog=settings.listen_backlog,
        header_timeout_s=settings.header_timeout_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
