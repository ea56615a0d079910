"""A TCP proxy in front of the service that cuts event streams where a test says: the way a phone
in a lift, a Wi-Fi hand-over or a dying proxy drops a client mid-stream.

It reads HTTP/1.1 in both directions (keep-alive connections carry several exchanges, as
browsers use them: a CORS preflight, then the POST), records each request (method, path,
`Last-Event-ID`) and each answer (status, content type) in order, and passes everything through
unchanged, except that the next event-stream answer takes the next armed `Cut`: once its
de-chunked body has delivered `events` whole events (each ends in a blank line; the full SSE
shape's `: ping` heartbeat has none) and then `extra` bytes more (`extra` > 0: inside the next
frame), the client's connection is closed (a FIN after the bytes before the cut, mid-chunk: the
client reads exactly those, then an incomplete body) and the service's is reset, whatever the
chunk boundary.
Event-stream answers beyond the armed cuts, and every other answer, pass whole.

A browser may drop bytes that arrive together with the connection's end before its page has read
them (a stream's error discards what is queued), which would move the cut. A `Cut(hold=True)`
therefore waits, after its last bytes, for `release()`: the test releases it once the client
shows it has read them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tests.tcp_proxy import TcpProxy

BLANK = b"\n\n"


@dataclass(frozen=True)
class Cut:
    events: int  # whole events delivered before the cut
    extra: int = 0  # bytes of the next frame delivered too (its chunk header excluded)
    hold: bool = False  # keep the connection open after those bytes until `release()`


@dataclass(frozen=True)
class Seen:
    """One request, or one answer's head."""

    method: str  # "" for an answer
    path: str  # the request's path, or the answer's status
    last_event_id: str | None = None
    content_type: str = ""
    cut: bool = False  # this answer took an armed cut


def _head(data: bytes) -> tuple[str, dict[str, str]]:
    first, *lines = data.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return first, headers


class Cutter:
    """Counts an event-stream body's bytes up to the cut."""

    def __init__(self, cut: Cut) -> None:
        self.cut = cut
        self.events = 0
        self.tail = b""  # the last byte seen, so a blank line split across chunks counts
        self.after = -1  # bytes since the `events`-th event ended; -1 before it

    def allowed(self, data: bytes) -> int | None:
        """How many bytes of `data` go out before the cut, or None when all of it does."""
        for i in range(len(data)):
            if self.after >= 0:
                if self.after >= self.cut.extra:
                    return i
                self.after += 1
                continue
            if (self.tail + data[i : i + 1]).endswith(BLANK):
                self.events += 1
                if self.events == self.cut.events:
                    self.after = 0
            self.tail = data[i : i + 1]
        if self.after >= 0 and self.after >= self.cut.extra:
            return len(data)
        return None


class _Closed(Exception):
    """The connection was cut on purpose."""


class CuttingProxy(TcpProxy):
    """`arm(Cut(...), ...)` then point a client at `url`; `seen` is what went through."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.seen: list[Seen] = []
        self.cuts_made = 0
        self._armed: deque[Cut] = deque()
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, *cuts: Cut) -> None:
        """The next event-stream answers are cut as given, one cut each, in order (and only
        those: any armed before are dropped). `seen` and `cuts_made` start again."""
        self._armed = deque(cuts)
        self.seen = []
        self.cuts_made = 0
        self._release = asyncio.Event()

    def release(self) -> None:
        """Let a held cut close its connection."""
        self._release.set()

    @property
    def armed(self) -> int:
        return len(self._armed)

    def requests(self) -> list[Seen]:
        return [s for s in self.seen if s.method and s.method != "OPTIONS"]

    def answers(self) -> list[Seen]:
        return [s for s in self.seen if not s.method]

    async def connection(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        service_out: asyncio.StreamWriter | None = None
        try:
            service_in, service_out = await asyncio.open_connection("127.0.0.1", self.target_port)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._requests(client_in, service_out))
                group.create_task(self._answers(service_in, client_out))
        except* (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _Closed):
            pass  # either side went away, or the connection was cut: it is over
        finally:
            if service_out is not None:
                service_out.transport.abort()
            # FIN after what was written, not RST: a reset makes the client's kernel drop bytes
            # it has received but its program has not read yet, which would move the cut
            client_out.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client sends no more requests; its answer may still be coming
            first, headers = _head(head)
            method, path, *_ = [*first.split(" "), "", ""]
            self.seen.append(Seen(method, path, headers.get("last-event-id")))
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            writer.write(head + body)
            await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                raise _Closed() from None
            first, headers = _head(head)
            status = first.split(" ")[1]
            content_type = headers.get("content-type", "")
            streaming = content_type.startswith("text/event-stream")
            cutter = Cutter(self._armed.popleft()) if streaming and self._armed else None
            self.seen.append(Seen("", status, content_type=content_type, cut=cutter is not None))
            writer.write(head)
            if headers.get("transfer-encoding", "").lower() == "chunked":
                await self._chunked(reader, writer, cutter)
            elif "content-length" in headers:
                writer.write(await reader.readexactly(int(headers["content-length"])))
            elif status not in {"204", "304"}:
                while data := await reader.read(65536):  # to the end of the connection
                    writer.write(data)
                    await writer.drain()
                raise _Closed()
            await writer.drain()

    async def _chunked(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cutter: Cutter | None
    ) -> None:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                writer.write(line + await reader.readuntil(b"\r\n"))  # no trailers here
                return
            data = await reader.readexactly(size)
            crlf = await reader.readexactly(2)
            allowed = cutter.allowed(data) if cutter is not None else None
            if cutter is not None and allowed is not None:
                writer.write(line + data[:allowed])
                await writer.drain()
                if cutter.cut.hold:
                    await self._release.wait()
                self.cuts_made += 1
                raise _Closed()
            writer.write(line + data + crlf)
            await writer.drain()


@contextlib.asynccontextmanager
async def cutting_proxy(target_port: int) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
