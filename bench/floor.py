"""The floor of a relay in Python: `python -m bench.floor --port N --upstream-port U [--parse]`.

Not the gateway: a measuring stick for it. A relay on raw asyncio protocols and uvloop, with
nothing of aiohttp, httpx or the SDK, in front of `bench.upstream`: each client request (read
whole) goes to the upstream on a connection of its own (`Connection: close`), and each upstream
read goes to the client at once. Plain, it writes the read as it came (what nginx does
with `proxy_buffering off`); with `--parse` it does the gateway's per-token work in miniature:
splits the HTTP chunks, reads each SSE event's JSON with orjson, and writes the event as an HTTP
chunk of its own. Driven by `python -m bench.load --mode=direct --url http://127.0.0.1:N` (the
answer is the upstream's own, so the load checks every text), its CPU per token is what Python on
uvloop costs when nothing stands between the two sockets but the relay itself (README,
Performance: "What stands in the way"). A connection per stream on both sides (its opening is in
the figure), no limits, no timeouts, no error answers: nothing here is fit to serve.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import orjson

from .common import install_uvloop, raise_nofile

HEAD_LIMIT = 64 * 1024
ANSWER_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)


class Upstream(asyncio.Protocol):
    """One answer from the upstream, relayed to `client` read by read."""

    def __init__(self, client: asyncio.Transport, parse: bool) -> None:
        self.client = client
        self.parse = parse
        self.buf = b""
        self.head = True

    def data_received(self, data: bytes) -> None:
        if not self.parse:
            self.client.write(data)
            return
        buf = self.buf + data
        if self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if b"transfer-encoding: chunked" not in buf[:end].lower():  # not a stream: as it came
                self.parse = False
                self.client.write(buf)
                return
            self.client.write(ANSWER_HEAD)
            buf, self.head = buf[end + 4 :], False
        while True:  # bounded: each pass takes one whole HTTP chunk off `buf`
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            size = int(buf[:line_end], 16)
            if len(buf) < line_end + size + 4:
                break
            event = buf[line_end + 2 : line_end + 2 + size]
            buf = buf[line_end + size + 4 :]
            if not size:
                self.client.write(b"0\r\n\r\n")
                break
            for line in event.split(b"\n"):
                if line.startswith(b"data: {"):
                    orjson.loads(line[6:])  # the gateway reads every event's JSON
            self.client.write(b"%x\r\n%b\r\n" % (len(event), event))
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    """One client connection: its request is sent to the upstream on a new connection."""

    def __init__(self, upstream_port: int, parse: bool) -> None:
        self.upstream_port = upstream_port
        self.parse = parse
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > HEAD_LIMIT and self.transport is not None:
                self.transport.close()
            return
        lines = self.buf[:end].split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4 : end + 4 + length]
        self.buf = b""
        method, path, _ = lines[0].split(b" ", 2)
        request = (
            b"%b %b HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (method, path, len(body), body)
        )
        asyncio.get_running_loop().create_task(self._send(request))

    async def _send(self, request: bytes) -> None:
        assert self.transport is not None
        client, parse = self.transport, self.parse
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(client, parse), "127.0.0.1", self.upstream_port
        )
        transport.write(request)


async def serve(port: int, upstream_port: int, parse: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(upstream_port, parse), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--parse", action="store_true", help="read every event (see above)")
    args = parser.parse_args(argv)
    raise_nofile()
    install_uvloop()
    asyncio.run(serve(args.port, args.upstream_port, args.parse))


if __name__ == "__main__":
    main()
