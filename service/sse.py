"""Server-Sent Events framing: pure functions from values to the exact bytes on the wire.

Hand-written rather than taken from aiohttp-sse: that library owns the response and its own
ping task, while this service needs one write per complete frame on a response its reader owns,
a ping scheduled by that reader's watch, and pre-encoded pieces for the per-token frame.
It is a few lines, pinned by golden tests.

Two frame shapes, chosen once per stream by the request's `Accept` header (README, "SSE framing"):

- **full** (`Accept` names `text/event-stream`: EventSource, fetch-event-source, httpx-sse):
  `id: <streamId>:<seq>`, one `data:` line, a blank line. The heartbeat is the lone comment line
  `: ping` with no blank line after it (a blank line after a comment makes fetch-event-source and
  httpx-sse deliver an empty message).
- **data-only** (anything else: curl, the design notes' fetch loops that split on blank lines
  and expect `data: ` first): one `data:` line and a blank line. The heartbeat is `: ping` and a
  blank line, a block of its own that such a reader skips.

A stream id is minted here (128 random bits, URL-safe), never taken from a client; the cursor
`<streamId>:<seq>` names both the stream and the position in it.

orjson escapes every control character (CR and LF included), so a payload is always one line
and model text can never end a frame early or forge another one. It writes U+2028, U+2029 and
U+0085 raw, and Python line readers (`str.splitlines`, httpx and requests `iter_lines`) split on
them, so those three are escaped after encoding: their UTF-8 bytes can only occur inside a JSON
string (UTF-8 is self-synchronising), and the checks for them cost next to nothing when absent.

orjson's output keeps the buffer it was written in (about 4 KB, whatever its length), so a
payload kept for the life of a stream or longer (a log's opening and terminal events) is encoded
by `dumps_kept`, a copy of its own size; a per-token frame is built around `dumps`' output by
`%` formatting, which makes a new object of its own size anyway.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson

# Comments start with a colon; clients ignore them, proxies see traffic.
PING_FULL: Final = b": ping\n"
PING_DATA_ONLY: Final = b": ping\n\n"

HEADERS: Final[dict[str, str]] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
STREAM_ID_HEADER: Final = "X-Stream-ID"

_STREAM_ID: Final = re.compile(r"[A-Za-z0-9_-]{22}")
# The UTF-8 of U+2028, U+2029 and U+0085, and their JSON escapes.
_LINE_BREAKS: Final = (
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
    (b"\xc2\x85", b"\\u0085"),
)


def new_stream_id() -> str:
    """128 random bits, URL-safe (22 characters of `[A-Za-z0-9_-]`)."""
    return secrets.token_urlsafe(16)


def valid_stream_id(value: str) -> bool:
    """Whether `value` has the form of `new_stream_id()` (checked before any lookup)."""
    return _STREAM_ID.fullmatch(value) is not None


def parse_cursor(value: str) -> tuple[str, int] | None:
    """A `Last-Event-ID` cursor as (stream id, seq), or None when it is not one of ours."""
    stream_id, colon, seq = value.strip().rpartition(":")
    if not colon or not valid_stream_id(stream_id) or not seq.isascii() or not seq.isdigit():
        return None
    return stream_id, int(seq)


def wants_full(accept: str | None) -> bool:
    """Whether an `Accept` header names `text/event-stream` (and not with `q=0`)."""
    if not accept:
        return False
    for media_range in accept.lower().split(","):
        media, *params = media_range.split(";")
        if media.strip() != "text/event-stream":
            continue
        quality = [p.split("=", 1)[1].strip() for p in params if p.strip().startswith("q=")]
        if not quality or quality[0].strip("0.") != "":
            return True
    return False


def _escape(data: bytes) -> bytes:
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def dumps(value: Any) -> bytes:
    """Compact one-line JSON (UTF-8, no ASCII escaping but for U+2028, U+2029 and U+0085)."""
    data = orjson.dumps(value)
    if b"\xe2\x80" in data or b"\xc2\x85" in data:  # the lead bytes of the three (per token)
        return _escape(data)
    return data


def dumps_kept(value: Any) -> bytes:
    """`dumps` for a payload kept for long: a copy of its own size (module docstring)."""
    return bytes(memoryview(dumps(value)))


@dataclass(frozen=True, slots=True)
class Framing:
    """How one stream's frames look: `id_prefix` is `id: <streamId>:` (full) or empty
    (data-only), and `ping` the heartbeat that suits the shape."""

    id_prefix: bytes
    ping: bytes

    @classmethod
    def full(cls, stream_id: str) -> Framing:
        return cls(b"id: %b:" % stream_id.encode(), PING_FULL)

    @classmethod
    def for_accept(cls, accept: str | None, stream_id: str) -> Framing:
        return cls.full(stream_id) if wants_full(accept) else DATA_ONLY

    def frame(self, seq: int, data: bytes) -> bytes:
        """One complete frame for an already encoded one-line JSON payload (`dumps`)."""
        if self.id_prefix:
            return b"%b%d\ndata: %b\n\n" % (self.id_prefix, seq, data)
        return b"data: %b\n\n" % data

    def event(self, seq: int, payload: dict[str, Any]) -> bytes:
        """One complete frame for an arbitrary JSON payload; `seq` counts from 1."""
        if self.id_prefix:
            return b"%b%d\ndata: %b\n\n" % (self.id_prefix, seq, dumps(payload))
        return b"data: %b\n\n" % dumps(payload)


DATA_ONLY: Final = Framing(b"", PING_DATA_ONLY)
