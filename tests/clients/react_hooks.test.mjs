// The React hooks of @ai-stream-gateway/client against the live service, in jsdom with Testing
// Library: run by tests/test_client_package.py (its docstring says what the upstream and the
// proxies do), which passes GATEWAY_URL, CUT_URL and STRIP_URL.
import "./jsdom_env.mjs";

import assert from "node:assert/strict";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { chat, getConversation } from "@ai-stream-gateway/client";
import { useAIStream, useStreamingChat } from "@ai-stream-gateway/client/react";
import { act, cleanup, fireEvent, render, renderHook, screen, waitFor } from "@testing-library/react";
import { createElement } from "react";
import ts from "typescript";

const API = process.env.GATEWAY_URL;
const CUT = process.env.CUT_URL;
const STRIP = process.env.STRIP_URL;
const HERE = dirname(fileURLToPath(import.meta.url));
const STORY = ["Once", " upon", " a time,", " a rocket 🚀", " left", " for 漢字", " and back."];
const TEXT = STORY.join("");
const WAIT = { timeout: 10_000, interval: 10 };

let clients = 0;
/** Options for one client of its own (the service allows each one stream at a time). */
function client(extra = {}) {
  clients += 1;
  const address = `10.17.0.${clients}`;
  const fetchAs = (url, init = {}) =>
    fetch(url, { ...init, headers: { ...(init.headers ?? {}), "X-Forwarded-For": address } });
  return { baseUrl: API, fetch: fetchAs, reconnect: { tries: 5, baseMs: 50, maxMs: 400 }, ...extra };
}

async function outcomes(route, outcome) {
  const text = await (await fetch(`${API}/metrics`)).text();
  for (const line of text.split("\n")) {
    if (!line.startsWith("ai_stream_outcomes_total{")) continue;
    if (line.includes(`route="${route}"`) && line.includes(`outcome="${outcome}"`)) {
      return Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return 0;
}

async function expectOutcome(route, outcome, count) {
  await waitFor(async () => assert.equal(await outcomes(route, outcome), count), WAIT);
}

/** A hook rendered with a record of what every render returned. */
function renderRecorded(useHook, initialProps) {
  const renders = [];
  const view = renderHook(
    (props) => {
      const value = useHook(props);
      renders.push(value);
      return value;
    },
    { initialProps },
  );
  return { ...view, renders };
}

function grewThrough(values) {
  const lengths = [];
  for (const value of values) if (lengths.at(-1) !== value.length) lengths.push(value.length);
  return lengths;
}

test.afterEach(() => cleanup());

test("useAIStream: the text grows over several renders, then metadata has the done fields", async () => {
  const { result, renders } = renderRecorded(() => useAIStream(client()));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[story] grow" });
  });
  const outcome = await run;
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.equal(outcome.status, "done");
  assert.equal(result.current.content, TEXT);
  assert.equal(result.current.error, null);
  const metadata = result.current.metadata;
  assert.equal(metadata.content, TEXT);
  assert.equal(metadata.finishReason, "stop");
  assert.equal(metadata.model, "test-model");
  assert.equal(metadata.tokenCount, STORY.length);
  assert.equal(typeof metadata.requestId, "string");
  assert.equal(typeof metadata.elapsedMs, "number");
  assert.equal("type" in metadata, false);
  const before = renders.filter((r) => r.metadata === null && r.isStreaming).map((r) => r.content);
  const lengths = grewThrough(before);
  assert.ok(lengths.length >= 3, `the text grew through ${lengths}`);
  assert.deepEqual([...lengths].sort((a, b) => a - b), lengths);
  // batched: far fewer renders than a render per event would make
  assert.ok(renders.length < STORY.length * 3, `${renders.length} renders`);
});

