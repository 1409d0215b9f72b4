//! The HTTP API from a real HTTP client (ureq, keep-alive) with real
//! WebSocket clients observing each effect: publish across shards, the seed
//! 002 routes exactly as written, status and client list, revocation (4001),
//! server-side subscribe, presence, history, the offline inbox, auth
//! failures, malformed and oversize bodies, keep-alive with pipelining, and
//! docs/openapi.yaml kept true against the router.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use switchboard::auth::{Claims, SigningKeySource, SigningSettings, mint};
use switchboard::config::{AuthMode, Config, Rule};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const KEY: &str = "test-api-key";
const SECRET: &str = "api-test-secret";

fn api_config(shards: usize) -> Config {
    let mut cfg = test_config(shards);
    cfg.api.keys = vec![KEY.into()];
    cfg.channels.subscribe = Rule::Any;
    cfg.channels.publish = Rule::Any;
    cfg
}

struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Api {
            agent,
            base: format!("http://{addr}"),
        }
    }
    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_as(path, body, Some(KEY))
    }
    fn post_as(&self, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send_json(&body).expect("HTTP exchange");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json().unwrap_or(Value::Null))
    }
    fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(path, Some(KEY))
    }
    fn get_as(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.call().expect("HTTP exchange");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json().unwrap_or(Value::Null))
    }
    fn delete(&self, path: &str) -> (u16, Value) {
        let mut resp = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {KEY}"))
            .call()
            .expect("HTTP exchange");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json().unwrap_or(Value::Null))
    }
}

struct Client {
    ws: WebSocket<TcpStream>,
    welcome: Value,
}

impl Client {
    fn user(addr: SocketAddr, user: &str) -> Client {
        let mut ws = ws(addr, &format!("/ws?userId={user}"));
        let welcome = read_json(&mut ws);
        assert_eq!(welcome["type"], "connected", "{welcome}");
        Client { ws, welcome }
    }
    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }
    fn recv(&mut self) -> Value {
        read_json(&mut self.ws)
    }
    fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let m = self.recv();
            if m["type"] == kind {
                return m;
            }
        }
    }
    fn subscribe(&mut self, channel: &str) {
        self.send(json!({"type":"subscribe","channel":channel}));
        self.next_of("subscribed");
    }
    fn shard(&self) -> u64 {
        let id = self.welcome["connectionId"].as_str().unwrap();
        id.split('.').next().unwrap().parse().unwrap()
    }
    /// The close code the server ends with.
    fn close_code(&mut self) -> u16 {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return f.code.into(),
                Ok(Message::Close(None)) => return 0,
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }
}

