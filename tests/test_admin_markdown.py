"""The admin page's Markdown rendering, finish reasons and per-turn models, in Debian's Chromium.

The real API and admin processes run against the scripted upstream (tests/fake_upstream.py), so a
test chooses the exact Markdown the model writes, holds the answer at a gate to look at the page
mid-stream, and ends it with the finish reason it wants. Screenshots go to `artifacts/admin/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.sync_api import Browser, Page

from bench import render
from tests.conftest import tool_required
from tests.fake_upstream import Done, FakeUpstream, Finish, Gate, Step, Text, Usage, running
from tests.process import free_port, service
from tests.test_admin_browser import (
    CHROMIUM,
    Background,
    Stack,
    chromium,
    open_page,
    rendered_text,
    screenshot,
    send_chat,
)

MODELS = ("test-model", "other-model")

# Everything a streamed answer should show as Markdown, in two halves: the gate between them
# holds the answer mid-paragraph so the page can be looked at while it streams.
FIRST = (
    "# Tide pools\n\n"
    "Some *emphasis*, some **strong** words and a [guide](https://example.com/guide).\n\n"
    "- anemones\n- crabs\n\n"
    "```python\nprint('low tide')\n\nprint('high tide')\n```\n\n"
    "1. look\n2. wait\n\n"
    "Still writ"
)
SECOND = "ing this line.\n\n## Second heading\n\n> a quote\n\nThe end."


@dataclass
class Recorder:
    """A loopback server that records every request made to it (model text must cause none)."""

    url: str
    paths: list[str]


@dataclass
class MarkdownStack:
    stack: Stack
    fake: FakeUpstream
    background: Background
    recorder: Recorder

    def release(self, gate: asyncio.Event) -> None:
        self.background.loop.call_soon_threadsafe(gate.set)


@contextlib.asynccontextmanager
async def recording_server() -> Any:
    paths: list[str] = []

    async def record(request: web.Request) -> web.Response:
        paths.append(request.path_qs)
        return web.Response(body=b"", content_type="image/png")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Recorder(f"http://127.0.0.1:{runner.addresses[0][1]}", paths)
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def md_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MarkdownStack]:
    if not Path(CHROMIUM).exists():
        tool_required("chromium")
    tmp = tmp_path_factory.mktemp("admin-markdown")
    api_port, admin_port = free_port(), free_port()
    background = Background()
    try:
        fake = background.enter(running())
        recorder = background.enter(recording_server())
        env = {
            "PORT": str(api_port),
            "ADMIN_PORT": str(admin_port),
            "OPENAI_BASE_URL": fake.url,
            "OPENAI_API_KEY": "sk-upstream-test",
            "OPENAI_MODEL": MODELS[0],
            "ALLOWED_MODELS": ",".join(MODELS),
            "RESUME_GRACE_S": "0",
        }
        api = background.enter(service(env, tmp, "api", api_port))
        admin = background.enter(service(env, tmp, "admin", admin_port))
        yield MarkdownStack(Stack(api, admin), fake, background, recorder)
    finally:
        background.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def tokens(text: str) -> list[Step]:
    """The text as a model streams it: a word (with its spacing) per chunk."""
    return [Text(t) for t in re.findall(r"\s*\S+\s*|\s+", text)]


def ending(reason: str = "stop") -> list[Step]:
    return [Finish(reason), Usage(9, 20), Done()]


def wait_done(page: Page, pane: str) -> None:
    if pane == "generate":
        page.wait_for_selector("#meta:not([hidden])")
        page.wait_for_function("() => !document.getElementById('generate').disabled")
    else:
        page.wait_for_function(
            """() => !document.querySelector('#messages li.streaming')
                && !document.getElementById('send').disabled"""
        )


def start(page: Page, pane: str, text: str) -> None:
    if pane == "generate":
        page.fill("#prompt", text)
        page.click("#generate")
    else:
        page.fill("#chat-input", text)
        page.click("#send")


PANES = {"generate": "#output", "chat": "#messages li.assistant:last-child .body"}

SAME_AS_WHOLE = """async ([selector, md]) => {
  const { renderMarkdown } = await import("./static/markdown.js");
  const shown = document.querySelector(selector).cloneNode(true);
  shown.querySelectorAll(".cursor").forEach(cursor => cursor.remove());
  return shown.innerHTML === renderMarkdown(md);
}"""

MARKDOWN_ELEMENTS = (
    "h1",
    "ul > li",
    "ol > li",
    "pre > code",
    "a[href='https://example.com/guide']",
    "em",
    "strong",
)


@pytest.mark.parametrize("pane", ["generate", "chat"])
def test_answers_render_as_markdown_while_they_stream(
    md_stack: MarkdownStack, browser: Browser, pane: str
) -> None:
    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    md_stack.fake.queue(
        [Gate(first), *tokens(FIRST), Gate(second), *tokens(SECOND), Gate(third), *ending()]
    )
    answer = PANES[pane]
    with open_page(browser, md_stack.stack.page_url + ("#chat" if pane == "chat" else "")) as page:
        start(page, pane, "Write about tide pools")
        # before the first token: the typing indicator, no text, no cursor
        page.wait_for_selector(f"{answer} > .typing")
        assert page.text_content(answer) == ""
        assert page.locator(f"{answer} .cursor").count() == 0
        md_stack.release(first)

        # mid-stream: every element so far, the cursor at the end of the unfinished paragraph
        page.wait_for_selector(f"{answer} p:last-of-type .cursor")
        page.wait_for_function(
            "sel => document.querySelector(sel).textContent.trimEnd().endsWith('Still writ')",
            arg=answer,
        )
        for selector in MARKDOWN_ELEMENTS:
            assert page.locator(f"{answer} {selector}").count() >= 1, selector
        assert page.locator(f"{answer} .typing").count() == 0
        assert page.locator(f"{answer} .cursor").count() == 1
        assert page.locator(f"{answer} ul > li").all_text_contents() == ["anemones", "crabs"]
        code = page.text_content(f"{answer} pre > code")
        assert code == "print('low tide')\n\nprint('high tide')\n"
        screenshot(page, f"markdown-{pane}-streaming")
        md_stack.release(second)

        # all the text in, not yet ended: the frozen blocks and the re-rendered tail together
        # are exactly the rendering of the whole text
        page.wait_for_function(
            "s => document.querySelector(s).textContent.trimEnd().endsWith('The end.')",
            arg=answer,
        )
        assert page.evaluate(SAME_AS_WHOLE, [answer, FIRST + SECOND]) is True
        md_stack.release(third)

        wait_done(page, pane)
        assert page.locator(f"{answer} .cursor").count() == 0
        assert page.locator(f"{answer} .typing").count() == 0
        assert page.evaluate(SAME_AS_WHOLE, [answer, FIRST + SECOND]) is True
        assert page.text_content(f"{answer} h2") == "Second heading"
        assert page.text_content(f"{answer} blockquote") == "\na quote\n"
        assert page.text_content(answer) == rendered_text(page, FIRST + SECOND)
        screenshot(page, f"markdown-{pane}-done")


# Animation frames run by hand: requestAnimationFrame only queues its callback.
MANUAL_FRAMES = """() => {
  window.__frames = [];
  window.requestAnimationFrame = callback => window.__frames.push(callback);
  window.cancelAnimationFrame = id => { if (id) window.__frames[id - 1] = () => {}; };
}"""
RUN_FRAMES = "() => window.__frames.splice(0).forEach(callback => callback(performance.now()))"


def test_rendering_waits_for_the_next_frame_however_many_tokens_arrive(
    md_stack: MarkdownStack, browser: Browser
) -> None:
    gate = asyncio.Event()
    first = tokens(FIRST)
    md_stack.fake.queue([*first, Gate(gate), *tokens(SECOND), *ending()])
    with open_page(browser, md_stack.stack.page_url) as page:
        page.evaluate(MANUAL_FRAMES)
        start(page, "generate", "Write about tide pools")
        page.wait_for_function(
            "n => document.getElementById('stat-tokens').textContent === String(n)",
            arg=len(first),
        )
        # every token is in, one frame is pending, nothing is rendered before it runs
        assert page.evaluate("window.__frames.length") == 1
        assert page.evaluate("document.getElementById('output').innerHTML") == (
            '<span class="typing" role="status" aria-label="Writing…">'
            "<span></span><span></span><span></span></span>"
        )
        page.evaluate(RUN_FRAMES)
        assert page.text_content("#output h1") == "Tide pools"
        assert page.locator("#output .cursor").count() == 1
        assert page.evaluate("window.__frames.length") == 0
        md_stack.release(gate)
        wait_done(page, "generate")  # the end renders the whole text without waiting for a frame
        assert page.evaluate(SAME_AS_WHOLE, ["#output", FIRST + SECOND]) is True


PAYLOAD = """\
<script>window.__xss = 1</script>

