//! Recovery never lies across restarts (issue 11, points 1-3). The real
//! binary runs on one data directory through kill -9, clean stops and
//! restarts. A ledger keeps every publication the server acknowledged
//! (`published {offset, epoch}`) and an observer keeps the position it saw
//! per channel; every `recovered: true` must deliver exactly the ledger's
//! publications after that position, and no (channel, epoch, offset) may
//! ever be acknowledged twice with different data.
//!
//! Each test runs on SQLite and on PostgreSQL (common/store.rs).
//!
//! What stands in for the faults, deterministically:
//! - "numbered but not committed at the crash": the test holds the
//!   database's write lock from its own connection, so the writer waits while
//!   publications are acknowledged, and the process is killed meanwhile;
//! - "a history write failed" (a full disk): a trigger makes the insert of
//!   one publication's row fail, as a full disk fails a statement;
//! - "the writer's queue was full": a queue of 4 behind that same lock.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::store::{Kind, TestStore};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// The server binary on a config file, its stderr kept line by line.
struct Proc {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn start(config: &Path) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let stderr = child.stderr.take().expect("stderr");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ws://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(addr);
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server says where it listens");
        Proc {
            child,
            addr: addr.parse().expect("an address"),
            log,
        }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// SIGTERM and a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "graceful exit after SIGTERM: {exit}");
    }

    fn wait_log(&self, what: &str) {
        wait_until(what, || {
            self.log.lock().unwrap().iter().any(|l| l.contains(what))
        });
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Client {
    ws: WebSocket<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr, user: &str) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (ws, _) =
            tungstenite::client::client(format!("ws://{addr}/ws?userId={user}"), stream).unwrap();
        let mut c = Client { ws };
        assert_eq!(c.recv()["type"], "connected");
        c
    }

    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("a message") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    }
}

/// Every publication the server acknowledged: (channel, epoch, offset) -> data.
#[derive(Default)]
struct Ledger {
    acked: HashMap<(String, String, u64), Value>,
}

impl Ledger {
    /// Publish and wait for `published`; returns (epoch, offset).
    fn publish(&mut self, c: &mut Client, channel: &str, data: Value) -> (String, u64) {
        c.send(json!({"type":"publish","channel":channel,"data":data}));
        let p = loop {
            let m = c.recv();
            if m["type"] == "published" {
                break m;
            }
            assert_ne!(m["type"], "error", "{m}");
        };
        let epoch = p["epoch"].as_str().expect("epoch").to_owned();
        let offset = p["offset"].as_u64().expect("offset");
        let key = (channel.to_owned(), epoch.clone(), offset);
        if let Some(old) = self.acked.insert(key, data.clone()) {
            assert_eq!(
                old, data,
                "{channel}: offset {offset} of epoch {epoch} acknowledged twice with different data"
            );
        }
        (epoch, offset)
    }
}

/// A client that remembers the last position it saw on each channel.
struct Observer {
    c: Client,
    at: HashMap<String, (String, u64)>,
    /// Live publications read while waiting for something else, in order.
    pending: Vec<Value>,
}

impl Observer {
    fn connect(addr: SocketAddr) -> Observer {
        Observer {
            c: Client::connect(addr, "observer"),
            at: HashMap::new(),
            pending: Vec::new(),
        }
    }

    fn reconnect(&mut self, addr: SocketAddr) {
        self.c = Client::connect(addr, "observer");
        self.pending.clear();
    }

    /// Read `n` live publications of `channel`; each must match the ledger.
    fn live(&mut self, ledger: &Ledger, channel: &str, n: usize) {
        for _ in 0..n {
            let m = match self.pending.iter().position(|m| m["channel"] == channel) {
                Some(i) => self.pending.remove(i),
                None => loop {
                    let m = self.c.recv();
                    if m["type"] != "message" {
                        continue;
                    }
                    if m["channel"] == channel {
                        break m;
                    }
                    self.pending.push(m);
                },
            };
            self.saw(ledger, channel, &m);
        }
    }

    fn saw(&mut self, ledger: &Ledger, channel: &str, m: &Value) {
        let epoch = m["epoch"].as_str().unwrap().to_owned();
        let offset = m["offset"].as_u64().unwrap();
        let expected = ledger
            .acked
            .get(&(channel.to_owned(), epoch.clone(), offset))
            .unwrap_or_else(|| panic!("{channel}: {epoch}@{offset} was never acknowledged: {m}"));
        assert_eq!(&m["data"], expected, "{channel}: {epoch}@{offset}");
        self.at.insert(channel.to_owned(), (epoch, offset));
    }