fn read_json(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn api_publish_reaches_subscribers_on_every_shard() {
    let server = start(api_config(4));
    let addr = server.local_addr();
    let mut subs: Vec<Client> = (0..8)
        .map(|i| Client::user(addr, &format!("s{i}")))
        .collect();
    let shards: std::collections::HashSet<u64> = subs.iter().map(Client::shard).collect();
    assert!(shards.len() >= 2, "subscribers spread over shards");
    for s in subs.iter_mut() {
        s.subscribe("news");
    }
    let api = Api::new(addr);
    for n in 1..=3u64 {
        let (status, r) = api.post("/api/publish", json!({"channel":"news","data":{"n":n}}));
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["offset"], n);
        assert_eq!(r["connections"], 8, "{r}");
        for s in subs.iter_mut() {
            let m = s.next_of("message");
            assert_eq!(m["data"]["n"], n);
            assert_eq!(m["channel"], "news");
        }
    }
    // Presence and history through the API.
    let (_, p) = api.get("/api/channels/news/presence");
    assert_eq!(p["connections"], 8);
    assert_eq!(p["users"].as_array().unwrap().len(), 8);
    let (_, h) = api.get("/api/channels/news/history?since=1&limit=5");
    let pubs = h["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 2);
    assert_eq!(pubs[0]["data"]["n"], 2);
    assert_eq!(h["hasMore"], false);
}

#[test]
fn seed_002_routes_work_as_written() {
    let server = start(api_config(3));
    let addr = server.local_addr();
    let api = Api::new(addr);
    let mut u1a = Client::user(addr, "user123");
    let mut u1b = Client::user(addr, "user123");
    let mut u2 = Client::user(addr, "user456");
    wait_until("routed", || server.router().user_count() == 2);

    let (status, r) = api.post(
        "/websocket/message/user",
        json!({"userId":"user123","type":"chat","data":{"message":"Hello!","sender":"system"}}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["connections"], 2);
    for c in [&mut u1a, &mut u1b] {
        let m = c.next_of("chat");
        assert_eq!(m["data"]["message"], "Hello!");
        assert!(m["timestamp"].is_string());
    }
    let (_, r) = api.post(
        "/websocket/message/users",
        json!({"userIds":["user123","user456","nobody"],"type":"announcement","data":{"title":"System Update"}}),
    );
    assert_eq!(
        (r["users"].clone(), r["connections"].clone()),
        (json!(3), json!(3))
    );
    for c in [&mut u1a, &mut u1b, &mut u2] {
        assert_eq!(c.next_of("announcement")["data"]["title"], "System Update");
    }
    let (_, r) = api.post(
        "/websocket/message/broadcast",
        json!({"type":"system","data":{"message":"Welcome to our platform!","level":"info"}}),
    );
    assert_eq!(r["connections"], 3);
    assert_eq!(u2.next_of("system")["data"]["level"], "info");
    let (_, r) = api.post(
        "/websocket/notification",
        json!({"userId":"user456","title":"New Message","body":"You have received a new message","data":{"category":"message","priority":"normal"}}),
    );
    assert_eq!(r["connections"], 1);
    let n = u2.next_of("notification");
    assert_eq!(n["data"]["title"], "New Message");
    assert_eq!(n["data"]["body"], "You have received a new message");
    assert_eq!(n["data"]["category"], "message");

    let (_, r) = api.get("/websocket/users/connected");
    assert_eq!(r["count"], 2);
    assert_eq!(r["users"], json!(["user123", "user456"]));
    let (_, r) = api.get("/websocket/users/user123/status");
    assert_eq!(r["online"], true);
    assert_eq!(r["connections"], 2, "{r}");
    assert!(r["since"].is_string());
    let (_, r) = api.get("/websocket/users/ghost/status");
    assert_eq!(
        (r["online"].clone(), r["connections"].clone()),
        (json!(false), json!(0))
    );

    let (status, r) = api.delete("/websocket/users/user123/disconnect?code=4000&reason=bye");
    assert_eq!(status, 200);
    assert_eq!(r["connections"], 2);
    assert_eq!(u1a.close_code(), 4000);
    assert_eq!(u1b.close_code(), 4000);
    wait_until("user gone", || server.router().user_shards("user123") == 0);
    drop(u2);
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, role: Option<&str>) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: Some(now_secs() + 3600),
        nbf: None,
        iat: Some(now_secs() - 5),
        iss: None,
        aud: None,
        jti: None,
        channels: Vec::new(),
        role: role.map(str::to_owned),
        tenant: None,
    };
    mint(
        &SigningSettings {
            algorithm: jsonwebtoken::Algorithm::HS256,
            key: SigningKeySource::Secret(SECRET.as_bytes().to_vec()),
            kid: None,
        },
        &claims,
    )
    .unwrap()
}

fn jwt_ws(addr: SocketAddr, token: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tungstenite::client::client(req, stream).unwrap().0
}

