"""Cancellation-safe helpers shared by every layer (no app state, no imports from the service)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def outlive_cancel(work: Awaitable[T]) -> T:
    """Run `work` (a release, a save) to its end even if the caller is cancelled meanwhile, then
    re-raise that cancellation: what a stream took is given back on every path."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if not task.cancelled():
            task.exception()  # retrieved; the caller's cancellation is what it sees
        raise asyncio.CancelledError
    return task.result()


async def settle(*tasks: asyncio.Task[None]) -> None:
    """Cancel `tasks` and wait until they have finished, even if we are cancelled meanwhile; a
    cancellation that arrived is re-raised once they are done."""
    for task in tasks:
        task.cancel()
    interrupted = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            interrupted = True
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the outcome was already taken elsewhere
    if interrupted:
        raise asyncio.CancelledError
