//! The client protocol on /ws with real clients: welcome, channels across
//! shards, direct messages to every connection of a user, presence,
//! request/response, errors that keep the connection open, and a routing
//! table that ends empty.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

struct Client {
    ws: WebSocket<TcpStream>,
    welcome: Value,
}

impl Client {
    fn connect(addr: SocketAddr, query: &str) -> Client {
        let mut ws = ws(addr, &format!("/ws{query}"));
        let welcome = read_json(&mut ws);
        assert_eq!(welcome["type"], "connected", "{welcome}");
        Client { ws, welcome }
    }
    fn user(addr: SocketAddr, user: &str) -> Client {
        Client::connect(addr, &format!("?userId={user}"))
    }
    fn shard(&self) -> u64 {
        let id = self.welcome["connectionId"].as_str().unwrap();
        id.split('.').next().unwrap().parse().unwrap()
    }
    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }
    fn recv(&mut self) -> Value {
        read_json(&mut self.ws)
    }
    /// Send and expect one reply of `kind`.
    fn ask(&mut self, v: Value, kind: &str) -> Value {
        self.send(v);
        let r = self.recv();
        assert_eq!(r["type"], kind, "{r}");
        r
    }
    /// No message arrives within `ms`.
    fn quiet(&mut self, ms: u64) {
        self.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        match self.ws.read() {
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected silence, got {other:?}"),
        }
        self.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
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

fn four_shards() -> switchboard::Server {
    let mut cfg = test_config(4);
    cfg.channels.subscribe = switchboard::config::Rule::Any;
    cfg.channels.publish = switchboard::config::Rule::Any;
    start(cfg)
}

#[test]
fn welcome_carries_identity_and_features() {
    let server = four_shards();
    let c = Client::user(server.local_addr(), "alice");
    assert_eq!(c.welcome["userId"], "alice");
    assert!(c.welcome["connectionId"].is_string());
    assert!(c.welcome["timestamp"].is_string());
    let features = c.welcome["features"].as_array().unwrap();
    for f in [
        "channels",
        "direct",
        "broadcast",
        "presence",
        "request",
        "history",
    ] {
        assert!(features.contains(&json!(f)), "{f}");
    }
    // This server stores nothing: no inbox, acks or ingestion announced.
    for f in ["inbox", "ack", "ingest"] {
        assert!(!features.contains(&json!(f)), "{f}");
    }
    let anon = Client::connect(server.local_addr(), "");
    assert!(
        anon.welcome["userId"]
            .as_str()
            .unwrap()
            .starts_with("anon-")
    );
}

#[test]
fn direct_message_reaches_every_connection_of_the_user_exactly_once() {
    let server = four_shards();
    let addr = server.local_addr();
    // Round-robin hand-off: four consecutive connections land on four shards.
    let mut alice: Vec<Client> = (0..3).map(|_| Client::user(addr, "alice")).collect();
    let mut bob = Client::user(addr, "bob");
    let mut shards: Vec<u64> = alice.iter().map(Client::shard).collect();
    shards.push(bob.shard());
    shards.sort_unstable();
    assert_eq!(shards, vec![0, 1, 2, 3], "spread over all shards");
    assert_eq!(server.router().user_shards("alice").count_ones(), 3);

    for i in 0..20 {
        let sent = bob.ask(
            json!({"type":"send","to":"alice","data":{"n":i},"requestId":i}),
            "sent",
        );
        assert_eq!(sent["connections"], 3, "{sent}");
        assert_eq!(sent["requestId"], i);
    }
    for a in alice.iter_mut() {
        for i in 0..20 {
            let m = a.recv();
            assert_eq!(m["type"], "direct");
            assert_eq!(m["from"], "bob");
            assert_eq!(m["data"]["n"], i, "in order, once each");
        }
        a.quiet(100);
    }
    // Seed 003 chat with a recipient.
    let sent = bob.ask(
        json!({"type":"chat","payload":{"recipient":"alice","message":"hi"}}),
        "sent",
    );
    assert_eq!(sent["connections"], 3);
    for a in alice.iter_mut() {
        let m = a.recv();
        assert_eq!(m["type"], "chat");
        assert_eq!(m["data"], "hi");
    }
    // Offline user: zero connections reached.
    let sent = bob.ask(json!({"type":"send","to":"nobody","data":1}), "sent");
    assert_eq!(sent["connections"], 0);
}

#[test]
fn channel_publish_crosses_shards_once_per_subscriber() {
    let server = four_shards();
    let addr = server.local_addr();
    let mut subs: Vec<Client> = (0..8)
        .map(|i| Client::user(addr, &format!("u{i}")))
        .collect();
    for s in subs.iter_mut() {
        let r = s.ask(
            json!({"type":"subscribe","channel":"room:1","requestId":"s"}),
            "subscribed",
        );
        assert_eq!(r["channel"], "room:1");
        assert_eq!(r["requestId"], "s");
    }
    assert_eq!(server.router().channel_shards("room:1"), 0b1111);
    let mut publisher = Client::user(addr, "pub");
    for i in 0..10 {
        let r = publisher.ask(
            json!({"type":"publish","channel":"room:1","data":{"seq":i,"text":"héllo \"q\""}}),
            "published",
        );
        assert_eq!(r["channel"], "room:1");
    }
    for s in subs.iter_mut() {
        for i in 0..10 {
            let m = s.recv();
            assert_eq!(m["type"], "message");
            assert_eq!(m["channel"], "room:1");
            assert_eq!(m["from"], "pub");
            assert_eq!(m["data"], json!({"seq":i,"text":"héllo \"q\""}));
        }
        s.quiet(50);
    }
    // Unsubscribe: no more deliveries; the table follows.
    for s in subs.iter_mut() {
        s.ask(
            json!({"type":"unsubscribe","channel":"room:1"}),
            "unsubscribed",
        );
    }
    assert_eq!(server.router().channel_shards("room:1"), 0);
    publisher.ask(
        json!({"type":"publish","channel":"room:1","data":0}),
        "published",
    );
    subs[0].quiet(100);
    let e = subs[0].ask(json!({"type":"unsubscribe","channel":"room:1"}), "error");
    assert_eq!(e["code"], "not_subscribed");
}

#[test]
fn presence_counts_users_and_connections_across_shards() {
    let server = four_shards();
    let addr = server.local_addr();
    let mut cs = [
        Client::user(addr, "ann"),
        Client::user(addr, "ann"),
        Client::user(addr, "ben"),
        Client::user(addr, "cat"),
    ];
    for c in cs.iter_mut().take(3) {
        c.ask(
            json!({"type":"subscribe","channel":"public:lobby"}),
            "subscribed",
        );
    }
    let r = cs[3].ask(
        json!({"type":"request","requestId":"p1","action":"presence","data":{"channel":"public:lobby"}}),
        "response",
    );
    assert_eq!(r["requestId"], "p1");
    assert_eq!(r["action"], "presence");
    assert_eq!(r["data"]["connections"], 3);
    assert_eq!(
        r["data"]["users"],
        json!([{"userId":"ann","connections":2},{"userId":"ben","connections":1}])
    );
    let w = cs[3].ask(
        json!({"type":"request","requestId":2,"action":"whoami"}),
        "response",
    );
    assert_eq!(w["data"]["userId"], "cat");
    let s = cs[3].ask(
        json!({"type":"request","requestId":3,"action":"status"}),
        "response",
    );
    assert_eq!(s["data"]["shards"], 4);
    assert_eq!(s["data"]["connections"], 4);
    // Seed 004 spelling.
    let u = cs[3].ask(
        json!({"type":"REQUEST","requestId":"x","action":"whoami"}),
        "RESPONSE",
    );
    assert_eq!(u["requestId"], "x");
    let e = cs[3].ask(
        json!({"type":"REQUEST","requestId":"y","action":"fly"}),
        "ERROR",
    );
    assert_eq!(e["error"]["code"], "unknown_action");
    let e = cs[3].ask(
        json!({"type":"request","requestId":"z","action":"fly"}),
        "error",
    );
    assert_eq!(e["code"], "unknown_action");
    assert_eq!(e["requestId"], "z");
}

#[test]
fn errors_keep_the_connection_open() {
    let server = start(test_config(2));
    let mut c = Client::user(server.local_addr(), "eve");
    let cases = [
        (json!({"type":"subscribe"}), "missing_field"),
        (json!({"type":"subscribe","channel":""}), "invalid_channel"),
        (
            json!({"type":"subscribe","channel":"has space"}),
            "invalid_channel",
        ),
        (
            json!({"type":"subscribe","channel":"private:x"}),
            "forbidden",
        ),
        (
            json!({"type":"subscribe","channel":"user:mallory"}),
            "forbidden",
        ),
        (
            json!({"type":"publish","channel":"private:x","data":1}),
            "forbidden",
        ),
        (json!({"type":"broadcast","data":1}), "forbidden"),
        (json!({"type":"send","data":1}), "missing_field"),
        (json!({"type":"request","action":"status"}), "missing_field"),
        (
            json!({"type":"authenticate","token":"t"}),
            "already_authenticated",
        ),
        (json!({"type":"teleport"}), "unknown_type"),
        (json!({"requestId":1}), "missing_type"),
    ];
    for (msg, code) in cases {
        let r = c.ask(msg.clone(), "error");
        assert_eq!(r["code"], code, "{msg} -> {r}");
    }
    c.ws.send(Message::text("{broken")).unwrap();
    assert_eq!(c.recv()["code"], "bad_json");
    c.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(c.recv()["code"], "binary_not_supported");
    // Own channel and public namespace are allowed.
    c.ask(
        json!({"type":"subscribe","channel":"user:eve"}),
        "subscribed",
    );
    c.ask(
        json!({"type":"subscribe","channel":"public:news"}),
        "subscribed",
    );
    c.ask(json!({"type":"ping"}), "pong");
}

#[test]
fn subscription_limit_and_rate_limit() {
    let mut cfg = test_config(1);
    cfg.channels.max_subscriptions = 2;
    cfg.rate_limit.messages_per_second = 1;
    cfg.rate_limit.burst = 5;
    let server = start(cfg);
    let mut c = Client::user(server.local_addr(), "rita");
    c.ask(
        json!({"type":"subscribe","channel":"public:a"}),
        "subscribed",
    );
    c.ask(
        json!({"type":"subscribe","channel":"public:b"}),
        "subscribed",
    );
    let e = c.ask(json!({"type":"subscribe","channel":"public:c"}), "error");
    assert_eq!(e["code"], "too_many_subscriptions");
    // Burst of 5 used 3; two more pass, then rate_limited.
    c.ask(json!({"type":"ping"}), "pong");
    c.ask(json!({"type":"ping"}), "pong");
    let e = c.ask(json!({"type":"ping"}), "error");
    assert_eq!(e["code"], "rate_limited");
    std::thread::sleep(Duration::from_millis(1100));
    c.ask(json!({"type":"ping"}), "pong");
}

#[test]
fn origin_allowlist() {
    let mut cfg = test_config(1);
    cfg.allowed_origins = vec!["https://app.example".into()];
    let server = start(cfg);
    let addr = server.local_addr();
    let req = |origin: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
        )
    };
    let r = http(addr, &req("https://evil.example"));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = Raw {
        stream,
        buf: Vec::new(),
    };
    raw.send_bytes(req("https://app.example").as_bytes());
    assert!(raw.read_http_head().starts_with("HTTP/1.1 101"));
}

