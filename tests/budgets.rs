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
    wait_until("every request read", || {
        let s = server.stats();
        s.messages_in - before.messages_in >= 2000 || s.slow_consumers > 0
    });
    // Pages on their way are counted when built: let them land.
    std::thread::sleep(Duration::from_millis(200));
    let after = server.stats();
    let pages = after.history_pages - before.history_pages;
    let refused = after.history_refused - before.history_refused;
    assert!(
        pages <= 8,
        "{pages} pages built for one connection that reads nothing"
    );
    assert!(refused >= 1900, "{refused} requests refused");
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
}

/// Issue 12.4: publishers on shards 1 and 2 pipelining 1 KB publications
/// to a channel homed on shard 0 with 100 subscribers that never read: the
/// home shard cannot keep up with two. The queue between the shards stays
/// within twice `shard_queue_bytes` (what does not fit is refused
/// `overloaded` to the publishers), each turn of the home shard handles at
/// most `shard_turn_bytes` of it, and RSS growth stays far below the bytes
/// published. Before, the home shard's queue held whatever the publishers
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
    // Two publishers, 20 MB each, written as fast as the sockets take them;
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
            for _ in 0..200 {
                publisher.ws.get_mut().write_all(&batch).unwrap();
            }
            // Stay open until the server read everything.
            std::thread::sleep(Duration::from_secs(1));
        }));
    }
    wait_until("the flood handled", || {
        let s = server.stats();
        s.messages_in >= 40_000 && s.shard_queue_bytes == 0
    });
    let grown = rss().saturating_sub(base);
    let s = server.stats();
    let peak = server
        .shard_stats()
        .iter()
        .map(|c| c.shard_queue_peak_bytes)
        .max()
        .unwrap_or(0);
    eprintln!(
        "peak queue {peak} bytes, RSS grown {grown} bytes, refused {}, turns cut {}",
        s.shard_queue_refused, s.inbox_turns_cut
    );
    // Admitted while there was room, publications still queued at the home
    // shard fan out after the check: at most one more budget's worth.
    assert!(
        peak <= (2 * budget + (256 << 10)) as u64,
        "{peak} bytes were queued for one shard (budget {budget})"
    );
    assert!(
        grown < 40 << 20,
        "RSS grew by {grown} bytes for 40 MB published"
    );
    assert!(
        s.publications + s.shard_queue_refused >= 40_000,
        "every publication was numbered or refused: {} + {}",
        s.publications,
        s.shard_queue_refused
    );
    for t in threads {
        let _ = t.join();
    }
}
