"""`python -m bench.render`: how busy the admin page's main thread is while an article streams in.

Starts the demo upstream (`service.demo_upstream`, `--tokens` long at `--rate` tokens per second),
the API pointed at it and the admin page, opens the page in Debian's Chromium (headless, driven by
Playwright, as the browser tests do), generates one article of `--tokens` tokens and reads the
DevTools Protocol's `Performance.getMetrics` before and after: `TaskDuration` (all main-thread
task time: script, style, layout, paint setup) over the wall time of the stream is the busy
share; `ScriptDuration`, `LayoutDuration` and `RecalcStyleDuration` say where it went. Long tasks
(over 50 ms, the Long Tasks API) are counted too. At the end it checks that the page shows
exactly the page's own Markdown rendering of the whole article (the demo's text is known).

Defaults are the README's figure: 10,000 tokens at 50 tokens/s (about 3.5 minutes). A short run:
`python -m bench.render --tokens 300 --rate 500`. Prints one JSON object (and writes it to
`bench/results/render-<UTC>.json` unless `--no-save`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Child, child_env, free_port
from service.demo_upstream import article_tokens
from service.prompts import generate_messages

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PROMPT = "Write a long article about rendering Markdown while it streams"
RESULTS = ROOT / "bench" / "results"

LONG_TASKS = """() => {
  window.__longTasks = [];
  new PerformanceObserver(list => {
    for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
  }).observe({ type: "longtask", buffered: true });
}"""

RENDERED = """md => import("./static/markdown.js").then(({ renderMarkdown }) => {
  const template = document.createElement("template");
  template.innerHTML = renderMarkdown(md);
  return template.content.textContent === document.getElementById("output").textContent;
})"""


@dataclass(frozen=True)
class Result:
    tokens: int
    rate: float
    wall_s: float
    busy_share: float  # main-thread task time / wall time while the article streamed
    task_s: float
    script_s: float
    layout_s: float
    style_s: float
    long_tasks: int
    long_task_max_ms: float
    rendered_ok: bool
    chromium: str


def article(tokens: int) -> str:
    """What the demo upstream writes for PROMPT, `tokens` long (its text is deterministic)."""
    messages = generate_messages(PROMPT, [], [])
    return "".join(itertools.islice(article_tokens(messages, tokens), tokens))


@contextlib.contextmanager
def stack(tokens: int, rate: float, logs: Path) -> Iterator[str]:
    """The demo upstream, the API and the admin page as processes; yields the page's URL."""
    upstream_port, api_port, admin_port = free_port(), free_port(), free_port()
    py = sys.executable
    env = child_env(
        {
            "PORT": str(api_port),
            "ADMIN_PORT": str(admin_port),
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "OPENAI_API_KEY": "sk-bench-render",
            "OPENAI_MODEL": "demo-writer-1",
            "MAX_TOKENS_LIMIT": str(max(tokens, 16_384)),
            "MAX_STREAM_S": str(int(tokens / rate * 2 + 600)),
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_CONCURRENT": "0",
            "RATE_LIMIT_TPM": "0",
            "CHAT_DB_PATH": str(logs / "conversations.db"),
        }
    )
    demo = [py, "-m", "service.demo_upstream", "--port", str(upstream_port)]
    demo += ["--tokens-per-s", str(rate), "--length", str(tokens)]
    children: list[Child] = []
    try:
        for name, argv, url in (
            ("upstream", demo, f"http://127.0.0.1:{upstream_port}/v1/models"),
            ("api", [py, "-m", "service", "api"], f"http://127.0.0.1:{api_port}/health"),
            ("admin", [py, "-m", "service", "admin"], f"http://127.0.0.1:{admin_port}/health"),
        ):
            child = Child(name, argv, log=logs / f"{name}.log", env=env)
            children.append(child)
            child.wait_http(url, 30)
        yield f"http://127.0.0.1:{admin_port}/"
    finally:
        for child in reversed(children):
            child.stop(grace_s=10)


def metrics(cdp: Any) -> dict[str, float]:
    return {m["name"]: float(m["value"]) for m in cdp.send("Performance.getMetrics")["metrics"]}


def run(tokens: int, rate: float, browser: Browser | None = None) -> Result:
    """Stream one `tokens`-long article at `rate` tokens/s into the page and measure it, in
    `browser` or in a Chromium of its own."""
    if browser is None:
        with sync_playwright() as pw:
            own = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                return run(tokens, rate, own)
            finally:
                own.close()
    with (
        tempfile.TemporaryDirectory(prefix="bench-render-") as tmp,
        stack(tokens, rate, Path(tmp)) as url,
    ):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", state="attached")
            page.evaluate(LONG_TASKS)
            cdp = context.new_cdp_session(page)
            cdp.send("Performance.enable", {"timeDomain": "timeTicks"})
            page.fill("#prompt", PROMPT)
            page.fill("#max-tokens", str(tokens))
            before, started = metrics(cdp), time.monotonic()
            page.click("#generate")
            page.wait_for_selector("#meta:not([hidden])", timeout=(tokens / rate * 3 + 60) * 1000)
            after, wall = metrics(cdp), time.monotonic() - started
            long_tasks = [float(d) for d in page.evaluate("window.__longTasks")]
            ok = bool(page.evaluate(RENDERED, article(tokens)))
        finally:
            context.close()

    def spent(name: str) -> float:
        return round(after[name] - before[name], 3)

    return Result(
        tokens=tokens,
        rate=rate,
        wall_s=round(wall, 2),
        busy_share=round(spent("TaskDuration") / wall, 4),
        task_s=spent("TaskDuration"),
        script_s=spent("ScriptDuration"),
        layout_s=spent("LayoutDuration"),
        style_s=spent("RecalcStyleDuration"),
        long_tasks=len(long_tasks),
        long_task_max_ms=round(max(long_tasks, default=0.0), 1),
        rendered_ok=ok,
        chromium=browser.version,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__)
    parser.add_argument("--tokens", type=int, default=10_000, help="article length in tokens")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    result = run(args.tokens, args.rate)
    text = json.dumps(asdict(result), indent=2)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (RESULTS / f"render-{stamp}.json").write_text(text + "\n")
    return 0 if result.rendered_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
