// aiStream.js: a dependency-free client for the gateway's Server-Sent Event streams.
// It is the main module of the package `@ai-stream-gateway/client` (this folder: `npm install
// --install-links <repo>/client`; types in aiStream.d.ts, React hooks in react.js), and the admin
// page serves this same file as /static/aiStream.js. Or copy this one file into any frontend
// (browser or Node 18+): it needs only fetch, ReadableStream, TextDecoder and AbortController.
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
// Dropped connections are reconnected by themselves, and aborting stops the generation on the
// server (notes 5 and 6). To pause, keep the handle `onStream` gives once the stream has an id:
//
//   let stream;
//   const result = generateContentStream(request, {
//     onStream: (handle) => (stream = handle),       // handle.streamId, handle.lastEventId
//     onReconnect: (r) => console.log(`reconnecting (${r.attempt}) in ${r.delayMs} ms`),
//     onContent: (e) => view.append(e.delta),
//   }, { baseUrl, apiKey, reconnect: { tries: 5, baseMs: 250, maxMs: 4000 } });
//   stream.pause();   // drops the connection; the server keeps generating for RESUME_GRACE_S
//   stream.resume();  // reads on from the last event received: nothing lost, nothing repeated
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
// 5. Reconnect. Once the stream id is known (the `X-Stream-ID` header, which the gateway's CORS
//    exposes, or the first event's cursor), a connection that drops before the final event is
//    replaced by `GET /api/v1/ai/streams/{streamId}` with `Last-Event-ID` = the last event's id
//    (cross-origin too: CORS allows that header). Up to `reconnect.tries` (5) tries per drop,
//    waiting `backoffDelay(n)` before try n: `baseMs * 2^(n-1)` capped at `maxMs`, a random
//    point in its upper half (jitter). A connection that delivered an event starts the count
//    again. The callbacks see one uninterrupted stream: a frame cut in two is dropped with its
//    connection and read whole again, and an event whose number was already seen is skipped,
//    so no text is repeated or lost; `onReconnect({attempt, delayMs, lastEventId, streamId})`
//    is told before each wait. Answers: 404 (the stream expired) ends in onError `not_found`;
//    204 (the stream ended and was read to its end, yet no final event arrived) in
//    `incomplete`; 429 and 5xx count as a failed try; other 4xx end in onError. A connection
//    that drops before the stream id arrived ends as before (`network` or `incomplete`): the
//    POST is never sent again, which could start (and bill) a second generation.
//    `reconnect: false` turns all of this off.
// 6. Abort is stop. Aborting `signal` once the stream id is known sends
//    `POST /api/v1/ai/streams/{streamId}/cancel` (with the API key), and closes the connection
//    when it has answered (at most 3 s later) and, after a 204, the stream's final event has
//    arrived on it (at most 3 s more): the server writes that event once the generation has
//    ended and its answer is saved, so a request made after the promise resolves (a new turn in
//    the same conversation) never meets the stopped one. The generation ends `cancelled` and
//    its spend stops, whatever the server's grace window (a dropped connection alone would only
//    start it). Events arriving meanwhile are not delivered. onAbort (and the result) get `stopped`:
//    true when the server answered 204. Before the stream id is known, closing the request is
//    enough (the server ends a stream whose client left before its first event).
// 7. Pause is reading later. `onStream(handle)` is called once, when the stream id is known;
//    `handle.pause()` closes the connection without cancelling (the generation runs on, its
//    events kept), `handle.resume()` reconnects from the last event at once. A pause longer
//    than the server's `RESUME_GRACE_S` ends the stream: its generation is stopped and, on
//    resume, the events produced until then arrive, then onError with code `cancelled` and
//    reason `client_disconnect` (the finished stream is still kept), or onError `not_found`
//    (it has expired, after `RESUME_TTL_S`). Aborting while paused stops as in 6.
// 8. The result says whether the stream ever had an id (`streamId`, null when none came back):
//    without one the server ended the generation when the client left (before its first event),
//    so the React hooks may ask the JSON routes (`generateContent`, `chat`) instead without
//    billing a second generation; with one they never do. An answer that is not an event stream
//    but names its stream in `X-Stream-ID` (a proxy that rewrote the type of a stream that did
//    start) counts as having one, so `onStream` hears of it before the `bad_stream` error.

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
    // `retry` and unknown fields are ignored: reconnecting is runStream's (note 5), with its own backoff.
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
 * @param {{onStart?, onContent?, onDone?, onError?, onAbort?, onComment?, onStream?, onReconnect?}} callbacks
 * @param {{baseUrl?: string, apiKey?: string, signal?: AbortSignal, batchMs?: number, fetch?: typeof fetch,
 *          reconnect?: false | {tries?: number, baseMs?: number, maxMs?: number}}} options
 */
