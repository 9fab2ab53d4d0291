// The client against a real presenced (PRESENCED_BIN, started here on loopback and
// restarted mid-session). Run by `cargo test --test js_client`, or by hand:
//   PRESENCED_BIN=/path/to/presenced node --test test/
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

import { PresenceClient, backoffDelay } from "../src/index.js";

const BIN = process.env.PRESENCED_BIN;
const SECRET = "js-client-test-secret-js-client-test-secret";
const dataDir = mkdtempSync(join(tmpdir(), "presenced-js-"));
let server = null;
let port = 0;

function b64url(v) {
  return Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");
}

/** An HS256 JWT as presenced expects it (the same as `presenced token`). */
function mint(sub, scope) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, iss: "presence-service", iat: now, exp: now + 3600 };
  if (scope) claims.scope = scope;
  const head = b64url({ alg: "HS256", typ: "JWT" }) + "." + b64url(claims);
  return head + "." + createHmac("sha256", SECRET).update(head).digest("base64url");
}

/** Starts presenced (port 0 the first time, the same port after) and waits for its address. */
function startServer() {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, ["serve"], {
      detached: true, // its own process group, stopped by pgid
      stdio: ["ignore", "ignore", "pipe"],
      env: {
        PATH: process.env.PATH,
        PRESENCE_SERVICE__HOST: "127.0.0.1",
        PRESENCE_SERVICE__PORT: String(port),
        PRESENCE_SERVICE__GRPC_PORT: "0",
        PRESENCE_SERVICE__DATA_DIR: dataDir,
        PRESENCE_SERVICE__NODE_ID: "js-node",
        PRESENCE_AUTH__JWT_SECRET: SECRET,
        PRESENCE_LOGGING__FORMAT: "json",
        PRESENCE_PRESENCE__HEARTBEAT_INTERVAL: "1s",
        PRESENCE_PRESENCE__SESSION_TTL: "5s",
        PRESENCE_PRESENCE__TYPING_TTL: "5s",
      },
    });
    const timer = setTimeout(() => reject(new Error("presenced did not report its address within 20 s")), 20_000);
    let buf = "";
    child.stderr.on("data", (chunk) => {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const v = JSON.parse(line);
          if (v.http) {
            clearTimeout(timer);
            port = Number(v.http.split(":").pop());
            resolve(child);
          }
        } catch {
          /* not JSON */
        }
      }
    });
    child.on("exit", (code) => reject(new Error("presenced exited with " + code)));
  });
}

function killServer() {
  if (!server) return;
  try {
    process.kill(-server.pid, "SIGKILL");
  } catch {
    /* gone */
  }
  server = null;
}

/** SIGTERM: the server drains (closes every WebSocket with 1012) and exits. */
function drainServer() {
  const child = server;
  server = null;
  return new Promise((resolve) => {
    child.on("exit", () => resolve());
    process.kill(child.pid, "SIGTERM");
  });
}

/** A storage like the browser's sessionStorage, for one simulated tab. */
function tabStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)) };
}

const base = () => "http://127.0.0.1:" + port;
const wsUrl = () => "ws://127.0.0.1:" + port + "/ws";

