//! Refusals that mean what PROTOCOL.md says (issue 11, points 11 and 12),
//! from real clients: the uppercase dialect gets `ERROR {error}` for the
//! refusals made before a request's handler (rate limit, not
//! authenticated), and a record with a repeated key is refused at every
//! size.

mod common;

use std::net::TcpStream;

use common::*;
use serde_json::{Value, json};
use switchboard::config::AuthMode;
use tungstenite::{Message, WebSocket};

fn read_json(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn send(ws: &mut WebSocket<TcpStream>, v: &Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// A seed 004 error: `ERROR` with `code`, `message` and the nested
/// `error {code, message}`, and the request's id.
fn assert_upper_error(e: &Value, code: &str, rid: &Value) {
    assert_eq!(e["type"], "ERROR", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert_eq!(e["error"]["code"], code, "{e}");
    assert!(e["error"]["message"].is_string(), "{e}");
    assert_eq!(&e["requestId"], rid, "{e}");
}

#[test]
fn uppercase_requests_get_uppercase_refusals() {
    // Before authentication.
    let mut cfg = test_config(1);
    cfg.auth.mode = AuthMode::Token;
    cfg.auth.token = Some("shared".into());
    let server = start(cfg);
    let mut c = ws(server.local_addr(), "/ws");
    send(
        &mut c,
        &json!({"type":"REQUEST","requestId":"r1","action":"whoami"}),
    );
    assert_upper_error(&read_json(&mut c), "not_authenticated", &json!("r1"));
    // The native spelling keeps the native answer.
    send(
        &mut c,
        &json!({"type":"request","requestId":"r2","action":"whoami"}),
    );
    let e = read_json(&mut c);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("not_authenticated")),
        "{e}"
    );
    assert!(e.get("error").is_none(), "{e}");

    // Over the rate limit: one message a second, no burst beyond it; three
    // sent at once, so at least two are over (the bucket refills by one
    // only after a second).
    let mut cfg = test_config(1);
    cfg.rate_limit.messages_per_second = 1;
    cfg.rate_limit.burst = 1;
    let server = start(cfg);
    let mut c = ws(server.local_addr(), "/ws?userId=u1");
    assert_eq!(read_json(&mut c)["type"], "connected");
    for i in 0..3 {
        send(
            &mut c,
            &json!({"type":"REQUEST","requestId":i,"action":"whoami"}),
        );
    }
    let replies: Vec<Value> = (0..3).map(|_| read_json(&mut c)).collect();
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|r| r["code"] == "rate_limited")
        .collect();
    assert!(limited.len() >= 2, "{replies:?}");
    for (r, rid) in replies.iter().zip(0..) {
        if r["code"] == "rate_limited" {
            assert_upper_error(r, "rate_limited", &json!(rid));
        } else {
            assert_eq!(r["type"], "RESPONSE", "{r}");
        }
    }
}

#[test]
fn repeated_keys_are_refused_at_every_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(stored_config(1, dir.path()));
    let mut c = ws(server.local_addr(), "/ws?userId=sensor");
    assert_eq!(read_json(&mut c)["type"], "connected");
    for members in [2usize, 31, 32, 33, 40, 200] {
        // `members` distinct keys, then `k1` again with another value.
        let mut fields: Vec<String> = (0..members).map(|i| format!("\"k{i}\":{i}")).collect();
        fields.push("\"k1\":\"again\"".into());
        let text = format!(
            "{{\"type\":\"sensor_data\",\"id\":\"r{members}\",\"data\":{{{}}}}}",
            fields.join(",")
        );
        c.send(Message::text(text)).unwrap();
        let r = read_json(&mut c);
        assert_eq!(r["code"], "invalid_data", "{members} members: {r}");
        let m = r["message"].as_str().unwrap_or_default();
        assert!(m.contains("duplicate field") && m.contains("\"k1\""), "{m}");
    }
    // The same record without the repetition is stored.
    let fields: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
    let text = format!(
        "{{\"type\":\"sensor_data\",\"id\":\"ok\",\"data\":{{{}}}}}",
        fields.join(",")
    );
    c.send(Message::text(text)).unwrap();
    let r = read_json(&mut c);
    assert_eq!(r["type"], "ack", "{r}");
}
