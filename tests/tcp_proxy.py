"""The loopback TCP proxies the tests put between a client and the service (`cutting_proxy`'s,
`test_sse_clients`' byte splitter): a server on an ephemeral 127.0.0.1 port whose connections
each run `connection()` as a task of their own, all cancelled and awaited by `stop()`."""

from __future__ import annotations

import asyncio
from typing import Any


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.connection(client_in, client_out)
        finally:
            self._tasks.discard(task)

    async def connection(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        """Serve one client connection until either side is done."""
        raise NotImplementedError
