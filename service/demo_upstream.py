"""A bundled OpenAI-compatible model server that writes synthetic articles at a steady pace.

It speaks `POST /v1/chat/completions` (streamed, with the usage chunk when asked, and not) and
`GET /v1/models`, so the service, the tests and the benchmark all reach it through the real SDK.
With no API key and no base URL configured, the service starts it in-process on a loopback port.
Alone: `python -m service.demo_upstream --port 8099 [--tokens-per-s 40] [--length 350]`.

The text is made from the prompt's first words and a few sentence patterns: readable, not
meaningful. Image placeholders appear as the service's system prompt asks for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

_SENTENCES = (
    "{T} rewards a careful look at the basics before anything clever.",
    "Most teams meet {t} long before they understand why it matters.",
    "The first thing to notice is how small decisions add up over time.",
    "A good example makes the idea concrete, so here is one worth keeping in mind.",
    "It helps to write down what you expect before you measure anything.",
    "When something surprises you, that is usually where the real lesson is.",
    "Nobody gets {t} right the first time, and that is perfectly fine.",
    "Keep the moving parts few, and give each one a single clear job.",
    "The trade-offs are real, but they are easier to live with once named.",
    "Experienced people return to the same few principles again and again.",
    "Try it on a small scale first, then grow what works.",
    "Clear names and short feedback loops do more than any tool.",
)
_HEADINGS = ("Why it matters", "Getting started", "Common pitfalls", "In practice", "Next steps")


def _topic(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The last user message's first words, and how many images it carries."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        images = 0
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if p.get("type") == "text"]
            images = sum(1 for p in content if p.get("type") == "image_url")
            content = " ".join(texts)
        words = str(content or "").replace("\n", " ").split()
        leads = {"write", "a", "an", "short", "article", "about", "on", "me", "tell", "explain"}
        while words and words[0].lower() in leads:
            words = words[1:]
        return " ".join(words[:6]).rstrip(".?!") or "this subject", images
    return "this subject", 0


def article_tokens(messages: list[dict[str, Any]], length: int) -> Iterator[str]:
    """An endless article about the prompt's topic, one token-sized piece at a time."""
    topic, images = _topic(messages)
    rng = random.Random(topic)
    yield from ("#", " " + topic[:1].upper() + topic[1:], "\n\n")
    image = 1
    for heading in itertools.cycle(_HEADINGS):
        yield from ("##", " " + heading, "\n\n")
        for _ in range(3):
            sentence = rng.choice(_SENTENCES).format(T=topic[:1].upper() + topic[1:], t=topic)
            words = sentence.split(" ")
            yield words[0]
            for word in words[1:]:
                yield " " + word
            yield " "
        yield "\n\n"
        if image <= images:
            yield f"[[image:{image}]]\n\n"
            image += 1
        elif image == images + 1:
            yield f"[[image: a picture of {topic}]]\n\n"
            image += 1


def _chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> bytes:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


class DemoUpstream:
    def __init__(self, *, tokens_per_s: float = 40.0, length: int = 350) -> None:
        self.tokens_per_s = tokens_per_s
        self.length = length

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": "demo-writer-1", "object": "model", "created": 0, "owned_by": "demo"}]
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        messages = body.get("messages") or []
        model = str(body.get("model") or "demo-writer-1")
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or self.length
        count = min(int(cap), self.length)
        finish = "length" if int(cap) < self.length else "stop"
        pieces = list(itertools.islice(article_tokens(messages, self.length), count))
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if not body.get("stream"):
            await asyncio.sleep(len(pieces) / self.tokens_per_s if self.tokens_per_s else 0)
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                },
                dumps=lambda v: orjson.dumps(v).decode(),
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        with contextlib.suppress(ConnectionResetError):  # the reader went away: nothing to do
            await self._stream(request, resp, pieces, (cid, model, created), finish, body, usage)
        return resp

    async def _stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        pieces: list[str],
        ident: tuple[str, str, int],
        finish: str,
        body: dict[str, Any],
        usage: dict[str, int],
    ) -> None:
        cid, model, created = ident
        await resp.prepare(request)
        await resp.write(_chunk(cid, model, created, {"role": "assistant", "content": ""}, None))
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s else 0.0
        loop = asyncio.get_running_loop()
        due = loop.time()
        for piece in pieces:
            if interval:
                due += interval
                await asyncio.sleep(max(0.0, due - loop.time()))
            await resp.write(_chunk(cid, model, created, {"content": piece}, None))
        await resp.write(_chunk(cid, model, created, {}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await resp.write(b"data: " + orjson.dumps(tail) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")


async def start(host: str, port: int, demo: DemoUpstream) -> tuple[web.AppRunner, str]:
    """Serve the demo upstream on host:port (0 = any free port); returns the runner and base URL."""
    runner = web.AppRunner(demo.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = runner.addresses
    bound = sockets[0][1] if sockets else port
    return runner, f"http://{host}:{bound}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--tokens-per-s", type=float, default=40.0, help="0 = as fast as possible")
    parser.add_argument("--length", type=int, default=350, help="tokens in a whole article")
    args = parser.parse_args()
    demo = DemoUpstream(tokens_per_s=args.tokens_per_s, length=args.length)
    web.run_app(demo.app(), host=args.host, port=args.port, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
