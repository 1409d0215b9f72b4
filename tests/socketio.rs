//! Socket.IO v4 over the WebSocket transport with a real server and real
//! WebSocket clients speaking Engine.IO v4 / Socket.IO v5 packets by hand
//! (tests/socketio_client.rs drives the real socket.io-client): the open
//! packet, the heartbeat, namespaces, CONNECT with its auth, events and
//! acks mapped onto the native protocol, publications from the HTTP API
//! reaching native and Socket.IO subscribers alike, revocation, and every
//! bad input answered while the server keeps serving.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchboard::config::{AuthMode, Config, Rule};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const SECRET: &str = "socketio-test-secret";
const KEY: &str = "socketio-api-key";

fn config() -> Config {
    let mut cfg = test_config(2);
    cfg.api.keys = vec![KEY.into()];
    cfg.channels.subscribe = Rule::Any;
    cfg.channels.publish = Rule::Any;
    cfg.socketio.namespaces = vec!["/custom".into()];
    cfg
}

fn jwt_config() -> Config {
    let mut cfg = config();
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    cfg.auth.jwt.algorithms = vec!["HS256".into()];
    cfg
}

fn token(sub: &str) -> String {
    hs256_token(SECRET, sub)
}

/// An Engine.IO client over WebSocket that has read the open packet.
struct Eio {
    ws: WebSocket<TcpStream>,
    open: Value,
}

impl Eio {
    fn connect(addr: SocketAddr, path_and_query: &str) -> Eio {
        Eio::connect_with(addr, path_and_query, None)
    }
    fn connect_with(addr: SocketAddr, path_and_query: &str, bearer: Option<&str>) -> Eio {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut req = format!("ws://{addr}{path_and_query}")
            .into_client_request()
            .unwrap();
        if let Some(t) = bearer {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (mut ws, resp) = tungstenite::client::client(req, stream).expect("upgrade");
        assert_eq!(resp.status(), 101);
        let first = read_text(&mut ws);
        let body = first.strip_prefix('0').expect("an open packet first");
        let open: Value = serde_json::from_str(body).unwrap();
        Eio { ws, open }
    }
    fn send(&mut self, packet: &str) {
        self.ws.send(Message::text(packet)).unwrap();
    }
    /// The next text packet, answering server pings on the way.
    fn recv(&mut self) -> String {
        loop {
            let t = read_text(&mut self.ws);
            if t == "2" {
                self.send("3");
                continue;
            }
            return t;
        }
    }
    /// The next `42` event on namespace prefix `nsp` ("" for `/`): (name, argument).
    fn event(&mut self, nsp: &str) -> (String, Value) {
        let p = self.recv();
        let body = p
            .strip_prefix(&format!("42{nsp}"))
            .unwrap_or_else(|| panic!("an event, got {p}"));
        let v: Value = serde_json::from_str(body).unwrap();
        (v[0].as_str().unwrap().to_owned(), v[1].clone())
    }
    /// CONNECT to `/` (with `auth`) and expect success; returns the welcome.
    fn join(&mut self, auth: Option<Value>) -> Value {
        match auth {
            Some(a) => self.send(&format!("40{a}")),
            None => self.send("40"),
        }
        let ok = self.recv();
        let sid: Value = serde_json::from_str(ok.strip_prefix("40").expect("40")).unwrap();
        assert!(sid["sid"].is_string(), "{ok}");
        let (name, welcome) = self.event("");
        assert_eq!(name, "connected", "{welcome}");
        welcome
    }
    /// The connection ends with close `code` (after any packets before it).
    fn expect_close(&mut self, code: u16) -> Vec<String> {
        let mut before = Vec::new();
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => before.push(t.to_string()),
                Ok(Message::Close(Some(f))) => {
                    assert_eq!(u16::from(f.code), code, "{f:?} after {before:?}");
                    return before;
                }
                other => panic!("expected close {code}, got {other:?} after {before:?}"),
            }
        }
    }
}

