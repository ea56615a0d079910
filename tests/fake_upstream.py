"""A scripted OpenAI-compatible server on a real loopback socket, reached through the real SDK.

A test queues one script per expected request. A script is a list of steps:

    Text("Hello")            a chunk whose delta carries the text
    Gate(event)              wait for an asyncio.Event before going on (headers may not be out)
    Status(500, headers)     answer with this status and an error body, nothing streamed
    Raw(b"...")              write these bytes as they are
    Drop()                   close the TCP connection abruptly
    Finish("stop")           a chunk with a finish reason
    Usage(prompt, completion)
    Done()                   `data: [DONE]`
    Repeat("x", 0.002)       the text every 2 ms until the connection ends
    Sleep(0.002)             pace the answer
    Echo()                   one chunk per message received: "role: content\n" (the context)
    Chunk({...})             a chunk with these fields over the usual ones (tool-call deltas,
                             refusal, logprobs, system_fingerprint: any chunk a server sends)
    Whole({...})             answer a non-stream request with this JSON body, as it is

A request with no `"stream": true` (a non-stream call) is answered with one JSON body: Whole's,
else one built from the script's Text, Finish and Usage steps.

Headers go out with the first step that writes, so a Gate first keeps the upstream silent before
it has even answered. Each request is recorded with its JSON body and an Event set when the
handler ends for any reason, the service closing the connection included, and the gateway's end
of the TCP connection it came on (`peer`: the same for requests on one reused connection). Chunks
name the model the request asked for, as a real server's do.

With no script queued, a request whose last message is a text in `by_prompt` gets that script
(a load test's clients choose their stream's shape by their prompt), else `default`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Gate:
    event: asyncio.Event


@dataclass(frozen=True)
class Status:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Raw:
    data: bytes


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Finish:
    reason: str = "stop"


@dataclass(frozen=True)
class Usage:
    prompt: int
    completion: int


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Sleep:
    """Pace the answer like a model does (not a synchronisation: nothing waits on it)."""

    seconds: float


@dataclass(frozen=True)
class Repeat:
    """Send `text` every `interval_s` until the connection ends: an upstream still streaming."""

    text: str
    interval_s: float = 0.002


@dataclass(frozen=True)
class Echo:
    """Answer with the messages the request carried, one delta each: `role: content\n`."""


@dataclass(frozen=True)
class Chunk:
    """A chunk whose fields are these over the usual ones (`id`, `object`, `created`, `model`)."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class Whole:
    """A non-stream answer's JSON body, as it is."""

    body: dict[str, Any]


Step = (
    Text
    | Gate
    | Status
    | Raw
    | Drop
    | Finish
    | Usage
    | Done
    | Repeat
    | Sleep
    | Echo
    | Chunk
    | Whole
)


def window_script(window: str) -> list[Step]:
    """An answer that holds the stream in one of the disconnect tests' windows: no answer yet
    (`before-answer`), a token then silence (`while-silent`), or tokens without end
    (`while-streaming`); each gate is one nobody opens."""
    scripts: dict[str, list[Step]] = {
        "before-answer": [Gate(asyncio.Event())],
        "while-silent": [Text("a"), Gate(asyncio.Event())],
        "while-streaming": [Repeat("tick")],
    }
    return scripts[window]


