"""Server-Sent Events framing: pure functions from values to the exact bytes on the wire.

Hand-written rather than taken from aiohttp-sse: that library owns the response and its own
ping task, while this service needs one write per complete frame on a response the relay owns,
a ping scheduled by the relay's single watchdog, and pre-encoded pieces for the per-token frame.
It is a few lines, pinned by a golden test.

Each event is `id: N`, then one `data:` line of compact JSON, then a blank line. orjson escapes
every control character (CR and LF included), so a payload is always one line and model text can
never end a frame early or forge another one.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

# Comments start with a colon; clients ignore them, proxies see traffic.
PING: Final = b": ping\n\n"

HEADERS: Final[dict[str, str]] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


def dumps(value: Any) -> bytes:
    """Compact one-line JSON (UTF-8, no ASCII escaping)."""
    return orjson.dumps(value)


def event(seq: int, payload: dict[str, Any]) -> bytes:
    """One complete frame for an arbitrary JSON payload."""
    return b"id: %d\ndata: %b\n\n" % (seq, orjson.dumps(payload))


def text_event(seq: int, head: bytes, text: str, tail: bytes) -> bytes:
    """The per-token frame from pre-encoded pieces: `head` + JSON string of `text` + `tail`.

    `head` is the JSON object's opening up to the text value (`{"type":"token","content":`)
    and `tail` the rest (`}` or `,"tokenCount":12}`); only the text itself is encoded per call.
    """
    return b"id: %d\ndata: %b%b%b\n\n" % (seq, head, orjson.dumps(text), tail)