#[test]
fn auth_failures_and_bad_requests_get_clear_errors() {
    let mut cfg = api_config(2);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    cfg.api.max_body_bytes = 1024;
    let server = start(cfg);
    let addr = server.local_addr();
    let api = Api::new(addr);
    let body = json!({"channel":"c","data":1});
    let (s, r) = api.post_as("/api/publish", body.clone(), None);
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, _) = api.post_as("/api/publish", body.clone(), Some("wrong"));
    assert_eq!(s, 401);
    let (s, _) = api.post_as("/api/publish", body.clone(), Some(&token("bob", None)));
    assert_eq!(s, 403, "a user token is not an admin");
    let (s, r) = api.post_as(
        "/api/publish",
        body.clone(),
        Some(&token("root", Some("admin"))),
    );
    assert_eq!(s, 200, "{r}");
    // X-API-Key works too.
    let mut resp = api
        .agent
        .get(format!("{}/api/status", api.base))
        .header("X-API-Key", KEY)
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let status: Value = resp.body_mut().read_json().unwrap();
    assert!(status["shards"].as_array().unwrap().len() == 2);
    // My status: any valid token, its own subject.
    let mut me = jwt_ws(addr, &token("carol", None));
    assert_eq!(read_json(&mut me)["type"], "connected");
    let (s, r) = api.get_as("/websocket/me/status", Some(&token("carol", None)));
    assert_eq!(s, 200);
    assert_eq!(
        (r["userId"].as_str(), r["connections"].as_u64()),
        (Some("carol"), Some(1))
    );

    let raw = |req: &str| http(addr, req);
    let r = raw(&format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{{\"chan\":1"
    ));
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("\"bad_json\""), "{r}");
    let (s, r) = api.post("/api/publish", json!({"data":1}));
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    assert!(r["error"]["message"].as_str().unwrap().contains("channel"));
    let (s, r) = api.post("/api/publish", json!({"channel":"has space","data":1}));
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (400, Some("invalid_channel"))
    );
    let big = "x".repeat(2000);
    let r = raw(&format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{big}",
        big.len()
    ));
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let (s, r) = api.get("/api/nothing");
    assert_eq!((s, r["error"]["code"].as_str()), (404, Some("not_found")));
    let r = raw(&format!(
        "PUT /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 0\r\n\r\n"
    ));
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert!(r.contains("Allow: GET"), "{r}");
    let r =
        raw("POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 411"), "{r}");
    let r = raw(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // A revoked admin token stops working on the API too.
    let admin = token("root", Some("admin"));
    server
        .revoke(switchboard::store::RevocationKind::User, "root", "left")
        .unwrap();
    wait_until("revocation applied", || {
        api.get_as("/api/status", Some(&admin)).0 == 401
    });
    // The server keeps serving.
    let (s, _) = api.get("/api/status");
    assert_eq!(s, 200);
}

/// Read one HTTP response (head + Content-Length body) from a stream.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(buf) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap_or(0);
            let code = resp.code.unwrap();
            if buf.len() >= n + len {
                let body = String::from_utf8(buf[n..n + len].to_vec()).unwrap();
                buf.drain(..n + len);
                return (code, body);
            }
        }
        let mut tmp = [0u8; 4096];
        let k = s.read(&mut tmp).expect("read");
        assert!(k > 0, "EOF before a full response");
        buf.extend_from_slice(&tmp[..k]);
    }
}

