// Uses every type @ai-stream-gateway/client exports, as an app would, under `tsc --strict
// --noEmit` (tests/test_client_package.py). The `@ts-expect-error` lines must be errors: the
// types bite (tsc fails on an expectation that is not an error).
import {
  ApiError,
  RECONNECT,
  SseParser,
  TextBatcher,
  apiJson,
  backoffDelay,
  chat,
  chatStream,
  deleteConversation,
  generateContent,
  generateContentStream,
  getConversation,
  parseCursor,
} from "@ai-stream-gateway/client";
import type {
  AbortInfo,
  ApiErrorBody,
  ApiErrorCode,
  ChatCallbacks,
  ChatDoneEvent,
  ChatErrorEvent,
  ChatEvent,
  ChatMessage,
  ChatMetadataEvent,
  ChatRequest,
  ChatResponse,
  ChatTokenEvent,
  ClientErrorCode,
  CommonCallbacks,
  Conversation,
  ErrorCode,
  FetchLike,
  FinishReason,
  GenerateCallbacks,
  GenerateContentEvent,
  GenerateDoneEvent,
  GenerateErrorEvent,
  GenerateEvent,
  GenerateRequest,
  GenerateResponse,
  GenerateStartEvent,
  MessageStatus,
  Outcome,
  ReconnectInfo,
  ReconnectOptions,
  RequestOptions,
  SseFrame,
  StreamFailure,
  StreamHandle,
  StreamOptions,
  StreamResult,
  Usage,
} from "@ai-stream-gateway/client";
import { FALLBACK_CODES, useAIStream, useStreamingChat } from "@ai-stream-gateway/client/react";
import type {
  AIStream,
  AIStreamOptions,
  GenerateMetadata,
  HookOptions,
  HookResult,
  StreamChunk,
  StreamingChat,
  StreamingChatOptions,
} from "@ai-stream-gateway/client/react";

const reconnect: ReconnectOptions = { tries: 3, baseMs: 100, maxMs: 1000 };
const fetchLike: FetchLike = (input, init) => fetch(input, init);
const requestOptions: RequestOptions = { baseUrl: "http://localhost:3301", apiKey: "sk-x", fetch: fetchLike };
const options: StreamOptions = { ...requestOptions, batchMs: 50, reconnect };
const generateRequest: GenerateRequest = { prompt: "Write about TypeScript", maxTokens: 800, temperature: 0.7 };
const chatRequest: ChatRequest = { message: "Hello", conversationId: "c1", model: "m" };

function describeGenerate(event: GenerateEvent): string {
  switch (event.type) {
    case "start":
      return (event satisfies GenerateStartEvent).streamId;
    case "content":
      return (event satisfies GenerateContentEvent).delta + event.tokenCount;
    case "done":
      return (event satisfies GenerateDoneEvent).content + String(event.finishReason) + event.elapsedMs;
    case "error":
      return (event satisfies GenerateErrorEvent).code + event.reason + event.error;
  }
}

function describeChat(event: ChatEvent): string {
  switch (event.type) {
    case "token":
      return (event satisfies ChatTokenEvent).content;
    case "metadata":
      return (event satisfies ChatMetadataEvent).conversationId + event.messageId + event.model;
    case "done":
      return (event satisfies ChatDoneEvent).usage.total_tokens + String(event.finishReason);
    case "error":
      return (event satisfies ChatErrorEvent).code + event.reason;
  }
}

const common: CommonCallbacks<ChatDoneEvent> = {
  onAbort: (info: AbortInfo) => info.stopped,
  onReconnect: (info: ReconnectInfo) => info.attempt + info.delayMs,
  onStream: (handle: StreamHandle) => (handle.paused ? handle.resume() : handle.pause()),
  onError: (failure: StreamFailure) => failure.code satisfies ErrorCode,
};
const generateCallbacks: GenerateCallbacks = {
  onStart: (e) => describeGenerate(e),
  onContent: (c) => c.delta.length + c.events,
  onDone: (e) => describeGenerate(e),
};
const chatCallbacks: ChatCallbacks = { ...common, onToken: (t) => t.content, onMetadata: (e) => describeChat(e) };