    /// Subscribe from the remembered position (or plainly, the first time).
    /// Returns (recovered, epoch now). A `recovered: true` must carry exactly
    /// the acknowledged publications after the position.
    fn recover(&mut self, ledger: &Ledger, channel: &str) -> (bool, String) {
        let Some((epoch, offset)) = self.at.get(channel).cloned() else {
            self.c
                .send(json!({"type":"subscribe","channel":channel,"requestId":channel}));
            self.next_subscribed(channel);
            return (false, String::new());
        };
        self.c.send(json!({"type":"subscribe","channel":channel,
            "since":{"offset":offset,"epoch":epoch},"requestId":channel}));
        let s = self.next_subscribed(channel);
        let now_epoch = s["epoch"].as_str().unwrap().to_owned();
        let top = s["offset"].as_u64().unwrap();
        let pubs = s["publications"].as_array().unwrap().clone();
        let recovered = s["recovered"] == true;
        if recovered {
            assert_eq!(now_epoch, epoch, "{channel}: recovered across epochs: {s}");
            let got: Vec<u64> = pubs.iter().map(|p| p["offset"].as_u64().unwrap()).collect();
            let missed: Vec<u64> = (offset + 1..=top).collect();
            assert_eq!(got, missed, "{channel}: recovered from {offset}: {s}");
            for p in &pubs {
                self.saw(ledger, channel, p);
            }
            // Everything acknowledged in this epoch after the position is
            // within the reply's top: nothing is skipped silently.
            let beyond = ledger
                .acked
                .keys()
                .filter(|(c, e, o)| c == channel && *e == epoch && *o > top)
                .count();
            assert_eq!(
                beyond, 0,
                "{channel}: acknowledged offsets above {top}: {s}"
            );
        } else {
            assert!(pubs.is_empty(), "{s}");
        }
        self.at.insert(channel.to_owned(), (now_epoch.clone(), top));
        (recovered, now_epoch)
    }

    fn next_subscribed(&mut self, channel: &str) -> Value {
        loop {
            let m = self.c.recv();
            if m["type"] == "subscribed" && m["channel"] == channel {
                return m;
            }
            assert_ne!(m["type"], "error", "{m}");
            if m["type"] == "message" {
                self.pending.push(m);
            }
        }
    }
}

fn setup(kind: Kind, extra: &str) -> (TestStore, PathBuf) {
    let st = TestStore::new(kind);
    let config = st.dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            "port = 0\nshards = 2\nlog_level = \"info\"\n[rate_limit]\nburst = 100000\n{}",
            st.toml(extra)
        ),
    )
    .unwrap();
    (st, config)
}

fn a_crash_then_a_clean_restart_keeps_the_new_epochs_and_never_recovers_wrongly(kind: Kind) {
    let (st, config) = setup(kind, "");
    let (quiet, busy) = ("public:quiet", "public:busy");
    let mut ledger = Ledger::default();
    let server = Proc::start(&config);
    let mut publisher = Client::connect(server.addr, "publisher");
    let mut obs = Observer::connect(server.addr);
    obs.recover(&ledger, quiet);
    obs.recover(&ledger, busy);
    for n in 1..=3 {
        for ch in [quiet, busy] {
            ledger.publish(&mut publisher, ch, json!({"run":1,"n":n}));
        }
    }
    obs.live(&ledger, quiet, 3);
    obs.live(&ledger, busy, 3);
    wait_until("three copies per channel committed", || {
        st.stored(quiet) == 3 && st.stored(busy) == 3
    });
    // A late reader that saw offsets 1..3 only.
    let mut late = Observer::connect(server.addr);
    late.at = obs.at.clone();

    // Numbered, acknowledged and delivered, not committed: the writer waits
    // for the lock this test holds, and the process dies meanwhile.
    let lock = st.hold_write_lock();
    for n in 4..=6 {
        for ch in [quiet, busy] {
            ledger.publish(&mut publisher, ch, json!({"run":1,"n":n}));
        }
    }
    obs.live(&ledger, quiet, 3);
    obs.live(&ledger, busy, 3);
    server.kill9();
    lock.release();

    // After the crash: new epochs, and recovering from 6 is refused.
    let server = Proc::start(&config);
    obs.reconnect(server.addr);
    let (rq, quiet_epoch) = obs.recover(&ledger, quiet);
    let (rb, _) = obs.recover(&ledger, busy);
    assert!(!rq && !rb, "the stored offsets are behind what was seen");
    let mut publisher = Client::connect(server.addr, "publisher");
    ledger.publish(&mut publisher, busy, json!({"run":2,"n":1}));
    obs.live(&ledger, busy, 1);
    drop(publisher);
    server.stop();

    // A clean restart: the quiet channel keeps the epoch chosen after the
    // crash (it was durable before anything was served), and publishing
    // on it never reuses an offset acknowledged before the crash (the
    // ledger checks that).
    let server = Proc::start(&config);
    obs.reconnect(server.addr);
    let (rq, again) = obs.recover(&ledger, quiet);
    assert!(rq, "nothing was missed on the quiet channel");
    assert_eq!(again, quiet_epoch, "the epoch chosen after the crash holds");
    let (rb, _) = obs.recover(&ledger, busy);
    assert!(rb, "the busy channel's last publication was committed");
    let mut publisher = Client::connect(server.addr, "publisher");
    for ch in [quiet, busy] {
        ledger.publish(&mut publisher, ch, json!({"run":3}));
    }
    obs.live(&ledger, quiet, 1);
    obs.live(&ledger, busy, 1);
    // The reader from before the crash: never a wrong `recovered: true`.
    late.reconnect(server.addr);
    for ch in [quiet, busy] {
        let (recovered, _) = late.recover(&ledger, ch);
        assert!(!recovered, "{ch}: its epoch ended at the crash");
    }
    drop(publisher);
    server.stop();
}

