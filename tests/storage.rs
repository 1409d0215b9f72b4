//! What Switchboard keeps, through real clients and a real SQLite file:
//! sensor records (validated, encrypted, acknowledged after the commit, read
//! back and decrypted), channel history and recovery (after a reconnect, after
//! a restart, and honestly impossible after expiry), the offline inbox with
//! acknowledged, retried delivery, and revocations that survive a restart.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use switchboard::auth::{Claims, SigningKeySource, SigningSettings, mint};
use switchboard::config::{AuthMode, Config, HistoryRule, Rule};
use switchboard::store::RevocationKind;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes
const SECRET: &str = "storage-test-secret";

struct Client {
    ws: WebSocket<TcpStream>,
}

impl Client {
    fn user(addr: SocketAddr, user: &str) -> Client {
        let mut ws = ws(addr, &format!("/ws?userId={user}"));
        let welcome = read_json(&mut ws);
        assert_eq!(welcome["type"], "connected", "{welcome}");
        Client { ws }
    }
    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }
    fn recv(&mut self) -> Value {
        read_json(&mut self.ws)
    }
    fn ask(&mut self, v: Value, kind: &str) -> Value {
        self.send(v);
        let r = self.recv();
        assert_eq!(r["type"], kind, "{r}");
        r
    }
    /// The next message of `kind`, skipping others.
    fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let m = self.recv();
            if m["type"] == kind {
                return m;
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

fn open_channels(mut cfg: Config) -> Config {
    cfg.channels.subscribe = Rule::Any;
    cfg.channels.publish = Rule::Any;
    cfg
}

fn db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("switchboard.db")).expect("the database file exists")
}

#[test]
fn ingested_records_are_acked_after_commit_and_decrypt_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stored_config(2, dir.path());
    cfg.ingest.required_fields = vec!["timestamp".into(), "sensorId".into(), "value".into()];
    cfg.ingest.fields_to_encrypt = vec!["value".into()];
    cfg.ingest.key = Some(KEY.into());
    let server = start(cfg.clone());
    let mut probe = ws(server.local_addr(), "/ws?userId=probe");
    let welcome = read_json(&mut probe);
    for f in ["inbox", "ack", "ingest", "history", "recovery"] {
        assert!(
            welcome["features"].as_array().unwrap().contains(&json!(f)),
            "{f}"
        );
    }
    let mut c = Client::user(server.local_addr(), "sensor-7");
    let data =
        json!({"timestamp": 1_700_000_000_000u64, "sensorId": "s-1", "value": 25.5, "unit": "C"});
    let ack = c.ask(
        json!({"type":"sensor_data","id":"m-1","data":data, "requestId": 9}),
        "ack",
    );
    assert_eq!(ack["clientId"], "m-1");
    assert_eq!(ack["requestId"], 9);
    let id = ack["id"].as_i64().expect("a record id");
    // The same client id again is the same record (an idempotent retry).
    let again = c.ask(json!({"type":"sensor_data","id":"m-1","data":data}), "ack");
    assert_eq!(again["id"].as_i64(), Some(id));
    assert_eq!(again["duplicate"], true);

    // Read it back from the file: the encrypted field is not in clear text.
    let conn = db(dir.path());
    let (user, stored): (String, String) = conn
        .query_row(
            "SELECT user_id, data FROM sensors_data WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(user, "sensor-7");
    assert!(!stored.contains("25.5"), "value stored in clear: {stored}");
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM sensors_data", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the retry was not stored twice");
    let sealer = switchboard::ingest::Sealer::from_config(&cfg.ingest)
        .unwrap()
        .unwrap();
    let plain: Value =
        serde_json::from_str(&switchboard::ingest::reveal(&sealer, &stored).unwrap()).unwrap();
    assert_eq!(plain, data);

    // Validation errors name the fields, and the connection lives on.
    let e = c.ask(
        json!({"type":"sensor_data","data":{"timestamp":1,"value":2}}),
        "error",
    );
    assert_eq!(e["code"], "invalid_data");
    assert!(e["message"].as_str().unwrap().contains("sensorId"), "{e}");
    let e = c.ask(json!({"type":"sensor_data","data":[1,2]}), "error");
    assert_eq!(e["code"], "invalid_data");
    let e = c.ask(json!({"type":"sensor_data"}), "error");
    assert_eq!(e["code"], "missing_field");
    let e = c.ask(
        json!({"type":"sensor_data","id":{"x":1},"data":{"timestamp":1,"sensorId":"s","value":1}}),
        "error",
    );
    assert_eq!(e["code"], "invalid_data", "{e}");
    c.ask(json!({"type":"ping"}), "pong");
    server.shutdown();
}