export function generateContentStream(request, callbacks = {}, options = {}) {
  return runStream(GENERATE, request, callbacks, options);
}

/**
 * Stream one chat turn from `POST /api/v1/ai/chat/stream`.
 * @param {object} request  {message, conversationId?}
 * @param {{onMetadata?, onToken?, onDone?, onError?, onAbort?, onComment?, onStream?, onReconnect?}} callbacks
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

/** `POST /api/ai/generate`: one generation returned whole; rejects with an ApiError. */
export function generateContent(request, options = {}) {
  return apiJson("POST", "/api/ai/generate", request, options);
}

/** `POST /api/v1/ai/chat`: one chat turn returned whole; rejects with an ApiError. */
export function chat(request, options = {}) {
  return apiJson("POST", "/api/v1/ai/chat", request, options);
}

/** An answer that is not 2xx, or no answer: `code` for programs, `message` for people. */
export class ApiError extends Error {
  constructor({ error, code, status, retryAfter, requestId, reason }) {
    super(error);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
    this.reason = reason; // the outcome, for an `error` event
  }
}

export async function apiJson(method, path, body, options = {}) {
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  let response;
  try {
    response = await fetchImpl((options.baseUrl ?? "") + path, request(method, body, options, "application/json"));
  } catch (err) {
    throw new ApiError(networkError(err));
  }
  if (!response.ok) throw new ApiError(await httpError(response));
  if (response.status === 204) return null;
  return response.json();
}

