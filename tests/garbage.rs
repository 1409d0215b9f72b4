//! Hostile input over real sockets: random bytes before the handshake,
//! random and half-valid frames after it, on the echo and the protocol
//! paths, cut at random points. Afterwards every shard still serves, and no
//! connection is left behind.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use tungstenite::Message;

/// Deterministic generator: a failure is reproducible from its seed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A frame that is often almost right: random opcode, flags, lengths that
/// may lie, masked or not, text that may not be UTF-8 or JSON.
fn hostile_frame(r: &mut Lcg) -> Vec<u8> {
    let payload = match r.below(6) {
        0 => br#"{"type":"subscribe","channel":"public:x"}"#.to_vec(),
        1 => br#"{"type":"publish","channel":"public:x","data":{"a":[1,2,{"b":null}]}}"#.to_vec(),
        2 => {
            br#"{"type":"request","requestId":1,"action":"presence","data":{"channel":"public:x"}}"#
                .to_vec()
        }
        3 => {
            let mut p = br#"{"type":"send","to":"x","data":"#.to_vec();
            let n = r.below(40) as usize;
            p.extend(r.bytes(n));
            p
        }
        _ => {
            let n = r.below(300) as usize;
            r.bytes(n)
        }
    };
    let mut f = Vec::new();
    let op = [0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB][r.below(8) as usize];
    let fin = r.below(4) != 0;
    switchboard::ws::frame::encode_client_frame(&mut f, fin, op, &payload, [1, 2, 3, 4]);
    match r.below(10) {
        0 => f[0] ^= 0x70, // reserved bits
        1 => f[1] &= 0x7F, // unmasked
        2 => {
            let keep = r.below(f.len() as u64) as usize;
            f.truncate(keep); // cut short
        }
        3 if f.len() > 3 => f[1] = 0xFF, // a 64-bit length that lies
        _ => {}
    }
    f
}

fn upgrade_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn hostile_streams_do_not_hurt_the_server() {
    let mut cfg = test_config(4);
    cfg.handshake_timeout = Duration::from_millis(500);
    cfg.close_timeout = Duration::from_millis(300);
    let server = start(cfg);
    let addr = server.local_addr();
    let mut r = Lcg(std::env::var("GARBAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED));
    for round in 0..1000 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut stream = Vec::new();
        match round % 4 {
            0 => {
                let n = r.below(2000) as usize;
                stream.extend(r.bytes(n));
            }
            1 => {
                let mut req = upgrade_request("/echo");
                let cut = r.below(req.len() as u64) as usize;
                req[cut] = r.next() as u8; // one corrupted byte in the head
                stream.extend(req);
            }
            _ => {
                stream.extend(upgrade_request(if round % 4 == 2 {
                    "/echo"
                } else {
                    "/ws"
                }));
                for _ in 0..r.below(20) {
                    stream.extend(hostile_frame(&mut r));
                }
            }
        }
        // Send in random pieces; the server may close at any point.
        let mut pos = 0;
        while pos < stream.len() {
            let n = (1 + r.below(700) as usize).min(stream.len() - pos);
            if s.write_all(&stream[pos..pos + n]).is_err() {
                break;
            }
            pos += n;
        }
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    // Every shard still serves (round-robin hand-off reaches each in turn).
    for i in 0..8 {
        let mut ws = ws(addr, "/echo");
        ws.send(Message::text(format!("still here {i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("still here {i}")));
    }
    wait_until("hostile connections all gone", || {
        let s = server.stats();
        s.sockets == 0 && s.connections == 0
    });
    assert_eq!(server.open_connections(), 0);
    assert_eq!(
        server.router().user_count() + server.router().channel_count(),
        0
    );
    let s = server.stats();
    assert!(
        s.protocol_errors > 0 && s.rejected > 0,
        "the inputs were hostile: {s:?}"
    );
}
