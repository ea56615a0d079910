// react.js: React hooks over aiStream.js (`@ai-stream-gateway/client/react`), with the design
// notes' shapes. Plain ES module, no JSX, no build step; React is a peer dependency.
//
//   import { useAIStream } from "@ai-stream-gateway/client/react";
//   const { generate, stop, isStreaming, content, error, metadata } = useAIStream({ baseUrl });
//   generate({ prompt: "Write about TypeScript" });   // content grows; metadata.finishReason at the end
//
//   const { streamMessage, stop, isStreaming, streamingMessage, error, conversationId } =
//     useStreamingChat({ baseUrl, conversationId: selected });
//   streamMessage({ message: "Hello" }, (chunk) => { if (chunk.type === "token") ... });
//
// Design notes:
// 1. Renders are batched: text reaches state at most every `batchMs` (50, the chat note's
//    buffering; the first piece at once), joined, so a fast stream costs about 20 renders a
//    second. useAIStream leaves this to aiStream.js's own batching; useStreamingChat reads every
//    event (its `onChunk` gets each one, as the note's example expects) and batches only the state.
// 2. One stream per hook. Starting another stops the one running (through the cancel route,
//    awaited, so a chat turn never meets its own conversation's 409), and `stop()` stops it: the
//    generation ends `cancelled` on the server (aiStream.js note 6), not merely disconnected.
// 3. Never an update after unmount: every state update checks that the component is mounted and
//    that the stream is still the hook's current one; unmounting stops the stream as in 2.
// 4. useStreamingChat's `conversationId` option is the conversation the component shows.
//    When it changes to another conversation than the running stream's, that stream is stopped
//    and the hook's state cleared (the note's "cancel ongoing streams when switching
//    conversations"); adopting the id that the stream's own `metadata` event just gave (a new
//    conversation) is not a switch. The returned `conversationId` is the option, or the id the
//    server gave; `streamMessage` sends it when its request names none.
// 5. Reconnect is aiStream.js's (note 5): a dropped connection is resumed from the last event,
//    bounded tries with backoff (`reconnect` option), nothing lost or repeated.
// 6. Fallback to the JSON route (`/api/ai/generate`, `/api/v1/ai/chat`) happens only when the
//    stream failed before any stream id came back (the result's `streamId` is null) and for a
//    reason that says the stream could not be read as one: `bad_stream` (not an event stream,
//    e.g. a proxy that strips them), `http_error` (not the API's own answer), `network` or
//    `incomplete` (cut before its first event, which the server ends at once). The server's
//    own refusals (`bad_request`, `rate_limited`, ...) are shown, never retried, and a stream
//    that had an id never falls back: a fallback never bills a second generation. The result
//    says `fallback: true`; `fallback: false` in the options turns it off.
// 7. Errors are `ApiError`s (aiStream.js): `message` for people, `code` for programs (the API's
//    codes and the client's own), `status` and `retryAfter` for HTTP refusals, `reason` (the
//    outcome) for an `error` event.

import { useCallback, useEffect, useRef, useState } from "react";
import { ApiError, TextBatcher, chat, chatStream, generateContent, generateContentStream } from "./aiStream.js";

/** The failures after which the JSON route is asked instead (note 6). */
export const FALLBACK_CODES = Object.freeze(["bad_stream", "http_error", "network", "incomplete"]);

const STREAM_OPTIONS = ["baseUrl", "apiKey", "reconnect", "fetch"];

function pick(options, names) {
  const out = {};
  for (const name of names) if (options[name] !== undefined) out[name] = options[name];
  return out;
}

function fallsBack(result, options) {
  return (
    options.fallback !== false &&
    result.status === "error" &&
    result.streamId === null &&
    FALLBACK_CODES.includes(result.error.code)
  );
}

function asError(failure) {
  if (failure instanceof ApiError) return failure;
  return new ApiError({
    error: failure?.error ?? String(failure?.message ?? failure),
    code: failure?.code ?? "network",
    status: failure?.status,
    retryAfter: failure?.retryAfter,
    requestId: failure?.requestId,
    reason: failure?.reason,
  });
}

function withoutType(event) {
  const { type: _type, ...fields } = event;
  return fields;
}

/** The run machinery both hooks share: one current stream, mounted-ness (notes 2 and 3). */
function createRuns() {
  const runs = {
    mounted: false,
    current: null,
    begin() {
      const previous = runs.current;
      const run = { controller: new AbortController(), conversationId: null, done: null };
      run.live = () => runs.mounted && runs.current === run;
      run.previous = previous?.done ?? null;
      runs.current = run;
      previous?.controller.abort();
      return run;
    },
    end(run) {
      if (runs.current === run) runs.current = null;
    },
    stop() {
      runs.current?.controller.abort();
    },
  };
  return runs;
}

function useRuns() {
  const ref = useRef(null);
  if (ref.current === null) ref.current = createRuns();
  const runs = ref.current;
  useEffect(() => {
    runs.mounted = true;
    return () => {
      runs.mounted = false;
      runs.stop();
      runs.current = null;
    };
  }, [runs]);
  return runs;
}

/**
 * The first design note's hook: `{ generate, stop, isStreaming, content, error, metadata }`.
 * @param {import("./react.js").AIStreamOptions} [options]
 */
