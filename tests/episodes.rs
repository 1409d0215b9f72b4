//! Failures that repeat are logged once per episode, with a count and a
//! metric (issue 12 point 11): `accept` at the descriptor limit, and storage
//! writes that fail request after request. The binary runs as an operator
//! runs it, its stderr read line by line.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// A running binary and every line it wrote to stderr so far.
struct Proc {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// `prefix` runs before the binary (e.g. `prlimit --nofile=...`).
    fn spawn(prefix: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["serve", "--port", "0", "--shards", "1"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on ws://") {
                    let rest = &line[i + "listening on ws://".len()..];
                    let _ = tx.send(rest.split_whitespace().next().unwrap().to_owned());
                }
                keep.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server says where it listens")
            .parse()
            .unwrap();
        Proc { child, addr, lines }
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Sum of a metric over its label sets.
    fn metric(&self, name: &str) -> u64 {
        let text = http(self.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// At the descriptor limit every new connection made the listener ready,
/// and every accept failed again: 922 WARN lines in 1.7 s. Now accepting
/// pauses (10 ms, doubling to 1 s) and ignores readiness meanwhile, and the
/// episode is one ERROR line at its start and one line with the count at
/// its end; `switchboard_accept_failures_total` counts every failure.
#[test]
fn accept_at_the_descriptor_limit_is_one_episode_with_back_off() {
    descriptor_limit_episode("acceptor");
}

/// The same in accept mode `reuseport`, where the shard accepts itself.
#[test]
fn reuseport_accept_at_the_descriptor_limit_is_one_episode_with_back_off() {
    descriptor_limit_episode("reuseport");
}

fn descriptor_limit_episode(mode: &str) {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let p = Proc::spawn(
        &["prlimit", "--nofile=40:40", "--"],
        &[
            ("SWITCHBOARD_STORAGE_BACKEND", "none"),
            ("SWITCHBOARD_HANDSHAKE_TIMEOUT", "60s"),
            ("SWITCHBOARD_ACCEPT", mode),
        ],
    );
    // Idle TCP connections hold the server's descriptors (handshakes wait
    // 60 s); past the limit they queue in the kernel's backlog, and each
    // one arriving makes the listener ready again.
    let mut held: Vec<TcpStream> = Vec::new();
    let attempts = 300;
    for _ in 0..attempts {
        held.push(TcpStream::connect(p.addr).expect("connect (the backlog takes it)"));
        std::thread::sleep(Duration::from_millis(2));
    }
    wait_until("the episode is logged", || p.count("accept failing") == 1);
    let during = p.log();
    // Free the descriptors: the server sees the closes, accepting resumes
    // (flapping at the limit while the backlog drains is the same episode);
    // the first accept 5 s (Episode::QUIET) after the last failure ends it.
    drop(held);
    wait_until("the episode ends", || {
        std::thread::sleep(Duration::from_millis(100));
        let _ = http(p.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        p.count("accept recovered after") == 1
    });
    let failures = p.metric("switchboard_accept_failures_total");
    let log = p.log();
    assert_eq!(p.count("accept failing"), 1, "one line per episode:\n{log}");
    assert_eq!(
        p.count("accept failed"),
        0,
        "no line per failure:\n{during}"
    );
    assert!(
        log.contains(&format!("accept recovered after {failures} failures")),
        "the end line carries the count ({failures}):\n{log}"
    );
    assert!(failures >= 1);
    // Back-off: far fewer accept attempts than readiness events (one per
    // connection that arrived while descriptors were exhausted).
    assert!(
        failures * 4 < attempts,
        "{failures} failed accepts for {attempts} connections"
    );
}

/// A client's `sensor_data` and its answer.
fn ingest(ws: &mut tungstenite::WebSocket<TcpStream>, i: usize) -> Value {
    let msg = json!({"type":"sensor_data","data":{"n":i}});
    ws.send(Message::text(msg.to_string())).unwrap();
    loop {
        let m = ws.read().unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "ack" || v["type"] == "error" {
                return v;
            }
        }
    }
}

/// During a full disk every failed request logged an ERROR line. Now the
/// writer logs the episode once, and once when it ends, with the count;
/// `switchboard_store_failures_total` (per shard, answered `storage_error`)
/// and `switchboard_store_errors_total` (the writer) count each failure.
/// The failure is made real with a trigger that aborts every insert, as a
/// full disk would, added and removed by a second connection.
#[test]
fn storage_failures_are_one_episode_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(
        &[],
        &[("SWITCHBOARD_STORAGE_DATA_DIR", dir.path().to_str().unwrap())],
    );
    let mut ws = ws(p.addr, "/ws?userId=meter");
    assert_eq!(ingest(&mut ws, 0)["type"], "ack", "the table exists now");
    let db = rusqlite::Connection::open(dir.path().join("switchboard.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER disk_full BEFORE INSERT ON sensors_data
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .unwrap();
    const FAILED: usize = 30;
    for i in 1..=FAILED {
        let e = ingest(&mut ws, i);
        assert_eq!(e["code"], "storage_error", "{e}");
    }
    db.execute_batch("DROP TRIGGER disk_full;").unwrap();
    // The first commit 5 s (Episode::QUIET) after the last failure ends the episode.
    wait_until("the end of the episode", || {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ingest(&mut ws, 99)["type"], "ack");
        p.count("storage writes recovered") == 1
    });
    let log = p.log();
    assert_eq!(p.count("storage writes failing"), 1, "{log}");
    assert!(
        log.contains(&format!("storage writes recovered after {FAILED} failures")),
        "{log}"
    );
    assert_eq!(
        p.count("ERROR"),
        1,
        "one ERROR line for the episode, not one per request:\n{log}"
    );
    assert_eq!(p.metric("switchboard_store_failures_total"), FAILED as u64);
    assert_eq!(p.metric("switchboard_store_errors_total"), FAILED as u64);
}
