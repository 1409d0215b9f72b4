//! Issue 12: every queue and store has a budget. Real servers on ephemeral
//! ports, real clients; floods assert bounds (queue depths, pages built,
//! bytes held, RSS growth compared with a baseline taken in the same test),
//! never wall-clock thresholds.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchboard::ws::frame::encode_client_frame;
use tungstenite::{Message, WebSocket};

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
    /// A client of `user` whose connection landed on `shard` (the acceptor
    /// hands connections out round robin).
    fn on_shard(addr: SocketAddr, user: &str, shard: u64) -> Client {
        loop {
            let c = Client::user(addr, user);
            if c.shard() == shard {
                return c;
            }
        }
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
    /// Send and return the next reply, whatever its type.
    fn recv_after(&mut self, v: Value) -> Value {
        self.send(v);
        self.recv()
    }
    fn ask(&mut self, v: Value, kind: &str) -> Value {
        self.send(v);
        let r = self.recv();
        assert_eq!(r["type"], kind, "{r}");
        r
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

/// Client frames (masked) for each JSON message, concatenated: written in
/// one go they arrive pipelined, as from a client that never waits.
fn frames<'a>(msgs: impl IntoIterator<Item = &'a Value>) -> Vec<u8> {
    let mut b = Vec::new();
    for m in msgs {
        encode_client_frame(&mut b, true, 0x1, m.to_string().as_bytes(), [1, 2, 3, 4]);
    }
    b
}

fn open_config(shards: usize) -> switchboard::Config {
    let mut cfg = test_config(shards);
    cfg.channels.subscribe = switchboard::config::Rule::Any;
    cfg.channels.publish = switchboard::config::Rule::Any;
    cfg
}

/// A channel whose home is `shard` of `n`.
fn homed(shard: usize, n: usize) -> String {
    (0..)
        .map(|i| format!("room:{i}"))
        .find(|c| switchboard::route::home_shard(c, n) == shard)
        .unwrap()
}

/// This process's resident set (the server runs in it), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Issue 12.8: a client pipelining thousands of `history` requests for a
/// channel with a large page, never reading, gets at most
/// MAX_PENDING_HISTORY pages built; the rest are refused `overloaded`
/// before any shard works on them. Before, every request built its page
/// (one per request: 2,000 here) and most were then dropped at the
/// slow-consumer limit.
#[test]
fn pipelined_history_requests_build_a_bounded_number_of_pages() {
    let mut cfg = open_config(2);
    cfg.max_outbound_bytes = 1 << 20;
    let server = start(cfg);
    let addr = server.local_addr();
    let channel = homed(0, 2);
    let mut publisher = Client::user(addr, "pub");
    let data = "x".repeat(16 << 10);
    for _ in 0..60 {
        publisher.ask(
            json!({"type":"publish","channel":channel,"data":data}),
            "published",
        );
    }
    let before = server.stats();
    let mut reader = Client::on_shard(addr, "greedy", 1);
    let asks: Vec<Value> = (0..2000)
        .map(|i| json!({"type":"request","requestId":i,"action":"history","data":{"channel":channel}}))
        .collect();
    let burst = frames(&asks);
    reader.ws.get_mut().write_all(&burst).unwrap();
    // Every request is answered by a page or refused, unless the reader is
    // cut as a slow consumer first (then the rest are never read).
    wait_until("every request handled", || {
        let s = server.stats();
        let handled =
            (s.history_pages - before.history_pages) + (s.history_refused - before.history_refused);
        handled == 2000 || s.slow_consumers > before.slow_consumers
    });
    let after = server.stats();
    let pages = after.history_pages - before.history_pages;
    let refused = after.history_refused - before.history_refused;
    // 4 on their way at a time; more only once the kernel took earlier
    // answers off the queue. Before the fix: one page per request read.
    assert!(
        pages <= 40,
        "{pages} pages built for one connection that reads nothing"
    );
    assert!(refused >= 1000, "{refused} requests refused");
    // The client that reads gets its answers as before.
    let r = publisher.ask(
        json!({"type":"request","requestId":"h","action":"history","data":{"channel":channel,"limit":2}}),
        "response",
    );
    assert_eq!(
        r["data"]["publications"].as_array().map(Vec::len),
        Some(2),
        "{r}"
    );
}

/// Issue 12.8: `history` and `presence` cost `rate_limit.request_cost`
/// tokens. With a burst of 20 and a cost of 10, two pass; before, twenty did.
#[test]
fn costly_requests_take_more_of_the_rate_limit() {
    let mut cfg = open_config(1);
    cfg.rate_limit.messages_per_second = 1;
    cfg.rate_limit.burst = 20;
    cfg.rate_limit.request_cost = 10;
    let server = start(cfg);
    let mut c = Client::user(server.local_addr(), "rita");
    let ask =
        json!({"type":"request","requestId":1,"action":"history","data":{"channel":"room:a"}});
    c.ask(ask.clone(), "response");
    c.ask(ask.clone(), "response");
    let e = c.ask(ask, "error");
    assert_eq!(e["code"], "rate_limited", "{e}");
    wait_until("counted", || server.stats().rate_limited == 1);
}

/// Issue 12.4: publishers on shards 1 and 2 pipelining 1 KB publications
/// to a channel homed on shard 0 with 100 subscribers that never read: the
/// home shard cannot keep up with two. The queue between the shards stays
/// within twice `shard_queue_bytes` (what does not fit is refused
/// `overloaded` to the publishers), each turn of the home shard handles at
/// most `shard_turn_bytes` of it, and RSS growth stays bounded. Before
/// (checked by running this test with both budgets set to usize::MAX: 1-2
/// MB queued, 1.1 MB handled in one turn), the home shard's queue held
/// whatever the publishers
/// got ahead by.
#[test]
fn a_publication_flood_across_shards_stays_within_the_queue_budget() {
    let mut cfg = open_config(3);
    let budget = 256 << 10;
    cfg.shard_queue_bytes = budget;
    cfg.max_outbound_bytes = 256 << 10;
    let server = start(cfg);
    let addr = server.local_addr();
    let channel = homed(0, 3);
    let mut subscribers = Vec::new();
    while subscribers.len() < 100 {
        let mut c = Client::user(addr, &format!("s{}", subscribers.len()));
        c.ask(json!({"type":"subscribe","channel":channel}), "subscribed");
        subscribers.push(c);
    }
    let base = rss();
    let data = "y".repeat(1000);
    let one = frames([&json!({"type":"publish","channel":channel,"data":data})]);
    let mut batch = Vec::new();
    for _ in 0..100 {
        batch.extend_from_slice(&one);
    }
    // Two publishers, 10 MB each, written as fast as the sockets take them;
    // their replies are read so that they are never cut as slow consumers.
    let mut threads = Vec::new();
    for shard in [1, 2] {
        let publisher = Client::on_shard(addr, &format!("flood{shard}"), shard);
        let mut reader = publisher.ws.get_ref().try_clone().unwrap();
        threads.push(std::thread::spawn(move || {
            let mut sink = [0u8; 65536];
            use std::io::Read;
            let _ = reader.set_read_timeout(Some(Duration::from_secs(2)));
            while let Ok(n) = reader.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }));
        let batch = batch.clone();
        threads.push(std::thread::spawn(move || {
            let mut publisher = publisher;
            for _ in 0..100 {
                publisher.ws.get_mut().write_all(&batch).unwrap();
            }
            // Stay open until the server read everything.
            std::thread::sleep(Duration::from_secs(1));
        }));
    }
    // A debug build on a busy machine takes a while: wait up to a minute
    // (a timeout, not a measured threshold).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = server.stats();
        // Every publication numbered (by the home shard) or refused.
        if s.publications + s.shard_queue_refused >= 20_000 && s.shard_queue_bytes == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood was not handled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = rss().saturating_sub(base);
    let s = server.stats();
    let peak = server
        .shard_stats()
        .iter()
        .map(|c| c.shard_queue_peak_bytes)
        .max()
        .unwrap_or(0);
    let turn = server
        .shard_stats()
        .iter()
        .map(|c| c.inbox_turn_peak_bytes)
        .max()
        .unwrap_or(0);
    eprintln!(
        "peak queue {peak} bytes, peak turn {turn} bytes, RSS grown {grown} bytes, refused {}, turns cut {}",
        s.shard_queue_refused, s.inbox_turns_cut
    );
    // One turn of a shard handles at most shard_turn_bytes of its inbox (and
    // the message that crosses it), whatever the others queued: its own
    // clients (pings, reads, timers) wait one budget, not the whole flood.
    assert!(
        turn <= (256 << 10) + 2048,
        "{turn} bytes of inbox handled in one turn"
    );
    // Admitted while there was room, publications still queued at the home
    // shard fan out after the check: at most one more budget's worth.
    assert!(
        peak <= (2 * budget + (256 << 10)) as u64,
        "{peak} bytes were queued for one shard (budget {budget})"
    );
    // The other tests of this file run in the same process (their memory
    // counts too): a loose bound, far below what an unbounded queue reached
    // (126 MiB - 1.7 GiB in the issue).
    assert!(
        grown < 64 << 20,
        "RSS grew by {grown} bytes for 20 MB published"
    );

    for t in threads {
        let _ = t.join();
    }
}

fn token_config() -> switchboard::Config {
    let mut cfg = open_config(1);
    cfg.auth.mode = switchboard::config::AuthMode::Token;
    cfg.auth.token = Some("tok".into());
    cfg.auth.timeout = Duration::from_secs(2);
    cfg.api.keys = vec!["k3y".into()];
    cfg
}

/// The head of a masked client text frame declaring `len` payload bytes.
fn text_head(len: u64) -> Vec<u8> {
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // mask of zeros: payload as is
    h
}

/// Issue 12.9: before `authenticate`, a connection may hold at most
/// `pre_auth_max_bytes` (16 KiB) of an unfinished message: past it, close
/// 1009. Before, it could hold `max_message_size` (1 MiB) until the auth
/// timeout (and got 4008 then, not 1009). Once authenticated the full
/// limits apply.
#[test]
fn an_unauthenticated_connection_holds_only_a_small_message() {
    let server = start(token_config());
    let addr = server.local_addr();
    let mut raw = Raw::connect(addr, "/ws");
    raw.send_bytes(&text_head(500_000));
    raw.send_bytes(&vec![b' '; 40_000]);
    let reason = raw.expect_close(1009);
    assert!(reason.contains("authentication"), "{reason}");
    wait_until("counted", || server.stats().pre_auth_refused == 1);

    // Authenticated: a 100 KB message is taken.
    let mut c = Client {
        ws: ws(addr, "/ws?token=tok&userId=big"),
        welcome: Value::Null,
    };
    c.welcome = c.recv();
    assert_eq!(c.welcome["type"], "connected", "{}", c.welcome);
    let data = "z".repeat(100_000);
    c.ask(
        json!({"type":"publish","channel":"room:big","data":data}),
        "published",
    );
}

/// Issue 12.9: an HTTP request that announces a body over
/// `pre_auth_max_bytes` without valid credentials is refused (401) as soon
/// as its head arrives, before any of the body is read. Before, the server
/// buffered up to `api.max_body_bytes` (1 MiB) first. With the API key the
/// same body is read and served.
#[test]
fn a_large_body_without_credentials_is_refused_before_it_is_read() {
    let server = start(token_config());
    let addr = server.local_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500000\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 512];
    use std::io::Read;
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head:?}");
    wait_until("counted", || server.stats().pre_auth_refused == 1);

    let data = "w".repeat(40_000);
    let body = json!({"channel":"room:b","data":data}).to_string();
    let resp = http(
        addr,
        &format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// Issue 12.10: a body that does not arrive within `handshake_timeout` is
/// answered 408 `body_timeout`. Before, the connection was dropped without
/// an answer. A head that never finished still gets nothing.
#[test]
fn a_slow_body_gets_408() {
    let mut cfg = token_config();
    cfg.handshake_timeout = Duration::from_millis(300);
    let server = start(cfg);
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"chan",
    )
    .unwrap();
    let mut out = Vec::new();
    use std::io::Read;
    let _ = s.read_to_end(&mut out);
    let resp = String::from_utf8_lossy(&out);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    assert!(resp.contains("body_timeout"), "{resp}");
    wait_until("counted", || server.stats().body_timeouts == 1);
}

