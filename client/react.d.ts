// Types of react.js, the React hooks (`@ai-stream-gateway/client/react`). Hand-written, no
// build step; checked by tests/js/consumer.ts under `tsc --strict --noEmit`.

import type {
  ApiError,
  ChatDoneEvent,
  ChatErrorEvent,
  ChatEvent,
  ChatRequest,
  ChatResponse,
  ErrorCode,
  FetchLike,
  GenerateDoneEvent,
  GenerateRequest,
  GenerateResponse,
  ReconnectOptions,
  StreamFailure,
} from "./aiStream.js";

export interface HookOptions {
  /** Where the API is ("" = this origin). */
  baseUrl?: string;
  apiKey?: string;
  /** State updates at most this often (50 ms; the first at once). */
  batchMs?: number;
  /** Resume after a dropped connection (`false`: never). */
  reconnect?: false | ReconnectOptions;
  /** Ask the JSON route when the stream never opened (default true; see react.js note 6). */
  fallback?: boolean;
  fetch?: FetchLike;
}

export type AIStreamOptions = HookOptions;

export interface StreamingChatOptions extends HookOptions {
  /** The conversation the component shows: changing it stops the stream of another one. */
  conversationId?: string | null;
}

/** The `done` event's fields (or the JSON answer's, after a fallback, which adds `usage`). */
export type GenerateMetadata = Omit<GenerateDoneEvent, "type"> & { usage?: GenerateResponse["usage"] };

/** How a hook's stream ended; `fallback: true` when the JSON route answered instead. */
export type HookResult<Done, Whole> =
  | { status: "done"; text: string; streamId: string | null; data: Done; fallback?: false }
  | { status: "done"; text: string; streamId: null; data: Whole; fallback: true }
  | { status: "error"; text: string; streamId: string | null; error: StreamFailure | ApiError; fallback?: boolean }
  | { status: "aborted"; text: string; streamId: string | null; stopped: boolean };

export interface AIStream {
  generate: (request: GenerateRequest) => Promise<HookResult<GenerateDoneEvent, GenerateResponse>>;
  /** Stops the generation on the server (outcome `cancelled`). */
  stop: () => void;
  isStreaming: boolean;
  content: string;
  error: ApiError | null;
  metadata: GenerateMetadata | null;
}

/** What `onChunk` gets: every chat event, `token` ones one by one; a failure as an `error` chunk. */
export type StreamChunk = ChatEvent | (Omit<ChatErrorEvent, "code" | "reason"> & { code: ErrorCode; reason?: ChatErrorEvent["reason"] });

export interface StreamingChat {
  streamMessage: (
    chatDto: ChatRequest,
    onChunk?: (chunk: StreamChunk) => void,
  ) => Promise<HookResult<ChatDoneEvent, ChatResponse>>;
  stop: () => void;
  isStreaming: boolean;
  /** The answer so far; kept after it ends, until the next message or a conversation switch. */
  streamingMessage: string;
  error: ApiError | null;
  conversationId: string | null;
}

export function useAIStream(options?: AIStreamOptions): AIStream;
export function useStreamingChat(options?: StreamingChatOptions): StreamingChat;

export const FALLBACK_CODES: readonly ErrorCode[];