function request(method, body, { apiKey, signal }, accept = "text/event-stream") {
  const headers = { Accept: accept };
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

/** The reconnect defaults (note 5): tries per drop, the first wait, the longest wait. */
export const RECONNECT = Object.freeze({ tries: 5, baseMs: 250, maxMs: 4000 });

/**
 * How long to wait before reconnect `attempt` (1, 2, ...): exponential from `baseMs`, capped at
 * `maxMs`, with "equal jitter" (a random point in the upper half), so it is always within
 * [cap / 2, cap] where cap = min(maxMs, baseMs * 2 ** (attempt - 1)).
 */
export function backoffDelay(attempt, { baseMs = RECONNECT.baseMs, maxMs = RECONNECT.maxMs } = {}, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return cap / 2 + random() * (cap / 2);
}

/** `<streamId>:<seq>` as {streamId, seq}, or null when the id is not one of the gateway's cursors. */
export function parseCursor(id) {
  const colon = id.lastIndexOf(":");
  if (colon <= 0) return null;
  const seq = id.slice(colon + 1);
  if (!/^\d{1,15}$/.test(seq)) return null;
  return { streamId: id.slice(0, colon), seq: Number(seq) };
}

/** A `done` or `error` event's data (the stream's last event). */
function isFinal(data) {
  try {
    const type = JSON.parse(data)?.type;
    return type === "done" || type === "error";
  } catch {
    return false;
  }
}

const STOP_WAIT_MS = 3000; // the longest an abort waits for the cancel route before closing anyway
const INCOMPLETE = { code: "incomplete", error: "The stream ended before the answer was complete." };

async function runStream(kind, body, callbacks, options) {
  const { baseUrl = "", signal, batchMs = 50, apiKey } = options;
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  const retry = options.reconnect === false ? null : { ...RECONNECT, ...(options.reconnect ?? {}) };
  let text = "";
  let streamId = null; // known from X-Stream-ID or the first event's cursor (note 5)
  let cursor = ""; // the last event's id: where a reconnect reads from
  let seq = 0; // its number
  let ending = null; // [status, payload] once a final event (or a broken one) arrives
  let connection = null; // the AbortController of the request in flight
  let paused = false;
  let interrupted = false; // the connection was closed by pause(), even if resume() came at once
  let stopping = null; // the cancel request, once the caller aborted (note 6)
  let wake = null; // ends a wait early (abort, pause, resume)
  let stopEnded = null; // after a stop: told when the stream's final event arrives (note 6)
  const batcher = new TextBatcher(batchMs, (joined, e, count) => kind.deliver(callbacks, joined, e, count));
  const aborted = () => signal?.aborted === true;

  const cancel = async () => {
    const url = `${baseUrl}/api/v1/ai/streams/${encodeURIComponent(streamId)}/cancel`;
    const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
    const limit = new AbortController();
    const timer = setTimeout(() => limit.abort(), STOP_WAIT_MS);
    try {
      const response = await fetchImpl(url, { method: "POST", headers, cache: "no-store", signal: limit.signal });
      await response.body?.cancel().catch(() => {});
      return response.status === 204;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  };
  const onAbort = () => {
    wake?.();
    if (streamId !== null && ending === null && stopping === null) {
      // stop first, then close: the server never sees a plain disconnect (note 6)
      const current = connection;
      let settled = null;
      const ended = new Promise((resolve) => (stopEnded = resolve));
      stopping = cancel();
      stopping
        .then((stopped) => {
          // closing a body whose end has arrived can leave its read pending forever (undici),
          // so once the final event is in, the read loop ends by itself instead
          if (!stopped || current === null || current.signal.aborted || ending !== null) return null;
          const limit = new Promise((resolve) => (settled = setTimeout(resolve, STOP_WAIT_MS)));
          return Promise.race([ended, limit]);
        })
        .finally(() => {
          clearTimeout(settled);
          if (ending === null) current?.abort();
        });
    } else {
      connection?.abort();
    }
  };
  signal?.addEventListener("abort", onAbort, { once: true });

  const handle = {
    get streamId() {
      return streamId;
    },
    get lastEventId() {
      return cursor;
    },
    get paused() {
      return paused;
    },
    /** Drop the connection without stopping the generation (it runs on for the grace window). */
    pause() {
      if (paused || ending !== null || aborted()) return;
      paused = true;
      interrupted = true;
      connection?.abort();
      wake?.();
    },
    /** Read on from the last event received. */
    resume() {
      if (!paused) return;
      paused = false;
      wake?.();
    },
  };
  const learn = (id) => {
    if (streamId !== null || !id) return;
    streamId = id;
    callbacks.onStream?.(handle);
  };

  const finish = async (status, payload) => {
    signal?.removeEventListener("abort", onAbort);
    const stopped = stopping === null ? false : await stopping;
    batcher.flush();
    if (status === "done") callbacks.onDone?.(payload);
    else if (status === "error") callbacks.onError?.(payload);
    else callbacks.onAbort?.({ text, stopped });
    return {
      status,
      text,
      streamId,
      ...(status === "done" ? { data: payload } : {}),
      ...(status === "error" ? { error: payload } : {}),
      ...(status === "aborted" ? { stopped } : {}),
    };
  };

  const onEvent = (frame) => {
    if (ending) return;
    if (aborted()) {
      // after a stop, the final event ends the read (not delivered): note 6
      if (stopEnded !== null && isFinal(frame.data)) {
        ending = ["aborted"];
        stopEnded();
      }
      return;
    }
    if (frame.id) {
      const at = parseCursor(frame.id);
      if (at !== null) {
        learn(at.streamId);
        if (at.streamId === streamId) {
          if (at.seq <= seq) return; // already delivered: never twice
          seq = at.seq;
        }
      }
      cursor = frame.id;
    }
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
  };

  // One request and its read. Returns {fail} (the stream is over: an error to report), {drop,
  // progress} (the connection went away; progress: it delivered an event) or {} (an ending).
  const connect = async (resuming) => {
    connection = new AbortController();
    if (aborted() || paused) connection.abort();
    let url = baseUrl + kind.path;
    let init = { ...request("POST", body, options), signal: connection.signal };
    if (resuming) {
      url = `${baseUrl}/api/v1/ai/streams/${encodeURIComponent(streamId)}`;
      const headers = { Accept: "text/event-stream" };
      if (cursor) headers["Last-Event-ID"] = cursor;
      if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
      init = { method: "GET", headers, signal: connection.signal, cache: "no-store" };
    }
    let response;
    try {
      response = await fetchImpl(url, init);
    } catch (err) {
      return { drop: networkError(err) };
    }
    if (resuming && response.status === 204) {
      // The stream ended and every event was read, yet no terminal event was: not complete.
      return { fail: INCOMPLETE };
    }
    if (resuming && (response.status === 429 || response.status >= 500)) {
      return { drop: await httpError(response).catch(() => networkError(null)) };
    }
    if (!response.ok) {
      return { fail: await httpError(response).catch(() => ({ code: "network", error: "The answer was cut off." })) };
    }
    learn(response.headers.get("X-Stream-ID")); // before the type: a started stream counts (note 8)
    const type = response.headers.get("Content-Type") ?? "";
    if (!type.startsWith("text/event-stream") || !response.body) {
      await response.body?.cancel().catch(() => {});
      return { fail: { code: "bad_stream", error: `Expected an event stream, got ${type || "no content type"}.` } };
    }
    let progress = false;
    const parser = new SseParser({
      onComment: (comment) => callbacks.onComment?.(comment),
      onEvent: (frame) => {
        progress = true;
        onEvent(frame);
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
      if (!ending) return { drop: networkError(err), progress };
    } finally {
      if (ending) reader.cancel().catch(() => {});
      reader.releaseLock();
    }
    if (ending) return {};
    parser.end(); // a frame cut in two is dropped here and read again whole after a reconnect
    return { drop: INCOMPLETE, progress };
  };

  // Waits `ms` (forever when not finite) or until woken.
  const nap = (ms) =>
    new Promise((resolve) => {
      const timer = Number.isFinite(ms) ? setTimeout(() => done(), ms) : null;
      const done = () => {
        if (timer !== null) clearTimeout(timer);
        wake = null;
        resolve();
      };
      wake = done;
    });

  let attempt = 0;
  let resuming = false;
  for (;;) {
    const got = await connect(resuming);
    resuming = true;
    if (ending) return finish(...ending);
    if (aborted()) return finish("aborted");
    if (got.fail) return finish("error", got.fail);
    if (interrupted) {
      interrupted = false;
      while (paused && !aborted()) await nap(Infinity);
      if (aborted()) return finish("aborted");
      attempt = 0;
      continue;
    }
    if (retry === null || streamId === null) return finish("error", got.drop);
    if (got.progress) attempt = 0;
    attempt += 1;
    if (attempt > retry.tries) return finish("error", got.drop);
    const delayMs = backoffDelay(attempt, retry);
    callbacks.onReconnect?.({ attempt, delayMs, lastEventId: cursor, streamId });
    await nap(delayMs);
    interrupted = false; // paused while waiting: nothing was open to close
    while (paused && !aborted()) await nap(Infinity);
    if (aborted()) return finish("aborted");
  }
}
