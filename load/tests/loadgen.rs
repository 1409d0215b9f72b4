//! The load generator must catch a misbehaving server: each test runs the
//! built `switchboard-load` binary against a deliberately faulty echo (or
//! fan-out) server (plain threads, hand-made frames) and checks the exit
//! status and the error kind in its JSON line; the real server must come
//! out clean. Counts and correctness only, never timing thresholds.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard::ws::frame::{RawOpCode, apply_mask, parse_header};
use switchboard::{Config, Server};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard-load");
/// Which data message (per connection, counting from 1) the fault hits.
const NTH: u64 = 10;
const CONNS: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Echo faithfully (the control).
    None,
    /// Flip one bit of the last payload byte of the Nth message.
    Flip,
    /// Never echo the Nth message.
    Drop,
    /// Echo the Nth message twice.
    Dup,
    /// Echo the (N+1)th message before the Nth.
    Swap,
    /// Close the connection (1011) instead of echoing the Nth message.
    Close,
}

/// An unmasked server frame, by hand.
fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Start the faulty echo server; every connection gets its own thread.
fn faulty_server(fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = serve_faulty(stream, fault);
            });
        }
    });
    addr
}

/// Read the upgrade request and answer 101. Returns the request head (None
/// if the client left first); `buf` keeps whatever followed it.
fn accept_upgrade(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<String>> {
    let mut tmp = vec![0u8; 64 << 10];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    s.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .as_bytes(),
    )?;
    buf.drain(..head_len);
    Ok(Some(head))
}

