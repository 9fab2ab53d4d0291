// @ts-check
/**
 * presenced WebSocket client, for browsers and Node (>= 18).
 *
 * - connects to `/ws` with a token (a string, or a function returning a fresh one for
 *   every attempt);
 * - heartbeats at the server's `heartbeat_interval` (from the `connected` message) and
 *   treats a silent server as gone;
 * - keeps one device id across reconnects and page reloads (generated once and stored in
 *   the tab's sessionStorage, or the `storage` given; or the `deviceId` given), so the
 *   server continues the device's session within its offline grace: a reconnect is no
 *   visible offline for anyone;
 * - reconnects with exponential backoff and jitter (after a 1012 "service restart" from a
 *   draining node: at once, within a second), re-subscribes to every watched user
 *   and reconciles from the snapshot the server sends: callbacks fire only for users whose
 *   presence differs from what the application last saw, and typing indicators that were
 *   on before the gap are cleared;
 * - `close()` signs out (`bye`): the server ends the device's session at once; a 4003 close
 *   (the user's data was erased) ends the client the same way, without a reconnect;
 * - typing with local debounce: call `typing(conversation)` on every keystroke; the server
 *   hears `is_typing: true` once (refreshed before its `typing_ttl` runs out) and `false`
 *   after `typingIdleMs` without keystrokes;
 * - activity: in a browser it tells the server by itself whether the user is here (the
 *   page hidden, or no input for `idleAfterMs`: idle since then; input or the page shown:
 *   active at once); `setActive(bool)` for Node and apps. An idle report waits until
 *   `activityMinIntervalMs` (a minute) after the previous report, carrying the moment in
 *   `idle_since`: a user who comes and goes sends at most one a minute, and nothing is
 *   sent while nothing changes. Each (re)connection says the device's state once.
 *
 * Types: ./index.d.ts.
 */

const OPEN = 1;

/** @type {Required<import("./index").Backoff>} */
const BACKOFF = { initialMs: 500, maxMs: 30_000, factor: 2 };

/** Close code of a draining server (RFC 6455 registry: "Service Restart"). */
const SERVICE_RESTART = 1012;
/** Close code of a connection another connection of the same device replaced. */
const REPLACED = 4001;
/** Close code of a user whose data was erased: never reconnect. */
const ERASED = 4003;
/** Input events that say the user is here. */
const INPUT_EVENTS = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "focus"];
/** Where a generated device id is kept. */
const DEVICE_KEY = "presenced.device_id";

/** A new device id (the server's id charset: letters, digits, `-`). */
function newDeviceId(random) {
  let hex = "";
  for (let i = 0; i < 16; i++) hex += Math.floor(random() * 16).toString(16);
  return "web-" + hex;
}

/** The tab's sessionStorage, when there is one (it survives reloads, not other tabs). */
function defaultStorage() {
  try {
    const s = /** @type {any} */ (globalThis).sessionStorage;
    return s && typeof s.getItem === "function" ? s : null;
  } catch {
    return null; // storage disabled
  }
}

/**
 * Delay before reconnection attempt `attempt` (0-based): exponential, capped, with "equal
 * jitter" (between half and all of the exponential value), so a server restart is not met
 * by every client at the same instant, and no client hammers it.
 * @param {number} attempt
 * @param {Required<import("./index").Backoff>} b
 * @param {() => number} random
 */
export function backoffDelay(attempt, b, random = Math.random) {
  const exp = Math.min(b.maxMs, b.initialMs * Math.pow(b.factor, Math.min(attempt, 30)));
  return Math.round(exp / 2 + random() * (exp / 2));
}

/** The fields a presence change is judged by (`ttl` counts down by itself). */
function sameView(a, b) {
  if (!a || !b) return false;
  const keys = ["status", "message", "last_seen", "device_count", "expires_at", "node_id", "idle_since"];
  if (keys.some((k) => a[k] !== b[k])) return false;
  return JSON.stringify(a.devices || []) === JSON.stringify(b.devices || []);
}

