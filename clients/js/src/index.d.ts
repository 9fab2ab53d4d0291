// Types of the presenced WebSocket protocol and of the client (./index.js).

export type Status = "online" | "away" | "busy" | "offline";
export type Platform = "desktop" | "mobile" | "web";

/** One live device of a user. */
export interface Device {
  device_id: string;
  platform?: Platform;
  /** Whether the user is active on the device. */
  active: boolean;
  /** RFC 3339: since when idle (absent while active, or when the viewer may not see times). */
  idle_since?: string;
}

/** What a viewer sees of one user (the same shape as the REST API's). */
export interface Presence {
  user_id: string;
  status: Status;
  message?: string;
  /** RFC 3339; null while online, or when hidden from this viewer. */
  last_seen: string | null;
  updated_at: string | null;
  node_id: string;
  /** Remaining seconds of an explicit status with a TTL. */
  ttl?: number;
  expires_at?: string;
  /** With an automatic `away`: RFC 3339, since when the last device went idle. */
  idle_since?: string;
  device_count: number;
  devices: Device[];
}

export interface TypingIndicator {
  conversation_id: string;
  user_id: string;
  is_typing: boolean;
}

/** The server's first message: who it thinks you are and the timing to keep (seconds). */
export interface Connected {
  user_id: string;
  device_id: string;
  platform?: Platform;
  node_id: string;
  heartbeat_interval: number;
  session_ttl: number;
  typing_ttl: number;
}

/** A refused request or a protocol error (`code` from the server's error table). */
export interface PresenceError {
  code: string;
  message: string;
}

/** A conversation's presence as the server sends it: a snapshot, or what changed. */
export interface ConversationPresence {
  conversation_id: string;
  /** Members in the conversation. */
  members: number;
  /** Members this user sees with any status but offline. */
  online: number;
  /** Snapshot: the first page of members online. Otherwise: members whose view changed. */
  presences: Presence[];
  /** Snapshot with more members online than listed: the REST page's cursor. */
  next_cursor?: string;
  snapshot: boolean;
  /** Members who left the conversation. */
  removed?: string[];
}

/** A followed conversation, as the client holds it. */
export interface Conversation {
  conversation_id: string;
  members: number;
  online: number;
  /** The members online this client knows of, sorted by id. */
  online_members: Presence[];
  /** More members are online than the snapshot listed (page them over REST). */
  more: boolean;
  /** This user was removed from the conversation: it is no longer followed. */
  removed?: boolean;
}

/** Server → client messages. */
export type ServerMessage =
  | { type: "connected"; payload: Connected }
  | { type: "presence_update"; payload: Presence }
  | { type: "typing_indicator"; payload: TypingIndicator }
  | { type: "conversation_presence"; payload: ConversationPresence }
  | { type: "ack"; id: string | number | null; payload: { id: string | number | null; type: string } }
  | { type: "error"; id: string | number | null; payload: PresenceError & { id: string | number | null } };

/** Client → server messages. */
export type ClientMessage = { id?: string | number } & (
  | { type: "heartbeat"; payload?: Record<string, never> }
  | { type: "presence_update"; payload: { online_status?: Status; custom_status?: string; ttl?: number } }
  | { type: "activity"; payload: { active: boolean; idle_since?: string } }
  | { type: "typing"; payload: { conversation_id: string; is_typing: boolean } }
  | { type: "subscribe"; payload: { user_ids?: string[]; conversation_ids?: string[] } }
  | { type: "unsubscribe"; payload: { user_ids?: string[]; conversation_ids?: string[] } }
  | { type: "bye"; payload?: Record<string, never> }
);

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateInfo {
  /** Reconnection attempt (1 = the first retry). */
  attempt?: number;
  /** Wait before the next attempt. */
  delayMs?: number;
  /** Close code and reason of the connection that ended. */
  code?: number;
  reason?: string;
  /** With "open": true after a reconnection. */
  reconnected?: boolean;
}

export interface Backoff {
  /** First retry waits between half and all of this (default 500 ms). */
  initialMs?: number;
  /** Cap (default 30 s). */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
}

/** A WebSocket constructor: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  new (url: string): WebSocket;
}

export interface ClientOptions {
  /** `ws://host:port/ws` (or `wss://`). */
  url: string;
  /** A JWT, or a function giving a fresh one for every (re)connection. */
  token?: string | (() => string | Promise<string>);
  /**
   * This device's id, the same on every connection, so a reconnect continues its session
   * (within the server's offline grace: nobody sees it go offline). Default: generated
   * once and kept in `storage`.
   */
  deviceId?: string;
  /**
   * Where a generated device id is kept (default: the tab's `sessionStorage` in a browser,
   * which survives reloads; none in Node, where the id lasts as long as the client). Pass
   * `null` for none, or any object with `getItem`/`setItem` (e.g. a file-backed store in
   * an app).
   */
  storage?: { getItem(key: string): string | null; setItem(key: string, value: string): void } | null;
  platform?: Platform;
  WebSocket?: WebSocketLike | unknown;
  backoff?: Backoff;
  /** Stop typing after this long without a keystroke (default 3000 ms). */
  typingIdleMs?: number;
  /**
   * Follow the user's activity in a browser page (default: on when there is a
   * `document`), from `connect()` to `close()`: hidden, or no input for `idleAfterMs`,
   * reports the device idle; input or the page shown, active.
   */
  trackActivity?: boolean;
  /** The document to follow (default `globalThis.document`). */
  document?: unknown;
  /** No input for this long is idle (default 120000 ms). */
  idleAfterMs?: number;
  /** At most one idle report per this long (default 60000 ms); active is sent at once. */
  activityMinIntervalMs?: number;
  /** For tests: the jitter's random source. */
  random?: () => number;
}

export declare function backoffDelay(attempt: number, backoff: Required<Backoff>, random?: () => number): number;

export declare class PresenceClient {
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  readonly connected: boolean;
  /** The `connected` payload of the current (or last) connection. */
  readonly session: Connected | null;
  /** The device id this client connects with. */
  readonly deviceId: string;
  connect(): Promise<Connected>;
  /** Signs out (`bye`: the session ends now) and stops reconnecting. */
  close(): void;
  /**
   * Whether the user is active on this device (`false`: idle, or the app in the
   * background, since `since`, default now). Sent to the server when it changes.
   */
  setActive(active: boolean, since?: Date | number): void;
  /** What this client last said of the user's activity. */
  readonly active: boolean;
  presence(userId: string): Presence | undefined;
  typingIn(conversationId: string): string[];
  typingNow(): TypingIndicator[];
  subscribe(userIds: string[]): Promise<void>;
  unsubscribe(userIds: string[]): Promise<void>;
  /** Follows conversations: counts and the members online, kept up to date. */
  subscribeConversations(conversationIds: string[]): Promise<void>;
  unsubscribeConversations(conversationIds: string[]): Promise<void>;
  conversation(conversationId: string): Conversation | undefined;
  setStatus(status: Status, message?: string, ttl?: number): Promise<{ id: string | number | null; type: string }>;
  typing(conversationId: string): void;
  stopTyping(conversationId: string): void;
  /** Each returns a function that removes the callback. */
  onPresence(fn: (presence: Presence, previous: Presence | undefined) => void): () => void;
  onTyping(fn: (indicator: TypingIndicator) => void): () => void;
  onState(fn: (state: ConnectionState, info: StateInfo) => void): () => void;
  onError(fn: (error: PresenceError) => void): () => void;
  onConnected(fn: (connected: Connected, reconnected: boolean) => void): () => void;
  onConversation(fn: (conversation: Conversation) => void): () => void;
}
