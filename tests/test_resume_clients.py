"""Real clients come back to a cut stream by themselves, and stop one, against the live service.

One real API process (`python -m service api`, a small grace window) relays a scripted upstream
through the real `openai` SDK; the admin page runs as its own process (another origin); every
client reaches the API through `tests/cutting_proxy.py`, armed to cut the client's connection
after a number of events, inside a frame too. The clients are the ones people use, installed by
the project (`tests/clients/package-lock.json` through `npm ci`): the browser's own `EventSource`
and `@microsoft/fetch-event-source` (with its default retry) in Debian's Chromium, the
`eventsource` package under Node, and the project's `aiStream.js` in Chromium, loaded from the
admin origin and calling the API cross-origin (and under Node, against a second API process with
a grace window shorter than the story, for a pause that outlasts it). The admin page's Stop
buttons are pressed in Chromium too.

Each resumed read must deliver every event once, in order (their cursors run on from 1 with no
gap or repeat), its text joined equal to `done.content` (generate) or the saved answer (chat),
and the upstream must have seen exactly one request per stream: coming back never starts (or
bills) a second generation.
"""

from __future__ import annotations

import http.client
import json
import queue
import re
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from playwright.sync_api import Browser, Page
from prometheus_client.parser import text_string_to_metric_families

from tests.cutting_proxy import Cut, Cutter, CuttingProxy, cutting_proxy
from tests.fake_upstream import Done, FakeUpstream, Finish, Sleep, Step, Text, Usage, running
from tests.process import ServiceProcess, free_port, service
from tests.test_admin_browser import Background, chromium
from tests.test_sse_clients import CLIENTS_DIR, node, static_site

__all__ = ["node"]  # the fixture, shared with tests/test_sse_clients.py

GRACE_S = "20"  # longer than any client's reconnect delay (EventSource's is 3 s)
SHORT_GRACE_S = "0.3"  # shorter than the story: a pause past it ends the generation
READ_MS = 20_000  # every client's whole read is bounded by this
WAIT_S = 10.0  # every other wait
GENERATE, CHAT = "/api/ai/generate-stream", "/api/v1/ai/chat/stream"
PIECES = (
    "Once",
    " upon",
    " a time,",
    " a rocket 🚀",
    " left",
    " for 漢字",
    " and back:",
    " the end",
    " of",
    " a story",
    " told",
    " slowly.",
)
TEXT = "".join(PIECES)
PACE_S = 0.1  # between the pieces: the stream still runs when fetch-event-source is back (1 s)


def story() -> list[Step]:
    steps: list[Step] = []
    for piece in PIECES:
        steps += [Text(piece), Sleep(PACE_S)]
    return [*steps, Finish("stop"), Usage(9, len(PIECES)), Done()]


class MarkedUpstream(FakeUpstream):
    """The fake upstream answering every request with the story; `requests(marker)` counts the
    requests whose messages carry a test's marker."""

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.scripts.appendleft(story())  # no await between this and the base class taking it
        return await super()._completions(request)

    def requests(self, marker: str) -> list[Any]:
        return [s for s in self.seen if marker in orjson.dumps(s.body["messages"]).decode()]


