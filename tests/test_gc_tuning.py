"""Python's garbage collector once the server has started (`edge` design note 5): what start-up
made is frozen out of every collection, and the thresholds are `GC_THRESHOLDS`, while it serves."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from service import edge
from tests.process import free_port


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The test process's collector as it was, whatever the test did to it."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def test_serving_freezes_start_up_objects_and_raises_the_thresholds(
    gc_restored: None,
) -> None:
    seen: dict[str, object] = {}
    started = ["made before serving"]  # tracked by the collector until frozen

    async def probe(request: web.Request) -> web.Response:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        # the frozen generation is not in `get_objects()`: no collection scans it
        seen["started_scanned"] = any(started is o for o in gc.get_objects())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/probe", probe)
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    port = free_port()
    server = asyncio.create_task(
        edge.serve(
            app,
            host="127.0.0.1",
            port=port,
            backlog=16,
            shutdown_timeout=1.0,
            header_timeout_s=5.0,
        )
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(10):
                while True:  # bounded by the timeout: until the site listens
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/probe") as answer:
                            assert answer.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.02)
    finally:
        os.kill(os.getpid(), signal.SIGINT)  # serve's own handler: stop, drain, clean up
        async with asyncio.timeout(10):
            await server
    assert seen["threshold"] == edge.GC_THRESHOLDS
    frozen = seen["frozen"]
    assert isinstance(frozen, int)
    assert frozen > 1000
    assert seen["started_scanned"] is False
