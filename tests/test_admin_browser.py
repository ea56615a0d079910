"""The admin page in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser), against the real API and admin processes with the demo upstream at a slow pace.

Playwright's sync API owns this thread's event loop, so the service processes live on an asyncio
loop in a background thread; these tests are plain functions (no pytest-aiohttp loop).
Screenshots go to `artifacts/admin/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.demo_upstream import article_tokens
from service.prompts import extract_placeholders, generate_messages
from tests.conftest import tool_required
from tests.process import ROOT, ServiceProcess, free_port, service

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "artifacts" / "admin"
PACE = "30"  # demo tokens per second: slow enough to watch the text grow
CHAT_TOKENS = "40"
WAIT_MS = 15_000  # every browser wait is bounded by this
T = TypeVar("T")


class Background:
    """An asyncio loop in a thread that owns the service processes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def enter(self, cm: contextlib.AbstractAsyncContextManager[T]) -> T:
        return self.run(self.stack.enter_async_context(cm))

    def close(self) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@dataclass
class Stack:
    api: ServiceProcess
    admin: ServiceProcess

    @property
    def page_url(self) -> str:
        return self.admin.url + "/"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api.url + path, timeout=5) as resp:  # noqa: S310
            return json.loads(resp.read())

    def sample(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.api.url + "/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return float(sample.value)
        return 0.0


@contextlib.contextmanager
def running_stack(tmp: Path, **env: str) -> Iterator[Stack]:
    """The API and the admin page as two real processes, each told the other's port (so the
    API's default CORS origins are the page's, as in a real deployment)."""
    if not Path(CHROMIUM).exists():
        tool_required("chromium")
    api_port, admin_port = free_port(), free_port()
    ports = {"PORT": str(api_port), "ADMIN_PORT": str(admin_port)}
    background = Background()
    try:
        api = background.enter(
            service({"DEMO_TOKENS_PER_S": PACE, **env, **ports}, tmp, "api", api_port)
        )
        admin = background.enter(service({**env, **ports}, tmp, "admin", admin_port))
        yield Stack(api, admin)
    finally:
        background.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Chat answers are DEFAULT_MAX_TOKENS long: about 1.3 s each at the demo's pace.
    # The page's Stop cancels the stream through the API before it closes its request.
    tmp = tmp_path_factory.mktemp("admin")
    with running_stack(tmp, DEFAULT_MAX_TOKENS=CHAT_TOKENS, RESUME_GRACE_S="0") as running:
        yield running


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """The system Chromium, headless, for every browser test (a missing one skips, or fails
    with `CI=true`); closed however the block ends."""
    if not Path(CHROMIUM).exists():
        tool_required("chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@contextlib.contextmanager
def open_page(browser: Browser, url: str, *, phone: bool = False) -> Iterator[Page]:
    viewport: ViewportSize = (
        {"width": 390, "height": 844} if phone else {"width": 1280, "height": 900}
    )
    context = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", state="attached")
        yield page
        assert errors == [], errors  # no uncaught exception in the page's scripts
    finally:
        context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def demo_text(prompt: str, tokens: int) -> str:
    """What the demo upstream writes for this prompt: it is deterministic per topic."""
    return "".join(itertools.islice(article_tokens(generate_messages(prompt, [], []), 350), tokens))


def rendered_text(page: Page, markdown: str) -> str:
    """The text content of the page's own rendering of `markdown` (static/markdown.js)."""
    return str(
        page.evaluate(
            """async md => {
                const { renderMarkdown } = await import("./static/markdown.js");
                const template = document.createElement("template");
                template.innerHTML = renderMarkdown(md);
                return template.content.textContent;
            }""",
            markdown,
        )
    )


def shown_words(markdown: str) -> str:
    """The words a reader sees of the demo's Markdown (headings without their marks)."""
    return " ".join(re.sub(r"^#+ ", "", markdown, flags=re.MULTILINE).split())


def poll(check: Any, what: str, seconds: float = 10.0) -> None:
    """Poll `check()` until true, bounded (waiting on another process's counters)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# Records every length the output shows while the done metadata is still hidden.
RECORD_LENGTHS = """() => {
  window.__lengths = [];
  const output = document.getElementById("output");
  const meta = document.getElementById("meta");
  new MutationObserver(() => {
    if (meta.hidden) window.__lengths.push(output.textContent.length);
  }).observe(output, { characterData: true, childList: true, subtree: true });
}"""


def start_generation(page: Page, prompt: str, max_tokens: int) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#generate")


def output_longer_than(page: Page, chars: int) -> None:
    page.wait_for_function(
        "n => document.getElementById('output').textContent.length > n", arg=chars
    )


def test_generate_streams_text_as_it_is_written(stack: Stack, browser: Browser) -> None:
    prompt = "Write about <b>bold</b> <img src=x onerror=window.__xss=1> claims"
    expected = demo_text(prompt, 60)
    with open_page(browser, stack.page_url) as page:
        assert page.get_attribute("#tab-generate", "aria-selected") == "true"
        assert page.input_value("#model") == "demo-writer-1"
        page.evaluate(RECORD_LENGTHS)
        start_generation(page, prompt, 60)
        output_longer_than(page, 120)
        screenshot(page, "generate-streaming")
        page.wait_for_selector("#meta:not([hidden])")
        screenshot(page, "generate-done")

        text = page.text_content("#output") or ""
        assert text == rendered_text(page, expected)  # the whole answer, rendered as Markdown
        assert page.text_content("#output h1") == (
            "<b>bold</b> <img src=x onerror=window.__xss=1> claims"
        )
        assert page.locator("#output h2").count() >= 1
        intermediate = {n for n in page.evaluate("window.__lengths") if 0 < n < len(expected)}
        assert len(intermediate) >= 3, intermediate
        summary = page.text_content("#meta-summary") or ""
        assert re.fullmatch(r"Generated 60 tokens in \d+ ms", summary), summary
        assert page.text_content("#meta-model") == "demo-writer-1"
        placeholders = page.locator("#meta-placeholders li").all_text_contents()
        assert placeholders == extract_placeholders(expected)
        assert placeholders == [
            "[[image: a picture of <b>bold</b> <img src=x onerror=window.__xss=1> claims]]"
        ]
        assert page.text_content("#stat-tokens") == "60"
        assert page.evaluate(
            "[document.getElementById('progress-bar').value, "
            "document.getElementById('progress-bar').max]"
        ) == [60, 60]
        assert page.text_content("#generate-status") == "Done."
        # the HTML in the model's text was shown as text: only Markdown's own elements, no
        # element made from the HTML, no script run
        assert "<b>bold</b>" in text
        tags = page.evaluate("[...document.querySelectorAll('#output *')].map(e => e.tagName)")
        assert set(tags) == {"H1", "H2", "P"}, tags
        assert page.evaluate("window.__xss") is None
        assert page.is_enabled("#generate")
        assert not page.is_enabled("#stop")


def test_stop_cancels_the_stream_and_the_server_cancels_the_upstream(
    stack: Stack, browser: Browser
) -> None:
    route = {"route": "generate_stream"}
    before = stack.sample("ai_stream_outcomes_total", outcome="cancelled", **route)
    dropped = stack.sample("ai_stream_outcomes_total", outcome="client_disconnect", **route)
    prompt = "Write a long article about tidal energy"
    with open_page(browser, stack.page_url) as page:
        start_generation(page, prompt, 300)  # ten seconds at the demo's pace
        output_longer_than(page, 30)
        page.click("#stop")
        page.wait_for_selector("#generate-status.stopped")
        status = page.text_content("#generate-status") or ""
        assert re.fullmatch(r"Stopped after \d+ tokens\.", status), status

        poll(
            lambda: (
                stack.sample("ai_stream_outcomes_total", outcome="cancelled", **route) == before + 1
            ),
            "the API to record the stream cancelled",
        )
        # stopped through the cancel route, not by the connection closing
        assert stack.sample("ai_stream_outcomes_total", outcome="client_disconnect", **route) == (
            dropped
        )
        poll(lambda: stack.sample("ai_stream_streams_active", **route) == 0, "no open stream")
        kept = shown_words(page.text_content("#output") or "")
        assert kept
        assert shown_words(demo_text(prompt, 300)).startswith(kept)
        assert len(kept) < len(shown_words(demo_text(prompt, 300)))
        assert page.is_hidden("#meta")
        assert page.is_enabled("#generate")
        assert not page.is_enabled("#stop")
        screenshot(page, "generate-stopped")
    assert stack.sample("ai_stream_outcomes_total", outcome="completed", **route) >= 1


def test_phone_sized_screen(stack: Stack, browser: Browser) -> None:
    with open_page(browser, stack.page_url, phone=True) as page:
        start_generation(page, "Write about rock pools", 40)
        page.wait_for_selector("#meta:not([hidden])")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#prompt", "#generate", "#stop", "#output", "#tab-chat", "#meta"):
            box = page.locator(selector).bounding_box()
            assert box is not None, selector
            assert box["x"] >= 0, selector
            assert box["x"] + box["width"] <= 390, selector
        screenshot(page, "phone-generate")


def test_errors_are_shown_with_their_code_and_partial_text_kept(
    tmp_path: Path, browser: Browser
) -> None:
    key = "sk-admin-browser-test-1"
    env = {"API_KEYS": key, "MAX_STREAM_S": "1.5"}
    prompt = "Write about lighthouse keepers"
    with running_stack(tmp_path, **env) as stack, open_page(browser, stack.page_url) as page:
        # The API needs a key: the page says so and opens the key field.
        assert page.get_attribute("#settings", "open") is not None
        start_generation(page, prompt, 300)
        page.wait_for_selector("#generate-status.error")
        assert page.text_content("#generate-status") == (
            "Error (unauthorized): A valid API key is required (Authorization: Bearer)."
        )
        assert page.text_content("#output") == ""
        screenshot(page, "error-unauthorized")

        page.fill("#api-key", key)
        page.click("#generate")
        output_longer_than(page, 10)
        page.wait_for_selector("#generate-status.error")
        status = page.text_content("#generate-status") or ""
        assert status.startswith("Error (timeout): ")
        assert status.endswith(" The text received so far is kept below.")
        kept = shown_words(page.text_content("#output") or "")
        assert kept
        assert shown_words(demo_text(prompt, 300)).startswith(kept)
        assert page.is_hidden("#meta")
        screenshot(page, "error-timeout-partial")
        outcome = {"route": "generate_stream", "outcome": "total_timeout"}
        assert stack.sample("ai_stream_outcomes_total", **outcome) == 1

        page.reload()
        page.wait_for_selector("body[data-ready=true]", state="attached")
        assert page.input_value("#api-key") == key  # kept in local storage


def chat_text(message: str) -> str:
    """The demo upstream's answer to a chat message (it writes about the last user message)."""
    messages = [{"role": "user", "content": message}]
    return "".join(itertools.islice(article_tokens(messages, 350), int(CHAT_TOKENS)))


def send_chat(page: Page, message: str, messages_after: int) -> None:
    page.fill("#chat-input", message)
    page.click("#send")
    page.wait_for_function(
        """n => document.querySelectorAll('#messages li').length === n
            && !document.querySelector('#messages li.streaming')
            && !document.getElementById('send').disabled""",
        arg=messages_after,
    )


def shown_messages(page: Page) -> list[tuple[str, str, str]]:
    return [
        (
            item.get_attribute("class") or "",
            item.locator(".body").text_content() or "",
            item.locator(".note").text_content() or "",
        )
        for item in page.locator("#messages li").all()
    ]


def test_chat_keeps_its_history_across_a_reload(stack: Stack, browser: Browser) -> None:
    first, second = "Tell me about baby sleep patterns", "Explain night feeds"
    with open_page(browser, stack.page_url + "#chat") as page:
        expected = [  # answers rendered as Markdown
            ("message user", first, ""),
            ("message assistant", rendered_text(page, chat_text(first)), f"{CHAT_TOKENS} tokens"),
            ("message user", second, ""),
            ("message assistant", rendered_text(page, chat_text(second)), f"{CHAT_TOKENS} tokens"),
        ]
        assert page.is_visible("#panel-chat")
        assert page.is_hidden("#panel-generate")
        assert page.text_content("#conversation-label") == "New conversation"
        send_chat(page, first, 2)
        match = re.search(r"[?&]conversation=(c_[A-Za-z0-9_-]+)", page.url)
        assert match is not None, page.url
        conversation = match.group(1)
        assert page.text_content("#conversation-label") == f"Conversation {conversation}"
        send_chat(page, second, 4)
        assert shown_messages(page) == expected
        assert conversation in page.url  # the second turn stayed in the same conversation
        screenshot(page, "chat")

        page.reload()
        page.wait_for_selector("body[data-ready=true]", state="attached")
        page.wait_for_function("() => document.querySelectorAll('#messages li').length === 4")
        assert shown_messages(page) == expected
        assert page.text_content("#conversation-label") == f"Conversation {conversation}"
        saved = stack.get(f"/api/v1/ai/conversations/{conversation}")
        assert [(m["role"], m["content"], m["status"]) for m in saved["messages"]] == [
            ("user", first, "complete"),
            ("assistant", chat_text(first), "complete"),
            ("user", second, "complete"),
            ("assistant", chat_text(second), "complete"),
        ]

        # Without the id in the URL, local storage brings the same conversation back.
        page.goto(stack.page_url + "#chat")
        page.wait_for_function("() => document.querySelectorAll('#messages li').length === 4")
        assert shown_messages(page) == expected
        assert conversation in page.url

        page.click("#new-conversation")
        assert page.locator("#messages li").count() == 0
        assert page.text_content("#conversation-label") == "New conversation"
        assert "conversation=" not in page.url
        assert page.evaluate("localStorage.getItem('aiStream.conversationId')") is None

    # A shared link opens the conversation on another device (here a phone-sized one).
    link = f"{stack.page_url}?conversation={conversation}#chat"
    with open_page(browser, link, phone=True) as phone:
        phone.wait_for_function("() => document.querySelectorAll('#messages li').length === 4")
        assert shown_messages(phone) == expected
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(phone, "phone-chat")
