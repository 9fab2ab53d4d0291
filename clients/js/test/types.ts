// Compiled by `npm run typecheck` (tsc --strict): the declarations describe a real use.
import WebSocket from "ws";
import { PresenceClient, backoffDelay, type Presence, type ServerMessage, type ClientMessage } from "../src/index.js";

const client = new PresenceClient({ url: "ws://127.0.0.1:8080/ws", token: async () => "jwt", deviceId: "laptop", platform: "desktop", WebSocket });
const stop = client.onPresence((p: Presence, prev) => {
  const was: string = prev ? prev.status : "unknown";
  console.log(p.user_id, p.status, was, p.devices.map((d) => d.platform ?? "?"), p.last_seen ?? "now");
});
client.onTyping((t) => console.log(t.conversation_id, t.user_id, t.is_typing));
client.onState((s, info) => console.log(s, info.attempt, info.delayMs));
stop();
async function main() {
  const hello = await client.connect();
  const beat: number = hello.heartbeat_interval;
  await client.subscribe(["bob"]);
  await client.subscribeConversations(["room-1"]);
  client.onConversation((c) => console.log(c.conversation_id, c.online, "of", c.members, c.online_members.map((p) => p.user_id), c.more));
  const counted: number | undefined = client.conversation("room-1")?.online;
  void counted;
  await client.unsubscribeConversations(["room-1"]);
  await client.setStatus("away", "lunch", 600);
  client.typing("room-1");
  client.stopTyping("room-1");
  const typists: string[] = client.typingNow().map((t) => t.user_id);
  void typists;
  client.setActive(false, new Date(Date.now() - 60_000));
  client.setActive(true);
  const active: boolean = client.active;
  const idle: string | undefined = client.presence("bob")?.devices.find((d) => !d.active)?.idle_since;
  void active;
  void idle;
  client.close();
  return beat + backoffDelay(3, { initialMs: 500, maxMs: 30_000, factor: 2 });
}
function handle(m: ServerMessage): string {
  switch (m.type) {
    case "presence_update":
      return m.payload.status;
    case "typing_indicator":
      return m.payload.user_id;
    case "conversation_presence":
      return m.payload.online + " of " + m.payload.members + (m.payload.snapshot ? " (snapshot)" : "");
    case "connected":
      return String(m.payload.typing_ttl);
    case "ack":
    case "error":
      return String(m.id);
  }
}
const out: ClientMessage = { type: "subscribe", payload: { user_ids: ["a"] }, id: 1 };
const away: ClientMessage = { type: "activity", payload: { active: false, idle_since: "2026-12-06T10:30:00Z" } };
void away;
void main;
void handle;
void out;