def echoed(messages: list[dict[str, Any]]) -> str:
    """The text an Echo step answers for these messages."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def answer(*texts: str, prompt: int = 7, completion: int | None = None) -> list[Step]:
    """A whole, well-formed answer."""
    steps: list[Step] = [Text(t) for t in texts]
    return [
        *steps,
        Finish(),
        Usage(prompt, len(texts) if completion is None else completion),
        Done(),
    ]


@dataclass
class Seen:
    body: dict[str, Any]
    headers: dict[str, str]
    peer: tuple[str, int] | None = None  # the gateway's end of the TCP connection it came on
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


def chunk(
    delta: dict[str, Any], finish: str | None = None, usage: Any = None, model: str = "test-model"
) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


class FakeUpstream:
    def __init__(self) -> None:
        self.scripts: deque[Sequence[Step]] = deque()
        self.default: list[Step] = answer("Hello", " world")
        self.by_prompt: dict[str, Sequence[Step]] = {}  # by the last message's text
        self.seen: list[Seen] = []
        self.record = True  # False: keep no per-request record, only the count of open ones
        self.open_requests = 0
        self.arrived = asyncio.Event()
        self.url = ""
        self.answered_model: str | None = None  # the model chunks name (None: the one asked for)
        self._runner: web.AppRunner | None = None

    @property
    def connections(self) -> int:
        """Open connections to this server (idle keep-alive ones included)."""
        assert self._runner is not None
        assert self._runner.server is not None
        return len(self._runner.server.connections)

    def queue(self, *scripts: Sequence[Step]) -> None:
        self.scripts.extend(scripts)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)

    def prelude(self) -> bytes:
        """What a stream writes before its script's first chunk."""
        return b""

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "test-model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        seen = Seen(body=await request.json(), headers=dict(request.headers), peer=peer)
        if self.record:
            self.seen.append(seen)
        self.open_requests += 1
        self.arrived.set()
        script = self.scripts.popleft() if self.scripts else self._unqueued(seen.body)
        model = self.answered_model or str(seen.body.get("model", "test-model"))  # named back
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            for step in script:
                if isinstance(step, Status):
                    body = {"error": {"message": "secret sk-live-ABC123 leaked?", "type": "x"}}
                    return web.json_response(body, status=step.status, headers=step.headers)
                if isinstance(step, Gate):
                    await step.event.wait()
                    continue
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    continue
                if isinstance(step, Drop):
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if seen.body.get("stream") is not True:
                    return web.json_response(self._whole(script, model))
                if not resp.prepared:
                    await resp.prepare(request)
                    if prelude := self.prelude():
                        await resp.write(prelude)
                if isinstance(step, Echo):
                    for message in seen.body["messages"]:
                        await resp.write(chunk({"content": echoed([message])}, model=model))
                    continue
                if isinstance(step, Repeat):
                    while True:
                        await resp.write(chunk({"content": step.text}, model=model))
                        await asyncio.sleep(step.interval_s)
                await resp.write(self._encode(step, model))
            return resp
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            self.open_requests -= 1
            seen.ended.set()

    def _unqueued(self, body: dict[str, Any]) -> Sequence[Step]:
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content")
        if isinstance(content, str) and content in self.by_prompt:
            return self.by_prompt[content]
        return self.default

    @staticmethod
    def _whole(script: Sequence[Step], model: str) -> dict[str, Any]:
        """A non-stream answer: Whole's body, or one built from the script's steps."""
        for step in script:
            if isinstance(step, Whole):
                return step.body
        text = "".join(s.text for s in script if isinstance(s, Text))
        finish = next((s.reason for s in script if isinstance(s, Finish)), None)
        usage = next((s for s in script if isinstance(s, Usage)), None)
        body: dict[str, Any] = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
        }
        if usage is not None:
            body["usage"] = {
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.prompt + usage.completion,
            }
        return body

    @staticmethod
    def _encode(step: Step, model: str) -> bytes:
        if isinstance(step, Chunk):
            base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0}
            return b"data: " + orjson.dumps({**base, "model": model, **step.fields}) + b"\n\n"
        if isinstance(step, Text):
            return chunk({"content": step.text}, model=model)
        if isinstance(step, Finish):
            return chunk({}, finish=step.reason, model=model)
        if isinstance(step, Usage):
            total = step.prompt + step.completion
            usage = {
                "prompt_tokens": step.prompt,
                "completion_tokens": step.completion,
                "total_tokens": total,
            }
            return chunk({}, usage=usage, model=model)
        if isinstance(step, Done):
            return b"data: [DONE]\n\n"
        assert isinstance(step, Raw), step
        return step.data


@contextlib.asynccontextmanager
async def running(fake: FakeUpstream | None = None) -> Any:
    """A fake upstream serving for the block: `fake` (a subclass's, say), or a new one."""
    fake = fake if fake is not None else FakeUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
