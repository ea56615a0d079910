// Unit tests of aiStream.js's reconnect, stop and pause (its header's notes 5 to 7), against a
// scripted fetch: each call gets the next answer of the script, and a body can break midway the
// way a cut connection does. The live service and real browsers are in tests/test_resume_clients.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { RECONNECT, backoffDelay, chatStream, generateContentStream, parseCursor } from "../../client/aiStream.js";

const SID = "80c74cbf6NEyoKlz_ww42A";
const bytes = (text) => new TextEncoder().encode(text);
const frame = (seq, event) => `id: ${SID}:${seq}\ndata: ${JSON.stringify(event)}\n\n`;
const START = frame(1, { type: "start", requestId: "r", streamId: SID });
const content = (seq, delta) => frame(seq, { type: "content", delta, tokenCount: seq - 1 });
const DONE = (seq, text) => frame(seq, { type: "done", content: text, tokenCount: seq - 2 });
const FAST = { tries: 3, baseMs: 1, maxMs: 4 };

/** An answer whose body sends `pieces`, then ends (or breaks, when `cut`). */
function answer(pieces, { status = 200, cut = false, headers = {} } = {}) {
  const queue = [...(pieces ?? [])];
  return () =>
    new Response(
      status === 204 || !pieces
        ? null
        : new ReadableStream({
            // one piece per read, then the end: errors discard what is queued, so a cut waits
            // until every piece has been read
            pull(controller) {
              const piece = queue.shift();
              if (piece !== undefined) controller.enqueue(bytes(piece));
              else if (cut) controller.error(new TypeError("terminated"));
              else controller.close();
            },
          }),
      { status, headers: { "Content-Type": "text/event-stream; charset=utf-8", ...headers } },
    );
}

/** A body that sends `pieces` and stays open until the request is aborted; `opened` gets its
 * stream's controller (to send more later). */
function hanging(pieces, headers = {}, opened = () => {}) {
  return (init) =>
    new Response(
      new ReadableStream({
        start(controller) {
          opened(controller, init);
          for (const piece of pieces) controller.enqueue(bytes(piece));
          init.signal.addEventListener("abort", () => controller.error(new DOMException("aborted", "AbortError")));
        },
        cancel() {
          init.bodyCancelled = true;
        },
      }),
      { status: 200, headers: { "Content-Type": "text/event-stream; charset=utf-8", "X-Stream-ID": SID, ...headers } },
    );
}

function scripted(answers) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
    const next = answers.shift();
    if (!next) throw new TypeError("no more answers in the script");
    return next(init, url);
  };
  return { fetch, calls };
}

function recorder() {
  const log = [];
  const callbacks = {
    onStart: (e) => log.push(["start", e.requestId]),
    onContent: (e) => log.push(["content", e.delta]),
    onDone: (e) => log.push(["done", e.content]),
    onError: (e) => log.push(["error", e.code]),
    onAbort: (e) => log.push(["abort", e.text, e.stopped]),
    onReconnect: (e) => log.push(["reconnect", e.attempt, e.lastEventId]),
  };
  return { log, callbacks };
}

test("backoff: exponential from baseMs, capped at maxMs, jitter in the upper half", () => {
  for (const random of [() => 0, () => 0.5, () => 0.999999, Math.random]) {
    for (let attempt = 1; attempt <= 12; attempt++) {
      const cap = Math.min(RECONNECT.maxMs, RECONNECT.baseMs * 2 ** (attempt - 1));
      const delay = backoffDelay(attempt, RECONNECT, random);
      assert.ok(delay >= cap / 2 && delay <= cap, `attempt ${attempt}: ${delay} not in [${cap / 2}, ${cap}]`);
    }
  }
  assert.equal(backoffDelay(1, { baseMs: 100, maxMs: 1000 }, () => 1), 100);
  assert.equal(backoffDelay(3, { baseMs: 100, maxMs: 1000 }, () => 1), 400);
  assert.equal(backoffDelay(30, { baseMs: 100, maxMs: 1000 }, () => 0), 500);
  assert.deepEqual(RECONNECT, { tries: 5, baseMs: 250, maxMs: 4000 });
});

