// Types of @notify-ws/client (notify-client.js). The wire contract is the gateway's
// docs/protocol.md.

export declare const VERSION: string;
/** The WebSocket subprotocol of protocol v2. */
export declare const PROTOCOL_V2: "notify.v2";
/** The endpoint's path, used when `url` names only the gateway's origin. */
export declare const WS_PATH: "/api/v1/notify/ws";

/** What the client does after a close with a given code. */
export type CloseActionKind = "retry" | "now" | "refresh" | "later" | "stop";

export declare function closeAction(code: number): { action: CloseActionKind; reason: string };

/** Full-jitter exponential backoff: uniform in [0, min(max, base * 2^attempt)] ms. */
export declare function backoffDelay(
  attempt: number,
  bounds: { base: number; max: number },
  random?: () => number,
): number;

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "stopped";

export interface StateChange {
  state: ConnectionState;
  /** Why the state changed, for people (e.g. "the gateway is going away (deploy or scale-in) (1001)"). */
  reason: string;
  /** What the close-code table decided, or "connect" / "none" / "stop". */
  action: CloseActionKind | "connect" | "none";
  /** What the client is doing about it, for people (e.g. "reconnecting in 1.3 s"). */
  doing: string;
  /** The wait before the next attempt, in ms, while reconnecting. */
  delay: number | null;
  /** Consecutive failed attempts so far (the backoff's exponent). */
  attempt: number;
  /** "v1" or "v2" while open, else null. */
  protocol: "v1" | "v2" | null;
  /** The code of the last close, or null before the first. */
  closeCode: number | null;
}

export interface Notification {
  /** The notification's id (v2); null on a v1 connection, whose frames carry none. */
  id: string | null;
  title: string;
  body: string;
  /** When it was created (v2: ISO 8601, UTC); null on v1. */
  createdAt: string | null;
  /** The frame as received, with any fields this version does not know. */
  raw: Record<string, unknown>;
}

export interface Gap {
  /** Notifications the gateway's retention deleted before this client acknowledged them. */
  dropped: number;
}

export interface TokenRequest {
  /** "connect": any connect; "refused": the last token got 4401; "expiring": the gateway asks for a refresh (v2). */
  reason: "connect" | "refused" | "expiring";
}

/** Returns a token, or null/undefined/"" to stop (the user logged out, say). */
export type TokenProvider = (request: TokenRequest) => string | null | undefined | Promise<string | null | undefined>;

/** The part of the WHATWG WebSocket the client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface NotifyClientOptions {
  /** The gateway: "wss://host" (the endpoint path is added) or the full endpoint URL. */
  url: string;
  /** A token, or a provider called before every connect and again after 4401 or an `expiring` frame. */
  token: string | TokenProvider;
  /** "auto" (offer v2, accept v1: the default), "v2" (stop if the gateway speaks v1 only) or "v1". */
  protocol?: "auto" | "v1" | "v2";
  /** Backoff bounds in ms: full jitter in [0, min(max, base * 2^attempt)]. Default {base: 500, max: 30000}. */
  backoff?: { base?: number; max?: number };
  /** A connection open this long (ms) resets the backoff. Default 60000. */
  stableAfter?: number;
  /** The wait after 4429 (too many connections), uniform in [min, max] ms. Default {min: 20000, max: 60000}. */
  longWait?: { min?: number; max?: number };
  /** An attempt not open after this many ms is abandoned and retried. Default 15000. */
  connectTimeout?: number;
  /** v2: acks are sent at most this long (ms) after the notification was handled. Default 100. */
  ackInterval?: number;
  /** v2: or as soon as this many are waiting (at most 500). Default 100. */
  ackBatch?: number;
  /** v2: how many recent ids are remembered to drop duplicates. Default 2000. */
  dedupeSize?: number;
  /** A WebSocket implementation; default globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** For tests: the random source of the jitter, the clock and the timers. */
  random?: () => number;
  now?: () => number;
  timers?: {
    setTimeout(callback: () => void, ms: number): unknown;
    clearTimeout(handle: unknown): void;
  };
  /** A new notification. v2: acknowledged once this returns (or its promise resolves); if it throws, it is not, and the gateway sends it again on the next connection. */
  onNotification?: (notification: Notification) => void | Promise<void>;
  onStateChange?: (change: StateChange) => void;
  /** v2: retention dropped notifications this client never acknowledged. */
  onGap?: (gap: Gap) => void;
  /** Something went wrong that the client handles by itself (a refused refresh, a throwing handler). */
  onError?: (error: NotifyClientError) => void;
}

export declare class NotifyClient {
  constructor(options: NotifyClientOptions);
  readonly state: ConnectionState;
  readonly protocolVersion: "v1" | "v2" | null;
  readonly lastClose: { code: number; reason: string } | null;
  /** Start connecting (again after a stop); does nothing while running. */
  connect(): this;
  /** Stop for good: pending acks are sent, the socket closes with 1000, nothing reconnects. Idempotent. */
  close(): void;
}

export declare class NotifyClientError extends Error {
  /** "token_provider" | "handler" | "bad_frame" | "bad_url" | a v2 error frame's code ("invalid_token", ...). */
  readonly code: string;
}
