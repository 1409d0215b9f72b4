//! Invariant: any client text frame, run through the full protocol handler of
//! an authenticated connection (decode with simd-json in place, dispatch,
//! permission checks, replies), never panics, and every reply the server
//! writes is one valid JSON object with a string "type".
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::auth::Authenticator;
use switchboard::config::Config;
use switchboard::env::{Desk, Env, Handling};
use switchboard::id::ConnId;
use switchboard::session::{ConnectParams, Replies, Session};

struct Collect(Vec<Vec<u8>>);

impl Replies for Collect {
    fn text(&mut self, json: &[u8]) {
        self.0.push(json.to_vec());
    }
}

fn check(replies: &[Vec<u8>]) {
    for r in replies {
        let v: serde_json::Value = serde_json::from_slice(r).expect("reply is JSON");
        assert!(v.get("type").and_then(|t| t.as_str()).is_some(), "reply has a type");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = Config::default();
    // Ingestion with validation and encryption runs too.
    cfg.ingest.required_fields = vec!["value".into()];
    cfg.ingest.fields_to_encrypt = vec!["value".into()];
    cfg.ingest.key = Some("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into());
    let sealer = switchboard::ingest::Sealer::from_config(&cfg.ingest).expect("test key");
    let env = Env::detached(cfg, Authenticator::None, sealer);
    let mut desk = Desk::default();
    let mut session = Session::new(ConnectParams {
        dev_user: Some("fuzzer".into()),
        ..ConnectParams::default()
    });
    let mut out = Collect(Vec::new());
    let mut ctx = Handling {
        env: &env,
        desk: &mut desk,
        key: 0,
        conn: ConnId::new(0, 1),
        now: std::time::Instant::now(),
    };
    session.on_open(&mut ctx, &mut out);
    // Several messages per input: split on a 0xFF byte (never valid UTF-8,
    // so a frame could not carry it anyway).
    for part in data.split(|&b| b == 0xFF) {
        if std::str::from_utf8(part).is_err() {
            continue; // the frame decoder refuses non-UTF-8 text before this point
        }
        let mut text = part.to_vec();
        session.on_text(&mut text, &mut ctx, &mut out);
    }
    check(&out.0);
    session.on_close(&mut ctx.desk.local, &env.router, 0, 0);
    assert!(desk.local.is_empty(), "closing a session leaves the shard index empty");
    assert_eq!(env.router.user_count() + env.router.channel_count(), 0);
});
