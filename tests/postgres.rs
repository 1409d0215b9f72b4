//! Failures of the PostgreSQL server itself (issue 14): the database killed
//! with SIGKILL mid-ingestion and restarted, while the Switchboard binary
//! keeps running; a database unreachable at start (exit 2 with one line, or
//! a wait when `start_retry` allows it). Each test runs a cluster of its own
//! (`switchboard::store::testpg`), so killing it touches no other test.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::store::testpg::Cluster;
use tungstenite::{Message, WebSocket};

/// The binary on a config file; every stderr line kept.
struct Proc {
    child: Child,
    addr: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(config: &Path) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let stderr = child.stderr.take().expect("stderr");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            child,
            addr: None,
            log,
        }
    }

    /// Wait for "listening on ws://ADDR".
    fn listening(&mut self, within: Duration) -> SocketAddr {
        let deadline = Instant::now() + within;
        loop {
            let found = self.log.lock().unwrap().iter().find_map(|l| {
                let rest = l.split("listening on ws://").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            });
            if let Some(addr) = found {
                self.addr = Some(addr);
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("switchboard exited ({status}): {:?}", self.lines());
            }
            assert!(
                Instant::now() < deadline,
                "not listening: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, what: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(what)).count()
    }

    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "graceful exit after SIGTERM: {exit}");
    }
}

fn write_config(dir: &Path, cluster_url: &str, extra_pg: &str) -> std::path::PathBuf {
    let config = dir.join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            "port = 0\nshards = 2\nlog_level = \"info\"\n[storage]\nbackend = \"postgres\"\n\
             data_dir = {:?}\n[storage.postgres]\nurl = {cluster_url:?}\nschema = \"sb\"\n\
             reconnect_max = \"300ms\"\n{extra_pg}",
            dir.join("data")
        ),
    )
    .unwrap();
    config
}

fn connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}/ws?userId=pgcrash"), stream).unwrap();
    let welcome = read(&mut ws).expect("welcome");
    assert_eq!(welcome["type"], "connected");
    ws
}

fn read(ws: &mut WebSocket<TcpStream>) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn record(seq: u64) -> String {
    json!({"type":"sensor_data","id":format!("r-{seq}"),"requestId":seq,
           "data":{"sensorId":"s","value":seq}})
    .to_string()
}