test("renders are batched: a delta every 5 ms makes a render about every 50 ms", async () => {
  const fast = Array.from({ length: 100 }, (_, i) => `${i} `).join("");
  const talk = renderRecorded(() => useStreamingChat(client()));
  const tokens = [];
  let run;
  let started = performance.now();
  act(() => {
    run = talk.result.current.streamMessage({ message: "[fast] burst" }, (c) => c.type === "token" && tokens.push(c));
  });
  assert.equal((await run).status, "done");
  let batches = Math.ceil((performance.now() - started) / 50); // the most a 50 ms batching allows
  await waitFor(() => assert.equal(talk.result.current.isStreaming, false), WAIT);
  assert.equal(talk.result.current.streamingMessage, fast);
  assert.equal(tokens.map((t) => t.content).join(""), fast); // onChunk: every event, as it came
  assert.ok(tokens.length >= 50, `${tokens.length} token events`);
  // one render per batch at most, plus the few of the start and the end
  assert.ok(talk.renders.length <= batches + 6, `${talk.renders.length} renders, ${batches} batches`);
  assert.ok(talk.renders.length * 2 <= tokens.length, `${talk.renders.length} renders for ${tokens.length} events`);

  const ai = renderRecorded(() => useAIStream(client()));
  started = performance.now();
  act(() => {
    run = ai.result.current.generate({ prompt: "[fast] burst" });
  });
  assert.equal((await run).status, "done");
  await waitFor(() => assert.equal(ai.result.current.isStreaming, false), WAIT);
  batches = Math.ceil((performance.now() - started) / 50);
  assert.equal(ai.result.current.content, fast);
  assert.ok(ai.renders.length <= batches + 6, `${ai.renders.length} renders, ${batches} batches`);
});

test("a new generate stops the one running (cancelled), then streams", async () => {
  const cancelled = await outcomes("generate_stream", "cancelled");
  const { result } = renderHook(() => useAIStream(client()));
  let first;
  act(() => {
    first = result.current.generate({ prompt: "[endless] replaced" });
  });
  await waitFor(() => assert.ok(result.current.content.length > 0), WAIT);
  let second;
  act(() => {
    second = result.current.generate({ prompt: "[story] replacement" });
  });
  assert.equal((await first).status, "aborted");
  assert.equal((await second).status, "done");
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.equal(result.current.content, TEXT);
  await expectOutcome("generate_stream", "cancelled", cancelled + 1);
});

test("a new message in the same conversation stops the running answer first: no 409", async () => {
  const { result } = renderHook(() => useStreamingChat(client()));
  let first;
  act(() => {
    first = result.current.streamMessage({ message: "[endless] interrupted" });
  });
  await waitFor(() => assert.ok(result.current.streamingMessage.length > 0), WAIT);
  const id = result.current.conversationId;
  let second;
  act(() => {
    second = result.current.streamMessage({ message: "[story] next turn" }); // sends `id` by itself
  });
  assert.equal((await first).status, "aborted");
  const outcome = await second;
  assert.equal(outcome.status, "done", JSON.stringify(outcome));
  assert.equal(outcome.data.conversationId, id);
  await waitFor(() => assert.equal(result.current.streamingMessage, TEXT), WAIT);
  assert.equal(result.current.error, null);
});

test("useAIStream: an answer cut at maxTokens says finishReason length", async () => {
  const { result } = renderHook(() => useAIStream(client()));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[length] be brief", maxTokens: 2 });
  });
  assert.equal((await run).status, "done");
  await waitFor(() => assert.equal(result.current.metadata?.finishReason, "length"), WAIT);
  assert.equal(result.current.content, "Cut short");
});

test("useAIStream: stop() stops the generation on the server (outcome cancelled)", async () => {
  const cancelled = await outcomes("generate_stream", "cancelled");
  const { result } = renderHook(() => useAIStream(client()));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[endless] stop me" });
  });
  await waitFor(() => assert.ok(result.current.content.startsWith("Going on")), WAIT);
  act(() => result.current.stop());
  const outcome = await run;
  assert.equal(outcome.status, "aborted");
  assert.equal(outcome.stopped, true);
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.equal(result.current.error, null);
  await expectOutcome("generate_stream", "cancelled", cancelled + 1);
});

test("useAIStream: unmounting cancels the stream and never updates afterwards", async () => {
  const cancelled = await outcomes("generate_stream", "cancelled");
  const { result, renders, unmount } = renderRecorded(() => useAIStream(client()));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[endless] unmount me" });
  });
  await waitFor(() => assert.ok(result.current.content.length > 0), WAIT);
  const rendered = renders.length;
  unmount();
  const outcome = await run;
  assert.equal(outcome.status, "aborted");
  assert.equal(outcome.stopped, true);
  await expectOutcome("generate_stream", "cancelled", cancelled + 1);
  assert.equal(renders.length, rendered);
});

