"""A bounded load generator for the endurance test, run in its own process.

`python -m tests.loadgen URL STREAMS CONCURRENCY CANCEL_FRACTION SEED [RESUME_FRACTION]` opens
STREAMS generate streams (`POST URL`), at most CONCURRENCY at once, and prints one JSON line of
counts: how many streams ended each way (`KINDS`, below), and for the resuming ones how many times
they came back (`reconnects`), how many of those read again from the start (`from_start`) and how
many cuts fell inside a frame (`cut_in_frame`).

Without RESUME_FRACTION (or with 0: a service that cancels a stream whose reader leaves), a
CANCEL_FRACTION of them, chosen at random, close their connection at a random point (right after
the headers, or after a random number of events): `cancelled`; the others read to the end.

With a RESUME_FRACTION (a service that keeps a generation going for a grace window after its last
reader left), the streams are of four kinds, chosen at random:
- `leave` (half the CANCEL_FRACTION): close the connection after a random number of events and
  never come back. They send `LEAVE_PROMPT`, for which the test's upstream pauses before its end
  for longer than the grace window, so their generations end `client_disconnect` when it runs out.
- `stop` (the other half): after a random number of events, `POST /api/v1/ai/streams/{id}/cancel`
  (what a user's Stop does; 204), then read on: the stream must end with an `error` event of code
  `cancelled` (`stopped`), or with `done` when it ended before the cancel came (`stop_late`).
- `resume` (a RESUME_FRACTION): drop the connection after a random number of body bytes (inside a
  frame too: the bytes past the cut are thrown away as if lost on the way), once or twice, half
  of the time after a pause shorter than the grace window, and come back through
  `GET /api/v1/ai/streams/{id}` with `Last-Event-ID` set to the last `id:` line read (none when
  cut inside the first frame: the stream is read from its start). Across connections the events
  must be numbered without gap or repeat and the joined deltas must equal `done.content`: then
  `resumed`, else `mismatched`. They send `RESUME_PROMPT` (a slower answer, so most come back
  to a generation still running) and always ask for full frames (they need the `id:` lines).
- the rest read to the end (`completed`; `mismatched` when their text is not `done.content`).
Readers that do not resume choose the frame shape at random (`Accept: text/event-stream` or not),
in both modes. Anything unexpected (a status, an early end of the body, a timeout, an `error`
event after a Stop that is not `cancelled`) counts as `failed`, a stream that ends other than with
exactly its answer (an `error` event included) as `mismatched`; the first few of either are
described on stderr.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

PROMPT = "endurance"
LEAVE_PROMPT = "endurance: leave"
RESUME_PROMPT = "endurance: resume"
FULL = {"Accept": "text/event-stream"}
FIRST_CUT_MAX = 1_500  # body bytes; a 20-token stream's full frames are about 2 KB
SECOND_CUT_MAX = 600
PAUSE_MAX_S = 0.2  # the test's grace window is longer

Counts = dict[str, int]
Client = Callable[[aiohttp.ClientSession], Awaitable[str | tuple[str, Counts]]]
KINDS = ("completed", "cancelled", "stopped", "stop_late", "resumed", "mismatched", "failed")


class Failed(Exception):
    """Something a well-behaved stream never does."""


class Mismatched(Exception):
    """A stream whose client did not get exactly its answer, once."""


@dataclass
class Reader:
    """One stream as its client sees it, across connections: frames parsed from the bytes that
    arrived, the last event number read, the deltas joined, the terminal event."""

    stream_id: str
    buf: bytes = b""
    seq: int = 0  # the last `id:` read (full frames only)
    events: int = 0
    deltas: list[str] = field(default_factory=list)
    terminal: dict[str, Any] | None = None
    out_of_order: bool = False
    cut_in_frame: int = 0  # drops that fell inside a frame

    def ended(self) -> bool:
        return self.terminal is not None

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.terminal is None and b"\n\n" in self.buf:
            frame, self.buf = self.buf.split(b"\n\n", 1)
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        seq: int | None = None
        payload: dict[str, Any] | None = None
        for line in frame.split(b"\n"):  # `: ping` lines are skipped
            if line.startswith(b"id: "):
                stream_id, _, n = line[4:].decode().rpartition(":")
                if stream_id != self.stream_id:
                    self.out_of_order = True
                seq = int(n)
            elif line.startswith(b"data: "):
                payload = orjson.loads(line[6:])
        if payload is None:
            return
        if seq is not None:
            self.out_of_order |= seq != self.seq + 1
            self.seq = seq
        self.events += 1
        if payload["type"] == "content":
            self.deltas.append(payload["delta"])
        elif payload["type"] in ("done", "error"):
            self.terminal = payload

    def check(self) -> None:
        """Raise `Mismatched` unless the stream completed with nothing lost and nothing
        repeated."""
        done = self.terminal
        if done is None or done["type"] != "done":
            raise Mismatched(f"ended with {done}")
        if self.out_of_order:
            raise Mismatched(f"events out of order, up to {self.stream_id}:{self.seq}")
        if "".join(self.deltas) != done["content"]:
            raise Mismatched(f"{''.join(self.deltas)!r} is not {done['content']!r}")


async def read(resp: aiohttp.ClientResponse, reader: Reader, cut: int | None = None) -> bool:
    """Feed `resp`'s body to `reader` until the terminal event; with `cut`, only until that many
    body bytes have arrived, then close the connection. True when cut before the end."""
    taken = 0
    while not reader.ended():
        data = await resp.content.readany()
        if not data:
            raise Failed("the body ended before a terminal event")
        if cut is not None and taken + len(data) >= cut:
            reader.feed(data[: cut - taken])
            if not reader.ended():
                resp.close()
                reader.cut_in_frame += bool(reader.buf)
                reader.buf = b""  # the rest of a frame cut in two never arrives
                return True
            return False
        taken += len(data)
        reader.feed(data)
    return False


def stream_url(url: str, stream_id: str) -> URL:
    return URL(url).with_path(f"/api/v1/ai/streams/{stream_id}")


async def post(
    session: aiohttp.ClientSession, url: str, prompt: str, full: bool
) -> tuple[aiohttp.ClientResponse, Reader]:
    resp = await session.post(url, json={"prompt": prompt}, headers=FULL if full else None)
    if resp.status != 200:
        resp.release()
        raise Failed(f"status {resp.status}")
    return resp, Reader(resp.headers.get("X-Stream-ID", ""))


async def reading(
    session: aiohttp.ClientSession, url: str, full: bool, leave_after: int | None
) -> str:
    """A reader to the end, or one that leaves for good after `leave_after` events."""
    prompt = PROMPT if leave_after is None else LEAVE_PROMPT
    resp, reader = await post(session, url, prompt, full)
    async with resp:
        while not reader.ended():
            if leave_after is not None and reader.events >= leave_after:
                return "cancelled"
            data = await resp.content.readany()
            if not data:
                raise Failed("the body ended before a terminal event")
            reader.feed(data)
    reader.check()
    return "completed"


async def stopping(session: aiohttp.ClientSession, url: str, full: bool, after: int) -> str:
    """A reader that stops its stream through the cancel route after `after` events."""
    resp, reader = await post(session, url, PROMPT, full)
    stopped = False
    async with resp:
        while not reader.ended():
            if not stopped and reader.events >= after:
                cancel = stream_url(url, reader.stream_id) / "cancel"
                async with session.post(cancel) as answer:
                    if answer.status != 204:
                        raise Failed(f"cancel answered {answer.status}")
                stopped = True
            data = await resp.content.readany()
            if not data:
                raise Failed("the body ended before a terminal event")
            reader.feed(data)
    terminal = reader.terminal
    assert terminal is not None
    if terminal["type"] == "error":
        if stopped and terminal["code"] == "cancelled" and terminal["reason"] == "cancelled":
            return "stopped"
        raise Failed(f"error event {terminal}")
    reader.check()
    return "stop_late" if stopped else "completed"


async def resuming(
    session: aiohttp.ClientSession, url: str, cuts: list[int], pause_s: float
) -> tuple[str, Counts]:
    """A reader whose connection drops at each of `cuts` (body bytes of that connection) and
    that comes back with `Last-Event-ID`; the outcome, and how many times it came back (how many
    of them from the start, with no event read) and was cut inside a frame."""
    resp, reader = await post(session, url, RESUME_PROMPT, full=True)
    async with resp:
        dropped = await read(resp, reader, cuts[0])
    back = from_start = 0
    for cut in [*cuts[1:], None]:
        if not dropped:
            break
        if pause_s:
            await asyncio.sleep(pause_s)  # a client away for a moment, not a synchronisation
        headers = dict(FULL)
        if reader.seq:
            headers["Last-Event-ID"] = f"{reader.stream_id}:{reader.seq}"
        else:
            from_start += 1
        back += 1
        async with session.get(stream_url(url, reader.stream_id), headers=headers) as resp:
            if resp.status != 200 or resp.headers.get("X-Stream-ID") != reader.stream_id:
                raise Mismatched(f"resumed at {reader.seq}: status {resp.status}")
            dropped = await read(resp, reader, cut)
    try:
        reader.check()
    except Mismatched as exc:
        raise Mismatched(f"{exc} (cuts {cuts}, pause {pause_s:.2f} s, back {back})") from None
    extra = {"reconnects": back, "from_start": from_start, "cut_in_frame": reader.cut_in_frame}
    return ("resumed" if back else "completed"), extra


async def main(
    url: str, streams: int, concurrency: int, cancel: float, seed: int, resume: float
) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    counts: Counts = dict.fromkeys((*KINDS, "reconnects", "from_start", "cut_in_frame"), 0)

    def plan() -> Client:
        """The next stream's client, as a coroutine function of the session (drawn in order, so
        a seed gives the same run)."""
        draw = rng.random()
        full = rng.random() < 0.5
        after = rng.randint(0, 20)
        if not resume:
            leave = after if draw < cancel else None
            return lambda s: reading(s, url, full, leave)
        if draw < cancel / 2:
            return lambda s: reading(s, url, full, after)
        if draw < cancel:
            return lambda s: stopping(s, url, full, max(after, 1))
        if draw < cancel + resume:
            cuts = [rng.randint(1, FIRST_CUT_MAX)]
            if rng.random() < 0.5:
                cuts.append(rng.randint(1, SECOND_CUT_MAX))
            pause_s = rng.uniform(0.01, PAUSE_MAX_S) if rng.random() < 0.5 else 0.0
            return lambda s: resuming(s, url, cuts, pause_s)
        return lambda s: reading(s, url, full, None)

    def report(what: str) -> None:
        if counts["failed"] + counts["mismatched"] < 5:  # the first few, for the test's output
            print(f"loadgen: {what}", file=sys.stderr)

    async def run(client: Client) -> None:
        async with gate:
            try:
                async with asyncio.timeout(60):
                    outcome = await client(session)
            except (aiohttp.ClientError, TimeoutError, Failed) as exc:
                outcome = "failed"
                report(f"failed: {exc!r}")
            except Mismatched as exc:
                outcome = "mismatched"
                report(f"mismatched: {exc}")
            if isinstance(outcome, tuple):
                outcome, extra = outcome
                for name, n in extra.items():
                    counts[name] += n
            counts[outcome] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(run(plan()) for _ in range(streams)))
    print(orjson.dumps(counts).decode())


if __name__ == "__main__":
    url, streams, concurrency, cancel, seed = sys.argv[1:6]
    resume = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    asyncio.run(main(url, int(streams), int(concurrency), float(cancel), int(seed), resume))