/// An HTTP API call with the test's API key; the whole response.
fn post(addr: SocketAddr, path: &str, body: Value) -> String {
    let body = body.to_string();
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn read_text(ws: &mut WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().expect("a packet") {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

const WS: &str = "/socket.io/?EIO=4&transport=websocket";

#[test]
fn open_packet_at_the_path_with_and_without_slash() {
    let mut cfg = config();
    cfg.socketio.ping_interval = Duration::from_millis(300);
    cfg.socketio.ping_timeout = Duration::from_millis(200);
    cfg.socketio.max_payload = 1000;
    let server = start(cfg);
    let addr = server.local_addr();
    for path in [WS, "/socket.io?EIO=4&transport=websocket"] {
        let c = Eio::connect(addr, path);
        assert!(c.open["sid"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(c.open["upgrades"], json!([]));
        assert_eq!(c.open["pingInterval"], 300);
        assert_eq!(c.open["pingTimeout"], 200);
        assert_eq!(c.open["maxPayload"], 1000);
    }
    // A second session has another sid.
    let a = Eio::connect(addr, WS);
    let b = Eio::connect(addr, WS);
    assert_ne!(a.open["sid"], b.open["sid"]);
}

#[test]
fn configured_path_and_what_is_refused_there() {
    let mut cfg = config();
    cfg.socketio.path = "/realtime".into();
    let server = start(cfg);
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, "/realtime/?EIO=4&transport=websocket");
    c.join(None);
    // Long-polling is not served yet: Engine.IO's own error, not a 404.
    let r = http(
        addr,
        "GET /realtime/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(
        r.ends_with("{\"code\":0,\"message\":\"Transport unknown\"}"),
        "{r}"
    );
    let r = http(
        addr,
        "GET /realtime/?EIO=3&transport=websocket HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.contains("\"code\":5"), "{r}");
    // The default path is not served once another is configured.
    let r = http(
        addr,
        "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
}

#[test]
fn events_become_native_messages_and_acks_their_answers() {
    let server = start(config());
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, &format!("{WS}&userId=alice"));
    let welcome = c.join(None);
    assert_eq!(welcome["userId"], "alice");
    // emit('ping') without an ack: the answer is an event.
    c.send("42[\"ping\"]");
    let (name, v) = c.event("");
    assert_eq!((name.as_str(), &v["type"]), ("pong", &json!("pong")));
    // emitWithAck('ping'): the answer is the ACK of id 7.
    c.send("427[\"ping\"]");
    let p = c.recv();
    let body = p.strip_prefix("437").unwrap_or_else(|| panic!("{p}"));
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v[0]["type"], "pong", "{p}");
    // A handler's error comes back as an `error` event, and the session stays.
    c.send("42[\"subscribe\",{}]");
    let (name, v) = c.event("");
    assert_eq!(
        (name.as_str(), &v["code"]),
        ("error", &json!("missing_field"))
    );
    c.send("42[\"no_such_type\"]");
    let (name, v) = c.event("");
    assert_eq!(
        (name.as_str(), &v["code"]),
        ("error", &json!("unknown_type"))
    );
    // Arguments the mapping cannot take: one clear error each.
    for bad in [
        "42[\"ping\",\"a string\"]",
        "42[\"ping\",{\"type\":\"publish\"}]",
        "423[\"ping\",{\"requestId\":1}]",
    ] {
        c.send(bad);
        let (name, v) = c.event("");
        assert_eq!(
            (name.as_str(), &v["code"]),
            ("error", &json!("bad_json")),
            "{bad}"
        );
    }
    c.send("428[\"ping\"]");
    assert!(c.recv().starts_with("438["));
}

#[test]
fn namespaces_configured_and_not() {
    let server = start(config());
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, WS);
    c.send("40/nope,");
    assert_eq!(c.recv(), "44/nope,{\"message\":\"Invalid namespace\"}");
    c.send("40/custom,");
    assert!(c.recv().starts_with("40/custom,{\"sid\":"));
    let (name, _) = c.event("/custom,");
    assert_eq!(name, "connected");
    // `/` joins the same identity; answers go to the namespace asked on.
    c.send("40");
    assert!(c.recv().starts_with("40{\"sid\":"));
    c.send("42/custom,5[\"ping\"]");
    assert!(c.recv().starts_with("43/custom,5[{\"type\":\"pong\""));
    c.send("42[\"ping\"]");
    assert!(c.recv().starts_with("42[\"pong\""));
    // Events on a namespace not joined are dropped, as socket.io does.
    c.send("42/other,[\"ping\"]");
    c.send("421[\"ping\"]");
    assert!(c.recv().starts_with("431["));
}

#[test]
fn connect_authenticates_like_a_native_client() {
    let server = start(jwt_config());
    let addr = server.local_addr();
    // auth: { token } (seeds 001, 004).
    let mut c = Eio::connect(addr, WS);
    let w = c.join(Some(json!({ "token": token("alice") })));
    assert_eq!(w["userId"], "alice");
    // Authorization: Bearer (seed 002) and ?token=.
    let mut c = Eio::connect_with(addr, WS, Some(&token("bob")));
    assert_eq!(c.join(None)["userId"], "bob");
    let mut c = Eio::connect(addr, &format!("{WS}&token={}", token("carol")));
    assert_eq!(c.join(None)["userId"], "carol");
    // Refused: CONNECT_ERROR with the reason, and the session may retry.
    let mut c = Eio::connect(addr, WS);
    c.send("40{\"token\":\"not-a-jwt\"}");
    let p = c.recv();
    let e: Value = serde_json::from_str(p.strip_prefix("44").expect("44")).unwrap();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{p}");
    c.send("40");
    let p = c.recv();
    assert!(
        p.starts_with("44{\"message\":\"authentication required"),
        "{p}"
    );
    // Nothing is answered before authentication.
    c.send("421[\"ping\"]");
    c.send(&format!("40{}", json!({ "token": token("dave") })));
    assert!(c.recv().starts_with("40{"));
    let (name, w) = c.event("");
    assert_eq!((name.as_str(), &w["userId"]), ("connected", &json!("dave")));
    // Three refusals are answered; the fourth closes the session.
    let mut c = Eio::connect(addr, WS);
    for _ in 0..3 {
        c.send("40{\"token\":\"x\"}");
        assert!(c.recv().starts_with("44{"));
    }
    c.send("40{\"token\":\"x\"}");
    let before = c.expect_close(4003);
    assert!(
        before.len() == 1 && before[0].starts_with("44{"),
        "{before:?}"
    );
}

#[test]
fn server_pings_and_a_silent_client_is_closed() {
    let mut cfg = config();
    cfg.socketio.ping_interval = Duration::from_millis(200);
    cfg.socketio.ping_timeout = Duration::from_millis(200);
    let server = start(cfg);
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    // Three pings answered: the session lives on.
    for _ in 0..3 {
        assert_eq!(read_text(&mut c.ws), "2");
        c.send("3");
    }
    c.send("421[\"ping\"]");
    assert!(c.recv().starts_with("431["));
    // A ping not answered ends it, without Socket.IO's DISCONNECT (the
    // client may reconnect, as after socket.io's "transport close").
    assert_eq!(read_text(&mut c.ws), "2");
    let before = c.expect_close(1011);
    assert!(before.is_empty(), "{before:?}");
}

#[test]
fn a_publication_reaches_native_and_socketio_subscribers() {
    let server = start(config());
    let addr = server.local_addr();
    // Two Socket.IO subscribers (one on each shard) and a native one.
    let mut sio: Vec<Eio> = (0..2)
        .map(|i| {
            let mut c = Eio::connect(addr, &format!("{WS}&userId=s{i}"));
            c.join(None);
            c.send("421[\"subscribe\",{\"channel\":\"news\"}]");
            let p = c.recv();
            assert!(p.starts_with("431[{\"type\":\"subscribed\""), "{p}");
            c
        })
        .collect();
    let mut native = ws(addr, "/ws?userId=n");
    let w: Value = serde_json::from_str(&read_text(&mut native)).unwrap();
    assert_eq!(w["type"], "connected");
    native
        .send(Message::text(r#"{"type":"subscribe","channel":"news"}"#))
        .unwrap();
    let s: Value = serde_json::from_str(&read_text(&mut native)).unwrap();
    assert_eq!(s["type"], "subscribed");
    let r = post(
        addr,
        "/api/publish",
        json!({"channel":"news","data":{"headline":"Hi"}}),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let n: Value = serde_json::from_str(&read_text(&mut native)).unwrap();
    assert_eq!(n["data"]["headline"], "Hi");
    for c in &mut sio {
        let (name, v) = c.event("");
        assert_eq!(name, "message");
        assert_eq!(v, n, "the same message under both wire formats");
    }
    // A type socket.io-client keeps for itself arrives as `message`, so it
    // cannot fire the client's own `disconnect` handlers.
    let r = post(
        addr,
        "/api/send",
        json!({"userId":"s1","type":"disconnect","data":1}),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (name, v) = sio[1].event("");
    assert_eq!(
        (name.as_str(), &v["type"]),
        ("message", &json!("disconnect"))
    );
    // A Socket.IO client publishes; the native subscriber gets it.
    sio[0].send("429[\"publish\",{\"channel\":\"news\",\"data\":[1,2]}]");
    let n: Value = serde_json::from_str(&read_text(&mut native)).unwrap();
    assert_eq!((&n["data"], &n["from"]), (&json!([1, 2]), &json!("s0")));
}

#[test]
fn revocation_sends_token_revoked_then_disconnects() {
    let mut cfg = jwt_config();
    cfg.api.keys = vec![KEY.into()];
    let server = start(cfg);
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, WS);
    c.join(Some(json!({ "token": token("alice") })));
    let r = post(addr, "/api/revoke", json!({"userId":"alice"}));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (name, v) = c.event("");
    assert_eq!(
        (name.as_str(), &v["type"]),
        ("token_revoked", &json!("token_revoked"))
    );
    let before = c.expect_close(4001);
    assert_eq!(before, vec!["41".to_owned()], "DISCONNECT: no reconnection");
}

#[test]
fn bad_packets_close_that_session_only() {
    let mut cfg = config();
    cfg.socketio.max_payload = 100;
    let server = start(cfg);
    let addr = server.local_addr();
    let cases: [(&str, u16); 7] = [
        ("9", 1002),
        ("4x", 1002),
        ("42[\"unterminated\"", 1002),
        ("450-[\"a\"]", 1002),
        ("4565-[\"a\"]", 1002),
        ("1", 1000),
        ("", 1002),
    ];
    for (packet, code) in cases {
        let mut c = Eio::connect(addr, WS);
        c.join(None);
        c.send(packet);
        c.expect_close(code);
    }
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.send(&format!("42[\"ping\",{{\"pad\":\"{}\"}}]", "x".repeat(100)));
    c.expect_close(1009);
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    c.expect_close(1003);
    // A text packet while attachments are due (socket.io's parser refuses it too).
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.send("451-[\"a\",{\"_placeholder\":true,\"num\":0}]");
    c.send("42[\"ping\"]");
    c.expect_close(1002);
    // Attachments over maxPayload together.
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.send("452-[\"a\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]");
    c.ws.send(Message::binary(vec![0u8; 60])).unwrap();
    c.ws.send(Message::binary(vec![0u8; 60])).unwrap();
    c.expect_close(1009);
    // A complete binary event has no native mapping: an error, the session stays.
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.send("451-[\"publish\",{\"_placeholder\":true,\"num\":0}]");
    c.ws.send(Message::binary(vec![7u8; 3])).unwrap();
    let (name, v) = c.event("");
    assert_eq!(
        (name.as_str(), &v["code"]),
        ("error", &json!("binary_not_supported"))
    );
    c.send("421[\"ping\"]");
    assert!(c.recv().starts_with("431["));
    // The server still serves.
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.send("421[\"ping\"]");
    assert!(c.recv().starts_with("431["));
}

#[test]
fn a_session_that_never_connects_a_namespace_is_closed() {
    let mut cfg = config();
    cfg.auth.timeout = Duration::from_millis(300);
    cfg.socketio.ping_interval = Duration::from_secs(60);
    let server = start(cfg);
    let mut c = Eio::connect(server.local_addr(), WS);
    let before = c.expect_close(4008);
    assert!(before.is_empty(), "{before:?}");
}

#[test]
fn disconnect_keeps_the_engine_io_session_as_socketio_does() {
    let mut cfg = config();
    cfg.socketio.ping_interval = Duration::from_millis(200);
    cfg.socketio.ping_timeout = Duration::from_millis(1000);
    let server = start(cfg);
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, &format!("{WS}&userId=alice"));
    c.join(None);
    c.send("41");
    // Still pinged: the Engine.IO session lives on, without a namespace.
    assert_eq!(read_text(&mut c.ws), "2");
    c.send("3");
    // Events on the namespace left are dropped; joining again works, as the
    // same identity (no second welcome).
    c.send("421[\"ping\"]");
    c.send("40");
    assert!(c.recv().starts_with("40{\"sid\":"));
    c.send("422[\"ping\"]");
    let p = c.recv();
    assert!(p.starts_with("432[{\"type\":\"pong\""), "{p}");
}

#[test]
fn the_heartbeat_starts_before_connect_and_connect_time_is_bounded() {
    let mut cfg = config();
    // Pings at 300 ms intervals (each wait at most a 100 ms tick late):
    // the second is due by 900 ms, well before the 2 s connect deadline.
    cfg.socketio.ping_interval = Duration::from_millis(300);
    cfg.socketio.ping_timeout = Duration::from_millis(100);
    cfg.auth.timeout = Duration::from_millis(2000);
    let server = start(cfg);
    let mut c = Eio::connect(server.local_addr(), WS);
    // Pings from the open packet on, answered, yet no CONNECT: closed once
    // auth.timeout has passed, with the pings it answered before that.
    let mut pings = 0;
    loop {
        match c.ws.read().expect("a packet or the close") {
            Message::Text(t) if t.as_str() == "2" => {
                pings += 1;
                c.send("3");
            }
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 4008, "{f:?}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} pings before the connect deadline");
}

/// The conformance configuration the official suites run against.
fn conformance() -> Config {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio/conformance.toml"),
    )
    .unwrap();
    let mut cfg: Config = toml::from_str(&text).unwrap();
    cfg.port = 0;
    cfg.shards = 2;
    cfg.validate().unwrap();
    cfg
}

#[test]
fn conformance_echo_applications() {
    let server = start(conformance());
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, WS);
    assert_eq!(c.open["pingInterval"], 300);
    c.send("40/custom,{\"token\":\"abc\"}");
    assert!(c.recv().starts_with("40/custom,{\"sid\":"));
    assert_eq!(c.recv(), "42/custom,[\"auth\",{\"token\":\"abc\"}]");
    c.send("40");
    assert!(c.recv().starts_with("40{\"sid\":"));
    assert_eq!(c.recv(), "42[\"auth\",{}]");
    c.send("42[\"message\",1,\"2\",{\"3\":[true]}]");
    assert_eq!(c.recv(), "42[\"message-back\",1,\"2\",{\"3\":[true]}]");
    c.send("42456[\"message-with-ack\",1,\"2\",{\"3\":[false]}]");
    assert_eq!(c.recv(), "43456[1,\"2\",{\"3\":[false]}]");
    // Binary attachments come back with their placeholders.
    let binary = |c: &mut Eio| match c.ws.read().unwrap() {
        Message::Binary(b) => b.to_vec(),
        other => panic!("{other:?}"),
    };
    c.send("452-[\"message\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]");
    c.ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    c.ws.send(Message::binary(vec![4u8, 5, 6])).unwrap();
    assert_eq!(
        c.recv(),
        "452-[\"message-back\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]"
    );
    assert_eq!(
        (binary(&mut c), binary(&mut c)),
        (vec![1, 2, 3], vec![4, 5, 6])
    );
    c.send("452-789[\"message-with-ack\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]");
    c.ws.send(Message::binary(vec![1u8])).unwrap();
    c.ws.send(Message::binary(vec![2u8])).unwrap();
    assert_eq!(
        c.recv(),
        "462-789[{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]"
    );
    assert_eq!((binary(&mut c), binary(&mut c)), (vec![1], vec![2]));
    // Plain Engine.IO at /engine.io/: every data packet back, text and binary.
    let mut e = Eio::connect(addr, "/engine.io/?EIO=4&transport=websocket");
    e.send("4hello");
    assert_eq!(e.recv(), "4hello");
    e.ws.send(Message::binary(vec![1u8, 2, 3, 4])).unwrap();
    match e.ws.read().unwrap() {
        Message::Binary(b) => assert_eq!(&b[..], &[1, 2, 3, 4]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_conformance_endpoints_are_off_by_default() {
    let server = start(config());
    let addr = server.local_addr();
    let r = http(
        addr,
        "GET /engine.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let mut c = Eio::connect(addr, WS);
    c.join(None);
    c.send("42[\"message\",{\"a\":1}]");
    // The native mapping: `message` is not a native type.
    let (name, v) = c.event("");
    assert_eq!(
        (name.as_str(), &v["code"]),
        ("error", &json!("unknown_type"))
    );
}

#[test]
fn message_strings_for_seed_004_clients() {
    let mut cfg = config();
    cfg.socketio.message_strings = true;
    cfg.socketio.path = "/realtime".into();
    let server = start(cfg);
    let addr = server.local_addr();
    let mut c = Eio::connect(addr, "/realtime/?EIO=4&transport=websocket&userId=u4");
    c.send("40");
    assert!(c.recv().starts_with("40{"));
    // The welcome too is a `message` string.
    let (name, w) = c.event("");
    assert_eq!(name, "message");
    let w: Value = serde_json::from_str(w.as_str().expect("a JSON string")).unwrap();
    assert_eq!(w["type"], "connected");
    // emit('message', JSON.stringify({type: 'REQUEST', ...})) -> RESPONSE.
    let req = json!({"type":"REQUEST","requestId":"r-1","action":"whoami"}).to_string();
    c.send(&format!("42{}", json!(["message", req])));
    let (name, r) = c.event("");
    assert_eq!(name, "message");
    let r: Value = serde_json::from_str(r.as_str().unwrap()).unwrap();
    assert_eq!(
        (&r["type"], &r["requestId"]),
        (&json!("RESPONSE"), &json!("r-1")),
        "{r}"
    );
    assert_eq!(r["data"]["userId"], "u4");
    // A channel publication, shared with the other string clients.
    c.send(&format!(
        "42{}",
        json!([
            "message",
            json!({"type":"subscribe","channel":"t"}).to_string()
        ])
    ));
    let (_, s) = c.event("");
    assert!(s.as_str().unwrap().contains("\"subscribed\""), "{s}");
    let r = post(addr, "/api/publish", json!({"channel":"t","data":{"k":1}}));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (name, m) = c.event("");
    let m: Value = serde_json::from_str(m.as_str().unwrap()).unwrap();
    assert_eq!((name.as_str(), &m["data"]["k"]), ("message", &json!(1)));
    // An UPDATE the backend sends to the user.
    let r = post(
        addr,
        "/api/send",
        json!({"userId":"u4","type":"UPDATE","data":{"status":"completed"}}),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (_, u) = c.event("");
    let u: Value = serde_json::from_str(u.as_str().unwrap()).unwrap();
    assert_eq!(
        (&u["type"], &u["data"]["status"]),
        (&json!("UPDATE"), &json!("completed"))
    );
}

#[test]
fn inbox_deliveries_are_acknowledged_with_socketio_acks() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stored_config(2, dir.path());
    cfg.api.keys = vec![KEY.into()];
    let server = start(cfg);
    let addr = server.local_addr();
    let query = format!("{WS}&userId=alice");
    let mut c = Eio::connect(addr, &query);
    c.join(None);
    // The next event with an ack id: (ack id, event name, argument).
    let acked = |c: &mut Eio| {
        let p = c.recv();
        let rest = p.strip_prefix("42").unwrap_or_else(|| panic!("{p}"));
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        assert!(digits > 0, "an event with an ack id: {p}");
        let id: u64 = rest[..digits].parse().unwrap();
        let v: Value = serde_json::from_str(&rest[digits..]).unwrap();
        (id, v[0].as_str().unwrap().to_owned(), v[1].clone())
    };
    let send = |n: u32| {
        let r = post(
            addr,
            "/api/send",
            json!({"userId":"alice","type":"notice","data":{"n":n},"ack":true}),
        );
        assert!(r.contains("\"stored\":true"), "{r}");
    };
    send(1);
    let (k1, name, v) = acked(&mut c);
    assert_eq!(
        (name.as_str(), &v["data"]["n"], &v["ack"]),
        ("notice", &json!(1), &json!(true))
    );
    c.send(&format!("43{k1}[]"));
    send(2);
    let (k2, _, v) = acked(&mut c);
    assert_eq!(v["data"]["n"], 2);
    assert_ne!(k1, k2);
    // Not acknowledged: n=2 waits in the inbox; n=1 was acknowledged and is gone.
    drop(c);
    let mut c = Eio::connect(addr, &query);
    c.join(None);
    let (_, _, v) = acked(&mut c);
    assert_eq!(
        v["data"]["n"], 2,
        "only the unacknowledged message comes again: {v}"
    );
}

#[test]
fn shutdown_lets_socketio_clients_reconnect() {
    let server = start(config());
    let mut c = Eio::connect(server.local_addr(), WS);
    c.join(None);
    let stop = std::thread::spawn(move || server.shutdown());
    // 1001 without Socket.IO's DISCONNECT: the client reconnects elsewhere.
    let before = c.expect_close(1001);
    assert!(before.is_empty(), "{before:?}");
    drop(c);
    stop.join().unwrap();
}
