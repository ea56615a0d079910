// aiStream.js: a dependency-free client for the gateway's Server-Sent Event streams.
// Copy this one file into any frontend (browser or Node 18+): it needs only fetch,
// ReadableStream, TextDecoder and AbortController.
//
//   import { generateContentStream } from "./aiStream.js";
//   const stop = new AbortController();
//   const result = await generateContentStream(
//     { prompt: "Write about TypeScript", maxTokens: 800 },
//     {
//       onStart: (e) => console.log("request", e.requestId),
//       onContent: (e) => view.append(e.delta),      // batched: about every 50 ms
//       onDone: (e) => console.log(`Generated ${e.tokenCount} tokens in ${e.elapsedMs} ms`),
//       onError: (e) => console.error(e.code, e.error), // partial text stays where it is
//       onAbort: () => console.log("stopped"),
//     },
//     { baseUrl: "http://localhost:3301", apiKey, signal: stop.signal },
//   );
//   // result.status is "done", "error" or "aborted"; result.text is everything received.
//
// Design notes:
// 1. The parser follows the WHATWG event-stream rules (CRLF, CR or LF line ends, comments,
//    multi-line data, `id`, `event`, one optional space after the colon) and works on bytes
//    split anywhere, including inside a UTF-8 character or between CR and LF.
// 2. Text callbacks are throttled with a leading edge: the first delta is shown at once (time
//    to first token is what people notice), later ones are joined and delivered at most every
//    `batchMs`. Pending text is always delivered before onDone, onError and onAbort.
// 3. The returned promise never rejects for stream trouble: every ending goes through exactly
//    one of onDone, onError or onAbort, and the result says which.
// 4. Streams are requested with `Accept: text/event-stream`, so the gateway answers in its full
//    shape: each event has an `id: <streamId>:<seq>` cursor (kept as the parser's lastEventId)
//    and heartbeats are lone `: ping` comment lines, which reach onComment, never onEvent.

/** Incremental event-stream parser. Feed it bytes (Uint8Array) or strings, in any pieces. */
export class SseParser {
  /**
   * @param {{onEvent?: (e: {type: string, data: string, id: string}) => void,
   *          onComment?: (text: string) => void}} handlers
   */
  constructor({ onEvent = () => {}, onComment = () => {} } = {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.decoder = new TextDecoder("utf-8");
    this.pending = ""; // an unfinished line
    this.skipLF = false; // the previous piece ended in CR: a leading LF belongs to it
    this.started = false;
    this.data = [];
    this.type = "";
    this.lastEventId = "";
  }

  /** @param {Uint8Array | string} chunk */
  feed(chunk) {
    const text = typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    this.#text(text);
  }

  /** End of stream: an event without its blank line is discarded, as browsers do. */
  end() {
    this.#text(this.decoder.decode());
    const unfinished = this.pending !== "" || this.data.length > 0;
    this.pending = "";
    this.data = [];
    this.type = "";
    return unfinished;
  }

  #text(text) {
    if (!text) return;
    if (!this.started) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    let i = 0;
    if (this.skipLF) {
      this.skipLF = false;
      if (text.charCodeAt(0) === 10) i = 1;
    }
    let lineStart = i;
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.pending + text.slice(lineStart, i);
      this.pending = "";
      if (c === 13) {
        if (i + 1 === text.length) this.skipLF = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      lineStart = i + 1;
      this.#line(line);
    }
    this.pending += text.slice(lineStart);
  }

  #line(line) {
    if (line === "") {
      if (this.data.length > 0) {
        const event = { type: this.type || "message", data: this.data.join("\n"), id: this.lastEventId };
        this.data = [];
        this.type = "";
        this.onEvent(event);
      }
      this.type = "";
      return;
    }
    if (line.charCodeAt(0) === 58) {
      this.onComment(line.slice(1).replace(/^ /, ""));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    // `retry` and unknown fields are ignored: this client does not reconnect by itself.
  }
}

/** Joins text and hands it over at most every `ms` milliseconds (leading edge, see note 2). */
export class TextBatcher {
  constructor(ms, deliver, clock = now) {
    this.ms = ms;
    this.deliver = deliver;
    this.clock = clock;
    this.text = "";
    this.extra = null;
    this.count = 0;
    this.timer = null;
    this.last = -Infinity;
  }

  add(text, extra) {
    this.text += text;
    this.extra = extra;
    this.count += 1;
    if (this.timer !== null) return;
    const wait = this.last === -Infinity ? 0 : this.last + this.ms - this.clock();
    if (!(this.ms > 0) || wait <= 0) this.flush();
    else if (Number.isFinite(wait)) this.timer = setTimeout(() => this.flush(), wait);
  }

  flush() {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    if (this.count === 0) return;
    const text = this.text;
    const extra = this.extra;
    const count = this.count;
    this.text = "";
    this.count = 0;
    this.last = this.clock();
    this.deliver(text, extra, count);
  }
}

const now = () => (globalThis.performance ? performance.now() : Date.now());

const GENERATE = {
  path: "/api/ai/generate-stream",
  text: (e) => (e.type === "content" ? e.delta : null),
  deliver: (callbacks, text, e, count) =>
    callbacks.onContent?.({ delta: text, tokenCount: e.tokenCount, events: count }),
  open: (callbacks, e) => (e.type === "start" ? (callbacks.onStart?.(e), true) : false),
};

const CHAT = {
  path: "/api/v1/ai/chat/stream",
  text: (e) => (e.type === "token" ? e.content : null),
  deliver: (callbacks, text, _e, count) => callbacks.onToken?.({ content: text, events: count }),
  open: (callbacks, e) => (e.type === "metadata" ? (callbacks.onMetadata?.(e), true) : false),
};

