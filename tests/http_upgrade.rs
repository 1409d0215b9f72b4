//! The HTTP side of the listener: responses to requests that are not valid
//! upgrades, partial requests, limits.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn upgrade(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn non_upgrade_requests_get_http_answers() {
    let server = start(test_config(1));
    let a = server.local_addr();
    let r = http(a, "GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status(&r), 404, "{r}");
    let r = http(a, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status(&r), 426, "{r}");
    assert!(r.contains("Sec-WebSocket-Version: 13"));
    let r = http(
        a,
        "POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status(&r), 405, "{r}");
    assert!(r.contains("Allow: GET"));
    let r = http(
        a,
        &upgrade("/echo", "").replace("Version: 13", "Version: 8"),
    );
    assert_eq!(status(&r), 426, "{r}");
    let r = http(a, &upgrade("/echo", "").replace(KEY, "short"));
    assert_eq!(status(&r), 400, "{r}");
    let r = http(a, "GET / HTTP/1.0\r\n\r\n");
    assert_eq!(status(&r), 400, "{r}");
    let r = http(a, "\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(status(&r), 400, "{r}");
    // Each answer has a Content-Length and closes.
    assert!(r.contains("Content-Length:") && r.contains("Connection: close"));
}

#[test]
fn oversized_head_gets_431() {
    let mut cfg = test_config(1);
    cfg.max_header_bytes = 1024;
    let server = start(cfg);
    let big = upgrade("/echo", &format!("X-Filler: {}\r\n", "a".repeat(2000)));
    let r = http(server.local_addr(), &big);
    assert_eq!(status(&r), 431, "{r}");
}

#[test]
fn request_split_byte_by_byte_upgrades() {
    let server = start(test_config(1));
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for b in upgrade("/echo", "").bytes() {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    let mut raw = Raw {
        stream: s,
        buf: Vec::new(),
    };
    let head = raw.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    raw.send(true, 0x1, b"after a slow handshake");
    assert_eq!(
        raw.read_frame(),
        Some((true, 0x1, b"after a slow handshake".to_vec()))
    );
}

#[test]
fn handshake_timeout_drops_silent_sockets() {
    let mut cfg = test_config(1);
    cfg.handshake_timeout = Duration::from_millis(300);
    let server = start(cfg);
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost").unwrap(); // never finished
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "server closed the connection");
    wait_until("counter", || server.stats().handshake_timeouts == 1);
}

#[test]
fn echo_can_be_switched_off_and_paths_configured() {
    let mut cfg = test_config(1);
    cfg.echo_enabled = false;
    cfg.ws_path = "/realtime".into();
    let server = start(cfg);
    let r = http(server.local_addr(), &upgrade("/echo", ""));
    assert_eq!(status(&r), 404, "{r}");
    let _ = Raw::connect(server.local_addr(), "/realtime");
}

#[test]
fn app_path_answers_ping_and_errors() {
    let server = start(test_config(1));
    let mut raw = Raw::connect(server.local_addr(), "/ws");
    let (_, _, welcome) = raw.read_frame().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&welcome).unwrap();
    assert_eq!(v["type"], "connected", "auth mode none welcomes at once");
    raw.send(true, 0x1, br#"{"type":"ping"}"#);
    let (_, op, payload) = raw.read_frame().unwrap();
    assert_eq!(op, 0x1);
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["type"], "pong");
    raw.send(true, 0x1, b"{not json");
    let (_, _, payload) = raw.read_frame().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], "bad_json");
    // Still open.
    raw.send(true, 0x1, br#"{"type":"nope","requestId":"r1"}"#);
    let (_, _, payload) = raw.read_frame().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["code"], "unknown_type");
    assert_eq!(v["requestId"], "r1");
}