test("useStreamingChat: onChunk gets every event, the message grows, the answer is saved", async () => {
  const options = client();
  const { result, renders } = renderRecorded(() => useStreamingChat(options));
  const chunks = [];
  let run;
  act(() => {
    run = result.current.streamMessage({ message: "[story] chat" }, (chunk) => chunks.push(chunk));
  });
  assert.equal((await run).status, "done");
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.equal(chunks[0].type, "metadata");
  assert.equal(chunks.at(-1).type, "done");
  assert.equal(chunks.at(-1).finishReason, "stop");
  const tokens = chunks.filter((c) => c.type === "token").map((c) => c.content);
  assert.deepEqual(tokens, STORY); // one chunk per event, as the note's onChunk expects
  const id = result.current.conversationId;
  assert.equal(id, chunks[0].conversationId);
  assert.equal(result.current.streamingMessage, TEXT);
  const grown = grewThrough(renders.filter((r) => r.isStreaming).map((r) => r.streamingMessage));
  assert.ok(grown.length >= 3, `the message grew through ${grown}`);
  const saved = await getConversation(id, options);
  const answer = saved.messages.at(-1);
  assert.equal(answer.role, "assistant");
  assert.equal(answer.content, TEXT);
  assert.equal(answer.status, "complete");
  assert.equal(answer.messageId, chunks[0].messageId);
});

test("useStreamingChat: switching conversations cancels the stream; adopting its new id does not", async () => {
  const options = client();
  const other = await chat({ message: "[length] another conversation" }, options);
  const cancelled = await outcomes("chat_stream", "cancelled");
  const { result, rerender } = renderHook((props) => useStreamingChat({ ...options, ...props }), {
    initialProps: { conversationId: null },
  });
  let run;
  act(() => {
    run = result.current.streamMessage({ message: "[endless] keep talking" });
  });
  await waitFor(() => assert.ok(result.current.streamingMessage.length > 0), WAIT);
  const started = result.current.conversationId;
  assert.equal(typeof started, "string");
  rerender({ conversationId: started }); // the app adopts the new conversation's id
  const length = result.current.streamingMessage.length;
  await waitFor(() => assert.ok(result.current.streamingMessage.length > length), WAIT);
  assert.equal(result.current.isStreaming, true);
  rerender({ conversationId: other.conversationId }); // the user opens another conversation
  assert.equal(result.current.conversationId, other.conversationId);
  assert.equal(result.current.streamingMessage, "");
  assert.equal(result.current.isStreaming, false);
  const outcome = await run;
  assert.equal(outcome.status, "aborted");
  assert.equal(outcome.stopped, true);
  await expectOutcome("chat_stream", "cancelled", cancelled + 1);
  assert.equal(result.current.streamingMessage, "");
});

test("errors surface with their codes: 400 bad_request", async () => {
  const { result } = renderHook(() => useAIStream(client()));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "" });
  });
  const outcome = await run;
  assert.equal(outcome.status, "error");
  assert.notEqual(outcome.fallback, true);
  await waitFor(() => assert.equal(result.current.error?.code, "bad_request"), WAIT);
  assert.equal(result.current.error.status, 400);
  assert.equal(result.current.error.name, "ApiError");
  assert.match(result.current.error.message, /prompt/);
  assert.equal(result.current.isStreaming, false);

  const chatHook = renderHook(() => useStreamingChat(client()));
  const chunks = [];
  act(() => {
    run = chatHook.result.current.streamMessage({ message: "" }, (c) => chunks.push(c));
  });
  assert.equal((await run).status, "error");
  assert.deepEqual(
    chunks.map((c) => [c.type, c.code]),
    [["error", "bad_request"]],
  );
  await waitFor(() => assert.equal(chatHook.result.current.error?.code, "bad_request"), WAIT);
});

test("errors surface with their codes: 429 rate_limited with retryAfter", async () => {
  const options = client(); // one client, two hooks: its second stream is one too many
  const first = renderHook(() => useAIStream(options));
  const second = renderHook(() => useAIStream(options));
  let running;
  act(() => {
    running = first.result.current.generate({ prompt: "[endless] hold the slot" });
  });
  await waitFor(() => assert.ok(first.result.current.content.length > 0), WAIT);
  let refused;
  act(() => {
    refused = second.result.current.generate({ prompt: "[story] one too many" });
  });
  assert.equal((await refused).status, "error");
  await waitFor(() => assert.equal(second.result.current.error?.code, "rate_limited"), WAIT);
  assert.equal(second.result.current.error.status, 429);
  assert.equal(typeof second.result.current.error.retryAfter, "number");
  act(() => first.result.current.stop());
  assert.equal((await running).status, "aborted");
});

