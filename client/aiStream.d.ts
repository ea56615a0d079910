// Types of aiStream.js, the gateway's client (`@ai-stream-gateway/client`). Hand-written, no
// build step; checked by tests/js/consumer.ts under `tsc --strict --noEmit`. The names follow
// the contract (API.md): the two event vocabularies, the outcomes, the error codes, the chat
// history, the resume and stop routes.

// --- the shared vocabularies ----------------------------------------------------------------

/** How a stream ended: one word, shared by the log, the metrics and `error` events' `reason`. */
export type Outcome =
  | "completed"
  | "client_disconnect"
  | "first_token_timeout"
  | "idle_timeout"
  | "total_timeout"
  | "upstream_error"
  | "rate_limited"
  | "cancelled"
  | "shutdown";

/** The API's error codes (HTTP error bodies and `error` events). */
export type ApiErrorCode =
  | "bad_request"
  | "unauthorized"
  | "not_found"
  | "conflict"
  | "payload_too_large"
  | "unsupported_media_type"
  | "request_timeout"
  | "rate_limited"
  | "overloaded"
  | "timeout"
  | "upstream_error"
  | "cancelled"
  | "server_shutdown"
  | "internal";

/** Codes the client itself gives: no answer, not the API's JSON, cut short, not a stream. */
export type ClientErrorCode = "network" | "http_error" | "incomplete" | "bad_stream";

export type ErrorCode = ApiErrorCode | ClientErrorCode;

/** The upstream's own word for why the answer ended (`length`: cut at maxTokens). */
export type FinishReason = "stop" | "length" | "content_filter" | "tool_calls" | "function_call" | (string & {});

/** OpenAI-style token usage. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

// --- requests -------------------------------------------------------------------------------

/** `POST /api/ai/generate(-stream)`. */
export interface GenerateRequest {
  prompt: string;
  /** http, https or data:image URLs, passed to the model as image parts. */
  selectedImageUrls?: string[];
  referenceImageUrls?: string[];
  model?: string;
  maxTokens?: number;
  temperature?: number;
}

/** `POST /api/v1/ai/chat(/stream)`. No `conversationId` starts a new conversation. */
export interface ChatRequest {
  message: string;
  conversationId?: string;
  model?: string;
  maxTokens?: number;
  temperature?: number;
}

// --- "generate" events ----------------------------------------------------------------------

export interface GenerateStartEvent {
  type: "start";
  requestId: string;
  streamId: string;
}

export interface GenerateContentEvent {
  type: "content";
  delta: string;
  /** Tokens so far. */
  tokenCount: number;
}

export interface GenerateDoneEvent {
  type: "done";
  content: string;
  imagePlaceholders: string[];
  tokenCount: number;
  model: string;
  requestId: string;
  elapsedMs: number;
  finishReason: FinishReason | null;
}

export interface GenerateErrorEvent {
  type: "error";
  error: string;
  code: ApiErrorCode;
  reason: Outcome;
  requestId: string;
  elapsedMs: number;
}

export type GenerateEvent = GenerateStartEvent | GenerateContentEvent | GenerateDoneEvent | GenerateErrorEvent;

// --- "chat" events --------------------------------------------------------------------------

export interface ChatTokenEvent {
  type: "token";
  content: string;
}

export interface ChatMetadataEvent {
  type: "metadata";
  conversationId: string;
  /** The answer's id, which is also its stream id. */
  messageId: string;
  model: string;
}

export interface ChatDoneEvent {
  type: "done";
  conversationId: string;
  messageId: string;
  usage: Usage;
  finishReason: FinishReason | null;
}

export interface ChatErrorEvent {
  type: "error";
  error: string;
  code: ApiErrorCode;
  reason: Outcome;
}

export type ChatEvent = ChatTokenEvent | ChatMetadataEvent | ChatDoneEvent | ChatErrorEvent;

// --- JSON answers ---------------------------------------------------------------------------

/** `POST /api/ai/generate`. */
export interface GenerateResponse {
  content: string;
  imagePlaceholders: string[];
  tokenCount: number;
  model: string;
  requestId: string;
  elapsedMs: number;
  finishReason: FinishReason | null;
  usage: Usage | null;
}

/** `POST /api/v1/ai/chat`. */
export interface ChatResponse {
  conversationId: string;
  messageId: string;
  model: string;
  content: string;
  usage: Usage | null;
  finishReason: FinishReason | null;
}

/** A saved message's state: `partial` when its answer was cut short (kept, never dropped). */
export type MessageStatus = "complete" | "partial" | "error" | "streaming";

export interface ChatMessage {
  messageId: string;
  role: "user" | "assistant";
  content: string;
  status: MessageStatus;
  finishReason: FinishReason | null;
  /** ISO 8601. */
  createdAt: string;
  completedAt: string | null;
  model: string | null;
  usage: Usage | null;
}

/** `GET /api/v1/ai/conversations/{conversationId}`. */
export interface Conversation {
  conversationId: string;
  createdAt: string;
  updatedAt: string;
  messages: ChatMessage[];
}