#[test]
fn ingestion_without_storage_is_refused_clearly() {
    let server = start(test_config(1));
    let mut c = Client::user(server.local_addr(), "u");
    let e = c.ask(json!({"type":"sensor_data","data":{"a":1}}), "error");
    assert_eq!(e["code"], "storage_disabled");
}

/// The `message` events a client reads until it has `n` of them.
fn messages(c: &mut Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| c.next_of("message")).collect()
}

#[test]
fn recovery_after_a_reconnect_returns_exactly_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(open_channels(stored_config(3, dir.path())));
    let addr = server.local_addr();
    let mut publisher = Client::user(addr, "pub");
    let mut reader = Client::user(addr, "reader");
    reader.ask(json!({"type":"subscribe","channel":"news"}), "subscribed");
    let first = publisher.ask(
        json!({"type":"publish","channel":"news","data":{"n":1}}),
        "published",
    );
    assert_eq!(first["offset"], 1);
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let m = messages(&mut reader, 1).remove(0);
    assert_eq!(
        (m["offset"].as_u64(), m["epoch"].as_str()),
        (Some(1), Some(epoch.as_str()))
    );
    drop(reader);
    for n in 2..=4 {
        let p = publisher.ask(
            json!({"type":"publish","channel":"news","data":{"n":n}}),
            "published",
        );
        assert_eq!(p["offset"], n);
    }
    let mut reader = Client::user(addr, "reader");
    let s = reader.ask(
        json!({"type":"subscribe","channel":"news","since":{"offset":1,"epoch":epoch}}),
        "subscribed",
    );
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["offset"], 4);
    let got: Vec<u64> = s["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![2, 3, 4]);
    // Live publications continue after the recovered ones.
    publisher.ask(
        json!({"type":"publish","channel":"news","data":{"n":5}}),
        "published",
    );
    assert_eq!(messages(&mut reader, 1)[0]["offset"], 5);
    // A wrong epoch is not trusted.
    let s = reader.ask(
        json!({"type":"subscribe","channel":"news","since":{"offset":1,"epoch":"nope"}}),
        "subscribed",
    );
    assert_eq!(s["recovered"], false);
    assert_eq!(s["epoch"], epoch.as_str());
    // History paging through the request API.
    let r = reader.ask(
        json!({"type":"request","requestId":"h1","action":"history","data":{"channel":"news","since":1,"limit":2}}),
        "response",
    );
    let pubs = r["data"]["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 2);
    assert_eq!(pubs[0]["offset"], 2);
    assert_eq!(r["data"]["hasMore"], true);
    assert_eq!(r["data"]["offset"], 5);
    server.shutdown();
}

#[test]
fn history_survives_a_restart_and_expires_honestly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = open_channels(stored_config(2, dir.path()));
    cfg.history.namespaces.insert(
        "brief".into(),
        HistoryRule {
            size: 10,
            ttl: Duration::from_millis(300),
        },
    );
    let server = start(cfg.clone());
    let mut p = Client::user(server.local_addr(), "pub");
    let mut epoch = String::new();
    for n in 1..=3 {
        let r = p.ask(
            json!({"type":"publish","channel":"kept","data":{"n":n}}),
            "published",
        );
        epoch = r["epoch"].as_str().unwrap().to_owned();
    }
    let brief = p.ask(
        json!({"type":"publish","channel":"brief:x","data":1}),
        "published",
    );
    drop(p);
    server.shutdown(); // flushes the writer

    let server = start(cfg);
    let mut c = Client::user(server.local_addr(), "reader");
    let s = c.ask(
        json!({"type":"subscribe","channel":"kept","since":{"offset":1,"epoch":epoch}}),
        "subscribed",
    );
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["publications"].as_array().unwrap().len(), 2);
    assert_eq!(s["epoch"], epoch.as_str(), "same epoch after a restart");
    // Subscribed itself: its own `message` may come before `published`.
    c.send(json!({"type":"publish","channel":"kept","data":{"n":4}}));
    let next = c.next_of("published");
    assert_eq!(next["offset"], 4, "offsets continue after a restart");
    // brief:x kept its publication for 300 ms only.
    std::thread::sleep(Duration::from_millis(400));
    let s = c.ask(
        json!({"type":"subscribe","channel":"brief:x","since":{"offset":0,"epoch":brief["epoch"]}}),
        "subscribed",
    );
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(s["publications"].as_array().unwrap().len(), 0);
    server.shutdown();
}