/// The status line of GET /readyz.
fn readyz(addr: SocketAddr) -> String {
    let r = common::http(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    r.lines().next().unwrap_or("").to_owned()
}

#[derive(Default)]
struct Outcomes {
    /// record id (`r-N`) -> row id, for every `ack`.
    acked: Vec<(String, i64)>,
    /// error code -> how many.
    errors: HashMap<String, usize>,
    /// Sequence numbers answered (ack or error).
    answered: HashSet<u64>,
    sent: u64,
}

#[test]
fn a_kill_9_of_postgres_mid_ingestion_loses_no_acknowledged_record() {
    let cluster = Cluster::start().expect("a test cluster");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &cluster.url(), "");
    let mut server = Proc::spawn(&config);
    let addr = server.listening(Duration::from_secs(30));
    assert!(readyz(addr).contains("200"), "{}", readyz(addr));

    // The client: 16 records in flight; every answer noted, the next sent.
    let out: Arc<Mutex<Outcomes>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let out = out.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ws = connect(addr);
            let mut seq = 0u64;
            for _ in 0..16 {
                ws.send(Message::text(record(seq))).unwrap();
                seq += 1;
            }
            out.lock().unwrap().sent = seq;
            while !stop.load(Ordering::Relaxed) {
                let m = read(&mut ws).expect("the server answers every record");
                let Some(rid) = m["requestId"].as_u64() else {
                    continue;
                };
                {
                    let mut o = out.lock().unwrap();
                    o.answered.insert(rid);
                    match m["type"].as_str() {
                        Some("ack") => {
                            let cid = m["clientId"].as_str().expect("client id").to_owned();
                            o.acked.push((cid, m["id"].as_i64().expect("row id")));
                        }
                        Some("error") => {
                            let code = m["code"].as_str().unwrap_or("?").to_owned();
                            *o.errors.entry(code).or_default() += 1;
                        }
                        _ => panic!("unexpected answer {m}"),
                    }
                }
                ws.send(Message::text(record(seq))).unwrap();
                seq += 1;
                out.lock().unwrap().sent = seq;
                // While the database is down every answer is an error at
                // once: do not spin.
                if m["type"] == "error" {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    };
    let acks = |out: &Arc<Mutex<Outcomes>>| out.lock().unwrap().acked.len();
    let errors = |out: &Arc<Mutex<Outcomes>>| out.lock().unwrap().errors.values().sum::<usize>();
    common::wait_until("300 acks", || acks(&out) >= 300);

    cluster.kill9(); // the database server, not Switchboard
    common::wait_until("errors answered during the outage", || errors(&out) > 50);
    common::wait_until("/readyz says not ready", || readyz(addr).contains("503"));
    let r = common::http(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.contains("storage_unavailable"), "{r}");
    let acks_down = acks(&out);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        acks(&out),
        acks_down,
        "nothing acknowledged while the database is down"
    );

    cluster.restart().expect("the database restarts");
    common::wait_until("ready again", || readyz(addr).contains("200"));
    common::wait_until("acks again, without a restart of Switchboard", || {
        acks(&out) >= acks_down + 300
    });
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();

    // Every acknowledged record is in the table exactly once.
    let mut db = cluster.client("sb").unwrap();
    let rows: Vec<(i64, String)> = db
        .query("SELECT id, client_id FROM sensors_data", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let distinct: HashSet<&String> = rows.iter().map(|(_, c)| c).collect();
    assert_eq!(distinct.len(), rows.len(), "a record stored twice");
    let stored: HashSet<(String, i64)> = rows.iter().map(|(i, c)| (c.clone(), *i)).collect();
    let out = out.lock().unwrap();
    for (cid, id) in &out.acked {
        assert!(
            stored.contains(&(cid.clone(), *id)),
            "acknowledged record {cid} (id {id}) is missing after the database's kill -9"
        );
    }
    // The rest were told: storage_error (or overloaded), nothing else.
    for code in out.errors.keys() {
        assert!(
            code == "storage_error" || code == "overloaded",
            "unexpected error code {code}: {:?}",
            out.errors
        );
    }
    assert!(out.errors.get("storage_error").copied().unwrap_or(0) > 0);
    // Every record but the last 16 (in flight when the client stopped) was answered.
    for seq in 0..out.sent.saturating_sub(16) {
        assert!(out.answered.contains(&seq), "record {seq} never answered");
    }
    // One outage, logged once (not once per refused record).
    assert_eq!(
        server.count("lost the connection to PostgreSQL"),
        1,
        "{:?}",
        server.lines()
    );
    assert_eq!(server.count("reconnected to PostgreSQL"), 1);
    assert_eq!(server.count("storage request of conn="), 0);
    eprintln!(
        "{} acknowledged, errors {:?}, {} rows",
        out.acked.len(),
        out.errors,
        rows.len()
    );
    server.addr = None;
    server.stop();
}

#[test]
fn an_unreachable_database_at_start_is_one_line_and_exit_2() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let config = write_config(dir.path(), &url, "");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot connect"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!("postgres://postgres@127.0.0.1:{port}/postgres")),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
}

#[test]
fn with_start_retry_the_server_waits_for_the_database() {
    let cluster = Cluster::start().expect("a test cluster");
    cluster.kill9();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &cluster.url(), "start_retry = \"60s\"\n");
    let mut server = Proc::spawn(&config);
    common::wait_until("the wait is announced", || {
        server.count("retrying for up to") == 1
    });
    assert_eq!(server.count("listening on"), 0, "{:?}", server.lines());
    cluster.restart().unwrap();
    let addr = server.listening(Duration::from_secs(60));
    let mut ws = connect(addr);
    ws.send(Message::text(record(1))).unwrap();
    let m = read(&mut ws).unwrap();
    assert_eq!(m["type"], "ack", "{m}");
    assert_eq!(
        server.count("retrying for up to"),
        1,
        "one line for the wait"
    );
    drop(ws);
    server.stop();
}

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes

