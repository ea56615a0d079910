"""What the service asks of its clients' TCP connections, so that a reader that stops reading is
found long before `MAX_STREAM_S`.

Two kinds of reader stop reading, and each needs its own remedy (README, "Readers that stop
reading"):

- A **vanished** peer (unplugged, out of coverage) acknowledges nothing. `TCP_USER_TIMEOUT` of
  `WRITE_TIMEOUT_S` makes the kernel abort a connection whose data stays unacknowledged that long,
  and keep-alive probes (idle after one heartbeat interval) do the same for a connection with
  nothing in flight (a JSON answer still generating). aiohttp then sees the connection lost and
  cancels the handler: outcome `client_disconnect`, upstream request cancelled.
- A **frozen** reader acknowledges but never reads. Its window closes, and the bytes meant for it
  pile up on the server: by default megabytes of kernel buffer, filled at token pace for longer
  than `MAX_STREAM_S` before a write blocks. A stream's socket gets a small send buffer and its
  transport a small high-water mark, and a frame's write in `SseReader` returns only once the
  transport is below that mark, so a write blocks once `STREAM_QUEUE_BOUND` bytes are queued and
  `WRITE_TIMEOUT_S` later the stream is cut. (Linux also applies the user timeout to a window
  that stays closed, which often cuts it first.)

Design notes:
1. Options are set per request, in a middleware, on the accepted socket (five `setsockopt` calls
   per request, none per write). Set on a listening socket they would be inherited by accepted
   ones on Linux, but the app does not own its listeners (the process's runner, the test
   servers), and this way every server the app runs behind gets the same behaviour.
2. Keep-alive seconds are whole numbers (the kernel's unit), at least 1.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

# A stream's kernel send buffer: the kernel doubles the value asked for (bookkeeping included), so
# it holds at most 16 KiB of a stream's bytes.
STREAM_SNDBUF = 8 * 1024
# A stream's transport buffer: `SseReader` waits once more than this is waiting in user space.
STREAM_HIGH_WATER = 16 * 1024
# Bytes queued on the server for a stream whose reader stopped reading, besides the frame being
# written, before its writes block: kernel send buffer plus transport buffer.
STREAM_QUEUE_BOUND = 2 * STREAM_SNDBUF + STREAM_HIGH_WATER

KEEPALIVE_PROBES = 3

# The transport's writer of a prepared event stream, which `SseReader` drains after each frame.
STREAM_OUT = web.ResponseKey("stream_out", AbstractStreamWriter)

SocketOption = tuple[int, int, int]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_options(write_timeout_s: float, heartbeat_interval_s: float) -> tuple[SocketOption, ...]:
    """Keep-alive and user timeout for an accepted connection, derived from the write deadline and
    the heartbeat: a vanished peer is found within `write_timeout_s` plus one heartbeat interval.

    - `TCP_USER_TIMEOUT` = the write deadline: data unacknowledged that long aborts the
      connection. A stream writes at least once per heartbeat interval, so a peer that vanishes is
      found within one interval plus the deadline, at any pace.
    - keep-alive: idle after one heartbeat interval (the deadline when heartbeats are off), then a
      probe every third of the shorter of the two (design note 2). With the user timeout set, Linux
      aborts at the first probe once nothing has come back for the deadline: within the deadline
      plus the idle time. Without it (old kernels) `KEEPALIVE_PROBES` unanswered probes take at
      most the deadline after the idle time.

    `write_timeout_s == 0` turns write deadlines off: the system's defaults stay. Options this
    platform lacks are left out (macOS has no `TCP_USER_TIMEOUT`; the deploy target is Linux).
    """
    if not write_timeout_s:
        return ()
    idle = max(1, math.ceil(heartbeat_interval_s or write_timeout_s))
    interval = max(1, math.ceil(min(idle, write_timeout_s) / KEEPALIVE_PROBES))
    wanted = (
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", idle),
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", interval),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", KEEPALIVE_PROBES),
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", math.ceil(write_timeout_s * 1000)),
    )
    return tuple(
        (level, getattr(socket, name), value)
        for level, name, value in wanted
        if hasattr(socket, name)
    )


def _tcp_socket(request: web.Request) -> socket.socket | None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None  # a Unix socket, or a test transport
    return sock  # type: ignore[no-any-return]


def watch_peer(options: tuple[SocketOption, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware that sets `options` on the request's connection (design note 1)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        sock = _tcp_socket(request)
        if sock is not None:
            try:
                for level, name, value in options:
                    sock.setsockopt(level, name, value)
            except OSError:
                pass  # the connection is already gone: the handler will find out
        return await handler(request)

    return middleware


async def bound_stream(request: web.Request, response: web.StreamResponse) -> None:
    """On prepare, an event stream gets a small send buffer and transport high-water mark, and
    `SseReader` gets the writer it drains (module docstring)."""
    if response.content_type != "text/event-stream":
        return
    sock = _tcp_socket(request)
    transport = request.transport
    if sock is None or transport is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
    except OSError:
        return
    transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)
    response[STREAM_OUT] = request.writer


def setup(app: web.Application, write_timeout_s: float, heartbeat_interval_s: float) -> None:
    """Watch every request's peer, and bound every event stream's buffers."""
    options = peer_options(write_timeout_s, heartbeat_interval_s)
    if options:
        app.middlewares.append(watch_peer(options))
    app.on_response_prepare.append(bound_stream)
