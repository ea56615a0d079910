"""Failover across model servers: an `Upstream` that tries an ordered list of servers in turn,
before the first byte of an answer and never after it.

Each server is an `OpenAIUpstream` with the SDK's own retries off (`max_retries=0`): this module's
attempt loop owns retries, so it can move on to the next server instead of waiting on one.
`UPSTREAMS` unset is a list of one (the single-upstream settings), on the same code path.

Design notes:
1. An attempt ends well once its server has answered 200 and sent the first batch of its answer
   (a content delta; for a relayed chunk stream, any chunk). Only then is the stream handed to the
   relay, so nothing a failed attempt received ever reaches a client, and a stream that breaks
   after that is never retried (the client may have seen part of it): it ends `upstream_error`.
   An attempt's 200 is told at once (`Attempts.answered`), so the OpenAI-compatible routes send
   their headers when a server has answered, as before; a later failover is still before any
   byte of content, and a call that then fails ends in an error chunk rather than a status.
2. Which failures move on follow the SDK's `_should_retry`: connection errors and timeouts, 408,
   409, 429 and 5xx (an `x-should-retry` header overrides; a `Retry-After` above the SDK's
   maximum refuses). Any other status (400, 401, 404, ...) ends the call at once, as the SDK does,
   and does not count against the server. So does an answer that is malformed, truncated or
   reports an error before its first batch (the server did answer; the SDK would not retry it
   either); a connection lost or a first byte missed after the headers is retried, as nothing
   was sent.
3. A round tries every server that is not cooling down, in order, with no wait between servers.
   Between rounds the loop waits as the SDK would between its tries (`retry_delay`: a
   `Retry-After`/`retry-after-ms` of the last failure up to the SDK's maximum, else 0.5 s doubling
   to 8 s, less up to a quarter of jitter). At most `1 + UPSTREAM_MAX_RETRIES` rounds, so a list of
   one makes exactly the tries the SDK made. A wait that would end past the first-token deadline
   is not waited: the call ends with the last failure (relay design note 7 then names it).
4. A server that failed `UPSTREAM_FAILURE_THRESHOLD` attempts in a row is skipped for
   `UPSTREAM_COOLDOWN_S`, then tried again (one more failure skips it again); a success resets
   its count. When every server is cooling down they are all tried anyway, in order: a gateway
   with servers to try never refuses without trying.
5. `UPSTREAM_ATTEMPT_FIRST_BYTE_S` bounds each attempt up to its first batch (0 = off), so a
   server that accepts the request and then says nothing is left for the next one (as a
   `timeout` failure). The relay's first-token clock still bounds the whole call. Its default,
   30 s, sits above the time to first token of slow reasoning models (a deadline below it would
   fail every such answer over) and well below `FIRST_TOKEN_TIMEOUT_S`' 120. A non-stream call
   (the OpenAI route's `stream: false`) has no first byte before its whole answer: it is not
   bounded per attempt.
6. A server's `models` map names its own model (or Azure deployment) for the model a client asked
   for; a server whose map lacks it is not tried; an empty map serves every model as asked. No
   server serving the model ends the call as `not_found`.
7. Every attempt is counted in `ai_stream_upstream_attempts_total{upstream,result}` (`result`:
   `ok` or the failure's kind), every attempt after the first in `ai_stream_upstream_retries_total`;
   the server that answered is noted in the task's `Attempts` for the `stream.finished` line.
8. Readiness asks every server at once; the check passes when one of them answers, and `reports`
   holds each server's word for the readiness body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Final

import httpx2
import openai
from openai._constants import INITIAL_RETRY_DELAY, MAX_RETRY_AFTER_DELAY, MAX_RETRY_DELAY

from .chunks import ChunkParser
from .config import Settings
from .parsers import UpstreamServer
from .upstream import (
    ATTEMPTS,
    CompletionRequest,
    OpenAIUpstream,
    Upstream,
    UpstreamError,
    UpstreamStream,
)

SINGLE: Final = "default"  # the name of the single upstream when UPSTREAMS is unset
RETRIED_KINDS: Final = frozenset(("timeout", "connection", "server", "rate_limit"))


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a response asks to wait (`retry-after-ms`, then `retry-after` as seconds or a
    date), as the SDK's `_parse_retry_after_header` reads them; None when it does not say."""
    if headers is None:
        return None
    for header, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            delay = float(value)
        except ValueError:
            continue
        if delay == math.inf and value.strip().lower() not in ("inf", "+inf", "infinity"):
            return MAX_RETRY_AFTER_DELAY + 1
        return delay / divisor
    parsed = email.utils.parsedate_tz(headers.get("retry-after") or "")
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed) - time.time())
    except (OverflowError, ValueError, OSError):
        return None