fn serve_faulty(mut s: TcpStream, fault: Fault) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 64 << 10];
    if accept_upgrade(&mut s, &mut buf)?.is_none() {
        return Ok(());
    }

    let mut n_data = 0u64;
    let mut held: Option<(u8, Vec<u8>)> = None;
    let mut closing = false;
    loop {
        let mut out = Vec::new();
        while let Ok(Some(h)) = parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let mut payload = buf[h.header_len..total].to_vec();
            buf.drain(..total);
            let Some(mask) = h.mask else {
                return Ok(()); // clients must mask; the load generator always does
            };
            apply_mask(&mut payload, mask);
            match h.opcode {
                RawOpCode::Text | RawOpCode::Binary if !closing => {
                    let op = if h.opcode == RawOpCode::Text { 1 } else { 2 };
                    n_data += 1;
                    match fault {
                        Fault::Flip if n_data == NTH => {
                            if let Some(b) = payload.last_mut() {
                                *b ^= 0x01; // stays ASCII: text stays valid UTF-8
                            }
                            server_frame(&mut out, op, &payload);
                        }
                        Fault::Drop if n_data == NTH => {}
                        Fault::Dup if n_data == NTH => {
                            server_frame(&mut out, op, &payload);
                            server_frame(&mut out, op, &payload);
                        }
                        Fault::Swap if n_data == NTH => held = Some((op, payload)),
                        Fault::Swap if n_data == NTH + 1 => {
                            server_frame(&mut out, op, &payload);
                            if let Some((hop, hp)) = held.take() {
                                server_frame(&mut out, hop, &hp);
                            }
                        }
                        Fault::Close if n_data == NTH => {
                            server_frame(&mut out, 0x8, &[0x03, 0xF3]); // 1011
                            closing = true;
                        }
                        _ => server_frame(&mut out, op, &payload),
                    }
                }
                RawOpCode::Ping => server_frame(&mut out, 0xA, &payload),
                RawOpCode::Close => {
                    if !closing {
                        server_frame(&mut out, 0x8, payload.get(..2).unwrap_or_default());
                    }
                    s.write_all(&out)?;
                    return Ok(()); // dropping the stream closes TCP
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            s.write_all(&out)?;
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Run the load generator; returns its exit status, its JSON line and all of stdout.
fn run_load(args: &[&str]) -> (ExitStatus, Value, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--json")
        // api mode reads its key from here too: only what a test passes counts.
        .env_remove("SWITCHBOARD_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchboard-load");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("switchboard-load {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout).expect("stdout");
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).expect("stderr");
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}\nstderr:\n{stderr}"));
    let json: Value = serde_json::from_str(line).expect("valid JSON");
    (status, json, stdout)
}

fn echo_against(addr: SocketAddr, extra: &[&str]) -> (ExitStatus, Value, String) {
    let url = format!("ws://{addr}/echo");
    let conns = CONNS.to_string();
    let mut args = vec![
        "echo", "--url", &url, "-c", &conns, "-d", "4", "-t", "1", "--warmup", "0",
    ];
    args.extend_from_slice(extra);
    run_load(&args)
}

/// The faulty server must produce exactly `expected` errors of `kind` (one
/// per connection) and nothing else, and a failing exit status.
fn assert_detects(fault: Fault, kind: &str, extra: &[&str]) {
    let addr = faulty_server(fault);
    let (status, json, stdout) = echo_against(addr, extra);
    assert_eq!(status.code(), Some(1), "{fault:?}: exit status\n{stdout}");
    let errors = &json["errors"];
    assert_eq!(errors[kind], CONNS, "{fault:?}: {kind} count\n{stdout}");
    assert_eq!(errors["total"], CONNS, "{fault:?}: only {kind}\n{stdout}");
    assert_eq!(json["opened"], CONNS);
    assert!(json["messages"].as_u64().unwrap() > 0, "{stdout}");
}

#[test]
fn detects_corruption() {
    assert_detects(Fault::Flip, "corrupt", &["-s", "48"]);
}

#[test]
fn detects_corruption_in_binary_header() {
    // 16-byte binary payloads: the flipped byte is in the timestamp.
    assert_detects(Fault::Flip, "corrupt", &["-s", "16", "--binary"]);
}

#[test]
fn detects_loss() {
    assert_detects(Fault::Drop, "lost", &[]);
}

#[test]
fn detects_duplication() {
    assert_detects(Fault::Dup, "dup", &["--binary", "-s", "300"]);
}

#[test]
fn detects_reordering() {
    assert_detects(Fault::Swap, "reorder", &[]);
}

#[test]
fn detects_server_close() {
    assert_detects(Fault::Close, "closed", &[]);
}

#[test]
fn test_server_without_fault_is_clean() {
    // The control: the same hand-made server, no fault, no error reported.
    let addr = faulty_server(Fault::None);
    let (status, json, stdout) = echo_against(addr, &[]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["closed_cleanly"], CONNS, "{stdout}");
    assert!(json["messages"].as_u64().unwrap() > 0, "{stdout}");
}

fn real_server(mut cfg: Config) -> Server {
    cfg.storage.backend = switchboard::config::StorageBackend::None;
    Server::start(cfg).expect("server starts")
}

#[test]
fn real_server_echo_is_clean() {
    // Heartbeats on: the server's pings are interleaved with the echoes and
    // must be answered (else it would close the connections with 1011).
    let server = real_server(Config {
        port: 0,
        shards: 1,
        heartbeat_interval: Duration::from_millis(300),
        pong_timeout: Duration::from_secs(5),
        ..Default::default()
    });
    let url = format!("ws://{}/echo", server.local_addr());
    let pid = std::process::id().to_string();
    let (status, json, stdout) = run_load(&[
        "echo", "--url", &url, "-c", "8", "-d", "8", "-t", "1", "--warmup", "0.2", "--pid", &pid,
    ]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["opened"], 8);
    assert!(json["messages"].as_u64().unwrap() > 0, "{stdout}");
    assert_eq!(json["closed_cleanly"], 8, "{stdout}");
    assert!(json["pings_answered"].as_u64().unwrap() > 0, "{stdout}");
    assert!(json["latency_us"]["samples"].as_u64().unwrap() > 0);
    // --pid: this test process hosts the server.
    assert!(json["server"]["cpu_s"].is_number(), "{stdout}");
    assert!(json["server"]["rss_after_bytes"].as_u64().unwrap() > 0);
    assert!(stdout.contains("user-space RSS"), "{stdout}");
}

#[test]
fn real_server_binary_large_messages_are_clean() {
    let server = real_server(Config {
        port: 0,
        shards: 1,
        ..Default::default()
    });
    let url = format!("ws://{}/echo", server.local_addr());
    // 70,000 bytes: 64-bit frame lengths and frames split across reads.
    let (status, json, stdout) = run_load(&[
        "echo", "--url", &url, "-c", "3", "-d", "4", "-s", "70000", "--binary", "-t", "0.5",
        "--warmup", "0",
    ]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert!(json["messages"].as_u64().unwrap() > 0, "{stdout}");
}

#[test]
fn real_server_connect_holds_and_answers_pings() {
    // Short heartbeats: connections that did not answer pings would be
    // closed with 1011 during the hold.
    let server = real_server(Config {
        port: 0,
        shards: 2,
        heartbeat_interval: Duration::from_millis(250),
        pong_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let url = format!("ws://{}/echo", server.local_addr());
    let pid = std::process::id().to_string();
    let (status, json, stdout) = run_load(&[
        "connect",
        "--url",
        &url,
        "-n",
        "60",
        "--ramp",
        "500",
        "--hold",
        "1.2",
        "--sources",
        "2",
        "--pid",
        &pid,
    ]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["opened"], 60, "{stdout}");
    assert_eq!(json["open_at_end"], 60, "{stdout}");
    assert_eq!(json["problems"], 0, "{stdout}");
    assert!(json["pings_answered"].as_u64().unwrap() >= 60, "{stdout}");
    assert_eq!(json["closed_cleanly"], 60, "{stdout}");
    assert_eq!(json["sources"], 2);
    assert!(json["server"]["rss_end_of_hold_bytes"].as_u64().unwrap() > 0);
    assert_eq!(server.stats().heartbeat_timeouts, 0);
}

#[test]
fn connect_counts_http_refusals() {
    let server = real_server(Config {
        port: 0,
        shards: 1,
        ..Default::default()
    });
    let url = format!("ws://{}/no-such-path", server.local_addr());
    let (status, json, stdout) = run_load(&["connect", "--url", &url, "-n", "5", "--hold", "0"]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(json["failures"]["http_404"], 5, "{stdout}");
    assert_eq!(json["open_at_end"], 0);
}

// ---------------------------------------------------------------------------
// Fan-out mode: a hand-made server for the JSON protocol's channels.

const FAN_SUBS: u64 = 5;

/// What the hand-made fan-out server does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FanFault {
    /// Deliver every publish to every subscriber (the control).
    None,
    /// Do not deliver the Nth publish to the first subscriber.
    DropOne,
}

/// A subscriber's socket; its own thread and publishers' threads write to it.
type Writer = Arc<Mutex<TcpStream>>;

/// Subscribers in the order they subscribed.
type Hub = Arc<Mutex<Vec<Writer>>>;

fn send_text(w: &Writer, json: &str) -> io::Result<()> {
    let mut f = Vec::new();
    server_frame(&mut f, 0x1, json.as_bytes());
    w.lock().unwrap().write_all(&f)
}

const TS: &str = "2026-01-01T00:00:00.000Z";

/// Start the hand-made fan-out server; every connection gets its own thread.
fn fanout_server(fault: FanFault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hub: Hub = Arc::default();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let hub = hub.clone();
            std::thread::spawn(move || {
                let _ = serve_fanout(stream, n, &hub, fault);
            });
        }
    });
    addr
}

/// `connected` on upgrade; `subscribe` -> `subscribed`; `publish` ->
/// `published`, then `message` to every subscriber (data copied as sent).
fn serve_fanout(mut s: TcpStream, n: usize, hub: &Hub, fault: FanFault) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let Some(head) = accept_upgrade(&mut s, &mut buf)? else {
        return Ok(());
    };
    let target = head.split_whitespace().nth(1).unwrap_or_default();
    let user = target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("userId="))
        .map_or_else(|| format!("anon-{n}"), str::to_owned);
    let me: Writer = Arc::new(Mutex::new(s.try_clone()?));
    send_text(
        &me,
        &format!(
            r#"{{"type":"connected","connectionId":"0.{n}","userId":"{user}","features":["channels","publish"],"channels":[],"timestamp":"{TS}"}}"#
        ),
    )?;
    let mut publishes = 0u64;
    let mut tmp = vec![0u8; 64 << 10];
    loop {
        while let Ok(Some(h)) = parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let mut payload = buf[h.header_len..total].to_vec();
            buf.drain(..total);
            let Some(mask) = h.mask else {
                return Ok(());
            };
            apply_mask(&mut payload, mask);
            match h.opcode {
                RawOpCode::Text => {
                    let text = String::from_utf8_lossy(&payload).into_owned();
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let channel = v["channel"].as_str().unwrap_or_default().to_owned();
                    match v["type"].as_str() {
                        Some("subscribe") => {
                            hub.lock().unwrap().push(me.clone());
                            send_text(
                                &me,
                                &format!(
                                    r#"{{"type":"subscribed","channel":"{channel}","timestamp":"{TS}"}}"#
                                ),
                            )?;
                        }
                        Some("publish") => {
                            publishes += 1;
                            // The data exactly as sent: the publish ends with it.
                            let at = text.find(r#""data":"#).expect("data") + 7;
                            let data = &text[at..text.len() - 1];
                            send_text(
                                &me,
                                &format!(
                                    r#"{{"type":"published","channel":"{channel}","timestamp":"{TS}"}}"#
                                ),
                            )?;
                            let mut msg = Vec::new();
                            server_frame(
                                &mut msg,
                                0x1,
                                format!(
                                    r#"{{"type":"message","channel":"{channel}","from":"{user}","data":{data},"timestamp":"{TS}"}}"#
                                )
                                .as_bytes(),
                            );
                            let subs = hub.lock().unwrap().clone();
                            for (i, w) in subs.iter().enumerate() {
                                if fault == FanFault::DropOne && publishes == NTH && i == 0 {
                                    continue;
                                }
                                // A subscriber that already left is not our problem here.
                                let _ = w.lock().unwrap().write_all(&msg);
                            }
                        }
                        _ => send_text(
                            &me,
                            &format!(
                                r#"{{"type":"error","code":"unknown_type","message":"?","timestamp":"{TS}"}}"#
                            ),
                        )?,
                    }
                }
                RawOpCode::Ping => {
                    let mut f = Vec::new();
                    server_frame(&mut f, 0xA, &payload);
                    me.lock().unwrap().write_all(&f)?;
                }
                RawOpCode::Close => {
                    let mut f = Vec::new();
                    server_frame(&mut f, 0x8, payload.get(..2).unwrap_or_default());
                    me.lock().unwrap().write_all(&f)?;
                    // The hub still holds a clone of the socket: shut it down
                    // explicitly so the client sees EOF now.
                    return s.shutdown(Shutdown::Both);
                }
                _ => {}
            }
        }
        let got = s.read(&mut tmp)?;
        if got == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..got]);
    }
}

