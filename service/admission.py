"""Admission of a new stream, as contexts entered in this order and left in the reverse:
`take_slot` (one of `MAX_STREAMS`, counted synchronously, before the first await, so a burst
cannot walk past the cap while earlier requests wait on SQLite or Redis), then `limited` (the
client's limits, as the stream's account), or both as `admitted`. Whatever ends the request (a
4xx, a store error, a cancellation at any await, the stream's end) gives back what was taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from . import keys
from .errors import ApiError, ErrorCode
from .limits.accounts import Account
from .relay import Slot
from .tasks import outlive_cancel


def client_of(request: web.Request) -> str:
    """The API key's id when keys are required, else the client's address."""
    key = request.get(keys.KEY_ID)
    if key is not None:
        return f"key:{key}"
    access = request.app[keys.ACCESS]
    return "ip:" + access.client_address(request.remote, request.headers.get("X-Forwarded-For"))


def take_slot(request: web.Request) -> Slot:
    """One of this instance's `MAX_STREAMS`, taken before any await (503 when draining or full).
    Use it as `with take_slot(request):` around everything the stream does."""
    live = request.app[keys.LIVE]
    if live.draining:
        raise ApiError(ErrorCode.SERVER_SHUTDOWN, "The server is shutting down.")
    slot = live.take(request.app[keys.SETTINGS].max_streams)
    if slot is None:
        raise ApiError(ErrorCode.OVERLOADED, "Too many open streams; retry shortly.")
    return slot


@contextlib.asynccontextmanager
async def limited(request: web.Request, estimate: int) -> AsyncIterator[Account]:
    """The client's limits: its request, lease and token reserve (429 when over one), as the
    stream's account. On exit, cancellation included, the account is given back unless a stream
    ran on it and settled it already (an account closes once)."""
    limits = request.app[keys.LIMITS]
    client = client_of(request)
    admission = await limits.admit(client, estimate)
    request[keys.ADMISSION] = admission  # the answer's quota headers (`web.on_prepare`)
    account = limits.open(client, admission)
    try:
        yield account
    finally:
        await outlive_cancel(account.give_back())


@contextlib.asynccontextmanager
async def admitted(request: web.Request, estimate: int) -> AsyncIterator[Account]:
    """A new stream's admission as one context: a `MAX_STREAMS` slot taken synchronously, then
    the client's limits; everything taken is given back when the context exits."""
    with take_slot(request):
        async with limited(request, estimate) as account:
            yield account
