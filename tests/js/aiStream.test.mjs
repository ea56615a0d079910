// Unit tests for the admin page's stream client, run by Node's built-in runner:
//   node --test tests/js/
// (tests/test_admin_js.py runs them as part of pytest.)
import assert from "node:assert/strict";
import http from "node:http";
import { mock, test } from "node:test";

import {
  ApiError,
  SseParser,
  TextBatcher,
  chatStream,
  generateContentStream,
  getConversation,
} from "../../client/aiStream.js";

const bytes = (text) => new TextEncoder().encode(text);

// Every rule of the event-stream format the parser must honour, in one stream: a BOM, CRLF, CR
// and LF line ends, comments, multi-line data, no space after the colon, a bare field name,
// `event` and `id` fields, UTF-8 characters of 2 to 4 bytes, and an unterminated event at EOF.
const TRICKY =
  "\ufeff: ping\r\n" +
  'id: 1\r\ndata: {"type":"start"}\r\n\r\n' +
  'id: 2\ndata: {"type":"content",\ndata:  "delta":"héllo — 🌍"}\n\n' +
  "event: custom\rdata:no-space\r\r" +
  "data\n\n" +
  ": comment only\n\n" +
  "id: 3\nretry: 10\nunknown: x\ndata: last\n\n" +
  "data: unterminated";

const TRICKY_EVENTS = [
  { type: "message", data: '{"type":"start"}', id: "1" },
  { type: "message", data: '{"type":"content",\n "delta":"héllo — 🌍"}', id: "2" },
  { type: "custom", data: "no-space", id: "2" },
  { type: "message", data: "", id: "2" },
  { type: "message", data: "last", id: "3" },
];
const TRICKY_COMMENTS = ["ping", "comment only"];

function parse(pieces) {
  const events = [];
  const comments = [];
  const parser = new SseParser({ onEvent: (e) => events.push(e), onComment: (c) => comments.push(c) });
  for (const piece of pieces) parser.feed(piece);
  const unfinished = parser.end();
  return { events, comments, unfinished };
}

test("parser: every rule of the format, in one piece and as a string", () => {
  for (const input of [bytes(TRICKY), TRICKY]) {
    const { events, comments, unfinished } = parse([input]);
    assert.deepEqual(events, TRICKY_EVENTS);
    assert.deepEqual(comments, TRICKY_COMMENTS);
    assert.equal(unfinished, true);
  }
});

test("parser: split at every byte position, and at every pair of positions", () => {
  const all = bytes(TRICKY);
  for (let i = 0; i <= all.length; i++) {
    const got = parse([all.slice(0, i), all.slice(i)]);
    assert.deepEqual(got.events, TRICKY_EVENTS, `split at ${i}`);
    assert.deepEqual(got.comments, TRICKY_COMMENTS, `split at ${i}`);
  }
  for (let i = 0; i <= all.length; i++) {
    for (let j = i; j <= all.length; j++) {
      const got = parse([all.slice(0, i), all.slice(i, j), all.slice(j)]);
      assert.deepEqual(got.events, TRICKY_EVENTS, `split at ${i} and ${j}`);
    }
  }
});

test("parser: one byte at a time", () => {
  const all = bytes(TRICKY);
  const got = parse(Array.from(all, (_, k) => all.slice(k, k + 1)));
  assert.deepEqual(got.events, TRICKY_EVENTS);
  assert.deepEqual(got.comments, TRICKY_COMMENTS);
});

test("parser: CR at the end of a piece then LF is one line end, not two", () => {
  const got = parse(["data: a\r", "\ndata: b\r", "\n\r", "\n"]);
  assert.deepEqual(got.events, [{ type: "message", data: "a\nb", id: "" }]);
});