fn fanout_against(addr: SocketAddr) -> (ExitStatus, Value, String) {
    let url = format!("ws://{addr}/ws");
    let n = FAN_SUBS.to_string();
    run_load(&[
        "fanout", "--url", &url, "-n", &n, "-k", "4", "-t", "1", "--warmup", "0",
    ])
}

#[test]
fn fanout_test_server_without_fault_is_clean() {
    let (status, json, stdout) = fanout_against(fanout_server(FanFault::None));
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["subscribed"], FAN_SUBS, "{stdout}");
    let completed = json["completed_total"].as_u64().unwrap();
    assert!(completed > 0, "{stdout}");
    assert_eq!(json["sent_total"], completed, "{stdout}");
    assert_eq!(json["received_total"], completed * FAN_SUBS, "{stdout}");
    assert_eq!(json["closed_cleanly"], FAN_SUBS + 1, "{stdout}");
}

#[test]
fn fanout_detects_a_dropped_delivery() {
    let (status, json, stdout) = fanout_against(fanout_server(FanFault::DropOne));
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(json["errors"]["lost"], 1, "{stdout}");
    assert_eq!(json["errors"]["total"], 1, "only the loss\n{stdout}");
    assert_eq!(json["subscribed"], FAN_SUBS, "{stdout}");
    // The loss did not stall the pipeline: every publish completed.
    let completed = json["completed_total"].as_u64().unwrap();
    assert!(completed > NTH, "{stdout}");
    assert_eq!(json["sent_total"], completed, "{stdout}");
    assert_eq!(json["received_total"], completed * FAN_SUBS - 1, "{stdout}");
}