def retry_delay(
    retries_taken: int,
    headers: Mapping[str, str] | None,
    rand: Callable[[], float] = random.random,
) -> float:
    """The SDK's `_calculate_retry_timeout` (design note 3)."""
    after = retry_after(headers)
    if after is not None and math.isfinite(after) and 0 < after <= MAX_RETRY_AFTER_DELAY:
        return after
    sleep = min(INITIAL_RETRY_DELAY * 2.0 ** min(retries_taken, 1000), MAX_RETRY_DELAY)
    return max(sleep * (1 - 0.25 * rand()), 0.0)


def should_retry(err: UpstreamError) -> bool:
    """The SDK's `_should_retry`, on an UpstreamError (design note 2)."""
    headers = _headers(err)
    if headers is not None:
        after = retry_after(headers)
        if after is not None and math.isfinite(after) and after > MAX_RETRY_AFTER_DELAY:
            return False
        said = headers.get("x-should-retry")
        if said in ("true", "false"):
            return said == "true"
    status = _status(err)
    if status is not None:
        return status in (408, 409, 429) or status >= 500
    return err.kind in RETRIED_KINDS


def _status(err: UpstreamError) -> int | None:
    cause = err.__cause__
    return cause.status_code if isinstance(cause, openai.APIStatusError) else None


def _headers(err: UpstreamError) -> Mapping[str, str] | None:
    cause = err.__cause__
    if isinstance(cause, openai.APIStatusError):
        headers: httpx2.Headers = cause.response.headers
        return headers
    return None


@dataclass(slots=True)
class _Server:
    config: UpstreamServer
    upstream: Upstream
    failures: int = 0  # in a row
    cooling_until: float = 0.0


class _Answer:
    """The stream of the attempt that answered: its first batch, then the rest (note 1). An
    iterator of its own (no async generator) that hands over the rest's awaitables as they are."""

    __slots__ = ("_first", "_over", "_rest", "parser")

    def __init__(
        self,
        parser: ChunkParser,
        first: tuple[str, int] | None,
        rest: AsyncIterator[tuple[str, int]],
    ) -> None:
        self.parser = parser
        self._first = first
        self._over = first is None  # nothing came: the answer is empty
        self._rest = rest

    def __aiter__(self) -> _Answer:
        return self

    def __anext__(self) -> Awaitable[tuple[str, int]]:
        """The first batch (already read), then the rest's own awaitable: no frame of this
        class between the relay and the stream for any later batch."""
        first = self._first
        if first is not None:
            self._first = None
            done: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
            done.set_result(first)
            return done
        if self._over:
            raise StopAsyncIteration
        return self._rest.__anext__()