/** Every error body the native routes answer. */
export interface ApiErrorBody {
  error: { code: ApiErrorCode; message: string };
}

// --- callbacks, options, results ------------------------------------------------------------

/** What `onError` gets: an `error` event as sent, or an HTTP or client failure. */
export interface StreamFailure {
  error: string;
  code: ErrorCode;
  reason?: Outcome;
  status?: number;
  retryAfter?: number;
  requestId?: string;
  elapsedMs?: number;
  type?: "error";
}

export interface ReconnectInfo {
  attempt: number;
  delayMs: number;
  lastEventId: string;
  streamId: string;
}

/** Given once the stream id is known (note 7). */
export interface StreamHandle {
  readonly streamId: string;
  readonly lastEventId: string;
  readonly paused: boolean;
  /** Drop the connection without stopping the generation (it runs on for the grace window). */
  pause(): void;
  /** Read on from the last event received. */
  resume(): void;
}

export interface AbortInfo {
  text: string;
  /** True when the cancel route answered 204. */
  stopped: boolean;
}

export interface CommonCallbacks<Done> {
  onDone?: (event: Done) => void;
  onError?: (failure: StreamFailure) => void;
  onAbort?: (info: AbortInfo) => void;
  /** Comment lines (`: ping` heartbeats). */
  onComment?: (text: string) => void;
  onStream?: (handle: StreamHandle) => void;
  onReconnect?: (info: ReconnectInfo) => void;
}

export interface GenerateCallbacks extends CommonCallbacks<GenerateDoneEvent> {
  onStart?: (event: GenerateStartEvent) => void;
  /** `delta` joins every delta since the last call; `events` counts them. */
  onContent?: (content: { delta: string; tokenCount: number; events: number }) => void;
}

export interface ChatCallbacks extends CommonCallbacks<ChatDoneEvent> {
  onMetadata?: (event: ChatMetadataEvent) => void;
  /** `content` joins every token since the last call; `events` counts them. */
  onToken?: (token: { content: string; events: number }) => void;
}

export interface ReconnectOptions {
  /** Tries per drop (5). */
  tries?: number;
  /** The first wait (250 ms). */
  baseMs?: number;
  /** The longest wait (4000 ms). */
  maxMs?: number;
}

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

export interface RequestOptions {
  /** Where the API is ("" = this origin). */
  baseUrl?: string;
  /** Sent as `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  signal?: AbortSignal;
  fetch?: FetchLike;
}

export interface StreamOptions extends RequestOptions {
  /** Text callbacks at most this often (50 ms; the first at once; 0 = every event). */
  batchMs?: number;
  /** `false`: never reconnect. */
  reconnect?: false | ReconnectOptions;
}

export type StreamResult<Done> =
  | { status: "done"; text: string; streamId: string | null; data: Done }
  | { status: "error"; text: string; streamId: string | null; error: StreamFailure }
  | { status: "aborted"; text: string; streamId: string | null; stopped: boolean };

// --- functions and classes ------------------------------------------------------------------

export function generateContentStream(
  request: GenerateRequest,
  callbacks?: GenerateCallbacks,
  options?: StreamOptions,
): Promise<StreamResult<GenerateDoneEvent>>;

export function chatStream(
  request: ChatRequest,
  callbacks?: ChatCallbacks,
  options?: StreamOptions,
): Promise<StreamResult<ChatDoneEvent>>;

export function generateContent(request: GenerateRequest, options?: RequestOptions): Promise<GenerateResponse>;
export function chat(request: ChatRequest, options?: RequestOptions): Promise<ChatResponse>;
export function getConversation(conversationId: string, options?: RequestOptions): Promise<Conversation>;
export function deleteConversation(conversationId: string, options?: RequestOptions): Promise<null>;
export function apiJson<T = unknown>(
  method: string,
  path: string,
  body: unknown,
  options?: RequestOptions,
): Promise<T | null>;

/** A failure with its code: a non-2xx answer, no answer, or (from the hooks) a stream's error. */
export class ApiError extends Error {
  constructor(init: {
    error: string;
    code: ErrorCode;
    status?: number;
    retryAfter?: number;
    requestId?: string;
    reason?: Outcome;
  });
  name: "ApiError";
  code: ErrorCode;
  status: number | undefined;
  retryAfter: number | undefined;
  requestId: string | undefined;
  reason: Outcome | undefined;
}

export const RECONNECT: Readonly<Required<ReconnectOptions>>;
export function backoffDelay(attempt: number, options?: ReconnectOptions, random?: () => number): number;
export function parseCursor(id: string): { streamId: string; seq: number } | null;

export interface SseFrame {
  type: string;
  data: string;
  id: string;
}

export class SseParser {
  constructor(handlers?: { onEvent?: (event: SseFrame) => void; onComment?: (text: string) => void });
  lastEventId: string;
  feed(chunk: Uint8Array | string): void;
  /** True when an unfinished event was discarded. */
  end(): boolean;
}

export class TextBatcher<Extra = unknown> {
  constructor(ms: number, deliver: (text: string, extra: Extra, count: number) => void, clock?: () => number);
  add(text: string, extra?: Extra): void;
  flush(): void;
}