test("a cut connection is resumed: no text lost or repeated", async () => {
  const { result } = renderHook(() => useAIStream(client({ baseUrl: CUT })));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[story] cut" });
  });
  const outcome = await run;
  assert.equal(outcome.status, "done", JSON.stringify(outcome));
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.equal(result.current.content, TEXT);
  assert.equal(result.current.metadata.content, TEXT);
  assert.equal(result.current.error, null);
});

test("a cut chat connection is resumed: every event once, the saved answer whole", async () => {
  const options = client({ baseUrl: CUT });
  const { result } = renderHook(() => useStreamingChat(options));
  const chunks = [];
  let run;
  act(() => {
    run = result.current.streamMessage({ message: "[story] chat-cut" }, (c) => chunks.push(c));
  });
  const outcome = await run;
  assert.equal(outcome.status, "done", JSON.stringify(outcome));
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.deepEqual(
    chunks.map((c) => c.type),
    ["metadata", ...STORY.map(() => "token"), "done"],
  );
  assert.deepEqual(
    chunks.filter((c) => c.type === "token").map((c) => c.content),
    STORY,
  );
  assert.equal(result.current.streamingMessage, TEXT);
  const saved = await getConversation(result.current.conversationId, { ...options, baseUrl: API });
  assert.equal(saved.messages.at(-1).content, TEXT);
});

test("a stream that never opened falls back to the JSON route", async () => {
  const { result } = renderHook(() => useAIStream(client({ baseUrl: `${STRIP}/html` })));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[story] fallback" });
  });
  const outcome = await run;
  assert.equal(outcome.status, "done");
  assert.equal(outcome.fallback, true);
  assert.equal(outcome.streamId, null);
  await waitFor(() => assert.equal(result.current.isStreaming, false), WAIT);
  assert.equal(result.current.content, TEXT);
  assert.equal(result.current.metadata.finishReason, "stop");
  assert.equal(result.current.error, null);

  const chatHook = renderHook(() => useStreamingChat(client({ baseUrl: `${STRIP}/html` })));
  const chunks = [];
  act(() => {
    run = chatHook.result.current.streamMessage({ message: "[story] fallback" }, (c) => chunks.push(c));
  });
  const chatted = await run;
  assert.equal(chatted.fallback, true);
  assert.deepEqual(
    chunks.map((c) => c.type),
    ["metadata", "token", "done"],
  );
  assert.equal(chunks[1].content, TEXT);
  await waitFor(() => assert.equal(chatHook.result.current.streamingMessage, TEXT), WAIT);
  assert.equal(chatHook.result.current.conversationId, chunks[0].conversationId);
});

test("a stream that had an id never falls back, even when it cannot be read", async () => {
  const { result } = renderHook(() => useAIStream(client({ baseUrl: `${STRIP}/typed` })));
  let run;
  act(() => {
    run = result.current.generate({ prompt: "[story] typed" });
  });
  const outcome = await run;
  assert.equal(outcome.status, "error");
  assert.notEqual(outcome.fallback, true);
  assert.equal(typeof outcome.streamId, "string");
  await waitFor(() => assert.equal(result.current.error?.code, "bad_stream"), WAIT);
  const counts = await (await fetch(`${STRIP}/counts`)).json();
  assert.equal(counts["typed /api/ai/generate-stream"], 1);
  assert.equal(counts["typed /api/ai/generate"], undefined);
});

test("the README's ten-line component streams an article", async () => {
  const readme = readFileSync(join(HERE, "..", "..", "README.md"), "utf8");
  const block = /<!-- react-article -->\s*```jsx\n([\s\S]*?)```/.exec(readme);
  assert.ok(block, "the README's react-article snippet");
  const lines = block[1].trimEnd().split("\n");
  assert.ok(lines.length <= 12, `${lines.length} lines`);
  const js = ts.transpileModule(block[1], {
    compilerOptions: { jsx: ts.JsxEmit.ReactJSX, module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
  }).outputText;
  const dir = join(HERE, "node_modules", ".readme-article");
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `article-${process.pid}.mjs`);
  writeFileSync(file, js);
  let Article;
  try {
    ({ Article } = await import(pathToFileURL(file).href));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  render(createElement(Article, { topic: "[story]", baseUrl: API }));
  fireEvent.click(screen.getByRole("button", { name: "Write" }));
  await waitFor(() => assert.equal(screen.getByRole("button").textContent, "Stop"), WAIT);
  await waitFor(() => assert.match(screen.getByText(/tokens/).textContent, /7 tokens, stop/), WAIT);
  assert.equal(screen.getByRole("article").querySelector("p").textContent, TEXT);
  assert.equal(screen.getByRole("button").textContent, "Write");
});
