"""A stream's events as its generation produced them: payloads numbered from 1, each one line of
JSON encoded once, and a terminal flag. How a payload is framed (an `id:` line or not, the
heartbeats between them) is each reader's business, since it depends on the reader's `Accept`.

Appending wakes the readers waiting for more (one future per waiting reader; nothing at all per
event when none waits). A reader that has caught up is written to by the generation directly
(`relay` design note 8), so it waits only for the end.
"""

from __future__ import annotations

import asyncio


class EventLog:
    __slots__ = ("_end_waiters", "_waiters", "ended", "events")

    def __init__(self) -> None:
        self.events: list[bytes] = []  # event n is events[n - 1]
        self.ended = False  # the terminal event is the last one
        self._waiters: list[asyncio.Future[None]] = []
        self._end_waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self.events)

    def append(self, payload: bytes) -> int:
        """Add one event; its number."""
        self.events.append(payload)
        if self._waiters:
            self._waiters = _wake(self._waiters)
        return len(self.events)

    def end(self, payload: bytes | None = None) -> None:
        """Add the terminal event (if any) and mark the log complete."""
        if payload is not None:
            self.events.append(payload)
        self.ended = True
        self._waiters = _wake(self._waiters)
        self._end_waiters = _wake(self._end_waiters)

    def wait(self) -> asyncio.Future[None]:
        """Resolved at the next event or at the end."""
        return self._future(self._waiters)

    def wait_end(self) -> asyncio.Future[None]:
        """Resolved at the end."""
        return self._future(self._end_waiters)

    def _future(self, waiters: list[asyncio.Future[None]]) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        if self.ended:
            future.set_result(None)
        else:
            waiters.append(future)
        return future


def _wake(waiters: list[asyncio.Future[None]]) -> list[asyncio.Future[None]]:
    for future in waiters:
        if not future.done():
            future.set_result(None)
    return []