/// The client side of the 10,000-connection test, run in a child process
/// (one process may hold 20,000 descriptors: the server and the clients
/// together would not fit). Ignored unless started by the parent test.
#[test]
#[ignore]
fn churn_client() {
    let Ok(addr) = std::env::var("SWITCHBOARD_CHURN_ADDR") else {
        return;
    };
    let _ = switchboard::raise_fd_limit();
    let addr: SocketAddr = addr.parse().unwrap();
    let n: usize = std::env::var("SWITCHBOARD_CHURN_N")
        .unwrap()
        .parse()
        .unwrap();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = Client::user(addr, &format!("user{}", i % 500));
        c.send(json!({"type":"subscribe","channel":format!("public:c{}", i % 37)}));
        if i % 3 == 0 {
            c.send(json!({"type":"subscribe","channel":"public:all"}));
        }
        clients.push(c);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv()["type"], "subscribed");
        if i % 3 == 0 {
            assert_eq!(c.recv()["type"], "subscribed");
        }
    }
    // Tell the parent, then wait for its go.
    println!("CHURN-READY");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    // Half unsubscribe explicitly (and wait for the answer); then all disconnect.
    for (i, c) in clients.iter_mut().enumerate() {
        if i % 6 == 0 {
            c.ask(
                json!({"type":"unsubscribe","channel":"public:all"}),
                "unsubscribed",
            );
        }
    }
    drop(clients);
    println!("CHURN-DONE");
}