<img src="{rec}/raw-img.png" onerror="window.__xss = 2">

[js](javascript:window.__xss=3) [JS](JaVaScRiPt:window.__xss=3)
[data](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX194c3M9NDwvc2NyaXB0Pg==)
[vb](vbscript:msgbox) <javascript:window.__xss=5>

![tracker]({rec}/track.png) ![inline](data:image/png;base64,iVBORw0KGgo=)

[![nested]({rec}/nested.png)]({rec}/clicked-only)

<a href="javascript:window.__xss=6">a</a> <svg onload="window.__xss=7"></svg>
<iframe src="{rec}/frame"></iframe> <style>body {{ background: url({rec}/bg.png) }}</style>
<div style="background: url({rec}/inline-style.png)">styled</div>

[reference][ref] and [data ref][dref]

[ref]: javascript:window.__xss=8
[dref]: data:text/html,<script>window.__xss=9</script>
"""

HARMLESS = """() => {
  const root = document.querySelector("main");
  const all = [...root.querySelectorAll("#output *, #messages *")];
  return {
    xss: window.__xss ?? null,
    made: all.filter(e => ["IMG", "SCRIPT", "IFRAME", "SVG", "STYLE", "OBJECT", "EMBED"]
      .includes(e.tagName.toUpperCase())).length,
    handlers: all.filter(e => [...e.attributes].some(a => /^on/i.test(a.name))).length,
    styled: all.filter(e => e.hasAttribute("style")).length,
    hrefs: all.filter(e => e.hasAttribute("href")).map(e => e.getAttribute("href")),
    images: [...root.querySelectorAll(".image-link")].map(e => e.textContent),
  };
}"""


@pytest.mark.parametrize("pane", ["generate", "chat"])
def test_model_text_cannot_run_script_or_make_the_browser_call_a_url(
    md_stack: MarkdownStack, browser: Browser, pane: str
) -> None:
    rec = md_stack.recorder
    payload = PAYLOAD.format(rec=rec.url)
    gate = asyncio.Event()
    half = payload.index("[reference]")
    md_stack.fake.queue([*tokens(payload[:half]), Gate(gate), *tokens(payload[half:]), *ending()])
    answer = PANES[pane]
    with open_page(browser, md_stack.stack.page_url + ("#chat" if pane == "chat" else "")) as page:
        start(page, pane, "Write something harmless")
        page.wait_for_selector(f"{answer} .cursor")
        page.wait_for_function(
            "sel => document.querySelector(sel).textContent.includes('styled')", arg=answer
        )
        seen = [page.evaluate(HARMLESS)]  # mid-stream (frozen blocks and the tail)
        md_stack.release(gate)
        wait_done(page, pane)
        seen.append(page.evaluate(HARMLESS))
        screenshot(page, f"markdown-{pane}-hostile")
        # a request the page makes now arrives after any the rendering would have made
        page.evaluate("url => fetch(url, { mode: 'no-cors' })", rec.url + "/sentinel")
        page.wait_for_function(
            "() => performance.getEntriesByType('resource').some(e => e.name.endsWith('/sentinel'))"
        )
        text = page.text_content(answer) or ""

    assert rec.paths == ["/sentinel"]
    rec.paths.clear()
    for state in seen:
        assert state["xss"] is None, state
        assert state["made"] == 0, state
        assert state["handlers"] == 0, state
        assert state["styled"] == 0, state
        for href in state["hrefs"]:
            assert href.startswith(("https://", "http://")), state
    assert seen[1]["hrefs"] == [f"{rec.url}/track.png", f"{rec.url}/clicked-only"]
    assert seen[1]["images"] == ["image: tracker", "image: nested"]
    # raw HTML is shown as the text it is
    assert "<script>window.__xss = 1</script>" in text
    assert '<img src="' in text
    assert "<javascript:window.__xss=5>" in text
    # links and images to a refused scheme stay the Markdown they were
    assert "[js](javascript:window.__xss=3)" in text
    assert "![inline](data:image/png;base64,iVBORw0KGgo=)" in text
    assert "[ref]: javascript:window.__xss=8" in text


def conversation_in(page: Page) -> str:
    match = re.search(r"[?&]conversation=(c_[A-Za-z0-9_-]+)", page.url)
    assert match is not None, page.url
    return match.group(1)


def reload_chat(page: Page, messages: int) -> None:
    page.reload()
    page.wait_for_selector("body[data-ready=true]", state="attached")
    page.wait_for_function(
        "n => document.querySelectorAll('#messages li').length === n", arg=messages
    )


CUT_AT_LIMIT = "Cut short: the answer reached its token limit (finish reason: length)."
FILTERED = (
    "Cut short: the model server's content filter stopped the answer "
    "(finish reason: content_filter)."
)


def test_an_answer_the_model_did_not_end_says_why(
    md_stack: MarkdownStack, browser: Browser
) -> None:
    fake = md_stack.fake
    with open_page(browser, md_stack.stack.page_url) as page:
        fake.queue([*tokens("An answer cut at its"), *ending("length")])
        start(page, "generate", "Write at length")
        wait_done(page, "generate")
        assert page.text_content("#generate-finish") == CUT_AT_LIMIT
        assert page.is_visible("#generate-finish")
        assert page.text_content("#meta-finish") == "length"
        assert page.text_content("#generate-status") == "Done."
        screenshot(page, "finish-length-generate")

        fake.queue([*tokens("A whole answer."), *ending("stop")])
        start(page, "generate", "Write briefly")
        wait_done(page, "generate")
        assert page.is_hidden("#generate-finish")
        assert page.text_content("#meta-finish") == "stop"

    with open_page(browser, md_stack.stack.page_url + "#chat") as page:
        fake.queue(
            [*tokens("Something the filter"), *ending("content_filter")],
            [*tokens("At its"), *ending("length")],
            [*tokens("A whole answer."), *ending("stop")],
        )
        for n, message in enumerate(("Filtered?", "Long?", "Short?"), 1):
            send_chat(page, message, 2 * n)
        expected = [FILTERED, CUT_AT_LIMIT, ""]
        assert page.locator("#messages li.assistant .finish").all_text_contents() == expected
        screenshot(page, "finish-reasons-chat")
        conversation = conversation_in(page)
        reload_chat(page, 6)  # the saved history says the same
        assert page.locator("#messages li.assistant .finish").all_text_contents() == expected
    saved = md_stack.stack.get(f"/api/v1/ai/conversations/{conversation}")["messages"]
    finish = [m["finishReason"] for m in saved if m["role"] == "assistant"]
    assert finish == ["content_filter", "length", "stop"]


def test_each_chat_turn_is_written_by_the_model_picked_for_it(
    md_stack: MarkdownStack, browser: Browser
) -> None:
    fake = md_stack.fake
    fake.queue([*tokens("From the first model."), *ending()])
    fake.queue([*tokens("From the second model."), *ending()])
    with open_page(browser, md_stack.stack.page_url + "#chat") as page:
        options = page.locator("#chat-model option").all_text_contents()
        assert options == sorted(MODELS)
        assert page.input_value("#chat-model") == "test-model"  # OPENAI_MODEL by default
        send_chat(page, "First question", 2)
        page.select_option("#chat-model", "other-model")
        send_chat(page, "Second question", 4)
        asked = [seen.body["model"] for seen in fake.seen[-2:]]
        assert asked == ["test-model", "other-model"]
        labels = page.locator("#messages li.assistant .who .model").all_text_contents()
        assert labels == ["test-model", "other-model"]
        screenshot(page, "chat-models")
        conversation = conversation_in(page)
        reload_chat(page, 4)  # the history shows which model wrote each answer
        labels = page.locator("#messages li.assistant .who .model").all_text_contents()
        assert labels == ["test-model", "other-model"]
        bodies = page.locator("#messages li.assistant .body").all_text_contents()
        assert [b.strip() for b in bodies] == ["From the first model.", "From the second model."]
    saved = md_stack.stack.get(f"/api/v1/ai/conversations/{conversation}")["messages"]
    assert [m["model"] for m in saved if m["role"] == "assistant"] == ["test-model", "other-model"]


def test_the_render_bench_streams_a_whole_article_into_the_page(browser: Browser) -> None:
    """`python -m bench.render`, short and fast: the page ends showing the whole article as
    Markdown and Chromium's metrics are read (the README's figure is a full run, not asserted)."""
    result = render.run(tokens=200, rate=1000, browser=browser)
    assert result.rendered_ok
    assert result.tokens == 200
    assert result.task_s > 0
    assert result.busy_share > 0


TABLE = "| left | centre | right |\n|:--|:-:|--:|\n| 1 | 2 | 3 |\n"


def test_tables_keep_their_alignment_under_the_pages_policy(
    md_stack: MarkdownStack, browser: Browser
) -> None:
    """Column alignment shows through classes: the page refuses inline styles, and nothing in a
    rendered answer makes it refuse anything (no policy violation at all)."""
    with open_page(browser, md_stack.stack.page_url) as page:
        shown = page.evaluate(
            """async (md) => {
              const violations = [];
              document.addEventListener("securitypolicyviolation",
                (e) => violations.push(e.violatedDirective));
              const { MarkdownView } = await import("./static/markdown.js");
              const view = new MarkdownView(document.getElementById("output"));
              view.start();
              view.append(md);
              await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
              const streamed = [...document.querySelectorAll("#output td")]
                .map((td) => getComputedStyle(td).textAlign);
              view.end();
              const ended = [...document.querySelectorAll("#output td")]
                .map((td) => getComputedStyle(td).textAlign);
              // a violation is reported in a task after the one that caused it
              await new Promise((done) => setTimeout(done, 0));
              return { streamed, ended, violations };
            }""",
            TABLE,
        )
    assert shown["streamed"] == ["left", "center", "right"]
    assert shown["ended"] == ["left", "center", "right"]
    assert shown["violations"] == []


def test_chat_questions_stay_plain_text_live_and_saved(
    md_stack: MarkdownStack, browser: Browser
) -> None:
    """Only answers are Markdown: what the user typed is shown as typed, never as markup."""
    question = (
        "# Not a heading *nor emphasis* <img src=x onerror=window.__xss=1> [l](https://e.example)"
    )
    shown = """() => [...document.querySelectorAll('#messages li.user .body')]
        .map(b => ({ text: b.textContent, elements: b.childElementCount }))"""
    md_stack.fake.queue([*tokens("# An answer"), *ending()])
    with open_page(browser, md_stack.stack.page_url + "#chat") as page:
        send_chat(page, question, 2)
        assert page.evaluate(shown) == [{"text": question, "elements": 0}]
        assert page.locator("#messages li.assistant .body h1").count() == 1
        reload_chat(page, 2)  # the saved history shows it the same way
        assert page.evaluate(shown) == [{"text": question, "elements": 0}]
        assert page.evaluate("window.__xss ?? null") is None
