"""`python -m bench.shared_streams`: what keeping streams in Redis costs, in one process.

Starts a redis-server of its own (no persistence) on a free loopback port, then:
1. `--streams` producers publish at model pace (`--rate` events per second each, for
   `--seconds`): the flusher's CPU per event (this process's CPU time, minus an identical run
   with publishing off), pipelines sent (the only round trips) and Redis commands run per event
   (`INFO commandstats`, those inside scripts included);
2. `--reconnects` readers on a second instance (its own client) open a finished stream at a
   random cursor and read from it: time from the `open` to the first missed event, p50 and p99.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from bench.common import percentile
from service.events import EventLog
from service.metrics import create_metrics
from service.shared_streams import SharedStreams, StreamMeta, connect
from tests.process import free_port

LOST = b'{"type":"error","code":"server_shutdown"}'


def meta(stream_id: str) -> StreamMeta:
    return StreamMeta(stream_id, "generate", "", "bench", 0.0, LOST)


async def produce(streams: int, rate: float, seconds: float, shared: SharedStreams | None) -> float:
    """CPU seconds this process spent while `streams` logs grew at `rate` events/s each."""
    logs = [EventLog() for _ in range(streams)]
    if shared is not None:
        for n, events in enumerate(logs):
            shared.publish(meta(f"p{n}"), events, lambda: None)
    payload = b'{"type":"content","delta":"word "}'
    start_cpu = time.process_time()
    ticks = round(seconds * rate)
    for _ in range(ticks):
        for events in logs:
            events.append(payload)
        await asyncio.sleep(1 / rate)  # model pace
    for events in logs:
        events.end(b'{"type":"done"}')
    if shared is not None:
        async with asyncio.timeout(10):
            while shared.publications:  # noqa: ASYNC110 (no event for a flush)
                await asyncio.sleep(0.01)
    return time.process_time() - start_cpu


async def calls(redis: aioredis.Redis) -> int:
    info: dict[str, Any] = await redis.info("commandstats")
    return sum(int(stats["calls"]) for name, stats in info.items() if name != "cmdstat_info")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        *("redis-server", "--port", str(port), "--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        spy = aioredis.Redis(port=port)
        async with asyncio.timeout(10):
            while True:
                try:
                    await spy.ping()
                    break
                except (OSError, RedisConnectionError):
                    await asyncio.sleep(0.05)  # bounded: waiting for the server to listen
        metrics = create_metrics(CollectorRegistry(), ())
        producer = SharedStreams(
            connect(url), instance="a", flush_ms=args.flush_ms, ttl_s=300, metrics=metrics
        )
        reader = SharedStreams(connect(url), instance="b", flush_ms=args.flush_ms, ttl_s=300)
        await producer.start()
        await reader.start()
        baseline = await produce(args.streams, args.rate, args.seconds, None)
        before = await calls(spy)
        published = await produce(args.streams, args.rate, args.seconds, producer)
        commands = await calls(spy) - before
        events = args.streams * (round(args.seconds * args.rate) + 1)
        flushes = metrics.registry.get_sample_value("ai_stream_resume_redis_flushes_total") or 0
        latencies = []
        for _ in range(args.reconnects):
            stream_id = f"p{random.randrange(args.streams)}"
            after = random.randrange(events // args.streams - 1)
            started = time.perf_counter()
            remote = await reader.open(stream_id, after)  # as the stream route does
            assert remote is not None
            async for n, _ in remote.read(after):
                assert n == after + 1
                break
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        await producer.aclose()
        await reader.aclose()
        await producer.redis.aclose()
        await reader.redis.aclose()
        await spy.aclose()
    finally:
        server.terminate()
        await server.wait()
    return {
        "streams": args.streams,
        "events": events,
        "flushes": flushes,
        "events_per_pipeline": round(events / max(flushes, 1), 1),
        "redis_commands_per_event": round(commands / events, 3),  # those inside scripts too
        "cpu_us_per_event": round((published - baseline) / events * 1e6, 2),
        "reconnect_to_first_event_ms": {
            "p50": round((percentile(latencies, 50) or 0) * 1000, 2),
            "p99": round((percentile(latencies, 99) or 0) * 1000, 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--rate", type=float, default=30.0, help="events per second per stream")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flush-ms", type=int, default=50)
    parser.add_argument("--reconnects", type=int, default=300)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (bash scripts/ensure-tools.sh)")
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