fn inbox_config(dir: &std::path::Path) -> switchboard::Config {
    let mut cfg = stored_config(2, dir);
    cfg.storage.synchronous = switchboard::config::SyncMode::Normal;
    cfg.api.keys = vec!["k3y".into()];
    cfg
}

/// POST /api/send with the API key: (status, body).
fn api_send(addr: SocketAddr, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let resp = http(
        addr,
        &format!(
            "POST /api/send HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp)
}

/// Issue 12.7: a stranger cannot push a user's backend-sent messages out
/// of the inbox. The backend fills `inbox.max_per_user` (5); a client's
/// messages to that user are refused `inbox_full`, and the user finds the
/// backend's five. Before, each of the stranger's messages evicted the
/// oldest one, whoever sent it: the user found only the stranger's.
#[test]
fn a_stranger_cannot_push_out_backend_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inbox_config(dir.path());
    cfg.inbox.max_per_user = 5;
    let server = start(cfg);
    let addr = server.local_addr();
    for n in 0..5 {
        let (status, resp) = api_send(
            addr,
            &json!({"userId":"victim","type":"notice","data":{"n":n}}),
        );
        assert_eq!(status, 200, "{resp}");
    }
    let mut stranger = Client::user(addr, "stranger");
    for _ in 0..5 {
        let e = stranger.ask(json!({"type":"send","to":"victim","data":"spam"}), "error");
        assert_eq!(e["code"], "inbox_full", "{e}");
    }
    let mut victim = Client::user(addr, "victim");
    for n in 0..5 {
        let m = victim.recv();
        assert_eq!(m["type"], "notice", "{m}");
        assert_eq!(m["data"]["n"], n, "{m}");
    }
    wait_until("counted", || server.stats().inbox_refused == 5);

    // Among clients' messages the oldest still go first.
    for n in 0..7 {
        stranger.ask(json!({"type":"send","to":"friend","data":{"n":n}}), "sent");
    }
    let mut friend = Client::user(addr, "friend");
    let ns: Vec<u64> = (0..5)
        .map(|_| friend.recv()["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![2, 3, 4, 5, 6]);
}

/// Issue 12.7: one sender's stored messages, to all recipients together,
/// are bounded by `inbox.max_bytes_per_sender`; a user's inbox by
/// `inbox.max_bytes_per_user`. Before, a client stored whatever it sent
/// to made-up offline users (218 MiB in 6 s), kept for 7 days.
#[test]
fn stored_bytes_are_bounded_per_sender_and_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inbox_config(dir.path());
    cfg.inbox.max_bytes_per_sender = 64 << 10;
    cfg.inbox.max_bytes_per_user = 16 << 10;
    cfg.inbox.stored_per_second = 0;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut flooder = Client::user(addr, "flooder");
    let data = "f".repeat(4000);
    let mut stored = 0;
    let mut full = 0;
    for i in 0..100 {
        let r = flooder.recv_after(json!({"type":"send","to":format!("ghost{i}"),"data":data}));
        match r["type"].as_str() {
            Some("sent") => stored += 1,
            Some("error") if r["code"] == "inbox_full" => full += 1,
            _ => panic!("{r}"),
        }
    }
    assert!(
        (15..=16).contains(&stored),
        "{stored} stored of 4 KB under 64 KiB"
    );
    assert_eq!(stored + full, 100);
    let bytes: i64 = rusqlite::Connection::open(dir.path().join("switchboard.db"))
        .unwrap()
        .query_row(
            "SELECT COALESCE(SUM(length(payload)), 0) FROM inbox",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(bytes <= 64 << 10, "{bytes} bytes stored");

    // One user's inbox: 16 KiB; a backend message larger than that is 413.
    let (status, resp) = api_send(
        addr,
        &json!({"userId":"small","type":"x","data":"b".repeat(20_000)}),
    );
    assert_eq!(status, 413, "{resp}");
    assert!(resp.contains("too_large"), "{resp}");
}

/// Issue 12.7: a connection stores at most `inbox.stored_per_second`
/// messages a second after a burst of `inbox.stored_burst`; the rest are
/// `rate_limited` (not stored). Before, every one was stored.
#[test]
fn stored_messages_have_a_rate_per_sender() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inbox_config(dir.path());
    cfg.inbox.stored_per_second = 1;
    cfg.inbox.stored_burst = 3;
    let server = start(cfg);
    let mut c = Client::user(server.local_addr(), "chatty");
    for _ in 0..3 {
        c.ask(json!({"type":"send","to":"away","data":"hi"}), "sent");
    }
    let e = c.ask(json!({"type":"send","to":"away","data":"hi"}), "error");
    assert_eq!(e["code"], "rate_limited", "{e}");
    wait_until("counted", || server.stats().inbox_rate_refused == 1);
}

/// Issue 12.5 from a real client: the writer's queue is bounded in bytes,
/// not only in requests. While the test holds SQLite's write lock the
/// writer cannot commit; a client pipelines 40 records of 100 KB (4 MB)
/// against a 1 MiB budget. Every record gets exactly one answer: the ones
/// that found room are acknowledged after the lock is released, the rest
/// are refused `overloaded` at once, and what was taken fits the budget.
/// Before the byte budget all 40 were queued (the count limit is 65,536).
#[test]
fn the_writer_queue_holds_a_byte_budget_against_a_real_client() {
    const RECORDS: usize = 40;
    const SIZE: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stored_config(1, dir.path());
    cfg.storage.queue_bytes = 1 << 20;
    let server = start(cfg);
    let mut c = Client::user(server.local_addr(), "loader");
    // A hang is a failure too (the refusals never come without the budget).
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // One record first, so the table exists and the writer is idle again.
    let first = c.ask(
        json!({"type":"sensor_data","id":"warm","data":{"v":1},"requestId":"warm"}),
        "ack",
    );
    assert_eq!(first["requestId"], "warm");

    let lock = rusqlite::Connection::open(dir.path().join("switchboard.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let big = "x".repeat(SIZE);
    let msgs: Vec<Value> = (0..RECORDS)
        .map(|i| json!({"type":"sensor_data","id":i,"data":{"v":big},"requestId":i}))
        .collect();
    c.ws.get_mut().write_all(&frames(&msgs)).unwrap();
    // While the lock is held nothing commits: the answers that come are
    // refusals, and the last record is refused once the queue is full.
    let mut refused = Vec::new();
    loop {
        let m = c.recv();
        assert_eq!(m["type"], "error", "nothing commits while locked: {m}");
        assert_eq!(m["code"], "overloaded", "{m}");
        let rid = m["requestId"].as_u64().unwrap() as usize;
        refused.push(rid);
        if rid == RECORDS - 1 {
            break;
        }
    }
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let mut acked = Vec::new();
    while acked.len() + refused.len() < RECORDS {
        let m = c.recv();
        assert_eq!(m["type"], "ack", "after the lock only acks come: {m}");
        acked.push(m["requestId"].as_u64().unwrap() as usize);
    }
    // One answer each, and what was queued fits the budget (plus the one
    // request an empty queue always takes).
    let mut all: Vec<usize> = acked.iter().chain(&refused).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..RECORDS).collect::<Vec<_>>());
    assert!(!acked.is_empty(), "some records found room");
    assert!(
        acked.len() * SIZE <= (1 << 20) + SIZE,
        "{} records of {SIZE} B queued against a 1 MiB budget",
        acked.len()
    );
    let stored: i64 = rusqlite::Connection::open(dir.path().join("switchboard.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM sensors_data", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored as usize, acked.len() + 1, "every ack is a row");
    server.shutdown();
}