// The gateway's own wire bytes for a generation (see the README's transcript): the full shape a
// client that sends `Accept: text/event-stream` gets, with `<streamId>:<seq>` cursors, a lone
// `: ping` comment line (no blank line after it) and an escaped U+2028.
const SID = "Q2hvb3NlIGEgc3RyZWFtIQ";
const GENERATE_WIRE =
  `id: ${SID}:1\ndata: {"type":"start","requestId":"r1","streamId":"${SID}"}\n\n` +
  ": ping\n" +
  `id: ${SID}:2\ndata: {"type":"content","delta":"Hello","tokenCount":1}\n\n` +
  ": ping\n" +
  `id: ${SID}:3\ndata: {"type":"content","delta":", wörld\\u2028","tokenCount":3}\n\n` +
  `id: ${SID}:4\ndata: {"type":"content","delta":" \\n\\ndata: not an event","tokenCount":4}\n\n` +
  `id: ${SID}:5\ndata: {"type":"done","content":"Hello, wörld\\u2028 \\n\\ndata: not an event",` +
  '"imagePlaceholders":[],"tokenCount":4,"model":"demo-writer-1","requestId":"r1","elapsedMs":12,' +
  '"finishReason":"length"}\n\n';
const GENERATED = "Hello, wörld\u2028 \n\ndata: not an event";

// The same answer in the data-only shape (no `Accept: text/event-stream`): no `id:` lines, and
// `: ping` as a block of its own.
const GENERATE_DATA_ONLY = GENERATE_WIRE.replace(/id: [^\n]*\n/g, "").replaceAll(": ping\n", ": ping\n\n");

test("parser: the gateway's cursors become lastEventId; lone ping lines are comments", () => {
  for (const wire of [GENERATE_WIRE, GENERATE_DATA_ONLY]) {
    const { events, comments, unfinished } = parse([bytes(wire)]);
    const full = wire === GENERATE_WIRE;
    assert.deepEqual(
      events.map((e) => [e.type, e.id, JSON.parse(e.data).type]),
      ["start", "content", "content", "content", "done"].map((t, k) => ["message", full ? `${SID}:${k + 1}` : "", t]),
    );
    assert.deepEqual(comments, ["ping", "ping"]);
    assert.equal(unfinished, false);
  }
});

/** A fetch that answers with `pieces` as the body, recording the request it was given. */
function fakeFetch(pieces, { status = 200, headers = {} } = {}) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
    const body = new ReadableStream({
      start(controller) {
        for (const piece of pieces) controller.enqueue(typeof piece === "string" ? bytes(piece) : piece);
        controller.close();
      },
    });
    return new Response(body, {
      status,
      headers: { "Content-Type": "text/event-stream; charset=utf-8", ...headers },
    });
  };
  return { fetch, calls };
}

function recorder() {
  const log = [];
  const callbacks = {
    onStart: (e) => log.push(["start", e.requestId]),
    onContent: (e) => log.push(["content", e.delta, e.tokenCount]),
    onDone: (e) => log.push(["done", e.tokenCount, e.content]),
    onError: (e) => log.push(["error", e.code, e.error]),
    onAbort: (e) => log.push(["abort", e.text]),
    onComment: (c) => log.push(["comment", c]),
  };
  return { log, callbacks };
}

test("generate: the gateway's wire bytes, in both shapes, split at every byte position", async () => {
  for (const wire of [GENERATE_WIRE, GENERATE_DATA_ONLY]) {
    const all = bytes(wire);
    for (let i = 0; i <= all.length; i++) {
      const { fetch } = fakeFetch([all.slice(0, i), all.slice(i)]);
      const { log, callbacks } = recorder();
      const result = await generateContentStream({ prompt: "x" }, callbacks, { fetch, batchMs: 0 });
      assert.equal(result.status, "done", `split at ${i}`);
      assert.equal(result.text, GENERATED);
      assert.equal(result.data.finishReason, "length");
      assert.deepEqual(log, [
        ["start", "r1"],
        ["comment", "ping"],
        ["content", "Hello", 1],
        ["comment", "ping"],
        ["content", ", wörld\u2028", 3],
        ["content", " \n\ndata: not an event", 4],
        ["done", 4, GENERATED],
      ]);
    }
  }
});

test("generate: posts JSON to the base URL with the API key", async () => {
  const { fetch, calls } = fakeFetch([GENERATE_WIRE]);
  await generateContentStream({ prompt: "Write", maxTokens: 5 }, {}, {
    fetch,
    baseUrl: "http://127.0.0.1:3301",
    apiKey: "sk-1",
  });
  assert.equal(calls.length, 1);
  assert.equal(calls[0].url, "http://127.0.0.1:3301/api/ai/generate-stream");
  assert.equal(calls[0].init.method, "POST");
  assert.equal(calls[0].init.headers.Authorization, "Bearer sk-1");
  assert.equal(calls[0].init.headers.Accept, "text/event-stream"); // the full shape, with cursors
  assert.equal(calls[0].init.headers["Content-Type"], "application/json");
  assert.deepEqual(JSON.parse(calls[0].init.body), { prompt: "Write", maxTokens: 5 });
});