#[test]
fn keep_alive_answers_pipelined_requests_in_order() {
    let server = start(api_config(2));
    let addr = server.local_addr();
    let mut sub = Client::user(addr, "p");
    sub.subscribe("pipe");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let publish = |n: u32| {
        let body = format!("{{\"channel\":\"pipe\",\"data\":{n}}}");
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Five requests in one write: answered in order on the same connection.
    let mut burst = String::new();
    burst.push_str(&publish(1));
    burst.push_str("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    burst.push_str(&publish(2));
    burst.push_str(&format!(
        "GET /api/status HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n"
    ));
    burst.push_str(&publish(3));
    s.write_all(burst.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let (c, b) = read_response(&mut s, &mut buf);
    assert_eq!(c, 200);
    assert_eq!(serde_json::from_str::<Value>(&b).unwrap()["offset"], 1);
    assert_eq!(read_response(&mut s, &mut buf), (200, "ok\n".into()));
    let (_, b) = read_response(&mut s, &mut buf);
    assert_eq!(serde_json::from_str::<Value>(&b).unwrap()["offset"], 2);
    let (_, b) = read_response(&mut s, &mut buf);
    assert!(serde_json::from_str::<Value>(&b).unwrap()["version"].is_string());
    let (_, b) = read_response(&mut s, &mut buf);
    assert_eq!(serde_json::from_str::<Value>(&b).unwrap()["offset"], 3);
    for n in 1..=3 {
        assert_eq!(sub.next_of("message")["data"], n);
    }
    // Still open: one more request, then Connection: close ends it.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).0, 200);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed after Connection: close");
}

#[test]
fn revoke_membership_clients_and_offline_inbox_via_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = api_config(2);
    cfg.storage = stored_config(2, dir.path()).storage;
    let server = start(cfg);
    let addr = server.local_addr();
    let api = Api::new(addr);

    // Server-side subscribe with a seed 001 event, then a publish reaches it.
    let mut a = Client::user(addr, "area-client");
    wait_until("routed", || server.router().user_shards("area-client") != 0);
    let (s, r) = api.post(
        "/api/subscribe",
        json!({"userId":"area-client","channel":"area:123","event":"area_added","data":{"areaId":"area_123"}}),
    );
    assert_eq!((s, r["connections"].as_u64()), (200, Some(1)), "{r}");
    let sub = a.next_of("subscribed");
    assert_eq!(
        (sub["channel"].as_str(), sub["server"].as_bool()),
        (Some("area:123"), Some(true))
    );
    assert_eq!(a.next_of("area_added")["data"]["areaId"], "area_123");
    api.post(
        "/api/publish",
        json!({"channel":"area:123","data":"updated"}),
    );
    assert_eq!(a.next_of("message")["data"], "updated");
    let (_, r) = api.post(
        "/api/unsubscribe",
        json!({"userId":"area-client","channel":"area:123","event":"area_removed"}),
    );
    assert_eq!(r["connections"], 1);
    a.next_of("unsubscribed");
    a.next_of("area_removed");

    // Client list: ingest some records so dataReceived moves.
    a.send(json!({"type":"sensor_data","data":{"v":1}}));
    a.next_of("ack");
    let (_, r) = api.get("/api/clients?limit=10");
    assert_eq!(r["total"], 1);
    let c = &r["clients"][0];
    assert_eq!(c["userId"], "area-client");
    assert_eq!(c["dataReceived"], 1);
    assert_eq!(c["isAuthenticated"], true);
    assert_eq!(c["ip"], "127.0.0.1");

    // Offline inbox through the API.
    let (_, r) = api.post(
        "/api/send",
        json!({"userId":"later","type":"chat","data":{"text":"while you were out"}}),
    );
    assert_eq!(
        (r["stored"].clone(), r["connections"].clone()),
        (json!(true), json!(0))
    );
    let mut later = Client::user(addr, "later");
    let m = later.next_of("chat");
    assert_eq!(m["data"]["text"], "while you were out");
    assert_eq!(m["id"], r["id"]);
    later.send(json!({"type":"ack","id":m["id"]}));

    // Revoke: the event, then 4001.
    let (s, r) = api.post(
        "/api/revoke",
        json!({"userId":"area-client","reason":"unpaired"}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["connections"], 1);
    let ev = a.next_of("token_revoked");
    assert_eq!(ev["reason"], "unpaired");
    assert_eq!(a.close_code(), 4001);
    let (s, r) = api.post("/api/revoke", json!({"reason":"nothing named"}));
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    server.shutdown();
}

/// docs/openapi.yaml lists exactly the router's routes (method and path).
#[test]
fn openapi_document_matches_the_router() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    let mut documented = std::collections::BTreeSet::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in doc.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            in_paths = false;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = format!(
                "/{}",
                p.trim_end_matches(':')
                    .trim_matches('"')
                    .trim_end_matches("\":")
            );
            path = path.trim_end_matches(':').trim_end_matches('"').to_owned();
        } else if let Some(m) = line.strip_prefix("    ")
            && let Some(method) = m.strip_suffix(':')
            && ["get", "post", "delete", "put", "patch"].contains(&method)
        {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: std::collections::BTreeSet<(String, String)> = switchboard::api::ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.yaml: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "openapi.yaml documents routes that do not exist: {extra:?}"
    );
}

/// A client that pipelines requests and never reads its responses stops
/// being served (back-pressure) instead of growing the server's memory;
/// once it reads, every response arrives, in order.
#[test]
fn pipelining_without_reading_is_back_pressured() {
    let mut cfg = api_config(1);
    cfg.max_outbound_bytes = 64 << 10;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    const N: usize = 3000;
    let one = b"GET /console.js HTTP/1.1\r\nHost: x\r\n\r\n";
    let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * N).collect();
    // Write from a thread: the server stops reading, so this may block.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&burst).is_ok());
    std::thread::sleep(Duration::from_millis(500));
    let served = server.stats().api_requests;
    assert!(
        (served as usize) < N / 2,
        "{served} of {N} requests served while the client read nothing"
    );
    // Now read everything: all N responses, complete and in order.
    let mut buf = Vec::new();
    for i in 0..N {
        let (code, body) = read_response(&mut s, &mut buf);
        assert_eq!(code, 200, "response {i}");
        assert!(
            body.contains("function") || body.contains("=>"),
            "response {i}"
        );
    }
    assert!(writer.join().unwrap());
}