export async function streams(): Promise<void> {
  const generated: StreamResult<GenerateDoneEvent> = await generateContentStream(generateRequest, generateCallbacks, options);
  if (generated.status === "done") describeGenerate(generated.data);
  else if (generated.status === "error") console.log(generated.error.code, generated.streamId);
  else console.log(generated.stopped);
  const chatted: StreamResult<ChatDoneEvent> = await chatStream(chatRequest, chatCallbacks, options);
  if (chatted.status === "done") describeChat(chatted.data);
  const whole: GenerateResponse = await generateContent(generateRequest, requestOptions);
  const answer: ChatResponse = await chat(chatRequest, requestOptions);
  const conversation: Conversation = await getConversation(answer.conversationId, requestOptions);
  const message: ChatMessage = conversation.messages[0];
  const status: MessageStatus = message.status;
  const usage: Usage | null = message.usage;
  console.log(whole.finishReason, status, usage?.prompt_tokens);
  await deleteConversation(conversation.conversationId, requestOptions);
  const raw = await apiJson<ApiErrorBody>("GET", "/health", undefined, requestOptions);
  console.log(raw?.error.code);
  try {
    await chat(chatRequest);
  } catch (err) {
    if (err instanceof ApiError) console.log(err.code, err.status, err.retryAfter, err.reason, err.requestId);
  }
}

const outcome: Outcome = "cancelled";
const apiCode: ApiErrorCode = "rate_limited";
const clientCode: ClientErrorCode = "bad_stream";
const finish: FinishReason = "length";
const parser = new SseParser({ onEvent: (frame: SseFrame) => frame.data, onComment: (text) => text });
parser.feed("data: {}\n\n");
const batcher = new TextBatcher<number>(50, (text, extra, count) => text + extra + count);
batcher.add("x", 1);
batcher.flush();
console.log(outcome, apiCode, clientCode, finish, parser.end(), RECONNECT.tries, backoffDelay(2, reconnect), parseCursor("s:1")?.seq);

// The hooks, as a component would use them (hooks outside components type-check the same).
const hookOptions: HookOptions = { baseUrl: "", batchMs: 50, fallback: false, reconnect: false };
const streamOptions: AIStreamOptions = hookOptions;
const chatOptions: StreamingChatOptions = { ...hookOptions, conversationId: null };
export function useEverything(): string {
  const ai: AIStream = useAIStream(streamOptions);
  const talk: StreamingChat = useStreamingChat(chatOptions);
  const metadata: GenerateMetadata | null = ai.metadata;
  void ai.generate(generateRequest).then((result: HookResult<GenerateDoneEvent, GenerateResponse>) => {
    if (result.status === "done" && result.fallback) return result.data.usage;
    if (result.status === "done") return result.data.finishReason;
    return null;
  });
  void talk.streamMessage({ message: "Hi" }, (chunk: StreamChunk) => {
    if (chunk.type === "token") return chunk.content;
    if (chunk.type === "error") return chunk.code;
    return null;
  });
  talk.stop();
  ai.stop();
  return `${ai.content}${ai.isStreaming}${ai.error?.code}${metadata?.finishReason}${talk.streamingMessage}${talk.conversationId}${FALLBACK_CODES.length}`;
}

// The types bite:
// @ts-expect-error a chat token carries `content`, not `delta`
export const wrongField: ChatTokenEvent = { type: "token", delta: "x" };
// @ts-expect-error not an outcome
export const wrongOutcome: Outcome = "finished";
// @ts-expect-error a generate done event has no `usage` field
export const wrongDone: GenerateDoneEvent["usage"] = null;
// @ts-expect-error the prompt is required
export const noPrompt: GenerateRequest = { maxTokens: 10 };
export function useWrongly(): unknown {
  // @ts-expect-error the hook has no `text` field (it is `content`)
  return useAIStream().text;
}
