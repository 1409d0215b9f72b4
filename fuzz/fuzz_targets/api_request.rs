//! Invariant: any bytes on the HTTP side of the listener, parsed as requests
//! (head with httparse, Content-Length body) and served by the API router
//! (auth, JSON bodies with serde, every handler), never panic; every answer
//! is a well-formed HTTP/1.1 response whose Content-Length matches its body,
//! and JSON answers parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::api::{Handled, handle};
use switchboard::auth::Authenticator;
use switchboard::config::Config;
use switchboard::env::{Desk, Env, Handling};
use switchboard::http::parse_request;
use switchboard::id::ConnId;

fn check(resp: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(resp) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("not a complete response: {other:?}"),
    };
    let len: usize = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .expect("Content-Length");
    assert_eq!(resp.len() - n, len, "Content-Length matches the body");
    let json = r.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"application/json")
    });
    if json {
        serde_json::from_slice::<serde_json::Value>(&resp[n..]).expect("JSON body");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = Config::default();
    cfg.api.allow_anonymous = true; // reach every handler
    let max_header_bytes = cfg.max_header_bytes;
    let env = Env::detached(cfg, Authenticator::None, None);
    let mut desk = Desk::default();
    let mut rest = data;
    // Pipelined requests, as the connection state machine serves them.
    for _ in 0..8 {
        let Ok(Some((req, head))) = parse_request(rest, max_header_bytes) else {
            return;
        };
        let end = head.saturating_add(req.content_length).min(rest.len());
        let body = &rest[head..end];
        let mut ctx = Handling {
            env: &env,
            desk: &mut desk,
            key: 0,
            conn: ConnId::new(0, 1),
            now: std::time::Instant::now(),
        };
        if let Handled::Now(resp) = handle(&req, body, &mut ctx) {
            check(&resp.bytes);
        }
        rest = &rest[end..];
    }
});
