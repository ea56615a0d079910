// Model text as Markdown while it streams: markdown-it (vendored: vendor/markdown-it.min.mjs, its
// licences in vendor/markdown-it.LICENSE, updated by scripts/vendor-markdown-it.sh) renders it
// into an element, safely and cheaply.
//
// 1. Model text never becomes markup of its own: markdown-it runs with `html: false`, so raw HTML
//    in the text is escaped and shown as text; the only elements are the ones Markdown syntax
//    makes (headings, paragraphs, lists, code, emphasis, links, quotes, tables, rules), and none
//    carries a style attribute (a table column's alignment is a class).
// 2. Model text cannot make the browser call a URL it chose. Links are live only for http(s),
//    mailto and scheme-less (relative) targets: a link, image or reference definition to any other
//    scheme (javascript:, data:, vbscript:, file:, ...) stays the Markdown text it was. Links open in a new tab with no referrer and are only
//    followed when clicked. Images are rendered as links labelled "image: <alt>" (plain text inside
//    a link), never as <img>, so nothing is fetched; the page's CSP (service/admin/__init__.py) also allows images from
//    the page's own origin only.
// 3. Rendering stays cheap on long answers: appends only mark the view dirty, and it renders at
//    most once per animation frame. Complete top-level blocks are rendered once and frozen: the
//    text before the last unindented line that follows a blank line outside a code fence (a
//    CommonMark block boundary for everything but loose lists and reference links; fences are
//    recognised as CommonMark does, so "``` a`b" opens none). A fence opened indented that meets
//    a less indented line may have ended with the list item holding it or may go on: from there
//    nothing more is frozen (each frame re-parses the rest, as CommonMark would). Each frame
//    scans only the new lines and re-parses only the tail after that point.
// 4. end() renders the whole text once, so the final view is exactly markdown-it's rendering of
//    the whole answer (a loose list or a reference link split while streaming comes out whole).
// 5. While streaming the last block carries a blinking cursor (span.cursor); before the first
//    text a typing indicator (span.typing) stands in for the answer.
import markdownit from "./vendor/markdown-it.min.mjs";

