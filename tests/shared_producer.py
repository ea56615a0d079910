"""A producing instance in a process of its own, for the tests that SIGKILL it: it publishes one
stream to Redis, appends `PAYLOADS`, prints `flushed` once Redis holds them all, then waits to be
killed. `python -m tests.shared_producer REDIS_URL STREAM_ID LEASE_S TTL_S`"""

from __future__ import annotations

import asyncio
import sys

from service.events import EventLog
from service.shared_streams import SharedStreams, StreamMeta, connect

LOST = b'{"type":"error","code":"server_shutdown","message":"The stream\'s server went away."}'
PAYLOADS = [
    b'{"type":"metadata","conversationId":"c1","messageId":"m1"}',
    b'{"type":"token","content":"Hello"}',
    b'{"type":"token","content":", world"}',
]


def meta(stream_id: str, instance: str, owner: str = "") -> StreamMeta:
    return StreamMeta(
        stream_id=stream_id,
        route="chat",
        owner=owner,
        instance=instance,
        created=1_800_000_000.0,
        lost=LOST,
        conversation_id="c1",
        message_id=stream_id,
    )


async def main(url: str, stream_id: str, lease_s: float, ttl_s: float) -> None:
    redis = connect(url, lease_s=lease_s)
    shared = SharedStreams(redis, instance="doomed", flush_ms=10, ttl_s=ttl_s, lease_s=lease_s)
    await shared.start()
    events = EventLog()
    publication = shared.publish(meta(stream_id, "doomed"), events, lambda: None)
    for payload in PAYLOADS:
        events.append(payload)
    async with asyncio.timeout(5):
        while publication.flushed < len(PAYLOADS):  # noqa: ASYNC110 (no event for a flush)
            await asyncio.sleep(0.01)  # bounded: waiting for the flusher
    print("flushed", flush=True)
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