test("parseCursor: the stream id is everything before the last colon", () => {
  assert.deepEqual(parseCursor(`${SID}:12`), { streamId: SID, seq: 12 });
  assert.equal(parseCursor("12"), null);
  assert.equal(parseCursor(`${SID}:x`), null);
});

test("reconnect: cut inside a frame, read on by GET with Last-Event-ID, nothing repeated or lost", async () => {
  const half = content(3, " wor");
  const { fetch, calls } = scripted([
    answer([START, content(2, "Hello"), half.slice(0, 20)], { cut: true, headers: { "X-Stream-ID": SID } }),
    answer([half, content(4, "ld"), DONE(5, "Hello world")]),
  ]);
  const { log, callbacks } = recorder();
  const result = await generateContentStream({ prompt: "x" }, callbacks, {
    fetch, baseUrl: "http://api", apiKey: "sk-1", batchMs: 0, reconnect: FAST,
  });
  assert.equal(result.status, "done");
  assert.equal(result.text, "Hello world");
  assert.deepEqual(log, [
    ["start", "r"], ["content", "Hello"], ["reconnect", 1, `${SID}:2`],
    ["content", " wor"], ["content", "ld"], ["done", "Hello world"],
  ]);
  assert.equal(calls.length, 2);
  assert.equal(calls[1].url, `http://api/api/v1/ai/streams/${SID}`);
  assert.equal(calls[1].init.method, "GET");
  assert.equal(calls[1].init.headers["Last-Event-ID"], `${SID}:2`);
  assert.equal(calls[1].init.headers.Accept, "text/event-stream");
  assert.equal(calls[1].init.headers.Authorization, "Bearer sk-1");
});

test("reconnect: the stream id from the first cursor; events already seen are skipped", async () => {
  const { fetch, calls } = scripted([
    answer([START, content(2, "a")], { cut: true }), // no X-Stream-ID header
    answer([content(2, "a"), content(3, "b"), DONE(4, "ab")]), // a server repeating one event
  ]);
  const { log, callbacks } = recorder();
  const result = await generateContentStream({ prompt: "x" }, callbacks, { fetch, batchMs: 0, reconnect: FAST });
  assert.equal(result.text, "ab");
  assert.deepEqual(log.filter(([k]) => k === "content"), [["content", "a"], ["content", "b"]]);
  assert.equal(calls[1].url, `/api/v1/ai/streams/${SID}`);
});

test("reconnect: chat streams too", async () => {
  const meta = frame(1, { type: "metadata", conversationId: "c", messageId: SID });
  const { fetch } = scripted([
    answer([meta, frame(2, { type: "token", content: "Hi" })], { cut: true }),
    answer([frame(3, { type: "token", content: " there" }), frame(4, { type: "done", messageId: SID })]),
  ]);
  const tokens = [];
  const result = await chatStream({ message: "x" }, { onToken: (e) => tokens.push(e.content) }, { fetch, batchMs: 0, reconnect: FAST });
  assert.equal(result.status, "done");
  assert.deepEqual(tokens, ["Hi", " there"]);
});

test("reconnect: failed tries are bounded, then the drop is reported", async () => {
  const fail = () => {
    throw new TypeError("connection refused");
  };
  const { fetch, calls } = scripted([
    answer([START, content(2, "a")], { cut: true }),
    fail, answer(null, { status: 503 }), fail, fail, fail,
  ]);
  const { log, callbacks } = recorder();
  const result = await generateContentStream({ prompt: "x" }, callbacks, { fetch, batchMs: 0, reconnect: FAST });
  assert.equal(result.status, "error");
  assert.equal(result.error.code, "network");
  assert.equal(calls.length, 1 + FAST.tries);
  assert.deepEqual(log.filter(([k]) => k === "reconnect").map(([, n]) => n), [1, 2, 3]);
});

test("reconnect: progress starts the count again", async () => {
  const { fetch } = scripted([
    answer([START, content(2, "a")], { cut: true }),
    answer([content(3, "b")], { cut: true }),
    answer([content(4, "c")], { cut: true }),
    answer([content(5, "d")], { cut: true }),
    answer([DONE(6, "abcd")]),
  ]);
  const result = await generateContentStream({ prompt: "x" }, {}, { fetch, batchMs: 0, reconnect: { ...FAST, tries: 1 } });
  assert.equal(result.status, "done");
  assert.equal(result.text, "abcd");
});

