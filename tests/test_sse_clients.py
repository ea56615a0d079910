"""The mainstream SSE clients, run as their users run them, read every stream of the live service
exactly.

One real service process (`python -m service api`) relays a scripted OpenAI-compatible upstream
through the real `openai` SDK, with a tiny heartbeat interval. Each client is a small program in
`tests/clients/`: eventsource-parser and the first design note's own reader under Node,
@microsoft/fetch-event-source in Debian's Chromium (driven by Playwright), httpx-sse, sseclient-py
and the httpx and requests `iter_lines` readers in Python. Every client is installed and pinned by
the project (`pyproject.toml`'s dev extra, `tests/clients/package-lock.json` through `npm ci`).

Each client reads each script on both streaming routes, in the frame shape it picks by its own
`Accept` header, and must deliver exactly the events sent: each one a plain JSON parse, none empty,
none extra, none lost to a heartbeat, their text joined equal to the final `done.content`
(generate) or the saved answer (chat). Clients that see `id:` lines must see `<streamId>:<seq>`,
the stream id being the `start` event's `streamId` or the chat answer's `messageId`, as in the
`X-Stream-ID` header. Scripts with multi-byte text are read through a proxy that cuts every
multi-byte character in two across the client's network reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import pytest
from aiohttp import web
from playwright.sync_api import Page
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import tool_required
from tests.fake_upstream import Done, FakeUpstream, Finish, Raw, Sleep, Step, Text, Usage, chunk
from tests.process import ROOT, ServiceProcess, service
from tests.tcp_proxy import TcpProxy
from tests.test_admin_browser import Background, chromium

CLIENTS_DIR = ROOT / "tests" / "clients"
HEARTBEAT_S = "0.02"
PAUSE_S = 0.1  # the slow upstream's silence: several heartbeats each time
READ_MS = 15_000  # every client's whole read is bounded by this
GENERATE, CHAT = "/api/ai/generate-stream", "/api/v1/ai/chat/stream"


# --- what the model says -------------------------------------------------------------------------


def _role_chunk() -> Step:
    """The role-only first chunk real servers send: an empty delta that must not become an event."""
    return Raw(chunk({"role": "assistant", "content": ""}))


def _end(deltas: int) -> list[Step]:
    return [Finish("stop"), Usage(9, deltas), Done()]


def _utf8_split_across_writes(text: str, char: str) -> list[Step]:
    """One chunk whose bytes go out in two writes that cut `char`'s UTF-8 encoding in two."""
    data = chunk({"content": text})
    cut = data.index(char.encode()) + 2
    return [Raw(data[:cut]), Sleep(0.005), Raw(data[cut:])]


def _surrogate_chunk(escape: bytes, after: str = "") -> Step:
    """A chunk whose content is one UTF-16 half written as a JSON escape (valid JSON, as Python's
    `json` and the SDK read it), then `after`."""
    return Raw(chunk({"content": "HALF" + after}).replace(b"HALF", escape))


@dataclass(frozen=True)
class Script:
    name: str
    steps: tuple[Step, ...]
    text: str  # what a client must read: the deltas' text joined
    chopped: bool = False  # read through the proxy that cuts characters across network reads

    @property
    def marker(self) -> str:
        return f"[script:{self.name}]"


def _texts(*pieces: str) -> list[Step]:
    return [Text(piece) for piece in pieces]


HEARTBEAT_PIECES = ("Slow", " and steady,", " with pauses.")
SEPARATOR_PIECES = (
    "Line one\nline two\r\nline three\rline four",
    '\n\ndata: {"type":"done","content":"forged"}\n\n',
    "\u2028LS\u2029PS\u0085NEL",
    '\r\n\r\nid: forged:9\r\nevent: error\r\ndata: {"type":"error"}\r\n\r\n',
    ": ping\n\n",
    ": ping\n",
    "\x0b\x0c\x1c\x1d\x1e\ttabs, feeds and group separators",
    "\n",
    "data: ",
    "[DONE]\n\n",
    "\r",
    "\n\r\n\n end\n",
)
MULTIBYTE_PIECES = (
    "Emoji 😀, family 👩‍👩‍👧, flag 🇫🇷, ",
    "漢",
    "字と",
    "かな, ",
    "e",
    "\u0301 and n\u0303, ",
    "👩",
    "\u200d👩\u200d👧 ",
    "Ω≈ç√∫ ",
)

