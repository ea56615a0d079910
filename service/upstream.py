"""The model server, behind a small Protocol; the only module that imports the `openai` SDK.

`OpenAIUpstream` calls `chat.completions` through the SDK's streaming-response API, so the SDK keeps
what it is good at (auth, Azure deployment URLs, timeouts), `failover` owns retries, and
`chunks.ChunkParser` reads the body once. SDK and transport failures become `UpstreamError` with a
bounded `kind` and a message from a fixed table (`MESSAGE_BY_KIND`) that never carries the
upstream's own text (which can echo key fragments) or a URL; that text is kept, capped, as `detail`
for the log.

Design notes:
1. Retries happen only before the answer's first batch, so no text is ever sent twice. The
   gateway's own `FailoverUpstream` (`failover`) owns them, with each server's SDK retries off
   (`max_retries=0`); `max_retries` stays a parameter here for a caller that wants the SDK's.
2. When the SDK does retry (`max_retries` above 0, never under `failover`), its retries are
   counted from its `x-stainless-retry-count` request header in an httpx request hook: one hook
   per attempt, nothing per token.
3. The SDK runs on its aiohttp transport (`DefaultAioHttpClient`): aiohttp parses the chunked
   body in C and hands over everything buffered in one read, which cut the relay's CPU per token
   about fourfold against the default httpx transport (README, Performance). That transport maps
   every aiohttp connection error to `ConnectTimeout`, so `translate` classifies by the aiohttp
   error underneath instead.
4. Streams open through the SDK's generic `client.post("/chat/completions", cast_to=
   httpx.Response, stream=True)`, the route its README documents for any endpoint: the same auth,
   retries, timeouts and Azure deployment URLs as `chat.completions.create`, minus the per-field
   transform of the parameters, which cost about half of the service's CPU to open a stream
   (README, Performance). The body is built here from an already validated request, and the raw
   response comes back unread. Later streams of a server reuse the request it built (note 9).
5. A clock can run out between retries (a backoff outlasting the first-token timeout). So that the
   stream then ends naming the upstream's failure rather than a timeout, each try's result is noted
   in the calling task's `Attempts` (a context variable the relay sets) by the HTTP client's `send`,
   which sees every try: its status, or its transport error.
6. A request from the OpenAI-compatible routes carries the client's own `body`: every field the
   gateway does not read goes to the upstream as the client sent it; the gateway sets `model`,
   `messages`, the token cap (when the client set none) and, for a stream, `stream_options.
   include_usage` (always asked, for accounting). Its chunks are read by a `ChunkRelay`
   (`chunks` design note 6); a non-stream answer is read whole, as one chunk.
7. Once the SDK has handed back a streamed response (its request, auth, URL and retries all
   done), its body is read straight from aiohttp's `StreamReader.readany()`, found under the
   httpx response the SDK's transport returns: that skips four wrappers (httpx's `aiter_bytes`,
   `aiter_raw`, its timing stream, the transport's `iter_chunked` generator) and their exception
   mapping per network read, about 6 % of the service's profile samples at model pace (README,
   Performance). aiohttp's errors are translated as the SDK's would be (`translate` classifies
   by the aiohttp error either way). A body with a `Content-Encoding`, or a transport whose
   response is not found, is read through httpx as before. The batches come from an iterator
   class, not an async generator, so a batch costs one coroutine call.
8. aiohttp's read timeout (`sock_read`, the httpx `read` timeout above) re-arms a timer on every
   network read. Once a streamed answer's headers are in, it is dropped when the relay's clocks
   bound every silence (`FIRST_TOKEN_TIMEOUT_S` and `IDLE_TIMEOUT_S` both on): a silent upstream
   still ends as `first_token_timeout` or `idle_timeout`, on time. With either clock off the
   timeout stays, as the backstop it was.
9. After the SDK has opened one stream of a server, later streams reuse the request it built:
   its URL, headers (auth, `x-stainless-*`) and timeouts, taken from the SDK's own
   `_build_request` once, with each stream's body encoded as the SDK encodes it
   (`openapi_dumps`), sent through the same HTTP client (`send`, its hooks and design note 5),
   and a non-2xx answer raised as the SDK's own status error. The SDK's request path (options,
   copies, header merging, URL parsing twice) was 43 % of the samples of a stream's opening
   (README, Performance). Only where nothing in that request can change from one stream to the
   next: an `openai.AsyncOpenAI` client (Azure keeps the SDK's path: its deployment URL follows
   each request's model), no SDK retries (`max_retries=0`, as under `failover`), a plain API
   key (no key provider, workload identity, provider runtime or custom auth), and the SDK
   choosing no idempotency header; anything else takes the SDK's `post` every time.
10. aiohttp's reader asks its protocol to resume reading after every read that leaves its buffer
   under the low-water mark, paused or not, and the protocol's `resume_reading` then feeds its
   parser an empty read and resumes the transport: a second `data_received` per network read at
   model pace. A connection whose body is read straight (note 7) gets a protocol class that does
   that work only when reading was paused (`_LeanHandler`, nothing else changed); a reader that
   falls behind still pauses and resumes the upstream as before.
11. Once a server's request is reused (note 9), a streamed request goes to the SDK transport's
   own aiohttp session as that transport would send it (the same URL, headers, timeouts mapped as
   it maps them, `allow_redirects`/`auto_decompress`/`compress` off), skipping httpx's client,
   its `Request` and `Response` objects and the transport's copy of the headers: about 15 % of
   the CPU of opening a stream (README, Performance). The try is noted as `_NotingClient` notes
   it (note 5). Anything but a plain 2xx body becomes the SDK's response as the transport would
   build it: a non-2xx the SDK's status error, an encoded body read through httpx (note 7); a
   redirect (httpx follows them, aiohttp here does not) sends the request again through httpx,
   which follows it, and so does every later stream of that server. Only where the transport is
   the SDK's aiohttp one with its session open and no proxy, and the client has no response
   hooks (the request hook counts SDK retries, which a reused request never makes); otherwise
   note 9's path through httpx.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import httpx2
import openai
import yarl
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict
from openai._models import FinalRequestOptions
from openai._utils._json import openapi_dumps
from openai._vendor.httpx_aiohttp.transport import AiohttpResponseStream, AiohttpTransport

from .chunks import (
    ChunkParser,
    ChunkRelay,
    MalformedChunk,
    UpstreamReportedError,
    capped,
    read_whole,
)
from .config import Settings
from .parsers import UpstreamServer


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float | None = None
    body: Mapping[str, Any] | None = None  # an OpenAI-compatible client's own (design note 6)
    forward_usage: bool = False  # that client asked for the usage chunk

    @property
    def streamed(self) -> bool:
        """The upstream is asked for a stream (always, but for a client's non-stream body)."""
        return self.body is None or self.body.get("stream") is True


# What a client is told for each kind of failure: the gateway's own words, never the upstream's.
MESSAGE_BY_KIND: Final[dict[str, str]] = {
    "auth": "The model server refused the gateway's credentials.",
    "rate_limit": "The model server is rate limiting this service.",
    "not_found": "The model server does not know this model.",
    "server": "The model server failed.",
    "rejected": "The model server rejected the request.",
    "timeout": "The model server timed out.",
    "connection": "The connection to the model server failed.",
    "malformed": "The model server sent a malformed answer.",
    "stream_error": "The model server reported an error in its answer.",
    "truncated": "The model server ended the answer early.",
    "other": "The model server call failed.",
}


def client_message(kind: str | None) -> str:
    """The message a client sees for an upstream failure of `kind` (a bounded vocabulary)."""
    return MESSAGE_BY_KIND.get(kind or "other", MESSAGE_BY_KIND["other"])


class UpstreamError(Exception):
    """A failure of the model server. `kind` is a bounded label; `message` is safe to show;
    `detail` is the upstream's own text (capped), for a structured log field only."""

    def __init__(self, kind: str, message: str | None = None, detail: str | None = None) -> None:
        message = message or client_message(kind)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.detail = detail


@dataclass(slots=True)
class Attempts:
    """The tries of one upstream call so far (design note 5)."""

    failure: UpstreamError | None = None  # what the latest finished try met, if it failed
    server: str | None = None  # the configured name of the server that answered (`failover`)
    # called when a try's server has answered 200 (its headers), before its first batch: the
    # OpenAI-compatible routes send their own headers then (relay design note 13)
    answered: Callable[[], None] | None = None


ATTEMPTS: ContextVar[Attempts | None] = ContextVar("upstream_attempts", default=None)


class UpstreamStream(Protocol):
    """One answer being streamed. Iterating yields (text, deltas) batches."""

    parser: ChunkParser

    def __aiter__(self) -> AsyncIterator[tuple[str, int]]: ...


class Upstream(Protocol):
    def stream(self, request: CompletionRequest) -> AbstractAsyncContextManager[UpstreamStream]:
        """Open the answer; the request is cancelled and closed when the context exits."""
        ...

    async def check(self) -> None:
        """Raise UpstreamError unless the model server answers (readiness)."""
        ...

    async def aclose(self) -> None: ...


def _status_kind(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limit"
    if status == 404:
        return "not_found"
    if status >= 500:
        return "server"
    return "rejected"


def _status_error(err: openai.APIStatusError) -> UpstreamError:
    status = err.status_code
    return UpstreamError(_status_kind(status), detail=capped(f"{status} {err.message}"))


def _transport_cause(err: BaseException) -> aiohttp.ClientError | None:
    """The aiohttp error under an SDK/httpx one (design note 3)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, aiohttp.ClientError):
            return cause
        cause = cause.__cause__
    return None


def translate(err: BaseException) -> UpstreamError:
    """Map any SDK, transport or parse failure to an UpstreamError (never with upstream text)."""
    if isinstance(err, UpstreamError):
        return err
    if isinstance(err, openai.APIStatusError):
        return _status_error(err)
    cause = _transport_cause(err)
    if cause is not None:
        if isinstance(cause, aiohttp.ServerTimeoutError):
            return UpstreamError("timeout")
        return UpstreamError("connection")
    if isinstance(err, openai.APITimeoutError | httpx2.TimeoutException):
        return UpstreamError("timeout")
    if isinstance(err, openai.APIConnectionError | httpx2.TransportError):
        return UpstreamError("connection")
    if isinstance(err, MalformedChunk):
        return UpstreamError("malformed", detail=capped(str(err)))
    if isinstance(err, UpstreamReportedError):
        return UpstreamError("stream_error", detail=err.detail)
    return UpstreamError("other")


def _raw_body(response: httpx2.Response) -> aiohttp.ClientResponse | None:
    """The aiohttp response under the SDK's, when its body can be read as it came (design note 7):
    found through the wrappers the SDK's transport puts around it, and only for a body without a
    `Content-Encoding` (httpx decodes one; the transport asks aiohttp not to)."""
    if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    stream: object = response.stream
    for _ in range(4):  # httpx's BoundAsyncStream, then the SDK's AiohttpResponseStream
        raw = getattr(stream, "_aiohttp_response", None)
        if isinstance(raw, aiohttp.ClientResponse):
            return raw
        stream = getattr(stream, "_stream", None)
        if stream is None:
            return None
    return None


class _LeanHandler(ResponseHandler):
    """aiohttp's client protocol, minus the work a read does when reading was never paused
    (design note 10)."""

    __slots__ = ()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)


class _SdkStream:
    """Iterates the raw body of one SDK streaming response through a ChunkParser: straight from
    aiohttp's reader when it is found (design note 7), else through httpx's `aiter_bytes`. An
    iterator of its own (no async generator), so a batch costs one coroutine call."""

    __slots__ = ("_bytes", "_read", "parser")

    def __init__(
        self, body: httpx2.Response | aiohttp.ClientResponse, parser: ChunkParser, *, clocked: bool
    ) -> None:
        """`body`: the SDK's response, or aiohttp's when it was sent straight (design note 11);
        `clocked`: the relay's clocks bound every silence of this answer, so aiohttp's read
        timeout is dropped (design note 8)."""
        self.parser = parser
        raw = body if isinstance(body, aiohttp.ClientResponse) else _raw_body(body)
        self._bytes: AsyncIterator[bytes] | None = None
        if raw is not None:
            self._read: Callable[[], Awaitable[bytes]] = raw.content.readany
            connection = raw.connection
            protocol = connection.protocol if connection is not None else None
            if protocol is not None:
                if type(protocol) is ResponseHandler:  # design note 10
                    protocol.__class__ = _LeanHandler
                if clocked:
                    protocol.read_timeout = None
        else:
            assert isinstance(body, httpx2.Response)
            self._bytes = body.aiter_bytes()
            self._read = self._next_bytes

    async def _next_bytes(self) -> bytes:
        """The next piece of a decoded body; b"" at its end (as aiohttp's `readany`)."""
        assert self._bytes is not None
        async for data in self._bytes:
            if data:
                return data
        return b""

    def __aiter__(self) -> _SdkStream:
        return self

    async def __anext__(self) -> tuple[str, int]:
        parser = self.parser
        if parser.failure is not None:  # after the text that came before it
            raise translate(parser.failure) from parser.failure
        while True:
            try:
                data = await self._read()
            except (aiohttp.ClientError, httpx2.HTTPError) as err:
                raise translate(err) from err
            if not data:
                if not parser.finished:
                    raise UpstreamError("truncated")
                raise StopAsyncIteration
            try:
                text, count = parser.feed(data)
            except (MalformedChunk, UpstreamReportedError) as err:
                raise translate(err) from err
            if count or parser.chunks:  # chunks: a relay's (design note 6)
                return text, count
            if parser.failure is not None:
                raise translate(parser.failure) from parser.failure

    async def aclose(self) -> None:
        """Close the decoded body's iterator, if one was used."""
        if self._bytes is not None:
            close = getattr(self._bytes, "aclose", None)
            if close is not None:
                await close()


class _WholeAnswer:
    """A non-stream answer, read whole and yielded once (design note 6)."""

    __slots__ = ("_body", "parser")

    def __init__(self, body: httpx2.Response) -> None:
        self._body = body
        self.parser = ChunkParser()

    async def __aiter__(self) -> AsyncIterator[tuple[str, int]]:
        try:
            text, self.parser = read_whole(await self._body.aread())
        except (httpx2.HTTPError, MalformedChunk, UpstreamReportedError) as err:
            raise translate(err) from err
        usage = self.parser.usage or {}
        tokens = usage.get("completion_tokens")
        yield text, tokens if isinstance(tokens, int) and tokens > 0 else len(text) // 4 + 1


def _body(request: CompletionRequest) -> dict[str, Any]:
    """The upstream request's JSON body (design note 6 for a client's own)."""
    if request.body is None:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "max_completion_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body
    body = {**request.body, "model": request.model, "messages": request.messages}
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = request.max_tokens
    if request.streamed:
        options = body.get("stream_options")
        body["stream_options"] = {**(options or {}), "include_usage": True}
    return body


def _note_try(met: int | Exception) -> None:
    """Note what a try met, its status or its transport error, in the calling task's
    `Attempts` (design note 5)."""
    attempts = ATTEMPTS.get()
    if attempts is None:
        return
    if isinstance(met, Exception):
        attempts.failure = translate(met)
    else:
        attempts.failure = UpstreamError(_status_kind(met), detail=str(met)) if met >= 400 else None


class _NotingClient(openai.DefaultAioHttpClient):
    """The SDK's aiohttp-backed HTTP client, noting what each try met (design note 5)."""

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        try:
            response = await super().send(request, **kwargs)
        except Exception as err:
            _note_try(err)
            raise
        _note_try(response.status_code)
        return response


@dataclass(frozen=True, slots=True)
class _Prepared:
    """The SDK's request for a stream, minus its body (design note 9), and the same request as
    aiohttp takes it when it can be sent straight (design note 11)."""

    url: httpx2.URL
    headers: tuple[tuple[str, str], ...]
    extensions: dict[str, Any]
    session: aiohttp.ClientSession | None = None  # the SDK transport's, for design note 11
    aio_url: yarl.URL | None = None
    aio_headers: CIMultiDict[str] | None = None
    aio_timeout: aiohttp.ClientTimeout | None = None


def _reusable(client: openai.AsyncOpenAI) -> bool:
    """Nothing in the SDK's request for a stream can change from one stream to the next
    (design note 9)."""
    return (
        type(client) is openai.AsyncOpenAI
        and isinstance(client.api_key, str)  # this module passes keys as strings only
        and client.max_retries == 0
        and client.custom_auth is None
        and getattr(client, "_api_key_provider", None) is None
        and getattr(client, "_workload_identity_auth", None) is None
        and getattr(client, "_provider_runtime", None) is None
        and getattr(client, "_idempotency_header", None) is None
    )


async def _prepared(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> _Prepared:
    """What the SDK's own request path builds for a stream (design note 9), and how `http`'s
    transport would hand it to aiohttp (design note 11)."""
    options = FinalRequestOptions.construct(method="post", url="/chat/completions", json_data={})
    options = await client._prepare_options(options)
    built = client._build_request(options)
    headers = tuple(
        (name, value) for name, value in built.headers.multi_items() if name != "content-length"
    )
    extensions = dict(built.extensions)
    transport = http._transport_for_url(built.url)
    session = getattr(transport, "client", None)
    if (
        type(transport) is not AiohttpTransport
        or not isinstance(session, aiohttp.ClientSession)
        or transport.proxy is not None
        or extensions.get("sni_hostname") is not None
        or http.event_hooks["response"]
    ):
        return _Prepared(built.url, headers, extensions)
    timeout = extensions.get("timeout", {})
    return _Prepared(
        built.url,
        headers,
        extensions,
        session=session,
        aio_url=yarl.URL(str(built.url), encoded=True),
        aio_headers=CIMultiDict(headers),
        aio_timeout=aiohttp.ClientTimeout(  # as the transport maps httpx's timeouts
            sock_connect=timeout.get("connect"),
            sock_read=timeout.get("read"),
            connect=timeout.get("pool"),
        ),
    )


class OpenAIUpstream:
    """OpenAI, Azure OpenAI or any OpenAI-compatible server, through the official SDK."""

    def __init__(
        self,
        settings: Settings,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        server: UpstreamServer | None = None,
        max_retries: int | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        """`server`: one of `UPSTREAMS` (else the single-upstream settings); `max_retries`: the
        SDK's own (0 under `failover`, whose loop owns retries); `on_retry` is called once per
        retried attempt (design note 2)."""
        self._on_retry = on_retry
        # design note 8: the relay's first-token and idle clocks bound a streamed answer's silence
        self._clocked = settings.first_token_timeout_s > 0 and settings.idle_timeout_s > 0
        retries = settings.upstream_max_retries if max_retries is None else max_retries
        read_timeout = max(settings.first_token_timeout_s, settings.idle_timeout_s)
        self._http = _NotingClient(
            limits=httpx2.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=min(settings.upstream_max_connections, 1000),
            ),
            # The relay's own clocks end streams; these are backstops (0 = off there too).
            timeout=httpx2.Timeout(
                read_timeout + 30 if read_timeout else None,
                connect=settings.upstream_connect_timeout_s,
            ),
            event_hooks={"request": [self._count_retry]},
        )
        self.client: openai.AsyncOpenAI
        if server is not None and server.azure_endpoint is not None:
            self.client = openai.AsyncAzureOpenAI(
                azure_endpoint=server.azure_endpoint,
                api_key=server.api_key or "unused",
                api_version=server.api_version,
                max_retries=retries,
                http_client=self._http,
            )
        elif server is not None:
            self.client = openai.AsyncOpenAI(
                api_key=server.api_key or "unused",
                base_url=server.base_url,
                max_retries=retries,
                http_client=self._http,
            )
        elif settings.uses_azure and base_url is None:
            self.client = openai.AsyncAzureOpenAI(
                azure_endpoint=settings.azure_endpoint or "",
                api_key=settings.azure_api_key or settings.openai_api_key,
                api_version=settings.openai_api_version,
                max_retries=retries,
                http_client=self._http,
            )
        else:
            self.client = openai.AsyncOpenAI(
                api_key=api_key or settings.openai_api_key or "unused",
                base_url=base_url or settings.openai_base_url,
                max_retries=retries,
                http_client=self._http,
            )
        self._reusable = _reusable(self.client)
        self._prepared: _Prepared | None = None  # design note 9, once a stream has opened

    async def _count_retry(self, request: httpx2.Request) -> None:
        if self._on_retry and request.headers.get("x-stainless-retry-count", "0") != "0":
            self._on_retry()

    @asynccontextmanager
    async def stream(self, request: CompletionRequest) -> AsyncIterator[UpstreamStream]:
        body = _body(request)
        response: httpx2.Response | aiohttp.ClientResponse
        try:
            prepared = self._prepared
            if prepared is not None and prepared.session is not None and request.streamed:
                response = await self._send_straight(prepared, body)
            elif prepared is not None:
                response = await self._send(prepared, body)
            else:
                # design note 4: the generic post, not chat.completions.create
                response = await self.client.post(
                    "/chat/completions",
                    cast_to=httpx2.Response,
                    body=body,
                    stream=True,
                    stream_cls=None,
                )
        except (openai.OpenAIError, httpx2.HTTPError, aiohttp.ClientError) as err:
            raise translate(err) from err
        try:
            if prepared is None and self._reusable:
                try:
                    self._prepared = await _prepared(self.client, self._http)
                except Exception:  # an SDK whose internals moved: its own path every time
                    self._reusable = False
            if not request.streamed:
                assert isinstance(response, httpx2.Response)
                yield _WholeAnswer(response)
            elif request.body is not None:
                relay = ChunkRelay(forward_usage=request.forward_usage)
                yield _SdkStream(response, relay, clocked=self._clocked)
            else:
                yield _SdkStream(response, ChunkParser(), clocked=self._clocked)
        finally:
            if isinstance(response, aiohttp.ClientResponse):
                await response.__aexit__(None, None, None)  # as the SDK transport's aclose
            else:
                await response.aclose()

    async def _send_straight(
        self, prepared: _Prepared, body: dict[str, Any]
    ) -> httpx2.Response | aiohttp.ClientResponse:
        """Send a stream's request to aiohttp as the SDK's transport would (design note 11),
        noting the try as `_NotingClient` does (design note 5)."""
        assert prepared.session is not None
        assert prepared.aio_url is not None
        try:
            response = await prepared.session.request(
                "POST",
                prepared.aio_url,
                headers=prepared.aio_headers,
                data=openapi_dumps(body),
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=prepared.aio_timeout,
            )
        except Exception as err:
            _note_try(err)
            raise
        status = response.status
        _note_try(status)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if 200 <= status < 300 and encoding == "identity":
            return response
        # A redirect (httpx follows it), an error (the SDK's own status error) or an encoded
        # body (httpx decodes it): the SDK's response, as its transport would have built it.
        answer = httpx2.Response(
            status_code=status,
            headers=response.raw_headers,
            stream=AiohttpResponseStream(response),
            request=httpx2.Request("POST", prepared.url, headers=prepared.headers),
        )
        if 300 <= status < 400 and "location" in answer.headers:
            await answer.aclose()  # not followed here: sent again through httpx, from now on
            self._prepared = prepared = dataclasses.replace(prepared, session=None)
            return await self._send(prepared, body)
        return await self._raise_for_status(answer)

    async def _send(self, prepared: _Prepared, body: dict[str, Any]) -> httpx2.Response:
        """Send a stream's request as the SDK built it, with this body (design note 9)."""
        request = httpx2.Request(
            "POST",
            prepared.url,
            headers=prepared.headers,
            content=openapi_dumps(body),
            extensions=dict(prepared.extensions),
        )
        return await self._raise_for_status(await self._http.send(request, stream=True))

    async def _raise_for_status(self, response: httpx2.Response) -> httpx2.Response:
        """`response`, or the SDK's own status error for it, as its `raise_for_status` path."""
        if not response.is_success:
            await response.aread()
            raise self.client._make_status_error_from_response(response)
        return response

    async def check(self) -> None:
        try:
            await self.client.with_options(max_retries=0, timeout=5.0).models.list()
        except (openai.OpenAIError, httpx2.HTTPError) as err:
            raise translate(err) from err

    async def aclose(self) -> None:
        await self.client.close()
        await self._http.aclose()