const md = markdownit({ html: false, linkify: false, typographer: false });
const SAFE_SCHEME = /^(https?|mailto):/i;
const ANY_SCHEME = /^[a-z][a-z0-9+.-]*:/i;
const FENCE = /^ {0,3}(`{3,}|~{3,})/;
const BLANK = /^[ \t]*\r?$/; // CommonMark's blank line: spaces and tabs only (no NBSP)
const NO_CURSOR_INSIDE = new Set(["A", "HR", "BR", "IMG", "INPUT"]); // links, void elements
const escape = md.utils.escapeHtml;

/** Whether markdown-it may make `url` (already normalised by it) a live link (note 2). */
export function safeLink(url) {
  const target = url.trim();
  return SAFE_SCHEME.test(target) || !ANY_SCHEME.test(target);
}

md.validateLink = safeLink;

const defaultLinkOpen =
  md.renderer.rules.link_open ?? ((tokens, idx, options, _env, self) => self.renderToken(tokens, idx, options));

md.renderer.rules.link_open = (tokens, idx, options, env, self) => {
  const token = tokens[idx];
  token.attrSet("target", "_blank");
  token.attrSet("rel", "noopener noreferrer nofollow");
  return defaultLinkOpen(tokens, idx, options, env, self);
};

// A table column's alignment as a class, not markdown-it's `style="text-align:..."`: the page's
// CSP allows no inline style, so the attribute would be refused (and the alignment lost).
for (const cell of ["th_open", "td_open"]) {
  md.renderer.rules[cell] = (tokens, idx, options, _env, self) => {
    const token = tokens[idx];
    const align = /^text-align:(left|center|right)$/.exec(token.attrGet("style") ?? "");
    if (token.attrs) token.attrs = token.attrs.filter(([name]) => name !== "style");
    if (align) token.attrJoin("class", `align-${align[1]}`);
    return self.renderToken(tokens, idx, options);
  };
}

/** Whether the inline token at `idx` sits inside a link (an image there becomes plain text). */
function inLink(tokens, idx) {
  let depth = 0;
  for (let i = idx - 1; i >= 0; i--) {
    if (tokens[i].type === "link_open") depth += 1;
    else if (tokens[i].type === "link_close") depth -= 1;
  }
  return depth > 0;
}

md.renderer.rules.image = (tokens, idx, options, env, self) => {
  const token = tokens[idx];
  const src = token.attrGet("src") ?? "";
  const label = escape(`image: ${self.renderInlineAsText(token.children ?? [], options, env) || src}`);
  if (inLink(tokens, idx)) return `<span class="image-link">${label}</span>`;
  return `<a class="image-link" href="${escape(src)}" target="_blank" rel="noopener noreferrer nofollow">${label}</a>`;
};

/** markdown-it's HTML for `text`, with the rules above. */
export function renderMarkdown(text) {
  return md.render(text);
}

function fragment(html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  return template.content;
}

function typingIndicator() {
  const typing = document.createElement("span");
  typing.className = "typing";
  typing.setAttribute("role", "status");
  typing.setAttribute("aria-label", "Writing…");
  typing.append(...[0, 1, 2].map(() => document.createElement("span")));
  return typing;
}

/** Where the cursor goes: the innermost last element of `node` with no text after it. */
function cursorHost(node) {
  let host = node;
  for (let depth = 0; depth < 32; depth++) {
    let last = host.lastChild;
    while (last && last.nodeType === Node.TEXT_NODE && !last.data.trim()) last = last.previousSibling;
    if (!last || last.nodeType !== Node.ELEMENT_NODE || NO_CURSOR_INSIDE.has(last.tagName)) break;
    host = last;
  }
  return host;
}

/** One answer rendered into `element` as it streams (notes 3 to 5). */
export class MarkdownView {
  constructor(element, { onRender } = {}) {
    this.element = element;
    this.onRender = onRender;
    this.text = "";
    this.frame = 0;
    this.streaming = false;
    this.frozenTo = 0; // text before this index is rendered and frozen
    this.tail = []; // the nodes rendering text from frozenTo on
    this.scanned = 0; // where the next unscanned line starts
    this.fence = null; // {char, length, indent} while inside a code fence
    this.unsure = false; // a fence may have ended with a list item: freeze nothing more
    this.blankBefore = false;
    this.cut = 0; // the latest block boundary found
  }

  /** Clear the element and show the typing indicator until the first text. */
  start() {
    cancelAnimationFrame(this.frame);
    Object.assign(this, { text: "", frame: 0, streaming: true, frozenTo: 0, tail: [] });
    Object.assign(this, { scanned: 0, fence: null, blankBefore: false, cut: 0, unsure: false });
    this.element.replaceChildren(typingIndicator());
  }

  append(text) {
    if (!text) return;
    this.text += text;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** Render the whole text once, with no cursor and no typing indicator (note 4). */
  end() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.streaming = false;
    this.tail = [];
    this.element.replaceChildren(fragment(renderMarkdown(this.text)));
    this.onRender?.();
  }

  /** Show saved text, rendered whole. */
  show(text) {
    this.text = text;
    this.end();
  }

  flush() {
    this.frame = 0;
    if (!this.streaming) return;
    this.scan();
    for (const node of this.tail) node.remove();
    this.element.querySelector(":scope > .typing")?.remove();
    if (this.cut > this.frozenTo) {
      this.element.append(fragment(renderMarkdown(this.text.slice(this.frozenTo, this.cut))));
      this.frozenTo = this.cut;
    }
    const tail = fragment(renderMarkdown(this.text.slice(this.frozenTo)));
    this.tail = [...tail.childNodes];
    const cursor = document.createElement("span");
    cursor.className = "cursor";
    cursor.setAttribute("aria-hidden", "true");
    const last = [...this.tail].reverse().find((node) => node.nodeType === Node.ELEMENT_NODE);
    if (last) cursorHost(last).append(cursor);
    else {
      tail.append(cursor);
      this.tail.push(cursor);
    }
    this.element.append(tail);
    this.onRender?.();
  }

  /** Read the complete lines not yet scanned, noting the latest block boundary (note 3). */
  scan() {
    const text = this.text;
    if (this.unsure) return;
    for (let lines = 0; lines < 1_000_000; lines++) {
      const end = text.indexOf("\n", this.scanned);
      if (end < 0) return;
      const start = this.scanned;
      const line = text.slice(start, end);
      this.scanned = end + 1;
      if (this.fence) {
        // A fence opened indented may sit in a list item, which a less indented line ends (and
        // the fence with it) or may not (a top-level fence): which one, only a full parse knows.
        if (this.fence.indent > 0 && !BLANK.test(line) && /^ */.exec(line)[0].length < this.fence.indent) {
          this.unsure = true;
          return;
        }
        const close = FENCE.exec(line);
        const marker = close?.[1];
        if (marker && marker[0] === this.fence.char && marker.length >= this.fence.length && BLANK.test(line.slice(close[0].length))) {
          this.fence = null;
        }
        this.blankBefore = false;
        continue;
      }
      const open = FENCE.exec(line);
      if (BLANK.test(line)) {
        this.blankBefore = true;
        continue;
      }
      if (this.blankBefore && !/^[ \t]/.test(line)) this.cut = start;
      this.blankBefore = false;
      // A backtick fence's info string holds no backtick (CommonMark): "``` a`b" is text.
      if (open && !(open[1][0] === "`" && line.slice(open[0].length).includes("`"))) {
        this.fence = { char: open[1][0], length: open[1].length, indent: open[0].length - open[1].length };
      }
    }
  }
}
