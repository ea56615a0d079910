// Unit tests for the admin page's Markdown rendering (service/admin/static/markdown.js): the
// rules that keep model text harmless, and where the streaming view freezes blocks. Run by Node's
// built-in runner (tests/test_admin_js.py); the browser tests cover the DOM side.
import assert from "node:assert/strict";
import { test } from "node:test";

import { MarkdownView, renderMarkdown, safeLink } from "../../service/admin/static/markdown.js";

test("only http(s), mailto and scheme-less links are live", () => {
  for (const url of ["https://example.com/a", "http://x", "MAILTO:a@b.c", "/docs", "#top", "a/b"]) {
    assert.equal(safeLink(url), true, url);
  }
  for (const url of ["javascript:alert(1)", " JaVaScRiPt:x", "data:text/html,x", "vbscript:x", "file:///etc"]) {
    assert.equal(safeLink(url), false, url);
  }
});

test("raw HTML, refused links and images never become markup that acts", () => {
  const html = renderMarkdown(
    '<script>alert(1)</script>\n\n<img src=x onerror="alert(2)">\n\n' +
      "[a](javascript:alert(3)) <javascript:alert(4)> ![t](http://127.0.0.1:9/t.png) " +
      "![d](data:image/png;base64,AAAA) [![n](http://h/n.png)](https://h/page)\n",
  );
  assert.doesNotMatch(html, /<(script|img|iframe|svg|style)\b/i);
  assert.doesNotMatch(html, /<[^>]*\son\w+=/i); // no handler attribute on any tag
  assert.deepEqual(
    [...html.matchAll(/href="([^"]*)"/g)].map((m) => m[1]),
    ["http://127.0.0.1:9/t.png", "https://h/page"],
  );
  assert.match(html, /<a class="image-link" href="http:\/\/127.0.0.1:9\/t.png"[^>]*>image: t<\/a>/);
  assert.match(html, /<span class="image-link">image: n<\/span>/);
  assert.match(html, /&lt;script&gt;alert\(1\)&lt;\/script&gt;/);
});

test("links open in a new tab with no referrer", () => {
  assert.equal(
    renderMarkdown("[x](https://example.com)"),
    '<p><a href="https://example.com" target="_blank" rel="noopener noreferrer nofollow">x</a></p>\n',
  );
});

// Where the view would freeze: the text before the last unindented line after a blank line,
// never inside a code fence, never before an indented continuation.
const cutOf = (text) => {
  const view = new MarkdownView(null);
  view.text = text;
  view.scan();
  return view.cut;
};

test("blocks freeze at blank lines outside code fences", () => {
  assert.equal(cutOf("# Title\n\nPara"), 0); // the last line is not complete yet
  assert.equal(cutOf("# Title\n\nPara\n"), "# Title\n\n".length);
  assert.equal(cutOf("a\n\n```\ncode\n\nmore\n"), "a\n\n".length);
  assert.equal(cutOf("a\n\n```\ncode\n\nmore\n```\n\nafter\n"), "a\n\n```\ncode\n\nmore\n```\n\n".length);
  assert.equal(cutOf("a\n\n~~~~\n```\n\nx\n~~~~\n"), "a\n\n".length); // a shorter fence does not close
  assert.equal(cutOf("- item\n\n  continued\n"), 0); // indented: the item goes on
  assert.equal(cutOf("    code\n\n    more code\n"), 0);
});

test("scanning is incremental: the same cut whatever the pieces", () => {
  const text = "# T\n\n```js\nlet a;\n\nlet b;\n```\n\n- x\n- y\n\nEnd\n";
  const view = new MarkdownView(null);
  for (const piece of text.match(/[\s\S]{1,3}/g)) {
    view.text += piece;
    view.scan();
  }
  assert.equal(view.cut, cutOf(text));
  assert.equal(view.cut, text.indexOf("End"));
});

test("finish reasons other than stop are said in words", async () => {
  const { describeFinish } = await import("../../service/admin/static/generate.js");
  assert.equal(describeFinish("stop"), "");
  assert.equal(describeFinish(null), "");
  assert.equal(describeFinish(undefined), "");
  assert.equal(describeFinish("length"), "Cut short: the answer reached its token limit (finish reason: length).");
  assert.equal(
    describeFinish("content_filter"),
    "Cut short: the model server's content filter stopped the answer (finish reason: content_filter).",
  );
  assert.equal(describeFinish("tool_calls"), "The answer ended early (finish reason: tool_calls).");
});

// Every cut the streaming view makes is a true block boundary: the frozen part and the rest
// rendered apart are the whole text's rendering (what end() shows).
const cutsWhileStreaming = (text) => {
  const view = new MarkdownView(null);
  const cuts = new Set();
  for (const piece of text.match(/[\s\S]{1,2}/g)) {
    view.text += piece;
    view.scan();
    cuts.add(view.cut);
  }
  return [...cuts].filter((cut) => cut > 0);
};