async function rest(method, path, token, body) {
  const r = await fetch(base() + path, {
    method,
    headers: { authorization: "Bearer " + token, "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  const v = await r.json();
  assert.equal(r.status, 200, JSON.stringify(v));
  return v.data;
}

/** A WebSocket class that records what the client sends. */
function recordingWs(sent) {
  return class extends WebSocket {
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  };
}

/** Resolves when `pred()` holds (polled), or fails naming `what` after `ms`. */
async function until(what, pred, ms = 5000) {
  const start = Date.now();
  while (!pred()) {
    if (Date.now() - start > ms) throw new Error(what + ": not within " + ms + " ms");
    await new Promise((r) => setTimeout(r, 20));
  }
}

const clients = [];
function client(user, opts = {}) {
  const c = new PresenceClient({ url: wsUrl(), token: mint(user), deviceId: user + "-dev", WebSocket, ...opts });
  clients.push(c);
  return c;
}

before(async () => {
  assert.ok(BIN, "set PRESENCED_BIN to the presenced binary");
  server = await startServer();
});

after(() => {
  for (const c of clients) c.close();
  killServer();
  rmSync(dataDir, { recursive: true, force: true });
});

test("backoff grows exponentially, is capped, and jitters between half and all", () => {
  const b = { initialMs: 500, maxMs: 30_000, factor: 2 };
  assert.deepEqual([0, 1, 2, 3].map((n) => backoffDelay(n, b, () => 1)), [500, 1000, 2000, 4000]);
  assert.equal(backoffDelay(20, b, () => 1), 30_000);
  assert.equal(backoffDelay(3, b, () => 0), 2000);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelay(4, b);
    assert.ok(d >= 4000 && d <= 8000, String(d));
  }
});

test("heartbeats at the server's interval; sees its own presence and a watched user's", async () => {
  const sent = [];
  const alice = client("alice", { WebSocket: recordingWs(sent) });
  const seen = [];
  alice.onPresence((p) => seen.push(p));
  const hello = await alice.connect();
  assert.equal(hello.user_id, "alice");
  assert.equal(hello.heartbeat_interval, 1);
  assert.equal(hello.typing_ttl, 5);
  await alice.subscribe(["bob"]);
  await until("bob's snapshot (offline)", () => alice.presence("bob")?.status === "offline");
  const bob = client("bob", { platform: "mobile" });
  await bob.connect();
  await until("bob online on a phone", () => alice.presence("bob")?.status === "online");
  assert.deepEqual(alice.presence("bob").devices, [{ device_id: "bob-dev", platform: "mobile", active: true }]);
  await bob.setStatus("away", "lunch");
  await until("bob away", () => alice.presence("bob")?.status === "away" && alice.presence("bob").message === "lunch");
  const t0 = Date.now();
  const beats0 = sent.filter((m) => m.type === "heartbeat").length;
  await new Promise((r) => setTimeout(r, 3500));
  const beats = sent.filter((m) => m.type === "heartbeat").length - beats0;
  assert.ok(beats >= 2 && beats <= 4, `${beats} heartbeats in ${Date.now() - t0} ms at a 1 s interval`);
  assert.ok(seen.some((p) => p.user_id === "bob" && p.status === "away"));
  await assert.rejects(alice.setStatus(/** @type {any} */ ("dancing")), (e) => e.code === "bad_request");
});

test("activity: no input or a hidden page is idle (one report a minute at most), input is active at once; said again after a reconnect", async () => {
  const sent = [];
  const doc = new EventTarget();
  /** @type {any} */ (doc).hidden = false;
  const dana = client("dana", { WebSocket: recordingWs(sent), document: doc, idleAfterMs: 400, activityMinIntervalMs: 1500 });
  const erin = client("erin", { trackActivity: false });
  await erin.connect();
  await erin.subscribe(["dana"]);
  const device = () => erin.presence("dana")?.devices?.[0];
  const reports = () => sent.filter((m) => m.type === "activity").map((m) => m.payload);
  await dana.connect();
  await until("dana online and active", () => device()?.active === true);
  await until("the connection's first report: active", () => reports().length === 1);
  assert.deepEqual(reports()[0], { active: true });
  // No input for idleAfterMs: idle, since the last input (before the report); it waits
  // for the minimum interval after the first report.
  const t0 = Date.now();
  await until("no input: idle", () => device()?.active === false, 4000);
  assert.equal(reports().length, 2);
  assert.equal(reports()[1].active, false);
  assert.ok(Date.parse(reports()[1].idle_since) <= t0, "idle since the last input: " + reports()[1].idle_since);
  assert.equal(dana.active, false);
  // Input: active at once.
  doc.dispatchEvent(new Event("keydown"));
  await until("input: active", () => device()?.active === true, 1000);
  const activeAt = Date.now();
  // Hidden: idle since now, reported no sooner than activityMinIntervalMs after the last report.
  /** @type {any} */ (doc).hidden = true;
  const hiddenAt = Date.now();
  doc.dispatchEvent(new Event("visibilitychange"));
  await until("hidden: idle", () => device()?.active === false, 4000);
  assert.ok(Date.now() - activeAt >= 1300, "the idle report waited for the minimum interval");
  assert.ok(Math.abs(Date.parse(reports()[3].idle_since) - hiddenAt) < 100, "its moment is when the page was hidden");
  // Nothing more while nothing changes.
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(reports().length, 4);
  // A reconnect (the session continues within the grace): the device says where it is
  // once more, and watchers see no change.
  const seen = [];
  erin.onPresence((p) => p.user_id === "dana" && seen.push(p));
  dana.drop("test");
  await until("said again after the reconnect", () => reports().length === 5, 6000);
  assert.equal(reports()[4].active, false);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(seen, [], "no flash of activity for a continued session");
  /** @type {any} */ (doc).hidden = false;
  dana.setActive(true);
  await until("setActive(true)", () => device()?.active === true, 1000);
});

test("close() while the socket is still connecting ends quietly (ws emits an error for the aborted handshake)", async () => {
  const created = [];
  const c = client("carol", {
    WebSocket: class extends WebSocket {
      constructor(...args) {
        super(...args);
        created.push(this);
      }
    },
  });
  void c.connect();
  await until("the client's socket", () => created.length === 1, 2000);
  assert.equal(created[0].readyState, WebSocket.CONNECTING);
  // An error thrown as uncaught in the next 300 ms fails this test (node's test runner).
  c.close();
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(c.state, "closed");
  assert.equal(created.length, 1, "no reconnection after close()");
});

test("typing: one frame for a burst of keystrokes, false after the idle time", async () => {
  const admin = mint("ops", "presence:admin");
  await rest("PUT", "/api/v2/conversations/room-1/members", admin, { members: ["carol", "dan"] });
  const sent = [];
  const carol = client("carol", { WebSocket: recordingWs(sent), typingIdleMs: 300 });
  const dan = client("dan");
  const events = [];
  dan.onTyping((t) => events.push(t));
  await Promise.all([carol.connect(), dan.connect()]);
  for (let i = 0; i < 10; i++) {
    carol.typing("room-1");
    await new Promise((r) => setTimeout(r, 20));
  }
  await until("dan sees carol typing", () => dan.typingIn("room-1").includes("carol"));
  const typingFrames = () => sent.filter((m) => m.type === "typing");
  assert.equal(typingFrames().length, 1, JSON.stringify(typingFrames()));
  await until("carol stops after the idle time", () => !dan.typingIn("room-1").includes("carol"), 3000);
  assert.deepEqual(typingFrames().map((m) => m.payload.is_typing), [true, false]);
  assert.deepEqual(events.map((e) => e.is_typing), [true, false]);
});

test("a reload continues the session (one stored device id): a watcher sees no offline; close() signs out at once", async () => {
  const watcher = client("wanda");
  const seen = [];
  watcher.onPresence((p) => p.user_id === "gus" && seen.push(p.status));
  await watcher.connect();
  await watcher.subscribe(["gus"]);
  const tab = tabStorage();
  const first = client("gus", { deviceId: undefined, storage: tab });
  const hello = await first.connect();
  assert.match(hello.device_id, /^web-[0-9a-f]{16}$/);
  assert.equal(tab.getItem("presenced.device_id"), hello.device_id, "the generated id is stored");
  await until("gus online", () => watcher.presence("gus")?.status === "online");
  seen.length = 0;
  // The page reloads: the socket goes without a goodbye, the new page reads the same id.
  first.stopped = true;
  first.ws.close();
  const second = client("gus", { deviceId: undefined, storage: tab });
  const again = await second.connect();
  assert.equal(again.device_id, hello.device_id);
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(seen, [], "no offline, no second online: " + JSON.stringify(seen));
  assert.equal(watcher.presence("gus").device_count, 1);
  // Signing out is immediate: no grace.
  const t0 = Date.now();
  second.close();
  await until("gus offline at once", () => watcher.presence("gus")?.status === "offline", 2000);
  assert.ok(Date.now() - t0 < 2000);
});

test("a draining server's 1012: back within a second, same device, session continued", async () => {
  const helen = client("helen", { deviceId: undefined, storage: tabStorage(), backoff: { initialMs: 5000, maxMs: 5000, factor: 1 } });
  const states = [];
  helen.onState((s, info) => states.push({ s, ...info }));
  const hello = await helen.connect();
  await drainServer();
  await until("1012 seen", () => states.some((x) => x.s === "reconnecting" && x.code === 1012), 5000);
  const retry = states.find((x) => x.s === "reconnecting" && x.code === 1012);
  assert.ok(retry.delayMs <= 1000, "reconnects within a second after 1012, not after its 5 s backoff: " + retry.delayMs);
  server = await startServer();
  await until("reconnected", () => helen.connected, 10_000);
  assert.equal(helen.session.device_id, hello.device_id);
});

test("a conversation: counts and the members online, kept up to date; dropped when removed", async () => {
  const admin = mint("ops", "presence:admin");
  await rest("PUT", "/api/v2/conversations/js-room/members", admin, { members: ["gus", "hal", "ivy"] });
  const gus = client("gus");
  const seen = [];
  gus.onConversation((c) => seen.push(c));
  await gus.connect();
  await gus.subscribeConversations(["js-room"]);
  const room = () => gus.conversation("js-room");
  await until("the snapshot", () => room()?.members === 3 && room().online === 1);
  assert.deepEqual(room().online_members.map((p) => p.user_id), ["gus"]);
  const hal = client("hal");
  await hal.connect();
  await until("hal online, counted and listed", () => room().online === 2 && room().online_members.some((p) => p.user_id === "hal"));
  await hal.setStatus("busy", "call");
  await until("hal's status in the list", () => room().online_members.find((p) => p.user_id === "hal")?.status === "busy");
  hal.close();
  await until("hal gone from the list", () => room().online === 1 && room().online_members.length === 1);
  // gus is removed: told, no longer followed.
  await rest("PUT", "/api/v2/conversations/js-room/members", admin, { members: ["hal", "ivy"] });
  await until("removed", () => seen.some((c) => c.removed) && gus.conversation("js-room") === undefined);
});

test("a server restart mid-session: backoff, reconnection, re-subscription and reconciliation", async () => {
  const admin = mint("ops", "presence:admin");
  // dave's status is stored (no device): the same before and after the restart.
  await rest("PUT", "/api/v2/presence/dave", mint("dave"), { status: "busy", message: "focus" });
  let gate = null; // while set, the token provider waits: the test decides when alice may reconnect
  const erin = client("erin", {
    token: async () => {
      if (gate) await gate.promise;
      return mint("erin");
    },
    backoff: { initialMs: 100, maxMs: 800, factor: 2 },
    random: () => 1,
  });
  const states = [];
  erin.onState((s, info) => states.push({ s, ...info }));
  const changes = [];
  erin.onPresence((p) => changes.push(p.user_id + ":" + p.status));
  await erin.connect();
  await erin.subscribe(["dave", "frank"]);
  await until("snapshots", () => erin.presence("dave")?.status === "busy" && erin.presence("frank")?.status === "offline");

  killServer();
  await until("at least three attempts while the server is down", () => states.filter((x) => x.s === "reconnecting" && x.delayMs).length >= 3, 10_000);
  const delays = states.filter((x) => x.s === "reconnecting" && x.delayMs).map((x) => x.delayMs);
  assert.deepEqual(delays.slice(0, 3), [100, 200, 400], "exponential backoff: " + delays);
  assert.equal(erin.connected, false);

  // The server comes back; frank changes before erin is let back in.
  let open;
  gate = { promise: new Promise((r) => (open = r)) };
  server = await startServer();
  await rest("PUT", "/api/v2/presence/frank", mint("frank"), { status: "away", message: "back soon" });
  changes.length = 0;
  open();
  gate = null;
  await until("reconnected", () => erin.connected, 10_000);
  assert.ok(states.some((x) => x.s === "open" && x.reconnected), JSON.stringify(states.slice(-3)));
  // Reconciled from the snapshot: frank's change arrives; dave, unchanged, is not re-announced.
  await until("frank's change reconciled", () => erin.presence("frank")?.status === "away");
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(changes.includes("frank:away"), JSON.stringify(changes));
  assert.ok(!changes.some((c) => c.startsWith("dave:")), "dave did not change: " + JSON.stringify(changes));
  // The subscription was restored on the new server: a later change is pushed.
  await rest("PUT", "/api/v2/presence/dave", admin, { status: "online", message: "" });
  await until("dave's later change pushed", () => changes.includes("dave:online"));
});