test("generate: deltas arriving together are joined; pending text comes before done", async () => {
  const events = ["a", "b", "c", "d"].map(
    (d, k) => `data: {"type":"content","delta":"${d}","tokenCount":${k + 1}}\n\n`,
  );
  const wire = ['data: {"type":"start","requestId":"r"}\n\n', events.join(""), 'data: {"type":"done","tokenCount":4}\n\n'];
  const { fetch } = fakeFetch(wire);
  const { log, callbacks } = recorder();
  // An interval longer than the test: only the leading edge and the final flush deliver.
  await generateContentStream({ prompt: "x" }, callbacks, { fetch, batchMs: 1e9 });
  assert.deepEqual(log, [
    ["start", "r"],
    ["content", "a", 1],
    ["content", "bcd", 4],
    ["done", 4, undefined],
  ]);
});

test("batcher: at most one delivery per interval, leading edge, timer flush", () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    let clock = 1000;
    const out = [];
    const batcher = new TextBatcher(50, (text, extra, count) => out.push([text, extra, count]), () => clock);
    batcher.add("a", 1);
    assert.deepEqual(out, [["a", 1, 1]]);
    clock += 10;
    batcher.add("b", 2);
    batcher.add("c", 3);
    assert.equal(out.length, 1);
    clock += 40;
    mock.timers.tick(40);
    assert.deepEqual(out, [["a", 1, 1], ["bc", 3, 2]]);
    clock += 100;
    batcher.add("d", 4); // the interval has passed: delivered at once
    assert.deepEqual(out.at(-1), ["d", 4, 1]);
    clock += 1;
    batcher.add("e", 5);
    batcher.flush(); // the end of a stream: nothing waits for the timer
    assert.deepEqual(out.at(-1), ["e", 5, 1]);
    mock.timers.tick(1000);
    assert.equal(out.length, 4);
  } finally {
    mock.timers.reset();
  }
});

test("generate: an error event keeps the partial text and passes code and reason", async () => {
  const { fetch } = fakeFetch([
    'data: {"type":"start","requestId":"r"}\n\ndata: {"type":"content","delta":"part","tokenCount":1}\n\n',
    'data: {"type":"error","error":"The answer took too long.","code":"timeout","reason":"total_timeout","requestId":"r","elapsedMs":9}\n\n',
  ]);
  const errors = [];
  const result = await generateContentStream({ prompt: "x" }, { onError: (e) => errors.push(e) }, { fetch });
  assert.equal(result.status, "error");
  assert.equal(result.text, "part");
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "timeout");
  assert.equal(errors[0].reason, "total_timeout");
  assert.equal(errors[0].error, "The answer took too long.");
});

test("generate: HTTP errors become onError with code, status, request id and Retry-After", async () => {
  const cases = [
    [401, '{"error":{"code":"unauthorized","message":"A valid API key is required."}}', {}, "unauthorized", "A valid API key is required."],
    [429, '{"error":{"code":"rate_limited","message":"Slow down."}}', { "Retry-After": "3" }, "rate_limited", "Slow down."],
    [502, "<html>Bad Gateway</html>", {}, "http_error", "The API answered HTTP 502 Bad Gateway."],
  ];
  for (const [status, body, headers, code, message] of cases) {
    const fetch = async () =>
      new Response(body, { status, statusText: status === 502 ? "Bad Gateway" : "", headers: { "Content-Type": "application/json", "X-Request-ID": "rid", ...headers } });
    const errors = [];
    const result = await generateContentStream({ prompt: "x" }, { onError: (e) => errors.push(e) }, { fetch });
    assert.equal(result.status, "error");
    assert.deepEqual(errors, [
      { status, code, error: message, requestId: "rid", retryAfter: headers["Retry-After"] ? 3 : undefined },
    ]);
  }
});