test("reconnect: 404 ends in not_found, 204 in incomplete, 400 in its code", async () => {
  const cases = [
    [answer(['{"error":{"code":"not_found","message":"No such stream, or it has expired."}}'], { status: 404, headers: { "Content-Type": "application/json" } }), "not_found"],
    [answer(null, { status: 204 }), "incomplete"],
    [answer(['{"error":{"code":"bad_request","message":"no"}}'], { status: 400, headers: { "Content-Type": "application/json" } }), "bad_request"],
  ];
  for (const [second, code] of cases) {
    const { fetch, calls } = scripted([answer([START], { cut: true }), second]);
    const { log, callbacks } = recorder();
    const result = await generateContentStream({ prompt: "x" }, callbacks, { fetch, batchMs: 0, reconnect: FAST });
    assert.equal(result.status, "error");
    assert.equal(result.error.code, code);
    assert.equal(calls.length, 2);
    assert.deepEqual(log.at(-1), ["error", code]);
  }
});

test("reconnect: never before the stream id is known, and never with reconnect: false", async () => {
  for (const [first, options, code] of [
    [() => { throw new TypeError("fetch failed"); }, {}, "network"],
    [answer(['data: {"type":"start"}\n\n'], { cut: true }), {}, "network"],
    [answer([START], { cut: true }), { reconnect: false }, "network"],
    [answer([START]), { reconnect: false }, "incomplete"],
  ]) {
    const { fetch, calls } = scripted([first, answer([DONE(2, "")])]);
    const result = await generateContentStream({ prompt: "x" }, {}, { fetch, batchMs: 0, ...options });
    assert.equal(result.status, "error");
    assert.equal(result.error.code, code);
    assert.equal(calls.length, 1); // the POST is never sent twice
  }
});

test("abort: cancels the stream with the key, then closes; stopped says the server agreed", async () => {
  const controller = new AbortController();
  // The server's way: 204 from the cancel route, then the terminal event on the open stream.
  let open;
  const stream = hanging([START, content(2, "part")], {}, (controller) => (open = controller));
  const cancelled = frame(3, { type: "error", error: "Stopped.", code: "cancelled", reason: "cancelled" });
  const stop = () => {
    setTimeout(() => open.enqueue(bytes(cancelled)), 20);
    return new Response(null, { status: 204 });
  };
  const { fetch, calls } = scripted([stream, stop]);
  const { log, callbacks } = recorder();
  const started = performance.now();
  const result = await generateContentStream(
    { prompt: "x" },
    { ...callbacks, onContent: (e) => (callbacks.onContent(e), controller.abort()) },
    { fetch, baseUrl: "http://api", apiKey: "sk-1", batchMs: 0, signal: controller.signal, reconnect: FAST },
  );
  assert.ok(performance.now() - started < 1000, "closed when the final event came, not at the limit");
  assert.deepEqual(result, { status: "aborted", text: "part", streamId: SID, stopped: true });
  assert.equal(calls.length, 2);
  assert.equal(calls[1].url, `http://api/api/v1/ai/streams/${SID}/cancel`);
  assert.equal(calls[1].init.method, "POST");
  assert.equal(calls[1].init.headers.Authorization, "Bearer sk-1");
  assert.ok(calls[0].init.bodyCancelled); // the stream's read ended at its final event, closing it
  assert.deepEqual(log, [["start", "r"], ["content", "part"], ["abort", "part", true]]);
});

test("abort: with no final event after the cancel, the connection is closed at the limit", async () => {
  const controller = new AbortController();
  const { fetch, calls } = scripted([hanging([START, content(2, "part")]), answer(null, { status: 204 })]);
  const result = await generateContentStream(
    { prompt: "x" },
    { onContent: () => controller.abort() },
    { fetch, baseUrl: "http://api", batchMs: 0, signal: controller.signal, reconnect: FAST },
  );
  assert.deepEqual(result, { status: "aborted", text: "part", streamId: SID, stopped: true });
  assert.ok(calls[0].init.signal.aborted); // closed: the limit (3 s) passed
});