#[test]
fn ten_thousand_connections_leave_the_tables_empty() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let server = four_shards();
    let n = 10_000;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "churn_client",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SWITCHBOARD_CHURN_ADDR", server.local_addr().to_string())
        .env("SWITCHBOARD_CHURN_N", n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let wait_for = |lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>,
                    what: &str| {
        for line in lines.by_ref() {
            if line.unwrap().contains(what) {
                return;
            }
        }
        panic!("child ended before {what}");
    };
    wait_for(&mut lines, "CHURN-READY");
    assert_eq!(server.open_connections(), n);
    assert_eq!(server.router().user_count(), 500);
    assert_eq!(server.router().channel_count(), 38);
    wait_until("local maps published", || {
        server.stats().local_channels >= 38
    });
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    wait_for(&mut lines, "CHURN-DONE");
    assert!(child.wait().unwrap().success());
    wait_until("routing table and shard maps empty", || {
        let s = server.stats();
        server.router().user_count() == 0
            && server.router().channel_count() == 0
            && s.local_users == 0
            && s.local_channels == 0
    });
    wait_until("connections released", || server.open_connections() == 0);
}

#[test]
fn data_reaches_recipients_byte_for_byte() {
    let server = four_shards();
    let addr = server.local_addr();
    let mut sub = Client::user(addr, "reader");
    sub.ask(
        json!({"type":"subscribe","channel":"public:raw"}),
        "subscribed",
    );
    let mut publisher = Client::user(addr, "writer");
    // 40 keys (more than simd-json keeps ordered), a 73-bit integer, an
    // exponent, escapes, null: all must arrive exactly as written.
    let keys: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
    let data = format!(
        r#"{{{},"big":12345678901234567890123,"e":1e3,"neg":-0,"s":"\u00e9\/\"","n":null}}"#,
        keys.join(",")
    );
    let msg = format!(r#"{{"type":"publish","channel":"public:raw","data":{data}}}"#);
    publisher.ws.send(Message::text(msg)).unwrap();
    assert_eq!(publisher.recv()["type"], "published");
    let text = loop {
        match sub.ws.read().unwrap() {
            Message::Text(t) => break t.as_str().to_owned(),
            _ => continue,
        }
    };
    assert!(
        text.contains(&format!("\"data\":{data},")),
        "data forwarded verbatim: {text}"
    );
    // Direct messages and null data too.
    let _second_reader = Client::user(addr, "reader");
    publisher
        .ws
        .send(Message::text(
            r#"{"type":"send","to":"reader","data":null}"#,
        ))
        .unwrap();
    assert_eq!(publisher.recv()["connections"], 2);
    assert_eq!(sub.recv()["data"], Value::Null);
}