export class PresenceClient {
  /** @param {import("./index").ClientOptions} options */
  constructor(options) {
    if (!options || !options.url) throw new TypeError("PresenceClient: options.url is required (ws://host:port/ws)");
    this.options = options;
    /** @type {typeof WebSocket} */
    this.WS = options.WebSocket || /** @type {any} */ (globalThis).WebSocket;
    if (!this.WS) throw new TypeError("PresenceClient: no WebSocket here; pass options.WebSocket (e.g. the ws package)");
    this.backoff = { ...BACKOFF, ...(options.backoff || {}) };
    this.random = options.random || Math.random;
    /** @type {{getItem(k: string): string | null, setItem(k: string, v: string): void} | null} */
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    /** The device id sent on every connection: given, stored, or generated once. */
    this.deviceId = options.deviceId || this.storedDeviceId() || this.forkDeviceId();
    this.typingIdleMs = options.typingIdleMs ?? 3000;
    /** @type {import("./index").ConnectionState} */
    this.state = "idle";
    /** @type {WebSocket | null} */
    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    /** @type {import("./index").Connected | null} */
    this.session = null;
    /** @type {Set<string>} */
    this.watched = new Set();
    /** @type {Map<string, import("./index").Presence>} */
    this.presences = new Map();
    /** @type {Map<string, {conversation_id: string, members: number, online: number, list: Map<string, import("./index").Presence>, next_cursor?: string}>} */
    this.rooms = new Map();
    /** @type {Map<string, import("./index").TypingIndicator>} conversation + user -> indicator */
    this.typists = new Map();
    /** @type {Map<string, {idle: any, sentAt: number}>} conversation -> our own typing */
    this.ownTyping = new Map();
    /** @type {Map<number, {resolve: (v: any) => void, reject: (e: any) => void}>} */
    this.pending = new Map();
    this.seq = 0;
    this.timers = { heartbeat: /** @type {any} */ (null), watchdog: /** @type {any} */ (null), retry: /** @type {any} */ (null) };
    this.lastMessageAt = 0;
    this.handlers = {
      presence: new Set(),
      typing: new Set(),
      state: new Set(),
      error: new Set(),
      connected: new Set(),
      conversation: new Set(),
    };
    /** @type {Array<{resolve: (c: import("./index").Connected) => void}>} */
    this.waiters = [];
    this.idleAfterMs = options.idleAfterMs ?? 120_000;
    this.activityMinIntervalMs = options.activityMinIntervalMs ?? 60_000;
    /**
     * What the application says (`active`, and since when idle) and what the server has
     * of this connection (`sent`: a new session starts active).
     */
    /** @type {{active: boolean, idleSince: number, sent: boolean | null, sentAt: number, timer: any}} */
    this.activity = { active: true, idleSince: 0, sent: null, sentAt: 0, timer: null };
    /** @type {(() => void) | null} detaches the browser's listeners */
    this.untrack = null;
    const doc = options.document === undefined ? /** @type {any} */ (globalThis).document : options.document;
    /** The document followed from `connect()` to `close()`, if any. */
    this.trackedDoc = options.trackActivity ?? Boolean(doc) ? doc : null;
  }

  /**
   * Says whether the user is active on this device (idle, or the app in the background:
   * `false`, optionally since `since`, a Date or ms). Active again is sent at once; an idle
   * report at most once per `activityMinIntervalMs` (its moment travels with it).
   * @param {boolean} active
   * @param {Date | number} [since]
   */
  setActive(active, since) {
    const a = this.activity;
    if (active) {
      a.active = true;
    } else if (a.active) {
      const t = since === undefined ? NaN : Number(since);
      a.active = false;
      a.idleSince = Number.isFinite(t) ? t : Date.now();
    }
    this.flushActivity();
  }

  /** Whether this client says the user is active on the device. */
  get active() {
    return this.activity.active;
  }

  /** Stops following the page and drops a pending activity report. */
  stopTracking() {
    clearTimeout(this.activity.timer);
    if (this.untrack) this.untrack();
    this.untrack = null;
  }