export function useAIStream(options = {}) {
  const [content, setContent] = useState("");
  const [isStreaming, setIsStreaming] = useState(false);
  const [error, setError] = useState(null);
  const [metadata, setMetadata] = useState(null);
  const latest = useRef(options);
  latest.current = options;
  const runs = useRuns();

  const generate = useCallback(
    (request) => {
      const run = runs.begin();
      run.done = (async () => {
        await run.previous; // stopped first (note 2)
        const aborted = { status: "aborted", text: "", streamId: null, stopped: false };
        if (!run.live() || run.controller.signal.aborted) return aborted;
        const options = latest.current;
        setContent("");
        setError(null);
        setMetadata(null);
        setIsStreaming(true);
        const signal = run.controller.signal;
        let result = await generateContentStream(
          request,
          {
            onContent: (e) => run.live() && setContent((text) => text + e.delta),
            onDone: (e) => run.live() && setMetadata(withoutType(e)),
          },
          { ...pick(options, STREAM_OPTIONS), batchMs: options.batchMs ?? 50, signal },
        );
        if (fallsBack(result, options) && !signal.aborted) {
          try {
            const answer = await generateContent(request, { ...pick(options, STREAM_OPTIONS), signal });
            if (run.live()) {
              setContent(answer.content);
              setMetadata(answer);
            }
            result = { status: "done", text: answer.content, streamId: null, data: answer, fallback: true };
          } catch (err) {
            result = signal.aborted
              ? { ...aborted, text: result.text }
              : { status: "error", text: result.text, streamId: null, error: asError(err), fallback: true };
          }
        }
        if (run.live()) {
          if (result.status === "error") setError(asError(result.error));
          setIsStreaming(false);
        }
        runs.end(run);
        return result;
      })();
      return run.done;
    },
    [runs],
  );

  return { generate, stop: runs.stop, isStreaming, content, error, metadata };
}

/**
 * The second design note's hook:
 * `{ streamMessage, stop, isStreaming, streamingMessage, error, conversationId }`.
 * @param {import("./react.js").StreamingChatOptions} [options]
 */
export function useStreamingChat(options = {}) {
  const selected = options.conversationId ?? null;
  const [streamingMessage, setStreamingMessage] = useState("");
  const [isStreaming, setIsStreaming] = useState(false);
  const [error, setError] = useState(null);
  const [conversationId, setConversationId] = useState(selected);
  const conversation = useRef(selected); // what streamMessage sends when its request names none
  const shown = useRef(selected);
  const latest = useRef(options);
  latest.current = options;
  const runs = useRuns();

  useEffect(() => {
    if (shown.current === selected) return;
    shown.current = selected;
    const run = runs.current;
    conversation.current = selected;
    setConversationId(selected);
    if (run !== null && run.conversationId !== null && run.conversationId === selected) return; // adopted (note 4)
    if (run !== null) {
      run.controller.abort();
      runs.end(run);
    }
    setStreamingMessage("");
    setError(null);
    setIsStreaming(false);
  }, [selected, runs]);

  const streamMessage = useCallback(
    (chatDto, onChunk = () => {}) => {
      const run = runs.begin();
      const request = { ...chatDto };
      if (request.conversationId === undefined && conversation.current !== null) {
        request.conversationId = conversation.current;
      }
      run.conversationId = request.conversationId ?? null;
      run.done = (async () => {
        await run.previous; // stopped first (note 2)
        const aborted = { status: "aborted", text: "", streamId: null, stopped: false };
        if (!run.live() || run.controller.signal.aborted) return aborted;
        const options = latest.current;
        setStreamingMessage("");
        setError(null);
        setIsStreaming(true);
        const signal = run.controller.signal;
        const chunk = (event) => {
          if (!signal.aborted) onChunk(event);
        };
        const learn = (id) => {
          run.conversationId = id;
          if (!run.live()) return;
          conversation.current = id;
          setConversationId(id);
        };
        const batcher = new TextBatcher(options.batchMs ?? 50, (text) => {
          if (run.live()) setStreamingMessage((shown) => shown + text);
        });
        let result = await chatStream(
          request,
          {
            onMetadata: (e) => {
              learn(e.conversationId);
              chunk(e);
            },
            onToken: (e) => {
              chunk({ type: "token", content: e.content });
              batcher.add(e.content);
            },
            onDone: (e) => {
              batcher.flush();
              chunk(e);
            },
          },
          { ...pick(options, STREAM_OPTIONS), batchMs: 0, signal },
        );
        batcher.flush();
        if (fallsBack(result, options) && !signal.aborted) {
          try {
            const answer = await chat(request, { ...pick(options, STREAM_OPTIONS), signal });
            learn(answer.conversationId);
            const { conversationId: id, messageId, model, content, usage, finishReason } = answer;
            chunk({ type: "metadata", conversationId: id, messageId, model });
            chunk({ type: "token", content });
            chunk({ type: "done", conversationId: id, messageId, usage, finishReason });
            if (run.live()) setStreamingMessage(content);
            result = { status: "done", text: content, streamId: null, data: answer, fallback: true };
          } catch (err) {
            result = signal.aborted
              ? { ...aborted, text: result.text }
              : { status: "error", text: result.text, streamId: null, error: asError(err), fallback: true };
          }
        }
        if (result.status === "error") {
          const failure = asError(result.error);
          chunk({ type: "error", error: failure.message, code: failure.code, reason: failure.reason });
          if (run.live()) setError(failure);
        }
        if (run.live()) setIsStreaming(false);
        runs.end(run);
        return result;
      })();
      return run.done;
    },
    [runs],
  );

  return { streamMessage, stop: runs.stop, isStreaming, streamingMessage, error, conversationId };
}