#[test]
fn offline_messages_arrive_in_order_and_are_kept_until_acked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stored_config(3, dir.path());
    cfg.inbox.retry_initial = Duration::from_millis(200);
    cfg.inbox.retry_max = Duration::from_millis(400);
    let server = start(cfg);
    let addr = server.local_addr();
    let mut alice = Client::user(addr, "alice");
    for n in 1..=3 {
        let sent = alice.ask(json!({"type":"send","to":"bob","data":{"n":n}}), "sent");
        assert_eq!(sent["stored"], true, "{sent}");
        assert_eq!(sent["connections"], 0);
    }
    // Bob connects: the three arrive in order, with ids, asking for acks.
    let mut bob = Client::user(addr, "bob");
    let got: Vec<Value> = (0..3).map(|_| bob.next_of("direct")).collect();
    let ns: Vec<u64> = got
        .iter()
        .map(|m| m["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![1, 2, 3]);
    assert!(got.iter().all(|m| m["ack"] == true && m["id"].is_i64()));
    // Unacknowledged: redelivered (same id) while connected.
    let again = bob.next_of("direct");
    assert!(got.iter().any(|m| m["id"] == again["id"]), "{again}");
    for m in &got {
        bob.send(json!({"type":"ack","id":m["id"]}));
    }
    wait_until("acks committed", || {
        db(dir.path())
            .query_row("SELECT COUNT(*) FROM inbox", [], |r| r.get::<_, i64>(0))
            .unwrap()
            == 0
    });
    let before = server.stats().redeliveries;
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(
        server.stats().redeliveries,
        before,
        "no redelivery after the acks"
    );
    drop(bob);
    // An online user with ack required: stored first, delivered with an id.
    let mut bob = Client::user(addr, "bob");
    wait_until("bob routed", || server.router().user_shards("bob") != 0);
    let sent = alice.ask(
        json!({"type":"send","to":"bob","data":"live","ack":true}),
        "sent",
    );
    assert_eq!(
        (sent["stored"].clone(), sent["connections"].clone()),
        (json!(true), json!(1))
    );
    // The acked three are not delivered again: the first direct is the new one.
    let m = bob.next_of("direct");
    assert_eq!(m["data"], "live");
    assert_eq!(m["id"], sent["id"]);
    bob.send(json!({"type":"ack","id":m["id"]}));
    server.shutdown();
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, iat: u64, jti: Option<&str>) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: Some(now_secs() + 3600),
        nbf: None,
        iat: Some(iat),
        iss: None,
        aud: None,
        jti: jti.map(str::to_owned),
        channels: Vec::new(),
        role: None,
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

fn connect_token(addr: SocketAddr, token: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tungstenite::client::client(req, stream).unwrap().0
}

/// The server's close code, after reading whatever came before it.
fn close_code(ws: &mut WebSocket<TcpStream>, seen: &mut Vec<Value>) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => seen.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Message::Close(Some(f))) => return f.code.into(),
            Ok(Message::Close(None)) => return 0,
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