  /** Sends the application's activity if the server has something else. */
  flushActivity() {
    const a = this.activity;
    clearTimeout(a.timer);
    if (this.state !== "open" || a.active === a.sent) return;
    const wait = a.active ? 0 : a.sentAt + this.activityMinIntervalMs - Date.now();
    if (wait > 0) {
      a.timer = setTimeout(() => this.flushActivity(), wait);
      return;
    }
    /** @type {Record<string, unknown>} */
    const payload = { active: a.active };
    if (!a.active) payload.idle_since = new Date(a.idleSince).toISOString();
    a.sent = a.active;
    a.sentAt = Date.now();
    this.request("activity", payload).catch((e) => {
      // Not applied. The connection went: said again on the next one. Refused (a rate
      // limit): said again after the minimum interval.
      if (e && (e.code === "not_connected" || e.code === "disconnected" || e.code === "closed")) return;
      this.emit("error", e);
      a.sent = null;
      clearTimeout(a.timer);
      a.timer = setTimeout(() => this.flushActivity(), this.activityMinIntervalMs);
    });
  }

  /**
   * Follows the user in a browser page: hidden, or no input for `idleAfterMs`, is idle
   * (since the page was hidden, or the last input); input or the page shown again is
   * active. Returns the function that stops following.
   */
  trackActivity(doc) {
    if (!doc || typeof doc.addEventListener !== "function") return () => {};
    let lastInput = Date.now();
    const input = () => {
      lastInput = Date.now();
      if (!this.activity.active && !doc.hidden) this.setActive(true);
    };
    const visibility = () => (doc.hidden ? this.setActive(false) : input());
    const target = doc.defaultView || doc;
    for (const e of INPUT_EVENTS) target.addEventListener(e, input, { passive: true, capture: true });
    doc.addEventListener("visibilitychange", visibility);
    const check = setInterval(() => {
      if (this.activity.active && Date.now() - lastInput >= this.idleAfterMs) this.setActive(false, lastInput);
    }, Math.max(1000, Math.min(this.idleAfterMs / 4, 15_000)));
    if (doc.hidden) this.setActive(false);
    return () => {
      clearInterval(check);
      for (const e of INPUT_EVENTS) target.removeEventListener(e, input, { capture: true });
      doc.removeEventListener("visibilitychange", visibility);
    };
  }

  /** Connects (and keeps reconnecting until `close()`); resolves on the first `connected`. */
  connect() {
    const p = new Promise((resolve) => this.waiters.push({ resolve }));
    if (this.stopped) {
      this.stopped = false;
      this.attempt = 0;
      if (this.trackedDoc && !this.untrack) this.untrack = this.trackActivity(this.trackedDoc);
      void this.open();
    }
    return /** @type {Promise<import("./index").Connected>} */ (p);
  }