fn run(args: &[&str], config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn load(config: &Path) -> switchboard::config::Config {
    let mut cfg = switchboard::config::Config::load_from(
        Some(config),
        &[],
        &switchboard::config::Overrides::default(),
    )
    .unwrap();
    cfg.port = 0;
    cfg
}

fn user(addr: SocketAddr, name: &str) -> WebSocket<TcpStream> {
    let mut ws = common::ws(addr, &format!("/ws?userId={name}"));
    assert_eq!(read(&mut ws).unwrap()["type"], "connected");
    ws
}

fn ask(ws: &mut WebSocket<TcpStream>, v: Value, kind: &str) -> Value {
    ws.send(Message::text(v.to_string())).unwrap();
    loop {
        let m = read(ws).expect("an answer");
        if m["type"] == kind {
            return m;
        }
    }
}

#[test]
fn migrate_store_copies_sqlite_into_postgres_and_decrypt_reads_both() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let common_toml = format!(
        "shards = 2\nlog_level = \"warn\"\n[channels]\nsubscribe = \"any\"\npublish = \"any\"\n\
         [ingest]\nkey = {KEY:?}\nfields_to_encrypt = [\"value\"]\n"
    );
    let sqlite_cfg = dir.path().join("sqlite.toml");
    std::fs::write(
        &sqlite_cfg,
        format!("{common_toml}[storage]\ndata_dir = {data:?}\n"),
    )
    .unwrap();
    let pg = Cluster::shared();
    let schema = pg.fresh_schema();
    let pg_cfg = dir.path().join("pg.toml");
    std::fs::write(
        &pg_cfg,
        format!(
            "{common_toml}[storage]\nbackend = \"postgres\"\ndata_dir = {data:?}\n\
             [storage.postgres]\nurl = {:?}\nschema = {schema:?}\n",
            pg.url()
        ),
    )
    .unwrap();

    // A SQLite store with records, an offline message, history and a clean stop.
    let server = common::start(load(&sqlite_cfg));
    let addr = server.local_addr();
    let mut c = user(addr, "sensor");
    let mut ids = Vec::new();
    for n in 1..=3 {
        let a = ask(
            &mut c,
            json!({"type":"sensor_data","id":format!("m-{n}"),"data":{"value":n * 10}}),
            "ack",
        );
        ids.push(a["id"].as_i64().unwrap());
    }
    let sent = ask(
        &mut c,
        json!({"type":"send","to":"bob","data":"while you were away"}),
        "sent",
    );
    assert_eq!(sent["stored"], true, "{sent}");
    let published = ask(
        &mut c,
        json!({"type":"publish","channel":"news","data":{"n":1}}),
        "published",
    );
    let epoch = published["epoch"].as_str().unwrap().to_owned();
    drop(c);
    server.shutdown();

    let from_sqlite = run(&["decrypt"], &sqlite_cfg);
    assert!(from_sqlite.status.success(), "{from_sqlite:?}");
    let text = String::from_utf8(from_sqlite.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains(r#""value":20"#), "decrypted: {text}");

    let copied = run(&["migrate-store"], &pg_cfg);
    assert!(copied.status.success(), "{copied:?}");
    let report = String::from_utf8_lossy(&copied.stdout);
    assert!(report.contains("sensors_data: 3 rows"), "{report}");
    assert!(report.contains("inbox: 1 rows"), "{report}");
    assert!(report.contains("history: 1 rows"), "{report}");

    // decrypt reads PostgreSQL now, and prints the same lines.
    let from_pg = run(&["decrypt"], &pg_cfg);
    assert!(from_pg.status.success(), "{from_pg:?}");
    assert_eq!(from_pg.stdout, from_sqlite.stdout);
    let paged = run(
        &["decrypt", "--after-id", &ids[0].to_string(), "--limit", "1"],
        &pg_cfg,
    );
    assert_eq!(String::from_utf8_lossy(&paged.stdout).lines().count(), 1);

    // A second copy is refused: the target is not empty.
    let again = run(&["migrate-store"], &pg_cfg);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{again:?}"
    );

    // The server on PostgreSQL carries on where SQLite stopped.
    let server = common::start(load(&pg_cfg));
    let addr = server.local_addr();
    let mut c = user(addr, "sensor");
    let dup = ask(
        &mut c,
        json!({"type":"sensor_data","id":"m-2","data":{"value":20}}),
        "ack",
    );
    assert_eq!(
        (dup["id"].as_i64(), dup["duplicate"].clone()),
        (Some(ids[1]), json!(true))
    );
    let fresh = ask(
        &mut c,
        json!({"type":"sensor_data","id":"m-4","data":{"value":40}}),
        "ack",
    );
    assert!(
        fresh["id"].as_i64().unwrap() > ids[2],
        "ids continue: {fresh}"
    );
    let s = ask(
        &mut c,
        json!({"type":"subscribe","channel":"news","since":{"offset":0,"epoch":epoch}}),
        "subscribed",
    );
    assert_eq!(s["recovered"], true, "the clean stop's epochs hold: {s}");
    let mut bob = user(addr, "bob");
    let m = loop {
        let m = read(&mut bob).unwrap();
        if m["type"] == "direct" {
            break m;
        }
    };
    assert_eq!(m["data"], "while you were away");
    drop((c, bob));
    server.shutdown();
}

#[test]
fn a_statement_past_the_timeout_is_a_storage_error_and_the_connection_serves_on() {
    let st = common::store::TestStore::new(common::store::Kind::Postgres);
    let mut cfg = st.config(1);
    cfg.storage.postgres.statement_timeout = Duration::from_millis(300);
    let server = common::start(cfg);
    let addr = server.local_addr();
    let mut alice = user(addr, "alice");
    let sent = ask(
        &mut alice,
        json!({"type":"send","to":"bob","data":1}),
        "sent",
    );
    assert_eq!(sent["stored"], true, "{sent}");
    // The test holds the inbox's lock: the writer's insert waits, and the
    // database cancels it at the timeout (without one it would wait for
    // the lock, and this answer would not come while the lock is held).
    let lock = st.hold_write_lock();
    let e = ask(
        &mut alice,
        json!({"type":"send","to":"bob","data":2,"requestId":"r2"}),
        "error",
    );
    assert_eq!(e["code"], "storage_error", "{e}");
    // A timeout is not an outage: the connection stays, /readyz stays 200.
    assert!(readyz(addr).contains("200"), "{}", readyz(addr));
    lock.release();
    let sent = ask(
        &mut alice,
        json!({"type":"send","to":"bob","data":3}),
        "sent",
    );
    assert_eq!(sent["stored"], true, "{sent}");
    assert_eq!(st.count("inbox"), 2, "the timed-out message was not stored");
    drop(alice);
    server.shutdown();
}

#[test]
fn tls_verify_full_connects_and_refuses_an_unknown_authority() {
    use switchboard::config::{PgTls, PostgresConfig, SyncMode};
    use switchboard::store::{Backend, Op, Outcome, PostgresBackend, StoreError};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cluster = Cluster::start_tls(&ck.cert.pem(), &ck.signing_key.serialize_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let cfg = PostgresConfig {
        url: format!(
            "host=localhost port={} user=postgres dbname=postgres",
            cluster.port()
        ),
        schema: "tls".into(),
        tls: PgTls::VerifyFull,
        ca_file: Some(ca),
        ..PostgresConfig::default()
    };
    let mut b = PostgresBackend::open(&cfg, SyncMode::Full, "sensors_data").unwrap();
    let r = b.apply(vec![Op::Ingest {
        table: "sensors_data".into(),
        kind: "sensor_data".into(),
        user: "u".into(),
        connection: "0.1".into(),
        client_id: Some("c".into()),
        received_at_ms: 1,
        data: b"{}".to_vec(),
    }]);
    assert!(matches!(r[0], Ok(Outcome::Ingested { .. })), "{r:?}");
    // The session is encrypted.
    let (mut c, _) = switchboard::store::postgres::connect_tool(&cfg, true).unwrap();
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ssl);

    // A certificate from another authority: refused.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = dir.path().join("other.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let wrong = PostgresConfig {
        ca_file: Some(other_ca),
        ..cfg.clone()
    };
    match PostgresBackend::open(&wrong, SyncMode::Full, "sensors_data") {
        Err(e @ StoreError::PgConnect { .. }) => {
            assert!(e.to_string().contains("cannot connect"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected to a server the CA did not certify"),
    }
    // A server without TLS: refused too (no silent fallback to plain text).
    let plain = PostgresConfig {
        url: format!(
            "host=localhost port={} user=postgres dbname=postgres",
            Cluster::shared().port()
        ),
        ..cfg
    };
    assert!(matches!(
        PostgresBackend::open(&plain, SyncMode::Full, "sensors_data"),
        Err(StoreError::PgConnect { .. })
    ));
}

#[test]
fn metrics_show_the_writer_and_whether_its_database_is_reachable() {
    let cluster = Cluster::start().expect("a test cluster");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(1);
    cfg.storage.data_dir = dir.path().to_owned();
    cfg.storage.backend = switchboard::config::StorageBackend::Postgres;
    cfg.storage.postgres.url = cluster.url();
    cfg.storage.postgres.reconnect_max = Duration::from_millis(200);
    let server = common::start(cfg);
    let addr = server.local_addr();
    let metric = |name: &str| -> Option<f64> {
        let text = common::http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    };
    let mut c = user(addr, "m");
    for n in 0..5 {
        ask(
            &mut c,
            json!({"type":"sensor_data","id":format!("x{n}"),"data":{"v":n}}),
            "ack",
        );
    }
    assert_eq!(metric("switchboard_store_available"), Some(1.0));
    let ops = metric("switchboard_store_ops_total").unwrap();
    let batches = metric("switchboard_store_batches_total").unwrap();
    assert!(
        ops >= 5.0 && batches >= 1.0 && batches <= ops,
        "{ops} {batches}"
    );
    cluster.kill9();
    // The next write finds the connection gone.
    let e = ask(
        &mut c,
        json!({"type":"sensor_data","id":"x9","data":{"v":9}}),
        "error",
    );
    assert_eq!(e["code"], "storage_error");
    assert_eq!(metric("switchboard_store_available"), Some(0.0));
    cluster.restart().unwrap();
    common::wait_until("available again", || {
        metric("switchboard_store_available") == Some(1.0)
    });
    drop(c);
    server.shutdown();
}

#[test]
fn two_nodes_on_one_schema_share_records_inbox_and_revocations() {
    // Two servers (nodes) on one PostgreSQL schema, each with its own
    // writer and connection.
    let st = common::store::TestStore::new(common::store::Kind::Postgres);
    let node = |dir: &Path| {
        let mut cfg = st.config(1);
        // Each node its own data directory (its clean-shutdown marker), one schema.
        cfg.storage.data_dir = dir.to_owned();
        common::start(cfg)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(da.path());
    let b = node(db.path());
    // A record stored through node A, retried through node B: the same record.
    let mut on_a = user(a.local_addr(), "sensor");
    let first = ask(
        &mut on_a,
        json!({"type":"sensor_data","id":"r-1","data":{"v":1}}),
        "ack",
    );
    let mut on_b = user(b.local_addr(), "sensor");
    let retry = ask(
        &mut on_b,
        json!({"type":"sensor_data","id":"r-1","data":{"v":1}}),
        "ack",
    );
    assert_eq!(retry["id"], first["id"]);
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(st.count("sensors_data"), 1);
    // A message stored for an offline user through A reaches them on B.
    let sent = ask(
        &mut on_a,
        json!({"type":"send","to":"carol","data":"from node A"}),
        "sent",
    );
    assert_eq!(sent["stored"], true, "{sent}");
    let mut carol = user(b.local_addr(), "carol");
    let m = loop {
        let m = read(&mut carol).unwrap();
        if m["type"] == "direct" {
            break m;
        }
    };
    assert_eq!(m["data"], "from node A");
    drop((on_a, on_b, carol));
    a.revoke(switchboard::store::RevocationKind::User, "mallory", "lost")
        .unwrap();
    // A revocation made through A is in the shared schema, where every
    // node reads it at its next start (tests/storage.rs checks that a
    // restarted node enforces a stored revocation).
    assert_eq!(st.count("revocations"), 1);
    a.shutdown();
    b.shutdown();
}