#[test]
fn real_server_fanout_is_clean() {
    // Two shards: subscribers on both, so deliveries cross shards.
    let server = real_server(Config {
        port: 0,
        shards: 2,
        ..Default::default()
    });
    let url = format!("ws://{}/ws", server.local_addr());
    let pid = std::process::id().to_string();
    let (status, json, stdout) = run_load(&[
        "fanout", "--url", &url, "-n", "50", "-k", "4", "-t", "1", "--warmup", "0.2", "--pid", &pid,
    ]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["subscribed"], 50, "{stdout}");
    assert_eq!(json["live_at_start"], 50, "{stdout}");
    let publishes = json["publishes"].as_u64().unwrap();
    assert!(publishes > 0, "{stdout}");
    assert_eq!(json["deliveries"], publishes * 50, "{stdout}");
    // Over the whole run: every publish reached all 50, exactly once.
    let completed = json["completed_total"].as_u64().unwrap();
    assert_eq!(json["sent_total"], completed, "{stdout}");
    assert_eq!(json["published_acks"], completed, "{stdout}");
    assert_eq!(json["received_total"], completed * 50, "{stdout}");
    assert_eq!(json["closed_cleanly"], 51, "{stdout}");
    assert!(json["latency_us"]["samples"].as_u64().unwrap() > 0);
    assert!(
        json["server"]["cpu_us_per_delivery"].is_number(),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------
// Ingest mode: a hand-made server that acknowledges sensor records, and the
// real server storing them in SQLite.

/// What the hand-made ingest server does wrong (to the Nth record of each
/// connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IngestFault {
    /// Acknowledge every record once (the control).
    None,
    /// Acknowledge the Nth record twice.
    AckTwice,
    /// Never answer the Nth record.
    NeverAck,
    /// Give the Nth record the record id of the one before it.
    ReuseId,
    /// Mark the Nth ack `"duplicate":true`.
    Duplicate,
    /// Answer every 7th record `overloaded` the first time (backpressure:
    /// the load generator sends it again and it is acknowledged then).
    Overloaded,
}

/// Start the hand-made ingest server; every connection gets its own thread.
fn ingest_server(fault: IngestFault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ids = Arc::new(std::sync::atomic::AtomicI64::new(1));
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let ids = ids.clone();
            std::thread::spawn(move || {
                let _ = serve_ingest(stream, n, &ids, fault);
            });
        }
    });
    addr
}