/**
 * Stream one generation from `POST /api/ai/generate-stream`.
 * @param {object} request  {prompt, selectedImageUrls?, referenceImageUrls?, model?, maxTokens?, temperature?}
 * @param {{onStart?, onContent?, onDone?, onError?, onAbort?, onComment?}} callbacks
 * @param {{baseUrl?: string, apiKey?: string, signal?: AbortSignal, batchMs?: number, fetch?: typeof fetch}} options
 */
export function generateContentStream(request, callbacks = {}, options = {}) {
  return runStream(GENERATE, request, callbacks, options);
}

/**
 * Stream one chat turn from `POST /api/v1/ai/chat/stream`.
 * @param {object} request  {message, conversationId?}
 * @param {{onMetadata?, onToken?, onDone?, onError?, onAbort?, onComment?}} callbacks
 * @param {object} options  as for generateContentStream
 */
export function chatStream(request, callbacks = {}, options = {}) {
  return runStream(CHAT, request, callbacks, options);
}

/** `GET /api/v1/ai/conversations/{id}`; resolves to the conversation, rejects with an ApiError. */
export function getConversation(id, options = {}) {
  return apiJson("GET", `/api/v1/ai/conversations/${encodeURIComponent(id)}`, undefined, options);
}

/** `DELETE /api/v1/ai/conversations/{id}`. */
export function deleteConversation(id, options = {}) {
  return apiJson("DELETE", `/api/v1/ai/conversations/${encodeURIComponent(id)}`, undefined, options);
}

/** An answer that is not 2xx, or no answer: `code` for programs, `message` for people. */
export class ApiError extends Error {
  constructor({ error, code, status, retryAfter, requestId }) {
    super(error);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
  }
}

export async function apiJson(method, path, body, options = {}) {
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  let response;
  try {
    response = await fetchImpl((options.baseUrl ?? "") + path, request(method, body, options));
  } catch (err) {
    throw new ApiError(networkError(err));
  }
  if (!response.ok) throw new ApiError(await httpError(response));
  if (response.status === 204) return null;
  return response.json();
}

function request(method, body, { apiKey, signal }) {
  const headers = { Accept: body === undefined ? "application/json" : "text/event-stream" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  return {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  };
}

async function httpError(response) {
  const requestId = response.headers.get("X-Request-ID") ?? undefined;
  const retry = response.headers.get("Retry-After");
  const base = { status: response.status, requestId, retryAfter: retry === null ? undefined : Number(retry) };
  let body = null;
  try {
    body = JSON.parse(await response.text());
  } catch {
    // not the API's JSON error shape (a proxy's page, for instance): described by status below
  }
  const err = body && typeof body === "object" ? body.error : null;
  if (err && typeof err.message === "string") {
    return { ...base, code: String(err.code ?? "http_error"), error: err.message };
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return { ...base, code: "http_error", error: `The API answered HTTP ${response.status}${reason}.` };
}

function networkError(err) {
  const detail = err && err.message ? ` (${err.message})` : "";
  return { code: "network", error: `The API could not be reached${detail}.` };
}

async function runStream(kind, body, callbacks, options) {
  const { baseUrl = "", signal, batchMs = 50 } = options;
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  let text = "";
  const batcher = new TextBatcher(batchMs, (joined, e, count) => kind.deliver(callbacks, joined, e, count));
  const finish = (status, payload) => {
    batcher.flush();
    if (status === "done") callbacks.onDone?.(payload);
    else if (status === "error") callbacks.onError?.(payload);
    else callbacks.onAbort?.({ text });
    return { status, text, ...(status === "done" ? { data: payload } : {}), ...(status === "error" ? { error: payload } : {}) };
  };
  const aborted = () => signal?.aborted === true;

  let response;
  try {
    response = await fetchImpl(baseUrl + kind.path, request("POST", body, options));
  } catch (err) {
    return aborted() ? finish("aborted") : finish("error", networkError(err));
  }
  if (!response.ok) {
    const err = await httpError(response).catch(() => ({ code: "network", error: "The answer was cut off." }));
    return aborted() ? finish("aborted") : finish("error", err);
  }
  const type = response.headers.get("Content-Type") ?? "";
  if (!type.startsWith("text/event-stream") || !response.body) {
    await response.body?.cancel().catch(() => {});
    return finish("error", { code: "bad_stream", error: `Expected an event stream, got ${type || "no content type"}.` });
  }

  let ending = null; // [status, payload] once a final event (or a broken one) arrives
  const parser = new SseParser({
    onComment: (comment) => callbacks.onComment?.(comment),
    onEvent: (frame) => {
      if (ending) return;
      let event;
      try {
        event = JSON.parse(frame.data);
      } catch {
        ending = ["error", { code: "bad_stream", error: "The stream sent an event that is not JSON." }];
        return;
      }
      const piece = kind.text(event);
      if (piece !== null && piece !== undefined) {
        text += piece;
        batcher.add(piece, event);
      } else if (event.type === "done") {
        ending = ["done", event];
      } else if (event.type === "error") {
        ending = ["error", event];
      } else {
        kind.open(callbacks, event);
      }
    },
  });

  const reader = response.body.getReader();
  try {
    while (!ending) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(value);
    }
  } catch (err) {
    if (!ending) return aborted() ? finish("aborted") : finish("error", networkError(err));
  } finally {
    if (ending) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
  if (ending) return finish(...ending);
  parser.end();
  if (aborted()) return finish("aborted");
  return finish("error", { code: "incomplete", error: "The stream ended before the answer was complete." });
}