test("fences and blank lines are read as CommonMark reads them", () => {
  // "``` a`b" is a paragraph, so the real fence is the next "```", and the blank line inside it
  // is no block boundary; a line of no-break spaces is not blank, nor does "``` \u00a0" close.
  const texts = [
    "``` not`a fence\n\n```\ncode\n\nmore code\n```\n\nafter\n",
    "one\n\u00a0\ntwo\n\nthree\n",
    "```\ncode\n```\u00a0\n\nstill code\n```\n\nafter\n",
    "a\r\n\r\n```\r\nx\r\n\r\ny\r\n```\r\n\r\nb\r\n",
  ];
  for (const text of texts) {
    const whole = renderMarkdown(text);
    const cuts = cutsWhileStreaming(text);
    assert.ok(cuts.length > 0, JSON.stringify(text));
    for (const cut of cuts) {
      const apart = renderMarkdown(text.slice(0, cut)) + renderMarkdown(text.slice(cut));
      assert.equal(apart, whole, `${JSON.stringify(text)} cut at ${cut}`);
    }
  }
  assert.match(renderMarkdown(texts[0]), /<pre><code>code\n\nmore code\n<\/code><\/pre>/);
  assert.equal(cutOf("~~~ a`b\ncode\n\nmore\n"), 0); // a tilde fence's info string may hold one
});

test("encoded, escaped and hidden schemes never yield a live link to another scheme", () => {
  const tries = [
    "[a](&#106;avascript:alert(1))", "[a](jAvAsCrIpT&colon;x)", "[a](java&#x09;script:alert(1))",
    "[a](<java\tscript:x>)", "[a](\u0001javascript:x)", "[a](%6Aavascript:x)", "[a](\\javascript:x)",
    "[a](java\u200bscript:x)", "[a]: <javascript:x>\n\n[a]", "<data:text/html,x>", "[a](data&#58;,x)",
  ];
  for (const text of tries) {
    for (const [, href] of renderMarkdown(text).matchAll(/href="([^"]*)"/g)) {
      const url = new URL(href.replaceAll("&amp;", "&"), "http://127.0.0.1:3300/admin/");
      assert.ok(["http:", "https:"].includes(url.protocol), `${text} -> ${href}`);
      assert.equal(url.host, "127.0.0.1:3300", `${text} -> ${href}`); // relative: the page's own
    }
  }
});

test("table alignment is a class, never a style attribute the page's CSP would refuse", () => {
  const html = renderMarkdown("| a | b | c | d |\n|:--|:-:|--:|---|\n| 1 | 2 | 3 | 4 |\n");
  assert.doesNotMatch(html, /style=/);
  assert.match(html, /<th class="align-left">a<\/th>\n<th class="align-center">b<\/th>\n<th class="align-right">c<\/th>\n<th>d<\/th>/);
  assert.match(html, /<td class="align-left">1<\/td>\n<td class="align-center">2<\/td>\n<td class="align-right">3<\/td>\n<td>4<\/td>/);
});

test("a fence that may have ended with its list item freezes nothing after it", () => {
  // The list item ends at "x", and its fence with it; the next "  ```" opens a top-level fence
  // that holds the link. Freezing at "[a]" would show a live link where the answer has code.
  const texts = [
    "- item\n  ```\n  code\n\nx\n  ```\n\n[a](https://e.example/)\n\nz\n  ```\n",
    "1. item\n   ```\n   code\nx\n   ```\n\n[a](https://e.example/)\n\nz\n",
  ];
  for (const text of texts) {
    const whole = renderMarkdown(text);
    assert.match(whole, /<pre><code>\n\[a\]\(https:\/\/e.example\/\)\n\nz\n/);
    for (const cut of cutsWhileStreaming(text)) {
      const apart = renderMarkdown(text.slice(0, cut)) + renderMarkdown(text.slice(cut));
      assert.equal(apart, whole, `${JSON.stringify(text)} cut at ${cut}`);
    }
  }
  // a top-level fence indented 2 with unindented code freezes nothing more either (unsure)
  assert.equal(cutOf("a\n\nb\n  ```\ncode\n\nmore\n  ```\n\nc\n"), "a\n\n".length);
});

test("no raw HTML element of any kind: link, meta, form, ping, srcset, SVG, MathML, base", () => {
  const raw = [
    '<link rel=stylesheet href="http://127.0.0.1:9/s.css">',
    '<meta http-equiv="refresh" content="0;url=http://127.0.0.1:9/r">',
    '<form action="http://127.0.0.1:9/f"><button>go</button></form>',
    '<a href="http://127.0.0.1:9/p" ping="http://127.0.0.1:9/ping">p</a>',
    '<img srcset="http://127.0.0.1:9/s.png 1x">',
    '<svg><image href="http://127.0.0.1:9/i.png"/></svg>',
    '<math><mi xlink:href="javascript:alert(1)">m</mi></math>',
    '<base href="http://127.0.0.1:9/">',
    '<video poster="http://127.0.0.1:9/v.png"></video><audio src="http://127.0.0.1:9/a.mp3"></audio>',
    '<object data="http://127.0.0.1:9/o"></object><embed src="http://127.0.0.1:9/e">',
  ];
  for (const text of [raw.join("\n"), raw.join("\n\n"), raw.map((r) => `text ${r} text`).join("\n\n")]) {
    const html = renderMarkdown(text);
    assert.deepEqual([...new Set([...html.matchAll(/<([a-z][a-z0-9]*)/gi)].map((m) => m[1]))], ["p"], html);
  }
});