/// `connected` on upgrade; `sensor_data` -> `ack` with the next record id.
fn serve_ingest(
    mut s: TcpStream,
    n: usize,
    ids: &std::sync::atomic::AtomicI64,
    fault: IngestFault,
) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    if accept_upgrade(&mut s, &mut buf)?.is_none() {
        return Ok(());
    }
    let mut out = Vec::new();
    server_frame(
        &mut out,
        0x1,
        format!(r#"{{"type":"connected","connectionId":"0.{n}","userId":"u{n}","features":[],"channels":[],"timestamp":"{TS}"}}"#).as_bytes(),
    );
    s.write_all(&out)?;
    let mut records = 0u64;
    let mut last_id = 0i64;
    let mut seen = std::collections::HashSet::new();
    let mut tmp = vec![0u8; 64 << 10];
    loop {
        let mut out = Vec::new();
        while let Ok(Some(h)) = parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let mut payload = buf[h.header_len..total].to_vec();
            buf.drain(..total);
            let Some(mask) = h.mask else {
                return Ok(());
            };
            apply_mask(&mut payload, mask);
            match h.opcode {
                RawOpCode::Text => {
                    let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                    assert_eq!(v["type"], "sensor_data", "{v}");
                    let cid = v["id"].as_str().unwrap_or_default().to_owned();
                    let rid = v["requestId"].to_string();
                    assert!(v["data"]["sensorId"].is_string(), "{v}");
                    let first_time = seen.insert(cid.clone());
                    if fault == IngestFault::Overloaded && first_time {
                        let seq: u64 = cid.rsplit('-').next().unwrap().parse().unwrap();
                        if seq.is_multiple_of(7) {
                            server_frame(
                                &mut out,
                                0x1,
                                format!(r#"{{"type":"error","code":"overloaded","message":"the storage queue is full; retry later","requestId":{rid},"timestamp":"{TS}"}}"#).as_bytes(),
                            );
                            continue;
                        }
                    }
                    records += 1;
                    let nth = records == NTH;
                    if fault == IngestFault::NeverAck && nth {
                        continue;
                    }
                    let id = if fault == IngestFault::ReuseId && nth {
                        last_id
                    } else {
                        ids.fetch_add(1, Ordering::Relaxed)
                    };
                    last_id = id;
                    let dup = if fault == IngestFault::Duplicate && nth {
                        r#","duplicate":true"#
                    } else {
                        ""
                    };
                    let ack = format!(
                        r#"{{"type":"ack","id":{id},"clientId":"{cid}"{dup},"requestId":{rid},"timestamp":"{TS}"}}"#
                    );
                    server_frame(&mut out, 0x1, ack.as_bytes());
                    if fault == IngestFault::AckTwice && nth {
                        server_frame(&mut out, 0x1, ack.as_bytes());
                    }
                }
                RawOpCode::Ping => server_frame(&mut out, 0xA, &payload),
                RawOpCode::Close => {
                    server_frame(&mut out, 0x8, payload.get(..2).unwrap_or_default());
                    s.write_all(&out)?;
                    return Ok(());
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            s.write_all(&out)?;
        }
        let got = s.read(&mut tmp)?;
        if got == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..got]);
    }
}

fn ingest_against(addr: SocketAddr) -> (ExitStatus, Value, String) {
    let url = format!("ws://{addr}/ws");
    let conns = CONNS.to_string();
    run_load(&[
        "ingest",
        "--url",
        &url,
        "-c",
        &conns,
        "-w",
        "4",
        "-t",
        "0.5",
        "--warmup",
        "0",
        "--drain-timeout",
        "1",
    ])
}

/// Exactly one error of `kind` per connection, nothing else, exit status 1.
fn assert_ingest_detects(fault: IngestFault, kind: &str) {
    let (status, json, stdout) = ingest_against(ingest_server(fault));
    assert_eq!(status.code(), Some(1), "{fault:?}: exit status\n{stdout}");
    assert_eq!(json["errors"][kind], CONNS, "{fault:?}: {kind}\n{stdout}");
    assert_eq!(
        json["errors"]["total"], CONNS,
        "{fault:?}: only {kind}\n{stdout}"
    );
    assert_eq!(json["opened"], CONNS, "{stdout}");
    assert!(json["acked_total"].as_u64().unwrap() > NTH, "{stdout}");
}

#[test]
fn ingest_test_server_without_fault_is_clean() {
    let (status, json, stdout) = ingest_against(ingest_server(IngestFault::None));
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    let records = json["records"].as_u64().unwrap();
    assert!(records > 0, "{stdout}");
    assert_eq!(json["acked_total"], records, "{stdout}");
    assert_eq!(json["sends"], records, "{stdout}");
    assert_eq!(json["closed_cleanly"], CONNS, "{stdout}");
}

#[test]
fn ingest_detects_a_second_ack() {
    assert_ingest_detects(IngestFault::AckTwice, "dup_ack");
}

#[test]
fn ingest_detects_a_record_never_acked() {
    assert_ingest_detects(IngestFault::NeverAck, "unacked");
}

#[test]
fn ingest_detects_a_reused_record_id() {
    assert_ingest_detects(IngestFault::ReuseId, "id_reused");
}

#[test]
fn ingest_detects_a_duplicate_ack() {
    assert_ingest_detects(IngestFault::Duplicate, "duplicate");
}

#[test]
fn ingest_resends_overloaded_records_until_stored() {
    let (status, json, stdout) = ingest_against(ingest_server(IngestFault::Overloaded));
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    let overloaded = json["overloaded"].as_u64().unwrap();
    assert!(overloaded > 0, "{stdout}");
    assert_eq!(json["error_codes"]["overloaded"], overloaded, "{stdout}");
    assert_eq!(json["resends"], overloaded, "{stdout}");
    let records = json["records"].as_u64().unwrap();
    assert_eq!(json["acked_total"], records, "{stdout}");
    assert_eq!(json["sends"], records + overloaded, "{stdout}");
}