fn a_lost_history_write_renews_that_channels_epoch_even_after_a_clean_stop(kind: Kind) {
    let (st, config) = setup(kind, "");
    let (lossy, sound) = ("public:lossy", "public:sound");
    let mut ledger = Ledger::default();
    let server = Proc::start(&config);
    let mut publisher = Client::connect(server.addr, "publisher");
    let mut obs = Observer::connect(server.addr);
    obs.recover(&ledger, lossy);
    obs.recover(&ledger, sound);
    for n in 1..=2 {
        for ch in [lossy, sound] {
            ledger.publish(&mut publisher, ch, json!({"n":n}));
        }
    }
    wait_until("copies committed", || {
        st.stored(lossy) == 2 && st.stored(sound) == 2
    });
    // The store fails this one write, as a full disk would.
    st.fail_history_inserts("poison", "simulated full disk");
    ledger.publish(&mut publisher, lossy, json!("poison"));
    server.wait_log("(nobody waits for it)");
    ledger.publish(&mut publisher, sound, json!({"n":3}));
    wait_until("the sound copy committed", || st.stored(sound) == 3);
    st.allow_history();
    obs.live(&ledger, lossy, 3);
    obs.live(&ledger, sound, 3);
    let sound_epoch = obs.at[sound].0.clone();
    drop(publisher);
    server.stop();

    let server = Proc::start(&config);
    obs.reconnect(server.addr);
    let (rl, _) = obs.recover(&ledger, lossy);
    assert!(!rl, "the lossy channel's last publication was never stored");
    let (rs, epoch) = obs.recover(&ledger, sound);
    assert!(rs, "the sound channel lost nothing");
    assert_eq!(epoch, sound_epoch);
    // New publications on the lossy channel reuse no acknowledged offset.
    let mut publisher = Client::connect(server.addr, "publisher");
    ledger.publish(&mut publisher, lossy, json!({"after":1}));
    obs.live(&ledger, lossy, 1);
    drop(publisher);
    server.stop();
    // And the renewal holds at the next clean restart.
    let server = Proc::start(&config);
    obs.reconnect(server.addr);
    assert!(obs.recover(&ledger, lossy).0);
    assert!(obs.recover(&ledger, sound).0);
    server.stop();
}