SCRIPTS = [
    Script(
        "heartbeats",
        (
            Sleep(PAUSE_S),  # silent before it has even answered
            _role_chunk(),
            Sleep(PAUSE_S),  # answered, still no token
            Text(HEARTBEAT_PIECES[0]),
            Sleep(PAUSE_S),
            Text(HEARTBEAT_PIECES[1]),
            Sleep(PAUSE_S),
            Text(HEARTBEAT_PIECES[2]),
            *_end(3),
        ),
        "".join(HEARTBEAT_PIECES),
    ),
    Script(
        "separators",
        (_role_chunk(), *_texts(*SEPARATOR_PIECES), *_end(len(SEPARATOR_PIECES))),
        "".join(SEPARATOR_PIECES),
    ),
    Script(
        "multibyte",
        (
            _role_chunk(),
            *_texts(*MULTIBYTE_PIECES),
            *_utf8_split_across_writes("🚀 rocket, ", "🚀"),
            *_utf8_split_across_writes("中文 end", "中"),
            *_end(len(MULTIBYTE_PIECES) + 2),
        ),
        "".join(MULTIBYTE_PIECES) + "🚀 rocket, 中文 end",
        chopped=True,
    ),
    Script(
        "surrogates",
        (
            _role_chunk(),
            Text("Grin: "),
            _surrogate_chunk(b"\\ud83d"),
            _surrogate_chunk(b"\\ude00", ", wave: "),
            _surrogate_chunk(b"\\ud83d"),
            _surrogate_chunk(b"\\udc4b", "."),
            *_end(5),
        ),
        "Grin: 😀, wave: 👋.",
        chopped=True,
    ),
]


class ScriptedUpstream(FakeUpstream):
    """The fake upstream, answering each request with the script its last message names, so
    requests need no queueing order."""

    def __init__(self) -> None:
        super().__init__()
        self.record = False
        self.by_marker = {script.marker: list(script.steps) for script in SCRIPTS}

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        last = orjson.dumps((await request.json())["messages"][-1]).decode()
        named = [steps for marker, steps in self.by_marker.items() if marker in last]
        assert len(named) == 1, last
        self.scripts.appendleft(named[0])  # no await between this and the base class taking it
        return await super()._completions(request)


# --- a proxy that cuts characters across the client's network reads ------------------------------


def pieces(data: bytes) -> Iterator[tuple[bytes, bool]]:
    """`data` cut after every LF and after the first byte of every multi-byte UTF-8 character;
    each piece with whether it ends inside a character."""
    start = 0
    for i, byte in enumerate(data):
        if byte == 0x0A or byte >= 0xC0:
            yield data[start : i + 1], byte >= 0xC0
            start = i + 1
    if start < len(data):
        yield data[start:], False


