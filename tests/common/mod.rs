//! Shared helpers for integration tests: start a real server on an ephemeral
//! port, connect real clients (tungstenite over TCP), and speak raw frames.
#![allow(dead_code)]

pub mod store;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use switchboard::config::Config;
use switchboard::{Server, ws::frame::encode_client_frame};
use tungstenite::WebSocket;

/// A config for tests: loopback, port 0, short timers, nothing stored
/// (tests of storage set `storage` to a temporary directory).
pub fn test_config(shards: usize) -> Config {
    let mut cfg = Config {
        port: 0,
        shards,
        log_level: "warn".into(),
        ..Config::default()
    };
    cfg.storage.backend = switchboard::config::StorageBackend::None;
    cfg
}

/// A config storing into SQLite under `dir`.
pub fn stored_config(shards: usize, dir: &std::path::Path) -> Config {
    let mut cfg = test_config(shards);
    cfg.storage.backend = switchboard::config::StorageBackend::Sqlite;
    cfg.storage.data_dir = dir.to_path_buf();
    cfg
}

pub fn start(cfg: Config) -> Server {
    // Tests that hold thousands of sockets need the soft limit raised, as the binary does.
    let _ = switchboard::raise_fd_limit();
    switchboard::logging::init(
        &std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
        switchboard::config::LogFormat::Text,
    );
    Server::start(cfg).expect("server starts")
}

/// Open a WebSocket client (tungstenite, blocking) on `path`.
pub fn ws(addr: SocketAddr, path: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://{addr}{path}");
    let (socket, resp) = tungstenite::client::client(url, stream).expect("ws handshake");
    assert_eq!(resp.status(), 101);
    socket
}

/// A raw TCP connection that has completed the upgrade, for hand-made frames.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl Raw {
    pub fn connect(addr: SocketAddr, path: &str) -> Raw {
        let mut stream = TcpStream::connect(addr).expect("tcp connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        let head = raw.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw
    }

    /// Read until the end of an HTTP head; keep what follows.
    pub fn read_http_head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return String::from_utf8(head).unwrap();
            }
            let mut tmp = [0u8; 4096];
            let n = self.stream.read(&mut tmp).expect("read head");
            assert!(n > 0, "EOF before the end of the HTTP head");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    pub fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut f = Vec::new();
        encode_client_frame(&mut f, fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d]);
        self.stream.write_all(&f).unwrap();
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Read one server frame: (fin, opcode, payload). `None` on EOF.
    pub fn read_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let b0 = self.buf[0];
                let b1 = self.buf[1];
                assert_eq!(b1 & 0x80, 0, "server frames are not masked");
                let (len, hl) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= hl + len {
                    let frame: Vec<u8> = self.buf.drain(..hl + len).collect();
                    return Some((b0 & 0x80 != 0, b0 & 0x0f, frame[hl..].to_vec()));
                }
            }
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read frame: {e}"),
            }
        }
    }

    /// Expect a close frame with `code`; returns its reason.
    pub fn expect_close(&mut self, code: u16) -> String {
        loop {
            let (_, op, payload) = self.read_frame().expect("a close frame before EOF");
            if op == 0x8 {
                assert!(payload.len() >= 2, "close without code");
                let got = u16::from_be_bytes([payload[0], payload[1]]);
                assert_eq!(
                    got,
                    code,
                    "close code (reason {:?})",
                    String::from_utf8_lossy(&payload[2..])
                );
                return String::from_utf8(payload[2..].to_vec()).unwrap();
            }
        }
    }

    /// After a close: the server closes the TCP connection.
    pub fn expect_eof(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.read_frame() {
                None => return,
                Some(_) => continue,
            }
        }
        panic!("server did not close the TCP connection");
    }
}

/// Send a raw HTTP request and return the whole response (until EOF). A
/// request without a `Connection` header gets `Connection: close` (the
/// server keeps HTTP/1.1 connections alive otherwise).
pub fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = if request.to_ascii_lowercase().contains("\r\nconnection:") {
        request.to_owned()
    } else {
        match request.split_once("\r\n") {
            Some((line, rest)) => format!("{line}\r\nConnection: close\r\n{rest}"),
            None => request.to_owned(),
        }
    };
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Poll `f` until it is true or 10 s pass.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

/// An HS256 token for `sub` signed with `secret`, valid for an hour (tests
/// that need other claims build their own `Claims`).
pub fn hs256_token(secret: &str, sub: &str) -> String {
    use switchboard::auth::{Claims, SigningKeySource, SigningSettings, mint};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = Claims {
        sub: sub.into(),
        exp: Some(now + 3600),
        nbf: None,
        iat: Some(now),
        iss: None,
        aud: None,
        jti: None,
        channels: Vec::new(),
        role: None,
        tenant: None,
    };
    let key = SigningSettings {
        algorithm: switchboard::auth::Algorithm::HS256,
        key: SigningKeySource::Secret(secret.as_bytes().to_vec()),
        kid: None,
    };
    mint(&key, &claims).expect("an HS256 token")
}