/// A client that sends a request and half-closes still gets the answer
/// (it waited on the store), then the connection closes.
#[test]
fn half_close_after_a_request_still_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = api_config(2);
    cfg.storage = stored_config(2, dir.path()).storage;
    let server = start(cfg);
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"userId":"away","data":{"n":1},"ack":true}"#;
    write!(
        s,
        "POST /api/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    let (code, body) = read_response(&mut s, &mut buf);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["stored"], true);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    server.shutdown();
}

/// Issue 11 point 7: `POST /api/token` does what docs/API.md says in every
/// auth mode: mode `token` returns the shared token (it used to answer 409
/// with a message about mode `none`), mode `jwt` signs a JWT the server
/// accepts, mode `none` answers 409 `not_available` saying how to connect.
#[test]
fn token_route_answers_as_documented_in_every_auth_mode() {
    let body = json!({"userId":"alice","ttl":"10m"});

    let mut cfg = api_config(1);
    cfg.auth.mode = AuthMode::Token;
    cfg.auth.token = Some("shared-s3cret".into());
    let server = start(cfg);
    let (s, r) = Api::new(server.local_addr()).post("/api/token", body.clone());
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["token"], "shared-s3cret");
    assert_eq!(r["userId"], "alice");
    assert_eq!(
        r["expiresAt"],
        Value::Null,
        "the shared token does not expire"
    );
    let mut c = jwt_ws(server.local_addr(), "shared-s3cret");
    assert_eq!(read_json(&mut c)["type"], "connected");
    drop(server);

    let mut cfg = api_config(1);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    let server = start(cfg);
    let (s, r) = Api::new(server.local_addr()).post("/api/token", body.clone());
    assert_eq!(s, 200, "{r}");
    let exp = r["expiresAt"].as_u64().expect("a JWT expires");
    assert!(exp > now_secs() && exp <= now_secs() + 600 + 5, "{r}");
    let mut c = jwt_ws(server.local_addr(), r["token"].as_str().unwrap());
    let hello = read_json(&mut c);
    assert_eq!(
        (hello["type"].as_str(), hello["userId"].as_str()),
        (Some("connected"), Some("alice"))
    );
    drop(server);

    let server = start(api_config(1));
    let (s, r) = Api::new(server.local_addr()).post("/api/token", body);
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (409, Some("not_available"))
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"none\"") && msg.contains("?userId="),
        "{msg}"
    );
}