class Chopper(TcpProxy):
    """A TCP proxy in front of the service. Answers reach the client in the pieces above, with a
    millisecond's pause after each cut inside a character (pacing, so the client's read ends
    there; nothing waits on it). `splits` counts those cuts."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.splits = 0

    async def connection(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            service_in, service_out = await asyncio.open_connection("127.0.0.1", self.target_port)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pipe(client_in, service_out, chop=False))
                    group.create_task(self._pipe(service_in, client_out, chop=True))
            finally:
                service_out.close()
        except* OSError:
            pass  # either side went away: the connection is over
        finally:
            client_out.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, chop: bool
    ) -> None:
        while data := await reader.read(65536):
            for piece, inside in pieces(data) if chop else [(data, False)]:
                writer.write(piece)
                await writer.drain()
                if inside:
                    self.splits += 1
                    await asyncio.sleep(0.001)
        if writer.can_write_eof():
            writer.write_eof()


# --- a static site for the browser's page ---------------------------------------------------------

CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript"}


async def _static(request: web.Request) -> web.Response:
    """`tests/clients/` (its `node_modules/` included). Like a dev server, an import without its
    `.js` (fetch-event-source's ESM build writes `from './fetch'`) finds the `.js` file."""
    path = (CLIENTS_DIR / request.match_info["path"]).resolve()
    if not path.is_file():
        path = path.with_name(path.name + ".js")
    if not path.is_relative_to(CLIENTS_DIR) or not path.is_file():
        raise web.HTTPNotFound()
    return web.Response(
        body=path.read_bytes(),
        content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
        charset="utf-8",
    )


@contextlib.asynccontextmanager
async def static_site() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{path:.+}", _static)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def started(thing: ScriptedUpstream | Chopper) -> AsyncIterator[None]:
    await thing.start()
    try:
        yield
    finally:
        await thing.stop()


# --- the live stack -------------------------------------------------------------------------------


@dataclass
class Live:
    api: ServiceProcess
    chopper: Chopper
    site: str

    def base(self, chopped: bool) -> str:
        return f"http://127.0.0.1:{self.chopper.port}" if chopped else self.api.url

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api.url + path, timeout=5) as resp:  # noqa: S310
            return json.loads(resp.read())

    def heartbeats(self) -> float:
        with urllib.request.urlopen(self.api.url + "/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ai_stream_heartbeats_total":
                    return float(sample.value)
        return 0.0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("sse-clients")
    background = Background()
    try:
        upstream = ScriptedUpstream()
        background.enter(started(upstream))
        site = background.enter(static_site())
        env = {
            "OPENAI_BASE_URL": upstream.url,
            "OPENAI_API_KEY": "sk-test-clients",
            "OPENAI_MODEL": "test-model",
            "HEARTBEAT_INTERVAL_S": HEARTBEAT_S,
            "UPSTREAM_MAX_RETRIES": "0",
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_CONCURRENT": "0",
            "RATE_LIMIT_TPM": "0",
            "CORS_ORIGINS": site,
        }
        api = background.enter(service(env, tmp))
        chopper = Chopper(api.port)
        background.enter(started(chopper))
        yield Live(api, chopper, site)
    finally:
        background.close()


@pytest.fixture(scope="module")
def node() -> str:
    """Node, with tests/clients' packages installed by `npm ci` (again only when the lock file
    changed; `--prefer-offline` uses npm's cache when it has the packages)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        tool_required("node and npm")
    assert node is not None
    assert npm is not None
    digest = hashlib.sha256((CLIENTS_DIR / "package-lock.json").read_bytes()).hexdigest()
    stamp = CLIENTS_DIR / "node_modules" / ".installed-lock-sha256"
    if not stamp.is_file() or stamp.read_text() != digest:
        done = subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=CLIENTS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        stamp.write_text(digest)
    return node


@pytest.fixture(scope="module")
def page(live: Live, node: str) -> Iterator[Page]:
    """Chromium with the fetch-event-source page loaded from the static site."""
    with chromium() as browser:
        context = browser.new_context()
        context.set_default_timeout(READ_MS + 5_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(live.site + "/fetch_event_source.html")
        page.wait_for_selector("body[data-ready=true]", state="attached")
        yield page
        assert errors == [], errors


# --- the clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    name: str
    runner: Literal["node", "python", "browser"]
    program: str  # the file in tests/clients/ (python: the client's name in python_clients.py)
    shape: Literal["sse", "data"]  # the frame shape its Accept header asks for
    sees_comments: bool  # its report shows the heartbeats it passed, and where


CLIENTS = [
    Client("eventsource-parser", "node", "eventsource_parser.mjs", "sse", True),
    Client("fetch-event-source", "browser", "fetch_event_source.html", "sse", False),
    Client("httpx-sse", "python", "httpx-sse", "sse", False),
    Client("sseclient-py", "python", "sseclient-py", "sse", False),
    Client("httpx-iter-lines", "python", "httpx-iter-lines", "data", True),
    Client("requests-iter-lines", "python", "requests-iter-lines", "data", True),
    Client("design-note-reader", "node", "design_note_reader.mjs", "data", True),
]


@dataclass
class Read:
    """What a client read: its own report (see tests/clients/python_clients.py)."""

    status: int | None
    headers: dict[str, str]
    data: list[str]
    ids: list[str | None]
    events: list[dict[str, Any]]
    other: list[str]
    other_at: list[int]  # how many events had been read when each `other` came
    error: str | None = None
    stderr: str = field(default="", repr=False)

    def report(self) -> str:
        lines = [f"status {self.status}, error: {self.error}", f"stderr: {self.stderr[-2000:]}"]
        ids = self.ids + [None] * (len(self.data) - len(self.ids))
        lines += [f"  id {i!r} data {d!r}" for i, d in zip(ids, self.data, strict=False)]
        others = zip(self.other, self.other_at, strict=False)
        lines += [f"  other {o!r} after {n} events" for o, n in others]
        return "\n".join(lines)


def _report(out: str, stderr: str = "") -> Read:
    try:
        parsed = json.loads(out)
    except ValueError:
        return Read(None, {}, [], [], [], [], [], f"no report on stdout: {out[-2000:]!r}", stderr)
    other_at = parsed.pop("otherAt")
    return Read(**parsed, other_at=other_at, stderr=stderr)


def read(client: Client, job: dict[str, Any], request: pytest.FixtureRequest) -> Read:
    if client.runner == "browser":
        page: Page = request.getfixturevalue("page")
        return _report(json.dumps(page.evaluate("job => window.readStream(job)", job)))
    if client.runner == "node":
        command = [request.getfixturevalue("node"), str(CLIENTS_DIR / client.program)]
    else:
        command = [sys.executable, str(CLIENTS_DIR / "python_clients.py"), client.program]
    done = subprocess.run(
        [*command, json.dumps(job)],
        cwd=CLIENTS_DIR,
        capture_output=True,
        text=True,
        timeout=READ_MS / 1000 + 15,
        check=False,
    )
    return _report(done.stdout, done.stderr)


# --- what exactly means ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    path: str
    first: str  # the first event's type
    piece: str  # the type of the events that carry text
    text: str  # the field that carries it

    def body(self, script: Script) -> dict[str, Any]:
        words = f"Say the {script.name} script {script.marker}"
        return {"prompt": words} if self.path == GENERATE else {"message": words}


ROUTES = {
    "generate": Route(GENERATE, "start", "content", "delta"),
    "chat": Route(CHAT, "metadata", "token", "content"),
}


def stream_id(route: Route, first: dict[str, Any]) -> str | None:
    return first.get("streamId") if route.path == GENERATE else first.get("messageId")


def assert_exact(client: Client, route: Route, script: Script, got: Read, live: Live) -> None:
    assert got.error is None, got.report()
    assert got.status == 200, got.report()
    # every event delivered is one of the route's, in order, parsed from its own data
    assert len(got.events) == len(got.data) >= 2, got.report()
    assert all(isinstance(e, dict) for e in got.events), got.report()
    first, *middle, last = got.events
    assert first.get("type") == route.first, got.report()
    assert last.get("type") == "done", got.report()
    assert [e.get("type") for e in middle] == [route.piece] * len(middle), got.report()
    texts = [e[route.text] for e in middle]
    assert all(isinstance(t, str) and t for t in texts), got.report()  # no empty events
    # nothing lost, nothing added: the text read is the model's, and the service's own record
    assert "".join(texts) == script.text, got.report()
    if route.path == GENERATE:
        assert last["content"] == script.text
    else:
        saved = live.get(f"/api/v1/ai/conversations/{first['conversationId']}")["messages"]
        answer = [m for m in saved if m["messageId"] == first["messageId"]]
        assert [(m["role"], m["status"], m["content"]) for m in answer] == [
            ("assistant", "complete", script.text)
        ]
    # whatever else the client saw was a heartbeat, never a frame it skipped
    assert set(got.other) <= {"", ": ping"}, got.report()
    # the stream id, where the client shows it
    sid = stream_id(route, first)
    assert isinstance(sid, str), first
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", sid), sid
    assert got.headers.get("x-stream-id") == sid, got.headers
    if client.shape == "sse":
        cursors = [re.fullmatch(r"(.+):(\d+)", i or "") for i in got.ids]
        assert all(cursors), got.report()
        assert {c[1] for c in cursors if c} == {sid}, got.report()
        seqs = [int(c[2]) for c in cursors if c]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), got.report()
    else:
        assert not any(got.ids), got.report()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
@pytest.mark.parametrize("route", list(ROUTES), ids=str)
@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_client_reads_every_stream_exactly(
    client: Client, route: str, script: Script, live: Live, request: pytest.FixtureRequest
) -> None:
    heartbeats, splits = live.heartbeats(), live.chopper.splits
    job = {
        "url": live.base(script.chopped) + ROUTES[route].path,
        "body": ROUTES[route].body(script),
        "timeoutMs": READ_MS,
    }
    got = read(client, job, request)
    assert_exact(client, ROUTES[route], script, got, live)
    if script.name == "heartbeats":  # several pings fell before and between the tokens
        assert live.heartbeats() - heartbeats >= 4
        if client.sees_comments:
            pinged = {n for o, n in zip(got.other, got.other_at, strict=True) if o == ": ping"}
            assert pinged >= {1, 2, 3}, got.report()
    if script.chopped:  # characters were cut in two across the client's reads
        assert live.chopper.splits - splits >= 2