#[test]
fn revocations_close_sockets_refuse_tokens_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stored_config(2, dir.path());
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let old = token("alice", now_secs() - 10, None);
    let mut a1 = connect_token(addr, &old);
    let mut a2 = connect_token(addr, &old);
    let by_jti = token("carol", now_secs(), Some("t-42"));
    let mut c = connect_token(addr, &by_jti);
    for ws in [&mut a1, &mut a2, &mut c] {
        assert_eq!(read_json(ws)["type"], "connected");
    }
    server
        .revoke(RevocationKind::User, "alice", "device lost")
        .unwrap();
    for ws in [&mut a1, &mut a2] {
        let mut seen = Vec::new();
        assert_eq!(close_code(ws, &mut seen), 4001);
        let ev = seen
            .iter()
            .find(|m| m["type"] == "token_revoked")
            .expect("event");
        assert_eq!(ev["reason"], "device lost");
    }
    server
        .revoke(RevocationKind::Token, "t-42", "rotated")
        .unwrap();
    let mut seen = Vec::new();
    assert_eq!(close_code(&mut c, &mut seen), 4001);

    // Refused at connect, with the error first.
    let mut again = connect_token(addr, &old);
    let mut seen = Vec::new();
    assert_eq!(close_code(&mut again, &mut seen), 4001);
    assert_eq!(seen[0]["code"], "token_revoked");
    // A token issued after the revocation is fine.
    let fresh = token("alice", now_secs() + 2, None);
    let mut ok = connect_token(addr, &fresh);
    assert_eq!(read_json(&mut ok)["type"], "connected");
    drop(ok);
    server.shutdown();

    // After a restart: still revoked (user and token id).
    let server = start(cfg);
    let addr = server.local_addr();
    for t in [&old, &by_jti] {
        let mut ws = connect_token(addr, t);
        let mut seen = Vec::new();
        assert_eq!(close_code(&mut ws, &mut seen), 4001, "{seen:?}");
    }
    let mut ok = connect_token(addr, &fresh);
    assert_eq!(read_json(&mut ok)["type"], "connected");
    server.shutdown();
}

#[test]
fn history_has_a_total_byte_budget_in_memory_and_on_disk() {
    const BUDGET: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = open_channels(stored_config(2, dir.path()));
    cfg.history.max_bytes = BUDGET;
    let server = start(cfg.clone());
    let mut p = Client::user(server.local_addr(), "pub");
    let big = "x".repeat(4000);
    // 20 channels of two 4 KB publications: 160 KB published, 64 KiB kept.
    let mut epochs = Vec::new();
    for ch in 0..20 {
        for n in 0..2 {
            let r = p.ask(
                json!({"type":"publish","channel":format!("big{ch}"),"data":{"n":n,"pad":big}}),
                "published",
            );
            if n == 0 {
                epochs.push(r["epoch"].as_str().unwrap().to_owned());
            }
        }
    }
    wait_until("the gauges", || server.stats().history_evicted > 0);
    let st = server.stats();
    assert!(st.history_bytes <= BUDGET as u64, "{}", st.history_bytes);
    assert!(st.history_bytes > BUDGET as u64 / 2, "{}", st.history_bytes);
    let recover = |c: &mut Client, ch: usize, epoch: &str| {
        c.ask(
            json!({"type":"subscribe","channel":format!("big{ch}"),"since":{"offset":0,"epoch":epoch}}),
            "subscribed",
        )
    };
    // The oldest went first: the first channel's history is gone (and said
    // so), the last channel's is whole, in the same epoch.
    let s = recover(&mut p, 0, &epochs[0]);
    assert_eq!(
        (s["recovered"].clone(), s["offset"].clone()),
        (json!(false), json!(2)),
        "{s}"
    );
    let s = recover(&mut p, 19, &epochs[19]);
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["publications"].as_array().unwrap().len(), 2);
    drop(p);
    server.shutdown();

    // On disk: at most the budget, the newest kept.
    let on_disk: i64 = db(dir.path())
        .query_row(
            "SELECT SUM(length(CAST(payload AS BLOB))) FROM history",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(on_disk as usize <= BUDGET && on_disk > 0, "{on_disk}");
    let server = start(cfg);
    // Two connections (round robin): both shards turn and publish gauges.
    let mut c = Client::user(server.local_addr(), "reader");
    let _other = Client::user(server.local_addr(), "other");
    wait_until("restored", || server.stats().history_bytes > 0);
    assert!(server.stats().history_bytes <= BUDGET as u64);
    let s = recover(&mut c, 19, &epochs[19]);
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["publications"].as_array().unwrap().len(), 2);
    let s = recover(&mut c, 0, &epochs[0]);
    assert_eq!(s["recovered"], false, "{s}");
    server.shutdown();
}