@dataclass
class Live:
    api: ServiceProcess
    admin: ServiceProcess
    upstream: MarkedUpstream
    proxy: CuttingProxy
    site: str
    background: Background
    short_grace: ServiceProcess  # another API process, on the same upstream, with a short grace

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api.url + path, timeout=5) as resp:  # noqa: S310
            return json.loads(resp.read())

    def sample(self, name: str, **labels: str) -> float:
        return metric(self.api.url, name, **labels)

    def arm(self, *cuts: Cut) -> None:
        self.background.run(_call(self.proxy.arm, *cuts))

    def release(self) -> None:
        self.background.run(_call(self.proxy.release))


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)  # on the proxy's own loop


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("resume-clients")
    background = Background()
    try:
        upstream = MarkedUpstream()
        background.enter(running(upstream))
        site = background.enter(static_site())
        api_port, admin_port = free_port(), free_port()
        ports = {"PORT": str(api_port), "ADMIN_PORT": str(admin_port)}
        env = {
            "OPENAI_BASE_URL": upstream.url,
            "OPENAI_API_KEY": "sk-test-clients",
            "OPENAI_MODEL": "test-model",
            "UPSTREAM_MAX_RETRIES": "0",
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_CONCURRENT": "0",
            "RATE_LIMIT_TPM": "0",
            "RESUME_GRACE_S": GRACE_S,
            "CORS_ORIGINS": f"{site},http://127.0.0.1:{admin_port}",
            **ports,
        }
        api = background.enter(service(env, tmp, "api", api_port))
        admin = background.enter(service(env, tmp, "admin", admin_port))
        proxy = background.enter(cutting_proxy(api.port))
        short_port, short_tmp = free_port(), tmp_path_factory.mktemp("short-grace")
        short = {**env, "RESUME_GRACE_S": SHORT_GRACE_S, "PORT": str(short_port)}
        short_grace = background.enter(service(short, short_tmp, "api", short_port))
        yield Live(api, admin, upstream, proxy, site, background, short_grace)
    finally:
        background.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def open_page(browser: Browser, url: str) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(READ_MS + 5_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", state="attached")
        yield page
        assert errors == [], errors
    finally:
        context.close()


@pytest.fixture
def client_page(live: Live, browser: Browser, node: str) -> Iterator[Page]:
    """tests/clients/resume.html, from the static site (another origin than the API's)."""
    yield from open_page(browser, live.site + "/resume.html")


@pytest.fixture
def admin_page(live: Live, browser: Browser) -> Iterator[Page]:
    """The admin page, from its own process and origin."""
    yield from open_page(browser, live.admin.url + "/")


def poll(check: Any, what: str, seconds: float = WAIT_S) -> None:
    """Poll `check()` until true, bounded (waiting on other processes' state)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def marker() -> str:
    return f"[story:{uuid.uuid4().hex[:12]}]"


def body(path: str, mark: str) -> dict[str, str]:
    words = f"Tell the story {mark}"
    return {"prompt": words} if path == GENERATE else {"message": words}


def start_and_leave(live: Live, mark: str) -> str:
    """POST a generate stream straight to the API, read its first event, and close the
    connection: the generation goes on in its grace window. Returns the stream id."""
    conn = http.client.HTTPConnection("127.0.0.1", live.api.port, timeout=WAIT_S)
    try:
        conn.request(
            "POST",
            GENERATE,
            body=json.dumps(body(GENERATE, mark)),
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        first = b""
        while not first.endswith(b"\n\n") and len(first) < 4096:
            first += resp.read(1)
        stream_id = resp.getheader("X-Stream-ID")
        assert stream_id is not None
        assert first.startswith(f"id: {stream_id}:1\n".encode()), first
        return stream_id
    finally:
        conn.close()


def assert_read_once(data: list[str], ids: list[str], path: str, live: Live, mark: str) -> None:
    """Every event once and in order, the text exact, one upstream request."""
    events = [json.loads(d) for d in data]
    assert events, data
    first, *middle, last = events
    stream = first.get("streamId") if path == GENERATE else first.get("messageId")
    assert isinstance(stream, str), first
    assert ids == [f"{stream}:{n}" for n in range(1, len(ids) + 1)], ids
    assert last["type"] == "done", events
    piece, field = ("content", "delta") if path == GENERATE else ("token", "content")
    assert [e["type"] for e in middle] == [piece] * len(middle), events
    text = "".join(e[field] for e in middle)
    assert text == TEXT, events
    if path == GENERATE:
        assert last["content"] == TEXT
    else:
        saved = live.get(f"/api/v1/ai/conversations/{first['conversationId']}")["messages"]
        answer = [m for m in saved if m["messageId"] == stream]
        assert [(m["status"], m["content"]) for m in answer] == [("complete", TEXT)]
    assert len(live.upstream.requests(mark)) == 1  # one generation, however many connections


# --- EventSource and the eventsource package: the GET route -------------------------------------


def test_browser_eventsource_reconnects_reads_the_rest_and_stops_at_204(
    live: Live, client_page: Page
) -> None:
    mark = marker()
    stream_id = start_and_leave(live, mark)
    live.arm(Cut(3))
    url = f"{live.proxy.url}/api/v1/ai/streams/{stream_id}"
    got = client_page.evaluate(
        "job => window.readEventSource(job)", {"url": url, "timeoutMs": READ_MS}
    )
    assert got["error"] is None, got
    assert got["closed"], got
    assert_read_once(got["data"], got["ids"], GENERATE, live, mark)
    assert_get_route_reconnects(live, stream_id, len(got["ids"]))


def test_eventsource_package_reconnects_reads_the_rest_and_stops_at_204(
    live: Live, node: str
) -> None:
    mark = marker()
    stream_id = start_and_leave(live, mark)
    live.arm(Cut(2, extra=9))  # inside the third frame
    job = {"url": f"{live.proxy.url}/api/v1/ai/streams/{stream_id}", "timeoutMs": READ_MS}
    done = subprocess.run(
        [node, str(CLIENTS_DIR / "eventsource_resume.mjs"), json.dumps(job)],
        cwd=CLIENTS_DIR,
        capture_output=True,
        text=True,
        timeout=READ_MS / 1000 + 15,
        check=False,
    )
    got = json.loads(done.stdout)
    assert got["error"] is None, (got, done.stderr)
    assert got["closed"], got
    assert got["lastError"]["code"] == 204, got
    assert_read_once(got["data"], got["ids"], GENERATE, live, mark)
    assert_get_route_reconnects(live, stream_id, len(got["ids"]))


def assert_get_route_reconnects(live: Live, stream_id: str, events: int) -> None:
    """The cut connection, one reconnect from where it was cut, then the one reconnect after the
    final event, which the 204 ends: nothing more."""
    assert live.proxy.cuts_made >= 1
    requests = live.proxy.requests()
    cut_at = requests[1].last_event_id
    assert [(r.method, r.last_event_id) for r in requests] == [
        ("GET", None),
        ("GET", cut_at),
        ("GET", f"{stream_id}:{events}"),
    ], requests
    assert cut_at is not None
    assert re.fullmatch(rf"{re.escape(stream_id)}:[1-9]\d*", cut_at), cut_at
    answers = live.proxy.answers()
    assert [(a.path, a.cut) for a in answers] == [("200", True), ("200", False), ("204", False)]


# --- fetch-event-source: the POST retried with Last-Event-ID ------------------------------------

CUTS = {
    "after-first-event": Cut(1, hold=True),
    "mid-stream": Cut(5, hold=True),
    "inside-a-frame": Cut(3, extra=12, hold=True),
}


@pytest.mark.parametrize("cut", list(CUTS), ids=str)
@pytest.mark.parametrize("path", [GENERATE, CHAT], ids=["generate", "chat"])
def test_fetch_event_source_default_retry_resumes_the_same_generation(
    live: Live, client_page: Page, path: str, cut: str
) -> None:
    mark = marker()
    live.arm(CUTS[cut])
    job = {"url": live.proxy.url + path, "body": body(path, mark), "timeoutMs": READ_MS}
    client_page.evaluate("job => window.startFetchEventSource(job)", job)
    # the connection drops once the client has read up to the cut (see tests/cutting_proxy.py)
    client_page.wait_for_function("n => window.__out.data.length >= n", arg=CUTS[cut].events)
    live.release()
    got = client_page.evaluate("() => window.__run")
    assert got["error"] is None, got  # it ended with the page's own abort at the final event
    assert_read_once(got["data"], got["ids"], path, live, mark)
    assert live.proxy.cuts_made >= 1
    requests = live.proxy.requests()
    assert [r.method for r in requests] == ["POST", "POST"], requests
    assert requests[0].last_event_id is None
    assert requests[1].last_event_id == got["ids"][CUTS[cut].events - 1], requests
    assert got["opens"] == [200, 200], got


# --- aiStream.js in Chromium, from the admin origin against the API's -----------------------------

# Starts one aiStream.js read in the page (window.__run resolves to its report). `then`: "abort"
# aborts its signal at the first text, "pause" pauses it there (window.__paused is set).
AI_STREAM = """job => {
  window.__run = (async () => {
    const { generateContentStream, chatStream } = await import("/static/aiStream.js");
    const run = job.path === "/api/ai/generate-stream" ? generateContentStream : chatStream;
    const out = { pieces: [], reconnects: [], streamId: null };
    Object.assign(out, { done: null, error: null, aborted: null });
    window.__out = out; // what it has delivered so far, while it reads
    const controller = new AbortController();
    let handle = null;
    const piece = (text) => {
      out.pieces.push(text);
      if (out.pieces.length !== 1) return;
      if (job.then === "abort") controller.abort();
      if (job.then === "pause") {
        handle.pause();
        window.__resume = () => handle.resume();
        window.__paused = true;
      }
    };
    const result = await run(
      job.body,
      {
        onStream: (h) => {
          handle = h;
          out.streamId = h.streamId;
        },
        onContent: (e) => piece(e.delta),
        onToken: (e) => piece(e.content),
        onReconnect: (r) => out.reconnects.push(r),
        onDone: (d) => (out.done = d),
        onError: (e) => (out.error = e),
        onAbort: (a) => (out.aborted = a),
      },
      {
        baseUrl: job.baseUrl,
        signal: controller.signal,
        batchMs: 0,
        reconnect: { tries: 5, baseMs: 20, maxMs: 200 },
      },
    );
    return { ...out, status: result.status, text: result.text, stopped: result.stopped ?? null };
  })();
}"""


def ai_stream(page: Page, live: Live, path: str, mark: str, then: str = "") -> None:
    job = {"path": path, "body": body(path, mark), "baseUrl": live.proxy.url, "then": then}
    page.evaluate(AI_STREAM, job)


def ai_stream_report(page: Page) -> Any:
    return page.evaluate("() => window.__run")


@pytest.mark.parametrize("path", [GENERATE, CHAT], ids=["generate", "chat"])
def test_ai_stream_reconnects_cross_origin_and_its_caller_sees_one_stream(
    live: Live, admin_page: Page, path: str
) -> None:
    mark = marker()
    live.arm(Cut(4, extra=5, hold=True))
    ai_stream(admin_page, live, path, mark)
    admin_page.wait_for_function("() => window.__out?.pieces.length >= 3")  # events 2 to 4
    live.release()
    got = ai_stream_report(admin_page)
    assert got["status"] == "done", got
    assert got["error"] is None, got
    assert "".join(got["pieces"]) == got["text"] == TEXT, got
    if path == GENERATE:
        assert got["done"]["content"] == TEXT
    assert len(live.upstream.requests(mark)) == 1
    assert live.proxy.cuts_made == 1
    stream_id = got["streamId"]
    assert [r["lastEventId"] for r in got["reconnects"]] == [f"{stream_id}:4"], got
    requests = live.proxy.requests()
    assert [(r.method, r.path, r.last_event_id) for r in requests] == [
        ("POST", path, None),
        ("GET", f"/api/v1/ai/streams/{stream_id}", f"{stream_id}:4"),
    ], requests


def test_ai_stream_abort_cancels_the_generation(live: Live, admin_page: Page) -> None:
    mark = marker()
    live.arm()
    route = {"route": "generate_stream"}
    cancelled = live.sample("ai_stream_outcomes_total", outcome="cancelled", **route)
    ai_stream(admin_page, live, GENERATE, mark, then="abort")
    got = ai_stream_report(admin_page)
    assert got["status"] == "aborted", got
    assert got["stopped"] is True, got
    assert got["aborted"] == {"text": got["pieces"][0], "stopped": True}, got
    assert got["done"] is None
    assert got["error"] is None
    stream_id = got["streamId"]
    assert [(r.method, r.path) for r in live.proxy.requests()] == [
        ("POST", GENERATE),
        ("POST", f"/api/v1/ai/streams/{stream_id}/cancel"),
    ]
    [upstream] = live.upstream.requests(mark)
    poll(upstream.ended.is_set, "the upstream request to be closed")
    assert upstream.cancelled  # closed by the service, not finished
    poll(
        lambda: (
            live.sample("ai_stream_outcomes_total", outcome="cancelled", **route) == cancelled + 1
        ),
        "the stream to end cancelled",
    )


def test_ai_stream_pause_then_resume_within_the_grace_gets_the_rest(
    live: Live, admin_page: Page
) -> None:
    mark = marker()
    live.arm()
    ai_stream(admin_page, live, GENERATE, mark, then="pause")
    admin_page.wait_for_function("() => window.__paused === true")
    poll(lambda: len(live.upstream.requests(mark)) == 1, "the upstream request")
    [upstream] = live.upstream.requests(mark)
    # paused: the connection is gone, and the generation runs on to its end meanwhile
    poll(upstream.ended.is_set, "the generation to finish while paused")
    assert not upstream.cancelled
    admin_page.evaluate("() => window.__resume()")
    got = ai_stream_report(admin_page)
    assert got["status"] == "done", got
    assert "".join(got["pieces"]) == got["text"] == TEXT, got
    assert got["done"]["content"] == TEXT
    assert got["reconnects"] == []  # a resume is not a reconnect after a failure
    stream_id = got["streamId"]
    requests = live.proxy.requests()
    assert [(r.method, r.path) for r in requests] == [
        ("POST", GENERATE),
        ("GET", f"/api/v1/ai/streams/{stream_id}"),
    ], requests
    cursor = requests[1].last_event_id
    assert cursor is not None
    assert re.fullmatch(rf"{re.escape(stream_id)}:[2-9]\d*", cursor), cursor
    assert len(live.upstream.requests(mark)) == 1


# --- the proxy's cut points ----------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_the_cut_falls_after_whole_events_and_extra_bytes_whatever_the_chunks(split: int) -> None:
    """`Cutter` counts events across chunk boundaries (a blank line split in two included)."""
    frames = [f'id: s:{n}\ndata: {{"n":{n}}}\n\n'.encode() for n in range(1, 6)]
    wire = b"".join(frames[:2]) + b": ping\n" + b"".join(frames[2:])
    for cut, expected in [
        (Cut(1), frames[0]),
        (Cut(2), b"".join(frames[:2])),
        (Cut(3, extra=4), b"".join(frames[:2]) + b": ping\n" + frames[2] + frames[3][:4]),
    ]:
        cutter = Cutter(cut)
        sent = b""
        for start in range(0, len(wire), split):
            chunk = wire[start : start + split]
            allowed = cutter.allowed(chunk)
            sent += chunk if allowed is None else chunk[:allowed]
            if allowed is not None:
                break
        assert sent == expected, (cut, split)


# --- the admin page's Stop buttons, with a grace window ------------------------------------------


@pytest.mark.parametrize("tab", ["generate", "chat"])
def test_the_admin_pages_stop_cancels_the_generation_despite_the_grace(
    live: Live, browser: Browser, tab: str
) -> None:
    """With a grace window a closed connection alone would leave the generation running; the
    page's Stop ends it `cancelled` through the cancel route, and the upstream is closed."""
    mark = marker()
    route = {"route": f"{tab}_stream"}
    cancelled = live.sample("ai_stream_outcomes_total", outcome="cancelled", **route)
    for page in open_page(browser, f"{live.admin.url}/#{tab}"):
        if tab == "generate":
            page.fill("#prompt", f"Tell the story {mark}")
            page.click("#generate")
            page.wait_for_function("() => document.getElementById('output').textContent !== ''")
            page.click("#stop")
            page.wait_for_selector("#generate-status.stopped")
        else:
            page.fill("#chat-input", f"Tell the story {mark}")
            page.click("#send")
            page.wait_for_function(
                "() => (document.querySelector('#messages li.streaming')?.textContent ?? '')"
                ".includes('Once')"
            )
            page.click("#chat-stop")
            page.wait_for_function("() => !document.querySelector('#messages li.streaming')")
        [upstream] = live.upstream.requests(mark)
        poll(upstream.ended.is_set, "the upstream request to be closed")
        assert upstream.cancelled  # closed by the service before the story's end
        poll(
            lambda: (
                live.sample("ai_stream_outcomes_total", outcome="cancelled", **route)
                == cancelled + 1
            ),
            "the stream to end cancelled",
        )
        if tab == "chat":
            conversation = page.evaluate("localStorage.getItem('aiStream.conversationId')")
            saved = live.get(f"/api/v1/ai/conversations/{conversation}")["messages"]
            assert [m["status"] for m in saved] == ["complete", "partial"], saved
            assert TEXT.startswith(saved[1]["content"]), saved
            assert saved[1]["content"] != TEXT


# --- aiStream.js under Node: a pause past the grace window ---------------------------------------


def _lines(stream: Any) -> tuple[queue.Queue[str], threading.Thread]:
    """A process's output lines, read by a thread (ends at EOF), so each wait for one is
    bounded."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def test_ai_stream_paused_past_the_grace_gets_what_was_made_then_the_cancel(
    live: Live, node: str
) -> None:
    mark = marker()
    job = {
        "baseUrl": live.short_grace.url,
        "path": GENERATE,
        "body": body(GENERATE, mark),
        "then": "pause",
    }
    with subprocess.Popen(
        [node, str(CLIENTS_DIR / "ai_stream.mjs"), json.dumps(job)],
        cwd=CLIENTS_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        got = _pause_past_the_grace(live, proc, mark)
    # the events made before the grace ran out, then the terminal event of its expiry
    assert got["status"] == "error", got
    assert (got["error"]["code"], got["error"]["reason"]) == ("cancelled", "client_disconnect")
    assert TEXT.startswith(got["text"]), got
    assert len(got["text"]) < len(TEXT), got
    assert "".join(got["pieces"]) == got["text"]
    assert got["reconnects"] == []


def _pause_past_the_grace(live: Live, proc: subprocess.Popen[str], mark: str) -> Any:
    """Waits for the client's pause, then for the grace window to expire (the upstream closed),
    then resumes it; returns its report."""
    api, route = live.short_grace.url, {"route": "generate_stream"}
    expiries = metric(api, "ai_stream_grace_expiries_total", **route)
    assert proc.stdin is not None
    lines, reader = _lines(proc.stdout)
    try:
        paused = json.loads(lines.get(timeout=WAIT_S))
        assert paused["paused"] is True, paused
        # nobody reads: the grace window expires and the generation ends, upstream closed
        poll(
            lambda: metric(api, "ai_stream_grace_expiries_total", **route) == expiries + 1,
            "the grace window to expire",
        )
        [upstream] = live.upstream.requests(mark)
        poll(upstream.ended.is_set, "the upstream request to be closed")
        assert upstream.cancelled
        proc.stdin.write("resume\n")
        proc.stdin.flush()
        return json.loads(lines.get(timeout=WAIT_S))
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        reader.join(WAIT_S)