/// The real server with SQLite storage in `dir`.
fn stored_server(mut cfg: Config, dir: &std::path::Path) -> Server {
    cfg.storage.backend = switchboard::config::StorageBackend::Sqlite;
    cfg.storage.data_dir = dir.to_path_buf();
    Server::start(cfg).expect("server starts")
}

#[test]
fn real_server_ingest_is_clean_and_every_ack_is_a_row() {
    let dir = tempfile::tempdir().unwrap();
    // Two shards: connections on both hand records to the one writer.
    let server = stored_server(
        Config {
            port: 0,
            shards: 2,
            ..Default::default()
        },
        dir.path(),
    );
    let url = format!("ws://{}/ws", server.local_addr());
    let pid = std::process::id().to_string();
    let (status, json, stdout) = run_load(&[
        "ingest", "--url", &url, "-c", "6", "-w", "8", "-t", "1", "--warmup", "0.2", "--pid", &pid,
    ]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["opened"], 6, "{stdout}");
    let records = json["records"].as_u64().unwrap();
    assert!(json["acked_in_window"].as_u64().unwrap() > 0, "{stdout}");
    assert_eq!(json["acked_total"], records, "{stdout}");
    assert_eq!(json["closed_cleanly"], 6, "{stdout}");
    assert!(json["ack_latency_us"]["samples"].as_u64().unwrap() > 0);
    assert!(json["server"]["cpu_us_per_record"].is_number(), "{stdout}");
    server.shutdown();
    // Every acknowledged record is a row, once, under this run's client ids.
    let db = rusqlite::Connection::open(dir.path().join("switchboard.db")).unwrap();
    let tag = json["run_tag"].as_str().unwrap();
    let (rows, distinct): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT client_id) FROM sensors_data WHERE client_id LIKE ?1",
            [format!("{tag}.%")],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows as u64, records, "{stdout}");
    assert_eq!(distinct as u64, records, "{stdout}");
}

// ---------------------------------------------------------------------------
// API mode: publishes over HTTP, delivered to WebSocket subscribers. A
// hand-made server that speaks both on one port, and the real server.

const API_SUBS: u64 = 4;

/// What the hand-made API server does wrong (to the Nth publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiFault {
    /// Publish and answer every request (the control).
    None,
    /// Do not deliver the Nth publish to the first subscriber.
    DropOne,
    /// Deliver the Nth publish to the first subscriber twice.
    DupOne,
    /// Answer the Nth request 503 without publishing it.
    Refuse,
    /// End every HTTP connection after its 5th response (`Connection:
    /// close`), as servers limiting requests per connection do.
    CloseEvery5,
}

/// Subscribers in the order they subscribed, and the channel's next offset
/// (one lock: offsets are given and delivered in one order).
type ApiHub = Arc<Mutex<(Vec<Writer>, u64)>>;

fn api_server(fault: ApiFault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hub: ApiHub = Arc::new(Mutex::new((Vec::new(), 1)));
    let publishes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let hub = hub.clone();
            let publishes = publishes.clone();
            std::thread::spawn(move || {
                let _ = serve_api(stream, n, &hub, &publishes, fault);
            });
        }
    });
    addr
}

/// A request head in `buf` (read more until it is there); None at EOF.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut tmp = vec![0u8; 64 << 10];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn serve_api(
    mut s: TcpStream,
    n: usize,
    hub: &ApiHub,
    publishes: &std::sync::atomic::AtomicU64,
    fault: ApiFault,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    if read_head(&mut s, &mut buf)?.is_none() {
        return Ok(());
    }
    if buf.starts_with(b"GET ") {
        return serve_api_subscriber(s, buf, n, hub);
    }
    // HTTP/1.1 keep-alive: requests answered in order, pipelined or not.
    let mut tmp = vec![0u8; 64 << 10];
    let mut answered = 0u64;
    loop {
        let Some(head_len) = read_head(&mut s, &mut buf)? else {
            return Ok(());
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&buf).unwrap().is_complete());
        assert_eq!(req.method, Some("POST"));
        assert_eq!(req.path, Some("/api/publish"));
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        assert_eq!(header("authorization").as_deref(), Some("Bearer test-key"));
        let len: usize = header("content-length").unwrap().parse().unwrap();
        while buf.len() < head_len + len {
            let got = s.read(&mut tmp)?;
            if got == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..got]);
        }
        let body: Value = serde_json::from_slice(&buf[head_len..head_len + len]).unwrap();
        buf.drain(..head_len + len);
        let nth = publishes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == NTH;
        if fault == ApiFault::Refuse && nth {
            let msg = r#"{"error":"unavailable"}"#;
            s.write_all(
                format!(
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{msg}",
                    msg.len()
                )
                .as_bytes(),
            )?;
            continue;
        }
        let channel = body["channel"].as_str().unwrap().to_owned();
        let (offset, subscribers) = {
            let mut h = hub.lock().unwrap();
            let offset = h.1;
            h.1 += 1;
            let mut frame = Vec::new();
            server_frame(
                &mut frame,
                0x1,
                format!(
                    r#"{{"type":"message","channel":"{channel}","data":{},"offset":{offset},"epoch":"fake-epoch","timestamp":"{TS}"}}"#,
                    body["data"]
                )
                .as_bytes(),
            );
            for (i, w) in h.0.iter().enumerate() {
                let times = match fault {
                    ApiFault::DropOne if nth && i == 0 => 0,
                    ApiFault::DupOne if nth && i == 0 => 2,
                    _ => 1,
                };
                for _ in 0..times {
                    let _ = w.lock().unwrap().write_all(&frame);
                }
            }
            (offset, h.0.len())
        };
        let reply = format!(
            r#"{{"success":true,"channel":"{channel}","offset":{offset},"epoch":"fake-epoch","connections":{subscribers}}}"#
        );
        answered += 1;
        let last = fault == ApiFault::CloseEvery5 && answered.is_multiple_of(5);
        s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{reply}",
                reply.len(),
                if last { "Connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        )?;
        if last {
            return Ok(());
        }
    }
}

