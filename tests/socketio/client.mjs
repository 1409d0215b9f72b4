// The seeds' socket.io-client code against a running Switchboard, one
// scenario per run: `node client.mjs <scenario> <base url>`. Tokens and the
// API key come in the environment (SB_TOKEN_*, SB_API_KEY). Prints one JSON
// line per step; exits 0 only when every check passed (tests/socketio_client.rs).
import { io } from "socket.io-client";

const [scenario, base] = process.argv.slice(2);
const env = process.env;

function step(what, value) {
  console.log(JSON.stringify({ step: what, value }));
}

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

// The next `event` on `socket` (its arguments), or a timeout error.
function next(socket, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    socket.once(event, (...args) => {
      clearTimeout(t);
      resolve(args);
    });
  });
}

async function api(path, body) {
  const r = await fetch(base + path, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${env.SB_API_KEY}` },
    body: JSON.stringify(body),
  });
  const json = await r.json();
  check(r.status === 200, `${path} answered ${r.status} ${JSON.stringify(json)}`);
  return json;
}

const scenarios = {
  // Seed 001: io(url, { auth: { token } }); `connected`, area events the
  // backend sends through the HTTP API, `token_revoked` on revocation.
  async seed001() {
    const socket = io(base, {
      auth: { token: env.SB_TOKEN_ALICE },
      transports: ["websocket"],
      reconnection: false,
    });
    const [welcome] = await next(socket, "connected");
    step("connected", welcome);
    check(welcome.userId === "alice", "connected as alice");
    const area = next(socket, "area_updated");
    await api("/api/send", { userId: "alice", type: "area_updated", data: { areaId: 7, name: "Hall" } });
    const [updated] = await area;
    step("area_updated", updated);
    check(updated.data.areaId === 7 && updated.data.name === "Hall", "area_updated data");
    const revoked = next(socket, "token_revoked");
    const gone = next(socket, "disconnect");
    await api("/api/revoke", { userId: "alice", reason: "logout" });
    const [r] = await revoked;
    step("token_revoked", r);
    check(r.reason === "logout", "token_revoked reason");
    const [reason] = await gone;
    step("disconnect", reason);
    check(reason === "io server disconnect", "no reconnection after a revocation");
  },

  // Seed 002: extraHeaders Authorization; emit('ping') -> 'pong'; `message`
  // events from the backend.
  async seed002() {
    const socket = io(base, {
      extraHeaders: { Authorization: `Bearer ${env.SB_TOKEN_BOB}` },
      transports: ["websocket"],
      reconnection: false,
    });
    await next(socket, "connect");
    step("connect", socket.id);
    const pong = next(socket, "pong");
    socket.emit("ping");
    step("pong", (await pong)[0]);
    const msg = next(socket, "message");
    await api("/api/send", { userId: "bob", type: "message", data: { text: "hello bob" } });
    const [m] = await msg;
    step("message", m);
    check(m.data.text === "hello bob", "message data");
    socket.disconnect();
  },

  // Seed 004: path '/realtime', query sessionId, auth token; a refused
  // token is a connect_error with the reason; REQUEST -> RESPONSE and an
  // UPDATE as JSON strings in `message` (socketio.message_strings).
  async seed004() {
    const bad = io(base, {
      path: "/realtime",
      query: { sessionId: "s-1" },
      auth: { token: "not-a-token" },
      transports: ["websocket"],
      reconnection: false,
    });
    const [err] = await next(bad, "connect_error");
    step("connect_error", err.message);
    check(err.message.length > 0, "connect_error carries the reason");
    bad.close();
    const socket = io(base, {
      path: "/realtime",
      query: { sessionId: "s-1" },
      auth: { token: env.SB_TOKEN_CAROL },
      transports: ["websocket"],
      reconnection: false,
    });
    await next(socket, "connect");
    step("connect", socket.id);
    // The seed's handler: `message` strings, parsed, switched on `type`.
    const seen = [];
    const wanted = new Promise((resolve) => {
      socket.on("message", (message) => {
        const parsed = JSON.parse(message);
        seen.push(parsed.type);
        if (parsed.type === "RESPONSE" || parsed.type === "UPDATE") {
          step(parsed.type, parsed);
          if (seen.includes("RESPONSE") && seen.includes("UPDATE")) resolve();
        }
      });
    });
    // sendAction(socket, 'whoami', {}) as the seed writes it.
    socket.emit(
      "message",
      JSON.stringify({ type: "REQUEST", requestId: Date.now().toString(), action: "whoami", data: {} }),
    );
    await api("/api/send", { userId: "carol", type: "UPDATE", data: { status: "completed" } });
    await Promise.race([
      wanted,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`got only ${seen}`)), 5000)),
    ]);
    socket.disconnect();
  },

  // Acks from the client (emitWithAck), a channel fed by the HTTP API and
  // by another Socket.IO client.
  async acks() {
    const opts = { transports: ["websocket"], reconnection: false };
    const a = io(base, { ...opts, auth: { token: env.SB_TOKEN_ALICE } });
    const b = io(base, { ...opts, auth: { token: env.SB_TOKEN_BOB } });
    await Promise.all([next(a, "connect"), next(b, "connect")]);
    const sub = await b.timeout(5000).emitWithAck("subscribe", { channel: "news" });
    step("subscribed", sub);
    check(sub.type === "subscribed" && sub.channel === "news", "subscribe acknowledged");
    const fromApi = next(b, "message");
    await api("/api/publish", { channel: "news", data: { n: 1 } });
    const [m1] = await fromApi;
    check(m1.channel === "news" && m1.data.n === 1, "publication from the API");
    const fromPeer = next(b, "message");
    const pub = await a.timeout(5000).emitWithAck("publish", { channel: "news", data: { n: 2 } });
    step("published", pub);
    check(pub.type === "published" && Number.isInteger(pub.offset), "publish acknowledged with its offset");
    const [m2] = await fromPeer;
    step("message", m2);
    check(m2.from === "alice" && m2.data.n === 2 && m2.offset === pub.offset, "publication from a peer");
    a.disconnect();
    b.disconnect();
  },

  // Acks from the server: an offline inbox delivery is acknowledged with
  // the event handler's callback, so it does not come again.
  async inbox() {
    const opts = { transports: ["websocket"], reconnection: false, auth: { token: env.SB_TOKEN_ALICE } };
    let socket = io(base, opts);
    await next(socket, "connect");
    const got = new Promise((resolve) => {
      socket.on("notice", (m, ack) => {
        step("notice", m);
        check(typeof ack === "function", "the delivery asks for an ack");
        if (m.data.n === 1) ack();
        if (m.data.n === 2) resolve();
      });
    });
    await api("/api/send", { userId: "alice", type: "notice", data: { n: 1 }, ack: true });
    await api("/api/send", { userId: "alice", type: "notice", data: { n: 2 }, ack: true });
    await got;
    socket.disconnect();
    // Reconnect: only the one not acknowledged comes again.
    socket = io(base, opts);
    const [again] = await next(socket, "notice");
    step("again", again);
    check(again.data.n === 2, "only the unacknowledged message is redelivered");
    socket.disconnect();
  },
};

const run = scenarios[scenario];
if (!run) {
  console.error(`unknown scenario ${scenario}`);
  process.exit(2);
}
run().then(
  () => {
    step("done", scenario);
    process.exit(0);
  },
  (e) => {
    console.error(e.stack || String(e));
    process.exit(1);
  },
);