test("pause and resume: the connection is closed, then read on from the cursor", async () => {
  let handle;
  const { fetch, calls } = scripted([
    hanging([START, content(2, "one")]),
    answer([content(3, " two"), DONE(4, "one two")]),
  ]);
  const log = [];
  const result = await generateContentStream(
    { prompt: "x" },
    {
      onStream: (h) => (handle = h),
      onContent: (e) => {
        log.push(e.delta);
        if (e.delta === "one") {
          handle.pause();
          assert.equal(handle.paused, true);
          queueMicrotask(() => setTimeout(() => handle.resume(), 5)); // the caller's later click
        }
      },
    },
    { fetch, batchMs: 0, reconnect: FAST },
  );
  assert.equal(result.status, "done");
  assert.deepEqual(log, ["one", " two"]);
  assert.equal(handle.streamId, SID);
  assert.equal(handle.lastEventId, `${SID}:4`);
  assert.ok(calls[0].init.signal.aborted);
  assert.equal(calls[1].init.headers["Last-Event-ID"], `${SID}:2`);
});

test("pause then abort: stopped through cancel, no reconnect", async () => {
  const controller = new AbortController();
  const { fetch, calls } = scripted([hanging([START, content(2, "one")]), answer(null, { status: 204 })]);
  const result = await generateContentStream(
    { prompt: "x" },
    {
      onStream: (h) => queueMicrotask(() => (h.pause(), setTimeout(() => controller.abort(), 5))),
    },
    { fetch, batchMs: 0, signal: controller.signal, reconnect: FAST },
  );
  assert.equal(result.status, "aborted");
  assert.equal(result.stopped, true);
  assert.equal(calls.length, 2);
  assert.match(calls[1].url, /\/cancel$/);
});

test("pause then resume at once: read on at once, not as a failed try", async () => {
  let handle;
  const { fetch, calls } = scripted([
    hanging([START, content(2, "one")]),
    answer([content(3, " two"), DONE(4, "one two")]),
  ]);
  const { log, callbacks } = recorder();
  const result = await generateContentStream(
    { prompt: "x" },
    {
      ...callbacks,
      onStream: (h) => (handle = h),
      onContent: (e) => {
        callbacks.onContent(e);
        if (e.delta === "one") {
          handle.pause();
          handle.resume();
        }
      },
    },
    { fetch, batchMs: 0, reconnect: { tries: 1, baseMs: 60_000, maxMs: 60_000 } }, // a try would time out the test
  );
  assert.equal(result.status, "done");
  assert.equal(result.text, "one two");
  assert.equal(log.filter(([k]) => k === "reconnect").length, 0);
  assert.equal(calls[1].init.headers["Last-Event-ID"], `${SID}:2`);
});

test("the result names the stream id, or null when none came back (note 8)", async () => {
  const seen = scripted([answer([START, frame(2, { type: "done", content: "" })])]);
  const done = await generateContentStream({ prompt: "x" }, {}, { fetch: seen.fetch, baseUrl: "http://api", reconnect: FAST });
  assert.equal(done.status, "done");
  assert.equal(done.streamId, SID);
  const html = new Response("<html></html>", { status: 200, headers: { "Content-Type": "text/html" } });
  const none = await generateContentStream({ prompt: "x" }, {}, { fetch: async () => html, baseUrl: "http://api" });
  assert.equal(none.status, "error");
  assert.equal(none.error.code, "bad_stream");
  assert.equal(none.streamId, null);
  // a relabelled stream that names itself in X-Stream-ID had an id: onStream hears of it
  const handles = [];
  const relabelled = new Response("data: {}\n\n", {
    status: 200,
    headers: { "Content-Type": "text/plain", "X-Stream-ID": SID },
  });
  const named = await generateContentStream(
    { prompt: "x" },
    { onStream: (h) => handles.push(h.streamId) },
    { fetch: async () => relabelled, baseUrl: "http://api" },
  );
  assert.equal(named.error.code, "bad_stream");
  assert.equal(named.streamId, SID);
  assert.deepEqual(handles, [SID]);
});