class FailoverUpstream:
    """The `Upstream` the gateway uses: one or more servers, tried in order (module notes)."""

    def __init__(
        self,
        settings: Settings,
        servers: list[tuple[UpstreamServer, Upstream]],
        *,
        on_attempt: Callable[[str, str], None] | None = None,
        on_retry: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._servers = [_Server(config, upstream) for config, upstream in servers]
        self._rounds = 1 + settings.upstream_max_retries
        self._threshold = settings.upstream_failure_threshold
        self._cooldown_s = settings.upstream_cooldown_s
        self._first_byte_s = settings.upstream_attempt_first_byte_s
        self._deadline_s = settings.first_token_timeout_s
        self._on_attempt = on_attempt
        self._on_retry = on_retry
        self.clock = clock  # public: a test may stand in for it
        self.reports: dict[str, str] = {s.config.name: "not checked yet" for s in self._servers}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        base_url: str | None = None,
        on_attempt: Callable[[str, str], None] | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> FailoverUpstream:
        """`UPSTREAMS`' servers, else the single upstream (`base_url`: the demo's) alone."""
        if settings.upstreams:
            servers: list[tuple[UpstreamServer, Upstream]] = [
                (config, OpenAIUpstream(settings, server=config, max_retries=0))
                for config in settings.upstreams
            ]
        else:
            single = OpenAIUpstream(settings, base_url=base_url, max_retries=0)
            servers = [(UpstreamServer(name=SINGLE), single)]
        return cls(settings, servers, on_attempt=on_attempt, on_retry=on_retry)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.config.name for s in self._servers)

    def _candidates(self, model: str) -> list[tuple[_Server, str]]:
        serving = [(s, m) for s in self._servers if (m := s.config.serves(model)) is not None]
        now = self.clock()
        ready = [(s, m) for s, m in serving if s.cooling_until <= now]
        return ready or serving  # note 4: all cooling, all tried

    def _failed(self, server: _Server, err: UpstreamError) -> None:
        self._count(server, err.kind)
        server.failures += 1
        if server.failures >= self._threshold:
            server.cooling_until = self.clock() + self._cooldown_s

    def _count(self, server: _Server, result: str) -> None:
        if self._on_attempt is not None:
            self._on_attempt(server.config.name, result)

    @asynccontextmanager
    async def stream(self, request: CompletionRequest) -> AsyncIterator[UpstreamStream]:
        started = self.clock()
        attempts = ATTEMPTS.get()
        last: UpstreamError | None = None
        tries = 0
        for round_ in range(self._rounds):
            candidates = self._candidates(request.model)
            if not candidates:
                raise UpstreamError("not_found")
            if round_:
                assert last is not None
                wait = retry_delay(round_ - 1, _headers(last))
                if self._deadline_s and self.clock() - started + wait > self._deadline_s:
                    raise last  # note 3: a wait past the deadline is not waited
                await asyncio.sleep(wait)
            for server, model in candidates:
                if tries and self._on_retry is not None:
                    self._on_retry()
                tries += 1
                stack = AsyncExitStack()
                try:
                    answer = await self._attempt(stack, server, request, model)
                except UpstreamError as err:
                    await stack.aclose()
                    if attempts is not None:
                        attempts.failure = err
                    if not should_retry(err):
                        self._count(server, err.kind)
                        raise
                    self._failed(server, err)
                    last = err
                    continue
                except BaseException:
                    await stack.aclose()
                    raise
                server.failures = 0
                self._count(server, "ok")
                if attempts is not None:
                    attempts.failure = None
                    attempts.server = server.config.name
                async with stack:
                    yield answer
                return
        assert last is not None
        raise last

    async def _attempt(
        self, stack: AsyncExitStack, server: _Server, request: CompletionRequest, model: str
    ) -> _Answer:
        """Open one server's answer and read its first batch under the first-byte deadline."""
        asked = request if model == request.model else dataclasses.replace(request, model=model)
        deadline = self._first_byte_s if request.streamed else 0  # note 5: a whole answer's
        try:
            async with asyncio.timeout(deadline or None):
                stream = await stack.enter_async_context(server.upstream.stream(asked))
                attempts = ATTEMPTS.get()
                if attempts is not None and attempts.answered is not None:
                    attempts.answered()  # its 200: headers may go out (note 1)
                batches = aiter(stream)
                stack.push_async_callback(_close, batches)
                try:
                    first: tuple[str, int] | None = await anext(batches)
                except StopAsyncIteration:
                    first = None
        except TimeoutError as err:
            raise UpstreamError(
                "timeout", detail="no first byte within the attempt's deadline"
            ) from err
        return _Answer(stream.parser, first, batches)

    async def check(self) -> None:
        """Every server at once; raise the first server's failure unless one answers (note 8)."""

        async def one(server: _Server) -> UpstreamError | None:
            try:
                await server.upstream.check()
            except UpstreamError as err:
                return err
            return None

        found = await asyncio.gather(*(one(s) for s in self._servers))
        for server, err in zip(self._servers, found, strict=True):
            self.reports[server.config.name] = "ok" if err is None else err.message
        if all(err is not None for err in found):
            raise found[0] or UpstreamError("other")

    async def aclose(self) -> None:
        for server in self._servers:
            await server.upstream.aclose()


async def _close(batches: AsyncIterator[tuple[str, int]]) -> None:
    close = getattr(batches, "aclose", None)
    if close is not None:
        await close()