/// `connected` on upgrade; `subscribe` -> `subscribed` and into the hub.
fn serve_api_subscriber(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    n: usize,
    hub: &ApiHub,
) -> io::Result<()> {
    if accept_upgrade(&mut s, &mut buf)?.is_none() {
        return Ok(());
    }
    let me: Writer = Arc::new(Mutex::new(s.try_clone()?));
    send_text(
        &me,
        &format!(
            r#"{{"type":"connected","connectionId":"0.{n}","userId":"u{n}","features":[],"channels":[],"timestamp":"{TS}"}}"#
        ),
    )?;
    let mut tmp = vec![0u8; 64 << 10];
    loop {
        while let Ok(Some(h)) = parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let mut payload = buf[h.header_len..total].to_vec();
            buf.drain(..total);
            let Some(mask) = h.mask else {
                return Ok(());
            };
            apply_mask(&mut payload, mask);
            match h.opcode {
                RawOpCode::Text => {
                    let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                    assert_eq!(v["type"], "subscribe", "{v}");
                    let channel = v["channel"].as_str().unwrap_or_default();
                    // Into the hub and answered under its lock: no publish
                    // can come between the two.
                    let mut h = hub.lock().unwrap();
                    h.0.push(me.clone());
                    send_text(
                        &me,
                        &format!(
                            r#"{{"type":"subscribed","channel":"{channel}","timestamp":"{TS}"}}"#
                        ),
                    )?;
                }
                RawOpCode::Ping => {
                    let mut f = Vec::new();
                    server_frame(&mut f, 0xA, &payload);
                    me.lock().unwrap().write_all(&f)?;
                }
                RawOpCode::Close => {
                    let mut f = Vec::new();
                    server_frame(&mut f, 0x8, payload.get(..2).unwrap_or_default());
                    me.lock().unwrap().write_all(&f)?;
                    return s.shutdown(Shutdown::Both);
                }
                _ => {}
            }
        }
        let got = s.read(&mut tmp)?;
        if got == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..got]);
    }
}

fn api_against(addr: SocketAddr) -> (ExitStatus, Value, String) {
    api_against_with(addr, &["-p", "2", "-k", "4"])
}

fn api_against_with(addr: SocketAddr, extra: &[&str]) -> (ExitStatus, Value, String) {
    let url = format!("ws://{addr}/ws");
    let n = API_SUBS.to_string();
    let mut args = vec![
        "api",
        "--url",
        &url,
        "-n",
        &n,
        "-t",
        "0.5",
        "--warmup",
        "0",
        "--api-key",
        "test-key",
    ];
    args.extend_from_slice(extra);
    run_load(&args)
}

#[test]
fn api_test_server_without_fault_is_clean() {
    let (status, json, stdout) = api_against(api_server(ApiFault::None));
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["subscribed"], API_SUBS, "{stdout}");
    assert_eq!(json["http_open"], 2, "{stdout}");
    let completed = json["completed_total"].as_u64().unwrap();
    assert!(completed > NTH, "{stdout}");
    assert_eq!(json["sent_total"], completed, "{stdout}");
    assert_eq!(json["answered_total"], completed, "{stdout}");
    assert_eq!(json["received_total"], completed * API_SUBS, "{stdout}");
    assert_eq!(json["first_offset"], 1, "{stdout}");
    assert_eq!(json["last_offset"], completed, "{stdout}");
    assert_eq!(json["closed_cleanly"], API_SUBS, "{stdout}");
}