fn refusals_that_lose_nothing_cost_no_history(kind: Kind) {
    // A queue of 4 and batches of 1: behind the test's lock, the writer
    // holds one request and the queue fills with four more.
    let (st, config) = setup(kind, "queue_capacity = 4\nmax_batch = 1\n");
    let kept = "public:kept";
    let mut ledger = Ledger::default();
    let server = Proc::start(&config);
    let mut publisher = Client::connect(server.addr, "publisher");
    let mut obs = Observer::connect(server.addr);
    obs.recover(&ledger, kept);
    // One at a time: with a queue of 4, copies published together could
    // find it full behind the logins' inbox reads (more likely on a
    // database over the network), which this test is not about.
    for n in 1..=3 {
        ledger.publish(&mut publisher, kept, json!({"n":n}));
        wait_until("the copy committed", || st.stored(kept) == n);
    }
    obs.live(&ledger, kept, 3);

    let lock = st.hold_write_lock();
    // A flood of acks fills the queue; another user's offline message and
    // a record are refused: nothing of them was acknowledged, so nothing
    // is lost.
    let mut flooder = Client::connect(server.addr, "flooder");
    let mut refused = None;
    for round in 0..50 {
        for id in 0..20 {
            flooder.send(json!({"type":"ack","id":round * 20 + id + 1}));
        }
        flooder.send(json!({"type":"send","to":"offline-bob","data":round,"requestId":round}));
        let m = loop {
            let m = flooder.recv();
            if m["requestId"] == round {
                break m;
            }
        };
        // Whether the send found the queue full depends on how many acks
        // were queued before it; another round until it does.
        if m["code"] == "overloaded" {
            refused = Some(m);
            break;
        }
    }
    let refused = refused.expect("the offline message is refused while the queue is full");
    assert_eq!(refused["type"], "error", "{refused}");
    flooder.send(json!({"type":"sensor_data","id":"r-1","data":{"v":1},"requestId":"rec"}));
    let m = loop {
        let m = flooder.recv();
        if m["requestId"] == "rec" {
            break m;
        }
    };
    assert_eq!(m["code"], "overloaded", "{m}");
    lock.release();
    drop(flooder);
    drop(publisher);
    server.stop();

    let server = Proc::start(&config);
    obs.reconnect(server.addr);
    let (recovered, _) = obs.recover(&ledger, kept);
    assert!(
        recovered,
        "refused acks, messages and records cost no history"
    );
    let mut publisher = Client::connect(server.addr, "publisher");
    ledger.publish(&mut publisher, kept, json!({"n":4}));
    obs.live(&ledger, kept, 1);
    drop(publisher);
    server.stop();
}

fn rounds_of_crashes_lost_writes_and_clean_restarts_never_recover_wrongly(kind: Kind) {
    let (st, config) = setup(kind, "");
    let channels = ["public:r0", "public:r1", "public:r2"];
    let mut ledger = Ledger::default();
    let mut obs: Option<Observer> = None;
    // Positions seen in the first round, tried again at every restart.
    let mut first_seen: Option<HashMap<String, (String, u64)>> = None;
    for round in 0..8u64 {
        let server = Proc::start(&config);
        let o = obs.get_or_insert_with(|| Observer::connect(server.addr));
        o.reconnect(server.addr);
        for ch in channels {
            o.recover(&ledger, ch);
        }
        if let Some(seen) = &first_seen {
            let mut stale = Observer::connect(server.addr);
            for ch in channels {
                stale.at = seen.clone();
                stale.recover(&ledger, ch); // checked if `recovered: true`
            }
        }
        let mut publisher = Client::connect(server.addr, "publisher");
        // Each round some channels stay quiet.
        let active: Vec<&str> = channels
            .iter()
            .enumerate()
            .filter(|(i, _)| !(round + *i as u64).is_multiple_of(3))
            .map(|(_, c)| *c)
            .collect();
        for n in 0..3 {
            for ch in &active {
                ledger.publish(&mut publisher, ch, json!({"round":round,"n":n}));
            }
        }
        for ch in &active {
            o.live(&ledger, ch, 3);
        }
        match round % 4 {
            // Acknowledged, not committed, then kill -9.
            1 => {
                let lock = st.hold_write_lock();
                for ch in &active {
                    ledger.publish(&mut publisher, ch, json!({"round":round,"late":true}));
                    o.live(&ledger, ch, 1);
                }
                server.kill9();
                lock.release();
            }
            // One channel's last copy fails in the store, then a clean stop.
            3 => {
                st.fail_history_inserts("poison", "simulated full disk");
                let ch = active[0];
                ledger.publish(&mut publisher, ch, json!(format!("poison {round}")));
                o.live(&ledger, ch, 1);
                server.wait_log("(nobody waits for it)");
                st.allow_history();
                drop(publisher);
                server.stop();
            }
            // A crash with everything committed, or a clean stop.
            2 => {
                wait_until("committed", || {
                    active.iter().all(|ch| {
                        let seen = o.at[*ch].1;
                        st.top_offset(ch).is_some_and(|top| top as u64 == seen)
                    })
                });
                server.kill9();
            }
            _ => {
                drop(publisher);
                server.stop();
            }
        }
        if first_seen.is_none() {
            first_seen = Some(o.at.clone());
        }
    }
}

on_both_backends!(
    a_crash_then_a_clean_restart_keeps_the_new_epochs_and_never_recovers_wrongly,
    a_lost_history_write_renews_that_channels_epoch_even_after_a_clean_stop,
    refusals_that_lose_nothing_cost_no_history,
    rounds_of_crashes_lost_writes_and_clean_restarts_never_recover_wrongly,
);
