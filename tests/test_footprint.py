"""What an open or finished stream holds (relay design note 15): the service's own tasks per open
stream, and the size of the events a finished stream keeps. Counted on the real app with the
real SDK path, never timed."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import service
from service import keys
from tests.conftest import MakeGateway
from tests.fake_upstream import Gate, Text, answer

SERVICE_DIR = str(Path(service.__file__).parent)
STREAMS = 5


def service_tasks() -> list[str]:
    """The running tasks whose coroutine is the service's own code, by qualified name."""
    names = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and code.co_filename.startswith(SERVICE_DIR):
            names.append(task.get_coro().__qualname__)  # type: ignore[union-attr]
    return sorted(names)


async def test_an_open_stream_holds_two_tasks_of_its_own(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(idle_timeout_s=30.0, first_token_timeout_s=30.0)
    gate = asyncio.Event()
    before = service_tasks()
    opened = []
    for _ in range(STREAMS):
        gateway.fake.queue([Text("a"), Gate(gate), *answer("b")])
        resp, frames = await gateway.stream({"prompt": "x"})
        await frames.until(b'"delta":"a"')
        opened.append((resp, frames))
    during = service_tasks()
    for name in before:
        during.remove(name)
    # the generation and its pump; the watchdog is a timer, the registry's bookkeeping runs in
    # the generation's own task
    assert during == sorted(["Generation.run", "Generation._pump"] * STREAMS)
    gate.set()
    for _, frames in opened:
        events = await frames.rest()
        assert events[-1]["type"] == "done"
        assert events[-1]["content"] == "ab"
    await gateway.settled()
    assert service_tasks() == before


async def test_a_finished_stream_keeps_its_events_at_their_own_size(
    make_gateway: MakeGateway,
) -> None:
    """orjson's output holds a ~4 KB buffer whatever its length; the opening and terminal
    events a retained stream keeps are copies of their own size."""
    gateway = await make_gateway()
    gateway.fake.default = answer("Hello")
    await (await gateway.stream({"prompt": "x"}))[1].rest()  # warm: first-use allocations
    await gateway.settled()
    only_sse = [tracemalloc.Filter(True, str(Path(SERVICE_DIR) / "sse.py"))]
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot().filter_traces(only_sse)
        ids = []
        for _ in range(STREAMS):
            resp, frames = await gateway.stream({"prompt": "x"})
            events = await frames.rest()
            assert [e["type"] for e in events] == ["start", "content", "done"]
            ids.append(resp.headers["X-Stream-ID"])
        await gateway.settled()
        end = tracemalloc.take_snapshot().filter_traces(only_sse)
    finally:
        tracemalloc.stop()
    live = gateway.client.app[keys.LIVE]
    assert live.retained == STREAMS + 1
    kept = sum(stat.size_diff for stat in end.compare_to(start, "filename"))
    kept_streams = [live.find(stream_id) for stream_id in ids]
    payloads = sum(len(g.log.events[0]) + len(g.log.events[-1]) for g in kept_streams if g)
    assert all(g is not None and g.ended for g in kept_streams)
    # the two kept events of each stream, with the object headers; far below one 4 KB buffer
    assert kept < payloads + STREAMS * 2 * 64, (kept, payloads)
    assert kept < STREAMS * 1024
