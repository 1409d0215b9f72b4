//! D3: no acknowledged record is lost by kill -9 (on SQLite and on
//! PostgreSQL: the Switchboard process is killed, not the database). A client ingests
//! continuously with several records in flight; the server process is killed
//! with SIGKILL mid-stream and restarted on the same data directory; every
//! record the client saw acknowledged is in the database exactly once, and a
//! retry of an acknowledged record is recognised as a duplicate.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::store::{Kind, TestStore};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// Start `switchboard serve` and return it with the address it listens on.
fn serve(config: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(rest) = line.split("listening on ws://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server says where it listens");
    (child, addr.parse().expect("an address"))
}

fn connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}/ws?userId=crash"), stream).unwrap();
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
    json!({"type":"sensor_data","id":format!("r-{seq}"),"data":{"sensorId":"s","value":seq,"timestamp":seq}})
        .to_string()
}

fn kill_9_mid_stream_loses_no_acknowledged_record(kind: Kind) {
    let st = TestStore::new(kind);
    let config = st.dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            "port = 0\nshards = 2\nlog_level = \"info\"\n{}",
            st.toml("")
        ),
    )
    .unwrap();
    let (mut child, addr) = serve(&config);
    // A publication whose history the crash may lose.
    let mut publisher = connect(addr);
    publisher
        .send(Message::text(
            json!({"type":"publish","channel":"public:crash","data":1}).to_string(),
        ))
        .unwrap();
    let published = loop {
        let m = read(&mut publisher).expect("published");
        if m["type"] == "published" {
            break m;
        }
    };
    let epoch = published["epoch"].as_str().unwrap().to_owned();

    // The client: 16 records in flight, every ack noted.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let acked = acked.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ws = connect(addr);
            let mut seq = 0u64;
            for _ in 0..16 {
                if ws.send(Message::text(record(seq))).is_err() {
                    return;
                }
                seq += 1;
            }
            while !stop.load(Ordering::Relaxed) {
                let Some(m) = read(&mut ws) else { return };
                if m["type"] != "ack" {
                    continue;
                }
                let id = m["id"].as_i64().expect("record id");
                let cid = m["clientId"].as_str().expect("client id").to_owned();
                acked.lock().unwrap().push((cid, id));
                if ws.send(Message::text(record(seq))).is_err() {
                    return;
                }
                seq += 1;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "too few acks before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL"); // mid-stream: records are in flight
    let _ = child.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);

    // Restart on the same directory; a retry of an acknowledged record is
    // the same record.
    let (mut child, addr) = serve(&config);
    let mut ws = connect(addr);
    let (cid, id) = acked[acked.len() / 2].clone();
    let seq: u64 = cid.trim_start_matches("r-").parse().unwrap();
    ws.send(Message::text(record(seq))).unwrap();
    let again = read(&mut ws).expect("ack");
    assert_eq!(again["type"], "ack", "{again}");
    assert_eq!(again["id"].as_i64(), Some(id));
    assert_eq!(again["duplicate"], true);
    // After a crash the stored offsets cannot be trusted: a new epoch, and
    // recovery from the old position is refused rather than wrong.
    ws.send(Message::text(
        json!({"type":"subscribe","channel":"public:crash","since":{"offset":1,"epoch":epoch}})
            .to_string(),
    ))
    .unwrap();
    let sub = loop {
        let m = read(&mut ws).expect("subscribed");
        if m["type"] == "subscribed" {
            break m;
        }
    };
    assert_eq!(sub["recovered"], false, "{sub}");
    drop(ws);
    drop(publisher);
    let pid = child.id() as i32;
    assert_eq!(sigterm(pid), 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful exit after SIGTERM: {status}");

    let rows = st.pairs("SELECT id, client_id FROM sensors_data");
    let stored: HashSet<(String, i64)> = rows.iter().map(|(i, c)| (c.clone(), *i)).collect();
    let distinct: HashSet<&String> = rows.iter().map(|(_, c)| c).collect();
    assert_eq!(distinct.len(), rows.len(), "a record stored twice");
    for (cid, id) in &acked {
        assert!(
            stored.contains(&(cid.clone(), *id)),
            "acknowledged record {cid} (id {id}) is missing after kill -9"
        );
    }
    eprintln!(
        "{} records acknowledged before SIGKILL, {} rows on disk after restart",
        acked.len(),
        rows.len()
    );
}

/// SIGTERM via `kill(1)`: the crate forbids `unsafe`, and the test needs no more.
fn sigterm(pid: i32) -> i32 {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(-1)
}

on_both_backends!(kill_9_mid_stream_loses_no_acknowledged_record);