  /**
   * Stops for good and signs out: sends `bye` (the server ends this device's session at
   * once, with no offline grace) and closes; no reconnection.
   */
  close() {
    this.stopped = true;
    this.clearTimers();
    clearTimeout(this.timers.retry);
    this.stopTracking();
    for (const t of this.ownTyping.values()) clearTimeout(t.idle);
    this.ownTyping.clear();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      // Closing a socket still connecting makes Node's `ws` emit an error for the aborted
      // handshake; with no listener that error would be thrown as uncaught.
      ws.onerror = () => {};
      try {
        if (ws.readyState === OPEN) ws.send(JSON.stringify({ type: "bye" }));
        ws.close(1000, "bye");
      } catch {
        /* already closed */
      }
    }
    this.failPending("closed");
    this.setState("closed", {});
  }

  /** @returns {boolean} */
  get connected() {
    return this.state === "open";
  }

  /** The last presence seen of `userId`, if watched. */
  presence(userId) {
    return this.presences.get(userId);
  }

  /** Every typing indicator that is on now. */
  typingNow() {
    return [...this.typists.values()];
  }

  /** Who is typing in `conversationId` now. */
  typingIn(conversationId) {
    return [...this.typists.values()].filter((t) => t.conversation_id === conversationId).map((t) => t.user_id);
  }

  onPresence(fn) {
    return this.on("presence", fn);
  }
  onTyping(fn) {
    return this.on("typing", fn);
  }
  onState(fn) {
    return this.on("state", fn);
  }
  onError(fn) {
    return this.on("error", fn);
  }
  onConnected(fn) {
    return this.on("connected", fn);
  }
  onConversation(fn) {
    return this.on("conversation", fn);
  }

  /**
   * Follows conversations: their member and online counts and the members online (as
   * this user may see them), from the server's snapshot on, through every change.
   */
  async subscribeConversations(ids) {
    const fresh = ids.filter((id) => !this.rooms.has(id));
    for (const id of fresh) this.rooms.set(id, { conversation_id: id, members: 0, online: 0, list: new Map() });
    if (fresh.length && this.state === "open") {
      try {
        await this.request("subscribe", { conversation_ids: fresh });
      } catch (e) {
        // Refused (not a member…): not followed; the caller may ask again.
        for (const id of fresh) this.rooms.delete(id);
        throw e;
      }
    }
  }

  /** After a reconnect: each followed conversation again, one by one (a conversation this
   * user was removed from while away is dropped, not the others). */
  resubscribeConversations() {
    for (const id of [...this.rooms.keys()]) {
      this.request("subscribe", { conversation_ids: [id] }).catch((e) => {
        if (e.code === "forbidden" || e.code === "not_found") {
          this.rooms.delete(id);
          this.emit("conversation", { conversation_id: id, members: 0, online: 0, online_members: [], more: false, removed: true });
        } else this.emit("error", e);
      });
    }
  }

  async unsubscribeConversations(ids) {
    for (const id of ids) this.rooms.delete(id);
    if (ids.length && this.state === "open") await this.request("unsubscribe", { conversation_ids: ids });
  }

  /** A followed conversation now: counts, and the members online sorted by id. */
  conversation(id) {
    const r = this.rooms.get(id);
    if (!r) return undefined;
    const online = [...r.list.values()].sort((a, b) => (a.user_id < b.user_id ? -1 : a.user_id > b.user_id ? 1 : 0));
    return { conversation_id: id, members: r.members, online: r.online, online_members: online, more: r.next_cursor !== undefined };
  }

  /** Watches users: their presence now (the server's snapshot) and every visible change. */
  async subscribe(userIds) {
    const fresh = userIds.filter((id) => !this.watched.has(id));
    for (const id of userIds) this.watched.add(id);
    if (fresh.length && this.state === "open") await this.sendUsers("subscribe", fresh);
  }

  async unsubscribe(userIds) {
    for (const id of userIds) {
      this.watched.delete(id);
      this.presences.delete(id);
    }
    if (userIds.length && this.state === "open") await this.sendUsers("unsubscribe", userIds);
  }

  /**
   * Sets this user's status (`online`, `away`, `busy`, `offline` = appear offline), with an
   * optional message and TTL in seconds; resolves when the server has applied it.
   */
  setStatus(status, message, ttl) {
    /** @type {Record<string, unknown>} */
    const payload = { online_status: status };
    if (message !== undefined) payload.custom_status = message;
    if (ttl !== undefined) payload.ttl = ttl;
    return this.request("presence_update", payload);
  }

  /**
   * Call on every keystroke in `conversationId`. Sends `is_typing: true` at most once per
   * refresh period, and `false` after `typingIdleMs` without a call.
   */
  typing(conversationId) {
    const now = Date.now();
    const own = this.ownTyping.get(conversationId);
    const refreshMs = Math.max(1000, ((this.session && this.session.typing_ttl) || 5) * 600);
    if (own) clearTimeout(own.idle);
    const sentAt = !own || now - own.sentAt >= refreshMs ? now : own.sentAt;
    if (sentAt === now) this.sendTyping(conversationId, true);
    const idle = setTimeout(() => this.stopTyping(conversationId), this.typingIdleMs);
    this.ownTyping.set(conversationId, { idle, sentAt });
  }

  /** Says at once that this user stopped typing in `conversationId` (e.g. on send). */
  stopTyping(conversationId) {
    const own = this.ownTyping.get(conversationId);
    if (!own) return;
    clearTimeout(own.idle);
    this.ownTyping.delete(conversationId);
    this.sendTyping(conversationId, false);
  }

  // ---- internals -------------------------------------------------------------------

  on(kind, fn) {
    this.handlers[kind].add(fn);
    return () => this.handlers[kind].delete(fn);
  }

  emit(kind, ...args) {
    for (const fn of this.handlers[kind]) {
      try {
        fn(...args);
      } catch (e) {
        if (kind !== "error") this.emit("error", { code: "callback", message: String(e) });
      }
    }
  }

  setState(state, info) {
    this.state = state;
    this.emit("state", state, info);
  }

  async open() {
    if (this.stopped) return;
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting", { attempt: this.attempt });
    let token;
    try {
      const t = this.options.token;
      token = typeof t === "function" ? await t() : t;
    } catch (e) {
      this.emit("error", { code: "token", message: String(e) });
      return this.retry({ code: 0, reason: "token provider failed" });
    }
    if (this.stopped) return;
    const q = new URLSearchParams();
    if (token) q.set("token", token);
    q.set("device_id", this.deviceId);
    if (this.options.platform) q.set("platform", this.options.platform);
    const url = this.options.url + (this.options.url.includes("?") ? "&" : "?") + q.toString();
    let ws;
    try {
      ws = new this.WS(url);
    } catch (e) {
      this.emit("error", { code: "connect", message: String(e) });
      return this.retry({ code: 0, reason: String(e) });
    }
    this.ws = ws;
    ws.onmessage = (ev) => this.receive(typeof ev.data === "string" ? ev.data : String(ev.data));
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      // Another live client took this device id (a duplicated tab copies sessionStorage):
      // a generated id forks, so the two stop replacing each other.
      if (ev.code === REPLACED && !this.options.deviceId) this.forkDeviceId();
      if (ev.code === ERASED) {
        this.stopTracking();
        // The user's data was erased: reconnecting would start a new record.
        this.stopped = true;
        this.clearTimers();
        this.failPending("closed");
        this.setState("closed", { code: ev.code, reason: ev.reason });
        return;
      }
      this.retry({ code: ev.code, reason: ev.reason });
    };
  }

  /** The stored device id, if any. */
  storedDeviceId() {
    try {
      return (this.storage && this.storage.getItem(DEVICE_KEY)) || null;
    } catch {
      return null;
    }
  }

  /** Generates (and stores) a new device id. */
  forkDeviceId() {
    this.deviceId = newDeviceId(this.random);
    try {
      if (this.storage) this.storage.setItem(DEVICE_KEY, this.deviceId);
    } catch {
      /* storage full or disabled: kept for this client's life */
    }
    return this.deviceId;
  }

  /** The connection is gone: schedules the next attempt. */
  retry(info) {
    this.clearTimers();
    this.failPending("disconnected");
    if (this.stopped) return;
    // A draining node (1012) asks for a reconnect now: its session is held for the
    // offline grace, so the sooner the better; the jitter (under a second) spreads a
    // node's clients over the others.
    const delayMs =
      info.code === SERVICE_RESTART ? Math.round(this.random() * 1000) : backoffDelay(this.attempt, this.backoff, this.random);
    this.attempt += 1;
    this.setState("reconnecting", { ...info, attempt: this.attempt, delayMs });
    this.timers.retry = setTimeout(() => void this.open(), delayMs);
  }

  clearTimers() {
    clearInterval(this.timers.heartbeat);
    clearInterval(this.timers.watchdog);
  }

  failPending(why) {
    for (const p of this.pending.values()) p.reject({ code: why, message: "the connection " + (why === "closed" ? "was closed" : "was lost") });
    this.pending.clear();
  }

  receive(text) {
    this.lastMessageAt = Date.now();
    let m;
    try {
      m = JSON.parse(text);
    } catch {
      return this.emit("error", { code: "malformed", message: "server sent non-JSON: " + text.slice(0, 80) });
    }
    const p = m.payload || {};
    switch (m.type) {
      case "connected":
        return this.welcome(p);
      case "presence_update": {
        // Watched users, this user's own presence, and contacts the server pushes.
        const prev = this.presences.get(p.user_id);
        this.presences.set(p.user_id, p);
        if (!sameView(prev, p)) this.emit("presence", p, prev);
        // A member listed online in a followed conversation changed (busy, a message…).
        for (const r of this.rooms.values()) {
          if (r.list.has(p.user_id) && p.status !== "offline") {
            r.list.set(p.user_id, p);
            this.emit("conversation", this.conversation(r.conversation_id));
          }
        }
        return;
      }
      case "conversation_presence": {
        const r = this.rooms.get(p.conversation_id);
        if (!r) return;
        if (p.snapshot) {
          r.list.clear();
          r.next_cursor = p.next_cursor;
        }
        for (const q of p.presences || []) {
          if (q.status === "offline") r.list.delete(q.user_id);
          else r.list.set(q.user_id, q);
        }
        for (const gone of p.removed || []) r.list.delete(gone);
        r.members = p.members;
        r.online = p.online;
        return this.emit("conversation", this.conversation(r.conversation_id));
      }
      case "typing_indicator": {
        const key = p.conversation_id + "\u0000" + p.user_id;
        const had = this.typists.has(key);
        if (p.is_typing) this.typists.set(key, p);
        else this.typists.delete(key);
        if (had !== p.is_typing) this.emit("typing", p);
        return;
      }
      case "ack": {
        const w = this.pending.get(m.id);
        if (w) {
          this.pending.delete(m.id);
          w.resolve(p);
        }
        return;
      }
      case "error": {
        const w = m.id != null ? this.pending.get(m.id) : undefined;
        const err = { code: p.code, message: p.message };
        // Removed from a followed conversation: no longer followed.
        if (p.conversation_id && this.rooms.delete(p.conversation_id)) {
          this.emit("conversation", { conversation_id: p.conversation_id, members: 0, online: 0, online_members: [], more: false, removed: true });
        }
        if (w) {
          this.pending.delete(m.id);
          w.reject(err);
        } else this.emit("error", err);
        return;
      }
      default:
        return;
    }
  }

  welcome(p) {
    const reconnected = this.session !== null;
    this.session = p;
    this.attempt = 0;
    const beatMs = Math.max(1, p.heartbeat_interval || 25) * 1000;
    this.timers.heartbeat = setInterval(() => this.request("heartbeat", {}).catch(() => {}), beatMs);
    // A server that says nothing for two beats (acks included) is gone: a dead network
    // path may never deliver a close, so the client gives up on the socket itself.
    this.timers.watchdog = setInterval(() => {
      if (Date.now() - this.lastMessageAt > 2 * beatMs + 1000) this.drop("server silent for " + (2 * beatMs + 1000) + " ms");
    }, Math.min(beatMs, 5000));
    // Typing indicators from before a gap may have ended meanwhile: clear them.
    for (const [key, t] of this.typists) {
      this.typists.delete(key);
      this.emit("typing", { ...t, is_typing: false });
    }
    for (const own of this.ownTyping.values()) clearTimeout(own.idle);
    this.ownTyping.clear();
    this.setState("open", { reconnected });
    this.emit("connected", p, reconnected);
    // A new session starts active, a continued one keeps what the device last said:
    // either way the device says where it is now.
    this.activity.sent = null;
    this.activity.sentAt = 0;
    this.flushActivity();
    // Re-subscribe: the server answers with a snapshot, reconciled in `receive`.
    if (this.watched.size) this.sendUsers("subscribe", [...this.watched]).catch((e) => this.emit("error", e));
    this.resubscribeConversations();
    for (const w of this.waiters.splice(0)) w.resolve(p);
  }

  /** Closes a socket that stopped answering and reconnects. */
  drop(reason) {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      try {
        ws.close(4000, "heartbeat timeout");
      } catch {
        /* ignore */
      }
    }
    this.retry({ code: 4000, reason });
  }

  async sendUsers(type, ids) {
    const chunk = 500;
    for (let i = 0; i < ids.length; i += chunk) await this.request(type, { user_ids: ids.slice(i, i + chunk) });
  }

  sendTyping(conversationId, isTyping) {
    this.request("typing", { conversation_id: conversationId, is_typing: isTyping }).catch((e) => this.emit("error", e));
  }

  /** Sends a message with an id; resolves on its `ack`, rejects on its `error`. */
  request(type, payload) {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN || this.state !== "open") {
      return Promise.reject({ code: "not_connected", message: "not connected" });
    }
    const id = ++this.seq;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      ws.send(JSON.stringify({ type, payload, id }));
    });
  }
}