/// Exactly `count` errors of `kind`, nothing else, exit status 1, and the
/// pipeline went on past the fault.
fn assert_api_detects(fault: ApiFault, kind: &str, count: u64) -> Value {
    let (status, json, stdout) = api_against(api_server(fault));
    assert_eq!(status.code(), Some(1), "{fault:?}: exit status\n{stdout}");
    assert_eq!(json["errors"][kind], count, "{fault:?}: {kind}\n{stdout}");
    assert_eq!(
        json["errors"]["total"], count,
        "{fault:?}: only {kind}\n{stdout}"
    );
    assert!(json["completed_total"].as_u64().unwrap() > NTH, "{stdout}");
    json
}

#[test]
fn api_detects_a_dropped_delivery() {
    let json = assert_api_detects(ApiFault::DropOne, "lost", 1);
    let completed = json["completed_total"].as_u64().unwrap();
    assert_eq!(json["received_total"], completed * API_SUBS - 1);
}

#[test]
fn api_detects_a_duplicated_delivery() {
    assert_api_detects(ApiFault::DupOne, "dup", 1);
}

#[test]
fn api_counts_refused_requests_by_status() {
    let json = assert_api_detects(ApiFault::Refuse, "rejected", 1);
    assert_eq!(json["http_statuses"]["503"], 1);
    let completed = json["completed_total"].as_u64().unwrap();
    assert_eq!(json["sent_total"], completed + 1);
    assert_eq!(json["received_total"], completed * API_SUBS);
}

#[test]
fn api_opens_a_new_connection_when_the_server_ends_an_idle_one() {
    // One request in flight: a connection the server ends after a response
    // has nothing outstanding, so it is opened again, not an error.
    let (status, json, stdout) =
        api_against_with(api_server(ApiFault::CloseEvery5), &["-p", "2", "-k", "1"]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    let completed = json["completed_total"].as_u64().unwrap();
    assert!(completed >= 10, "{stdout}");
    assert_eq!(json["sent_total"], completed, "{stdout}");
    assert_eq!(json["received_total"], completed * API_SUBS, "{stdout}");
    assert!(
        json["http_reconnects"].as_u64().unwrap() >= completed / 5 - 1,
        "{stdout}"
    );
}

fn api_config(shards: usize) -> Config {
    let mut cfg = Config {
        port: 0,
        shards,
        ..Default::default()
    };
    cfg.channels.subscribe = switchboard::config::Rule::Any;
    cfg.api.keys = vec!["test-key".into()];
    cfg
}

#[test]
fn real_server_api_publish_is_clean() {
    // Two shards: subscribers and HTTP connections on both, the channel's
    // home on one of them.
    let server = real_server(api_config(2));
    let url = format!("ws://{}/ws", server.local_addr());
    let pid = std::process::id().to_string();
    let (status, json, stdout) = run_load(&[
        "api",
        "--url",
        &url,
        "-n",
        "20",
        "-p",
        "3",
        "-k",
        "8",
        "-t",
        "1",
        "--warmup",
        "0.2",
        "--api-key",
        "test-key",
        "--pid",
        &pid,
    ]);
    assert!(status.success(), "{stdout}");
    assert_eq!(json["errors"]["total"], 0, "{stdout}");
    assert_eq!(json["subscribed"], 20, "{stdout}");
    assert_eq!(json["http_open"], 3, "{stdout}");
    let publishes = json["publishes"].as_u64().unwrap();
    assert!(publishes > 0, "{stdout}");
    // Over the whole run: every request answered 200 and delivered to all 20 once.
    let completed = json["completed_total"].as_u64().unwrap();
    assert_eq!(json["sent_total"], completed, "{stdout}");
    assert_eq!(json["answered_total"], completed, "{stdout}");
    assert_eq!(json["received_total"], completed * 20, "{stdout}");
    let first = json["first_offset"].as_u64().unwrap();
    assert_eq!(json["last_offset"], first + completed - 1, "{stdout}");
    assert_eq!(json["connections_reported"], 20, "{stdout}");
    assert_eq!(json["http_statuses"], serde_json::json!({}), "{stdout}");
    assert_eq!(json["closed_cleanly"], 20, "{stdout}");
    assert!(json["http_latency_us"]["samples"].as_u64().unwrap() > 0);
    assert!(json["e2e_latency_us"]["samples"].as_u64().unwrap() > 0);
    assert!(json["server"]["cpu_us_per_publish"].is_number(), "{stdout}");
}

#[test]
fn real_server_api_without_the_key_is_refused_and_counted() {
    let server = real_server(api_config(1));
    let url = format!("ws://{}/ws", server.local_addr());
    let (status, json, stdout) = run_load(&[
        "api", "--url", &url, "-n", "3", "-p", "1", "-k", "4", "-t", "0.3", "--warmup", "0",
    ]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    let refused = json["http_statuses"]["401"].as_u64().unwrap_or(0);
    assert!(refused > 0, "{stdout}");
    assert_eq!(json["errors"]["rejected"], refused, "{stdout}");
    assert_eq!(json["errors"]["total"], refused, "{stdout}");
    assert_eq!(json["received_total"], 0, "{stdout}");
}
