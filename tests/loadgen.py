"""A bounded load generator for the endurance test, run in its own process.

`python -m tests.loadgen URL STREAMS CONCURRENCY CANCEL_FRACTION SEED` opens STREAMS generate
streams, at most CONCURRENCY at once; a CANCEL_FRACTION of them, chosen at random, close their
connection at a random point (right after the headers, or after a random number of events).
Prints one JSON line: how many completed, were cancelled, or failed.
"""

from __future__ import annotations

import asyncio
import random
import sys

import aiohttp
import orjson


async def one(session: aiohttp.ClientSession, url: str, cancel_after: int | None) -> str:
    async with session.post(url, json={"prompt": "endurance"}) as resp:
        if resp.status != 200:
            return "failed"
        events = 0
        buf = b""
        while True:
            if cancel_after is not None and events >= cancel_after:
                resp.close()
                return "cancelled"
            data = await resp.content.readany()
            if not data:
                return "failed"
            buf += data
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                if not frame.startswith(b"data: "):
                    continue  # a `: ping` block
                events += 1
                payload = orjson.loads(frame[6:])
                if payload["type"] == "done":
                    return "completed"
                if payload["type"] == "error":
                    return "failed"


async def main(url: str, streams: int, concurrency: int, cancel: float, seed: int) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    counts = {"completed": 0, "cancelled": 0, "failed": 0}

    async def run(i: int) -> None:
        cancel_after = rng.randint(0, 20) if rng.random() < cancel else None
        async with gate:
            try:
                async with asyncio.timeout(60):
                    counts[await one(session, url, cancel_after)] += 1
            except (aiohttp.ClientError, TimeoutError):
                counts["failed"] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(run(i) for i in range(streams)))
    print(orjson.dumps(counts).decode())


if __name__ == "__main__":
    url, streams, concurrency, cancel, seed = sys.argv[1:6]
    asyncio.run(main(url, int(streams), int(concurrency), float(cancel), int(seed)))