test("generate: broken streams end in one onError each", async () => {
  const cases = [
    [fakeFetch(['data: {"type":"start"}\n\ndata: {"type":"content","delta":"x","tokenCount":1}\n\n']).fetch, "incomplete"],
    [fakeFetch(["data: {not json\n\n"]).fetch, "bad_stream"],
    [fakeFetch(["{}"], { headers: { "Content-Type": "application/json" } }).fetch, "bad_stream"],
    [async () => { throw new TypeError("fetch failed"); }, "network"],
  ];
  for (const [fetch, code] of cases) {
    const { log, callbacks } = recorder();
    const result = await generateContentStream({ prompt: "x" }, callbacks, { fetch, batchMs: 0 });
    assert.equal(result.status, "error");
    const ends = log.filter(([kind]) => ["done", "error", "abort"].includes(kind));
    assert.deepEqual(ends.map(([kind, c]) => [kind, c]), [["error", code]]);
  }
});

test("chat: metadata, joined tokens, done", async () => {
  const { fetch, calls } = fakeFetch([
    `id: ${SID}:1\ndata: {"type":"metadata","conversationId":"c_1","messageId":"${SID}","model":"demo-writer-1"}\n\n`,
    `id: ${SID}:2\ndata: {"type":"token","content":"Baby"}\n\n: ping\nid: ${SID}:3\ndata: {"type":"token","content":" sleep"}\n\n`,
    `id: ${SID}:4\ndata: {"type":"done","conversationId":"c_1","messageId":"${SID}","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"finishReason":"stop"}\n\n`,
  ]);
  const log = [];
  const result = await chatStream(
    { message: "Tell me", conversationId: "c_1" },
    {
      onMetadata: (e) => log.push(["metadata", e.conversationId, e.messageId]),
      onToken: (e) => log.push(["token", e.content]),
      onDone: (e) => log.push(["done", e.usage.total_tokens]),
      onError: (e) => log.push(["error", e.code]),
    },
    { fetch, batchMs: 0 },
  );
  assert.equal(result.status, "done");
  assert.equal(result.text, "Baby sleep");
  assert.equal(calls[0].url, "/api/v1/ai/chat/stream");
  assert.deepEqual(JSON.parse(calls[0].init.body), { message: "Tell me", conversationId: "c_1" });
  assert.deepEqual(log, [["metadata", "c_1", SID], ["token", "Baby"], ["token", " sleep"], ["done", 5]]);
});

test("getConversation: a 404 rejects with the API's code", async () => {
  const fetch = async () =>
    new Response('{"error":{"code":"not_found","message":"No such conversation."}}', { status: 404 });
  await assert.rejects(getConversation("c/1", { fetch }), (err) => {
    assert.ok(err instanceof ApiError);
    assert.equal(err.code, "not_found");
    assert.equal(err.status, 404);
    assert.equal(err.message, "No such conversation.");
    return true;
  });
});

test("abort: the request is really closed, partial text kept, onAbort once", async () => {
  let serverSawClose;
  const closed = new Promise((resolve) => (serverSawClose = resolve));
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/event-stream" });
    res.write('data: {"type":"start","requestId":"r"}\n\n');
    res.write('data: {"type":"content","delta":"first","tokenCount":1}\n\n');
    res.on("close", () => serverSawClose(true)); // the stream is never finished by the server
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const controller = new AbortController();
  const { log, callbacks } = recorder();
  try {
    const result = await generateContentStream(
      { prompt: "x" },
      { ...callbacks, onContent: (e) => (callbacks.onContent(e), controller.abort()) },
      { baseUrl: `http://127.0.0.1:${server.address().port}`, signal: controller.signal, batchMs: 0 },
    );
    assert.equal(result.status, "aborted");
    assert.equal(result.text, "first");
    assert.deepEqual(log, [["start", "r"], ["content", "first", 1], ["abort", "first"]]);
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("server never saw the close")), 5000).unref());
    assert.equal(await Promise.race([closed, timeout]), true);
  } finally {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
});

test("abort: a signal aborted before the request starts ends in onAbort", async () => {
  const { fetch, calls } = fakeFetch([GENERATE_WIRE]);
  const controller = new AbortController();
  controller.abort();
  const { log, callbacks } = recorder();
  const result = await generateContentStream({ prompt: "x" }, callbacks, { fetch, signal: controller.signal });
  assert.equal(result.status, "aborted");
  assert.equal(calls.length, 1);
  assert.deepEqual(log, [["abort", ""]]);
});
