"""The client package (`client/`, `@ai-stream-gateway/client`): its React hooks against the live
service, its types under `tsc --strict`, its installation into an app, and the admin page serving
its module.

One real API process relays a fake upstream (through the real `openai` SDK) that answers by a tag
in the last message: `[story]` a paced story that ends `stop`, `[fast]` 100 deltas 5 ms apart,
`[length]` a short answer cut at `length`, `[endless]` text until the connection ends. The hooks
run in Node's test runner with React, react-dom, jsdom and Testing Library (`tests/clients/`,
installed by `npm ci` through the `node` fixture; the package itself is linked there, so the tests
import it by its name, through its `exports`), reaching the API directly, through
`tests/cutting_proxy.py` (each stream cut twice, inside a frame too) and through a proxy that
answers event-stream requests with something else (`/html`: a page of its own, the stream never
opened; `/typed`: the real stream, relabelled `text/plain`, its `X-Stream-ID` kept). Node's exit
code and its TAP summary decide; the TAP output is the failure message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from service.admin import STATIC
from tests.conftest import tool_required
from tests.cutting_proxy import Cut, CuttingProxy, cutting_proxy
from tests.fake_upstream import (
    Done,
    FakeUpstream,
    Finish,
    Repeat,
    Sleep,
    Step,
    Text,
    Usage,
    running,
)
from tests.process import ROOT, ServiceProcess, service
from tests.test_admin_browser import Background
from tests.test_admin_js import tap_passed
from tests.test_sse_clients import CLIENTS_DIR, node

__all__ = ["node"]  # the fixture, shared with tests/test_sse_clients.py

CLIENT_DIR = ROOT / "client"
PIECES = ("Once", " upon", " a time,", " a rocket 🚀", " left", " for 漢字", " and back.")
PACE_S = 0.05
FAST, FAST_PACE_S = 100, 0.005  # the `[fast]` answer: 100 deltas in about half a second
NODE_TIMEOUT_S = 120


def _story() -> list[Step]:
    steps: list[Step] = []
    for piece in PIECES:
        steps += [Text(piece), Sleep(PACE_S)]
    return [*steps, Finish("stop"), Usage(9, len(PIECES)), Done()]


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


class TaggedUpstream(FakeUpstream):
    """Answers by the tag in the last message (see the module's docstring)."""

    def _unqueued(self, body: dict[str, Any]) -> Sequence[Step]:
        text = _text_of((body.get("messages") or [{}])[-1])
        if "[length]" in text:
            return [Text("Cut"), Text(" short"), Finish("length"), Usage(5, 2), Done()]
        if "[fast]" in text:
            steps: list[Step] = []
            for i in range(FAST):
                steps += [Text(f"{i} "), Sleep(FAST_PACE_S)]
            return [*steps, Finish("stop"), Usage(5, FAST), Done()]
        if "[endless]" in text:
            return [Text("Going"), Repeat(" on", 0.02)]
        return _story()

    def requests(self, tag: str) -> int:
        return sum(tag in orjson.dumps(s.body["messages"]).decode() for s in self.seen)


class StrippingProxy:
    """In front of the API: `/html/...` answers event-stream requests with its own HTML page
    (the stream never opens); `/typed/...` forwards them and relabels the whole answer
    `text/plain`, keeping `X-Stream-ID` (the stream did start). Everything else is forwarded.
    `GET /counts` gives the requests seen, by "<mode> <path>"."""

    STREAMS = ("/api/ai/generate-stream", "/api/v1/ai/chat/stream")
    PASSED = ("Content-Type", "Accept", "Authorization", "X-Forwarded-For", "Last-Event-ID")

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.counts: Counter[str] = Counter()
        self.url = ""

    async def _forward(self, request: web.Request) -> web.Response:
        mode, path = request.match_info["mode"], "/" + request.match_info["path"]
        self.counts[f"{mode} {path}"] += 1
        if mode == "html" and path in self.STREAMS:
            return web.Response(
                text="<html><body>Streaming is off here.</body></html>", content_type="text/html"
            )
        headers = {k: v for k, v in request.headers.items() if k in self.PASSED}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                self.api_url + path,
                data=await request.read(),
                headers=headers,
                allow_redirects=False,
            ) as answer,
        ):
            body = await answer.read()
            out = {"Content-Type": answer.headers.get("Content-Type", "application/octet-stream")}
            if mode == "typed" and path in self.STREAMS:
                out["Content-Type"] = "text/plain; charset=utf-8"
            for name in ("X-Stream-ID", "X-Request-ID", "Retry-After"):
                if name in answer.headers:
                    out[name] = answer.headers[name]
            return web.Response(status=answer.status, body=body, headers=out)

    async def _counts(self, _: web.Request) -> web.Response:
        return web.json_response(dict(self.counts))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StrippingProxy]:
        app = web.Application()
        app.router.add_get("/counts", self._counts)
        app.router.add_route("*", "/{mode:html|typed}/{path:.+}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            yield self
        finally:
            await runner.cleanup()


@dataclass
class Live:
    api: ServiceProcess
    upstream: TaggedUpstream
    cutter: CuttingProxy
    stripper: StrippingProxy
    background: Background


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("client-package")
    background = Background()
    try:
        upstream = TaggedUpstream()
        background.enter(running(upstream))
        env = {
            "OPENAI_BASE_URL": upstream.url,
            "OPENAI_API_KEY": "sk-test-client-package",
            "OPENAI_MODEL": "test-model",
            "UPSTREAM_MAX_RETRIES": "0",
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_CONCURRENT": "1",  # per client: each hook test is a client of its own
            "RATE_LIMIT_TPM": "0",
            "RESUME_GRACE_S": "20",
        }
        api = background.enter(service(env, tmp))
        cutter = background.enter(cutting_proxy(api.port))
        stripper = background.enter(StrippingProxy(api.url).running())
        yield Live(api, upstream, cutter, stripper, background)
    finally:
        background.close()


async def _arm(proxy: CuttingProxy, *cuts: Cut) -> None:
    proxy.arm(*cuts)  # on the proxy's own loop


def test_react_hooks_against_the_live_service(live: Live, node: str) -> None:
    # The two streams through the cutting proxy (a generation, then a chat turn) are cut twice
    # each: the generation after 3 whole events and 9 bytes of the 4th, then after 2 more events
    # (its third read is not cut: the stream ends first); the chat turn after 2 events and 5
    # bytes, then after 3 more.
    cuts = (Cut(3, extra=9), Cut(2), Cut(10_000), Cut(2, extra=5), Cut(3))
    live.background.run(_arm(live.cutter, *cuts))
    done = subprocess.run(
        [node, "--preserve-symlinks", "--test", "--test-reporter=tap", "react_hooks.test.mjs"],
        cwd=CLIENTS_DIR,
        env={
            **_node_env(),
            "GATEWAY_URL": live.api.url,
            "CUT_URL": live.cutter.url,
            "STRIP_URL": live.stripper.url,
        },
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    tap_passed(done, 16)
    # The cut streams were read whole through two reconnects each, from one upstream request.
    assert live.cutter.cuts_made == 4
    assert live.upstream.requests("[story] cut") == 1
    assert live.upstream.requests("[story] chat-cut") == 1
    resumes = [s for s in live.cutter.requests() if s.method == "GET"]
    assert len([s for s in resumes if "/api/v1/ai/streams/" in s.path]) >= 4, resumes
    assert all(s.last_event_id for s in resumes), resumes
    # The fallback asked the JSON route only for the stream that never opened.
    counts = live.stripper.counts
    assert counts["html /api/ai/generate-stream"] == 1
    assert counts["html /api/ai/generate"] == 1
    assert counts["html /api/v1/ai/chat/stream"] == 1
    assert counts["html /api/v1/ai/chat"] == 1
    assert counts["typed /api/ai/generate-stream"] == 1
    assert counts["typed /api/ai/generate"] == 0
    assert live.upstream.requests("[story] typed") == 1


def _node_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}


def test_types_check_under_tsc_strict(node: str) -> None:
    """tests/clients/consumer.ts uses every exported type; its `@ts-expect-error` lines must be
    errors (the types bite), and nothing else may be."""
    tsc = CLIENTS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    done = subprocess.run(
        [node, str(tsc), "--project", "tsconfig.json"],
        cwd=CLIENTS_DIR,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_types_reject_a_wrong_event_field(node: str) -> None:
    """The negative check on its own: consumer.ts without its first `@ts-expect-error` (a chat
    token with `delta`) fails on that line, with that message."""
    tsc = CLIENTS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    source = (CLIENTS_DIR / "consumer.ts").read_text()
    expectation = "// @ts-expect-error a chat token carries `content`, not `delta`\n"
    assert source.count(expectation) == 1
    bad = CLIENTS_DIR / "consumer_unexpected.generated.ts"
    config = CLIENTS_DIR / "tsconfig_unexpected.generated.json"
    bad.write_text(source.replace(expectation, ""))
    config.write_text(json.dumps({"extends": "./tsconfig.json", "files": [bad.name]}))
    try:
        done = subprocess.run(
            [node, str(tsc), "--project", config.name],
            cwd=CLIENTS_DIR,
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT_S,
            check=False,
        )
    finally:
        bad.unlink()
        config.unlink()
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() if "error TS" in line]
    assert len(errors) == 1, done.stdout
    assert "'delta' does not exist in type 'ChatTokenEvent'" in errors[0], done.stdout


APP_MAIN = """\
import { generateContentStream, ApiError } from "@ai-stream-gateway/client";
import { useAIStream, useStreamingChat } from "@ai-stream-gateway/client/react";
import { createElement } from "react";
import { renderToString } from "react-dom/server";
function View() {
  const a = useAIStream();
  const c = useStreamingChat();
  return createElement("p", null, `${a.isStreaming}|${a.content}|${c.conversationId}`);
}
const page = renderToString(createElement(View));
console.log(JSON.stringify([typeof generateContentStream, typeof ApiError, page]));
"""


@pytest.mark.parametrize(
    ("install", "run"),
    [
        pytest.param(["--install-links"], [], id="copied"),
        pytest.param([], ["--preserve-symlinks"], id="linked"),
    ],
)
def test_the_package_installs_into_an_app_and_imports(
    node: str, tmp_path: Path, install: list[str], run: list[str]
) -> None:
    """`npm install [--install-links] <repo>/client` in a new app (offline: React from npm's
    cache, which `npm ci` filled), then both entry points import under Node and a component using
    both hooks renders with the app's own React. Copied (`--install-links`), the package runs as
    it is; linked (npm's default for a folder), `react.js` finds the app's React when Node keeps
    the link's path (`--preserve-symlinks`)."""
    npm = shutil.which("npm")
    if npm is None:
        tool_required("npm")
    assert npm is not None
    app = tmp_path / "app"
    app.mkdir()
    manifest = {"name": "app", "private": True, "type": "module"}
    (app / "package.json").write_text(json.dumps(manifest))
    lock = json.loads((CLIENTS_DIR / "package-lock.json").read_text())["packages"]
    react = [f"{name}@{lock[f'node_modules/{name}']['version']}" for name in ("react", "react-dom")]
    flags = [*install, "--offline", "--no-audit", "--no-fund", "--loglevel=error"]
    done = subprocess.run(
        [npm, "install", *flags, str(CLIENT_DIR), *react],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    installed = app / "node_modules" / "@ai-stream-gateway" / "client"
    assert installed.is_symlink() == (not install)
    assert (installed / "aiStream.js").read_bytes() == (CLIENT_DIR / "aiStream.js").read_bytes()
    (app / "main.js").write_text(APP_MAIN)
    ran = subprocess.run(
        [node, *run, "main.js"], cwd=app, capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert json.loads(ran.stdout) == ["function", "function", "<p>false||null</p>"]


async def test_the_admin_page_serves_the_packages_module_byte_for_byte(aiohttp_client: Any) -> None:
    from service.admin import create_admin_app
    from service.config import Settings

    client = await aiohttp_client(create_admin_app(Settings()))
    resp = await client.get("/static/aiStream.js")
    assert resp.status == 200
    assert resp.content_type in ("text/javascript", "application/javascript")
    assert await resp.read() == (CLIENT_DIR / "aiStream.js").read_bytes()
    assert (STATIC / "aiStream.js").resolve() == (CLIENT_DIR / "aiStream.js").resolve()


def test_the_package_declares_its_entry_points_and_types() -> None:
    manifest = json.loads((CLIENT_DIR / "package.json").read_text())
    assert manifest["name"] == "@ai-stream-gateway/client"
    assert manifest["exports"]["."] == {"types": "./aiStream.d.ts", "default": "./aiStream.js"}
    assert manifest["exports"]["./react"] == {"types": "./react.d.ts", "default": "./react.js"}
    assert "react" in manifest["peerDependencies"]
    assert "dependencies" not in manifest
    for name in manifest["files"]:
        assert (CLIENT_DIR / name).is_file(), name
