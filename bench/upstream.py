"""A fast OpenAI-compatible bench upstream: `python -m bench.upstream --port N`.

Raw asyncio protocols on uvloop (no aiohttp server), HTTP/1.1 with keep-alive, and every byte of
the answer pre-encoded, so the model side costs next to nothing next to the service under test.

- `GET /v1/models` lists one model, `bench`.
- `POST /v1/chat/completions` streams `max_completion_tokens` (or `max_tokens`, default 100)
  tokens `" w0"`, `" w1"`, ... as chat-completion chunks, each SSE event its own HTTP chunk, then
  a `finish_reason: "stop"` chunk, a usage chunk when `stream_options.include_usage` is true,
  `data: [DONE]` and the terminating chunk. The model name sets the pace: `bench` writes
  everything back to back (a few events per `write`, honouring the transport's flow control),
  `bench-d20` waits 20 ms between tokens (one timer per connection, scheduled on an absolute
  clock so delays do not drift), `bench-d1000` one second.
- A client that leaves stops the writing and cancels its timer.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from typing import Any, Final, cast

import orjson

from .common import install_uvloop, raise_nofile

MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 8 * 1024 * 1024
DEFAULT_TOKENS: Final = 100
_DELAY = re.compile(r"-d(\d+)$")

STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
MODELS_BODY: Final = orjson.dumps(
    {"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}
)


def http_chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `payload`."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def sse_chunk(obj: dict[str, Any]) -> bytes:
    """One SSE event of compact JSON, as its own HTTP chunk."""
    return http_chunk(b"data: %b\n\n" % orjson.dumps(obj))


def token_text(i: int) -> str:
    return f" w{i}"


def delay_of(model: str) -> float:
    """Seconds between tokens: the number after `-d` in the model name, in milliseconds."""
    match = _DELAY.search(model)
    return int(match.group(1)) / 1000 if match else 0.0


def simple_response(status: str, body: bytes, *, keep_alive: bool) -> bytes:
    connection = b"" if keep_alive else b"Connection: close\r\n"
    return b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b" % (
        status.encode(),
        len(body),
        connection,
        body,
    )


class ModelChunks:
    """Pre-encoded chunks for one model name: per token, and joined in groups for fast writes."""

    __slots__ = ("_groups", "finish", "model", "prefix", "suffix", "tokens")

    def __init__(self, model: str) -> None:
        self.model = model
        probe = orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": "\x00"}, "finish_reason": None}],
            }
        )
        self.prefix, self.suffix = probe.split(b'"\\u0000"')
        self.tokens: list[bytes] = []
        self._groups: dict[tuple[int, int], bytes] = {}
        self.finish = sse_chunk(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        )

    def token(self, i: int) -> bytes:
        tokens = self.tokens
        while len(tokens) <= i:
            text = orjson.dumps(token_text(len(tokens)))
            tokens.append(http_chunk(b"data: %b%b%b\n\n" % (self.prefix, text, self.suffix)))
        return tokens[i]

    def group(self, start: int, end: int) -> bytes:
        """Tokens start..end-1 joined; cached, since every answer reuses the same groups."""
        key = (start, end)
        blob = self._groups.get(key)
        if blob is None:
            self.token(end - 1)
            blob = b"".join(self.tokens[start:end])
            if len(self._groups) < 100_000:
                self._groups[key] = blob
        return blob

    def tail(self, n: int, include_usage: bool) -> bytes:
        parts = [self.finish]
        if include_usage:
            usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10}
            parts.append(
                sse_chunk(
                    {
                        "id": "c",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": self.model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        parts.append(http_chunk(b"data: [DONE]\n\n"))
        parts.append(b"0\r\n\r\n")
        return b"".join(parts)


class Server:
    """State shared by all connections: the chunk caches and a few counters."""

    def __init__(self, events_per_write: int) -> None:
        self.events_per_write = max(1, events_per_write)
        self._models: dict[str, ModelChunks] = {}
        self.requests = 0
        self.completed = 0
        self.disconnects = 0

    def chunks(self, model: str) -> ModelChunks:
        found = self._models.get(model)
        if found is None:
            if len(self._models) >= 64:  # arbitrary names must not grow the cache forever
                self._models.clear()
            found = self._models[model] = ModelChunks(model)
        return found


class Connection(asyncio.Protocol):
    """One client connection: parse requests one at a time, stream each answer."""

    __slots__ = (
        "_buf",
        "_busy",
        "_chunks",
        "_closed",
        "_deadline0",
        "_delay",
        "_keep_alive",
        "_loop",
        "_n",
        "_next",
        "_paused",
        "_server",
        "_timer",
        "_transport",
        "_usage",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._busy = False
        self._closed = False
        self._paused = False
        self._keep_alive = True
        self._timer: asyncio.TimerHandle | None = None
        self._chunks: ModelChunks | None = None
        self._n = 0
        self._next = 0
        self._delay = 0.0
        self._deadline0 = 0.0
        self._usage = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._busy:
            self._server.disconnects += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._busy and not self._delay:
            self._pump()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_HEAD + MAX_BODY:
            self._close()
            return
        if not self._busy:
            self._process()

    # -- request parsing ----------------------------------------------------------------------

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._closed = True

    def _process(self) -> None:
        """Handle every complete request in the buffer (one at a time: answers are in order)."""
        for _ in range(64):  # bounded; a pipelining client gets the rest after this answer
            if self._busy or self._closed:
                return
            buf = self._buf
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buf) > MAX_HEAD:
                    self._close()
                return
            lines = buf[:head_end].split(b"\r\n")
            try:
                method, path, version = lines[0].split(b" ", 2)
            except ValueError:
                self._close()
                return
            length = 0
            keep_alive = version == b"HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    try:
                        length = int(value.strip())
                    except ValueError:
                        self._close()
                        return
                elif name == b"connection":
                    token = value.strip().lower()
                    if token == b"close":
                        keep_alive = False
                    elif token == b"keep-alive":
                        keep_alive = True
            if length < 0 or length > MAX_BODY:
                self._close()
                return
            end = head_end + 4 + length
            if len(buf) < end:
                return
            body = buf[head_end + 4 : end]
            self._buf = buf[end:]
            self._keep_alive = keep_alive
            self._server.requests += 1
            self._handle(method, path.split(b"?", 1)[0], body)

    def _reply(self, status: str, body: bytes) -> None:
        if self._transport is None:
            return
        self._transport.write(simple_response(status, body, keep_alive=self._keep_alive))
        if not self._keep_alive:
            self._close()

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        if path == b"/v1/models" and method == b"GET":
            self._reply("200 OK", MODELS_BODY)
            return
        if path != b"/v1/chat/completions":
            self._reply("404 Not Found", b'{"error":{"message":"not found","type":"not_found"}}')
            return
        if method != b"POST":
            self._reply("405 Method Not Allowed", b'{"error":{"message":"use POST"}}')
            return
        try:
            req = orjson.loads(body)
            model = str(req.get("model") or "bench")
            n = req.get("max_completion_tokens") or req.get("max_tokens") or DEFAULT_TOKENS
            n = max(1, int(n))
            stream = bool(req.get("stream"))
            options = req.get("stream_options") or {}
            include_usage = bool(options.get("include_usage"))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            self._reply("400 Bad Request", b'{"error":{"message":"bad request body"}}')
            return
        chunks = self._server.chunks(model)
        if not stream:
            self._reply("200 OK", self._whole(chunks, n))
            return
        self._start_stream(chunks, n, include_usage, delay_of(model))

    @staticmethod
    def _whole(chunks: ModelChunks, n: int) -> bytes:
        text = "".join(token_text(i) for i in range(n))
        return orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": chunks.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10},
            }
        )

    # -- streaming ----------------------------------------------------------------------------

    def _start_stream(self, chunks: ModelChunks, n: int, include_usage: bool, delay: float) -> None:
        transport = self._transport
        if transport is None:
            return
        self._busy = True
        self._chunks, self._n, self._next = chunks, n, 0
        self._usage, self._delay = include_usage, delay
        head = STREAM_HEAD if self._keep_alive else STREAM_HEAD + b"Connection: close\r\n"
        if not delay:
            transport.write(head + b"\r\n")
            self._pump()
            return
        # First token right away, then one every `delay` seconds on an absolute schedule.
        transport.write(head + b"\r\n" + chunks.token(0))
        self._next = 1
        self._deadline0 = self._loop.time()
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        if self._next >= self._n:
            self._finish()
            return
        at = self._deadline0 + self._next * self._delay
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed or self._transport is None or self._chunks is None:
            return
        self._transport.write(self._chunks.token(self._next))
        self._next += 1
        self._schedule_tick()

    def _pump(self) -> None:
        """No delay: write groups of events back to back until done or the transport pushes back."""
        chunks, transport, step = self._chunks, self._transport, self._server.events_per_write
        if chunks is None:
            return
        n = self._n
        while transport is not None and not self._paused and not self._closed and self._next < n:
            start = self._next
            end = min(n, start + step)
            self._next = end
            blob = chunks.group(start, end)
            if end == n:
                blob += chunks.tail(n, self._usage)
                transport.write(blob)
                self._finish(tail_written=True)
                return
            transport.write(blob)

    def _finish(self, *, tail_written: bool = False) -> None:
        transport, chunks = self._transport, self._chunks
        if transport is None or chunks is None or self._closed:
            return
        if not tail_written:
            transport.write(chunks.tail(self._n, self._usage))
        self._busy = False
        self._chunks = None
        self._server.completed += 1
        if not self._keep_alive:
            self._close()
        elif self._buf:
            self._process()


async def serve(host: str, port: int, events_per_write: int) -> None:
    loop = asyncio.get_running_loop()
    server = Server(events_per_write)
    listener = await loop.create_server(
        lambda: Connection(server), host, port, backlog=8192, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream listening on http://{host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    listener.close()
    print(
        f"bench upstream: {server.requests} requests, {server.completed} completed, "
        f"{server.disconnects} client disconnects",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--events-per-write",
        type=int,
        default=8,
        help="with no delay, SSE events joined per transport.write (default 8)",
    )
    args = parser.parse_args(argv)
    raise_nofile()
    install_uvloop()
    asyncio.run(serve(args.host, args.port, args.events_per_write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
