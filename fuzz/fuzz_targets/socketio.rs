//! Invariants: the Engine.IO and Socket.IO packet decoders never panic on
//! any input and keep their promises (a namespace starts with `/`, an ack
//! id is below 2^53, the payload is a suffix of the input); and any
//! sequence of client text frames, run through the Socket.IO front end of a
//! connection (CONNECT, events mapped onto the native handlers, acks),
//! never panics, and every packet the server writes back decodes with the
//! same decoders (one Engine.IO packet per frame, a well-formed Socket.IO
//! packet in each message, except the plain Engine.IO echo's, which are
//! the client's own data).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::auth::Authenticator;
use switchboard::config::Config;
use switchboard::env::{Desk, Env, Handling};
use switchboard::id::ConnId;
use switchboard::proto::socketio::{EioPacket, decode_eio, decode_sio};
use switchboard::session::{ConnectParams, Replies, Session, Verdict};

struct Collect(Vec<Vec<u8>>);

impl Replies for Collect {
    fn text(&mut self, packet: &[u8]) {
        self.0.push(packet.to_vec());
    }
    // Binary frames (attachments) carry the client's bytes: nothing to check.
}

fn decoders(data: &[u8]) {
    let _ = decode_eio(data);
    if let Ok(p) = decode_sio(data) {
        assert!(p.nsp.starts_with('/'));
        assert!(p.id.is_none_or(|id| id < 1 << 53));
        if let Some(d) = p.data {
            assert!(data.ends_with(d), "the payload is the input's tail");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    decoders(data);
    let mut cfg = Config::default();
    cfg.socketio.namespaces = vec!["/custom".into()];
    cfg.socketio.max_payload = 4096;
    // The second byte picks the conformance applications and the plain
    // Engine.IO echo, so they are fuzzed too.
    let flags = data.get(1).copied().unwrap_or(0);
    cfg.socketio.conformance = flags & 1 == 1;
    let plain = flags & 2 == 2;
    let env = Env::detached(cfg, Authenticator::None, None);
    let mut desk = Desk::default();
    let mut session = Session::engine_io(ConnectParams {
        dev_user: Some("fuzzer".into()),
        ..ConnectParams::default()
    }, plain, flags & 4 == 4);
    let mut out = Collect(Vec::new());
    let mut ctx = Handling {
        env: &env,
        desk: &mut desk,
        key: 0,
        conn: ConnId::new(0, 1),
        now: std::time::Instant::now(),
    };
    // Several frames per input, split on 0xFF (never valid UTF-8, so a
    // text frame could not carry it); a CONNECT first half of the time.
    if data.first().is_some_and(|b| b & 1 == 0) {
        session.on_sio_text(b"40", &mut ctx, &mut out);
    }
    for part in data.split(|&b| b == 0xFF) {
        let verdict = if let Some(attachment) = part.strip_prefix(&[0xFE]) {
            // A binary frame: the next attachment of a binary packet.
            session.on_sio_binary(attachment, &mut ctx, &mut out)
        } else if std::str::from_utf8(part).is_err() {
            continue; // the frame decoder refuses non-UTF-8 text before this point
        } else {
            session.on_sio_text(part, &mut ctx, &mut out)
        };
        if let Verdict::Close(..) = verdict {
            break;
        }
    }
    for packet in &out.0 {
        match decode_eio(packet).expect("one Engine.IO packet") {
            // The plain echo sends back whatever data came.
            EioPacket::Message(_) if plain => {}
            EioPacket::Message(m) => {
                decode_sio(m).expect("a well-formed Socket.IO packet");
            }
            EioPacket::Pong(_) => {}
            other => panic!("the server wrote {other:?}"),
        }
    }
    session.on_close(&mut ctx.desk.local, &env.router, 0, 0);
    assert!(desk.local.is_empty(), "closing a session leaves the shard index empty");
});
