//! Authorization under attack (issue 12, points 1-3; issue 11, point 13),
//! from real clients on a real server: channel ids are exact segments and
//! ids may not contain the namespace separator; the rules hold for
//! subscribe, publish, presence, history and recovery; a token's expiry
//! closes an open connection unless it is refreshed in place; the API
//! refuses cross-site simple requests; the console sends security headers.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use switchboard::auth::{Claims, SigningKeySource, SigningSettings, mint};
use switchboard::config::{AuthMode, Config};
use tungstenite::{Message, WebSocket};

const SECRET: &str = "authz-test-secret";
const KEY: &str = "authz-api-key";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        exp: Some(now() + 3600),
        nbf: None,
        iat: Some(now()),
        iss: None,
        aud: None,
        jti: None,
        channels: Vec::new(),
        role: None,
        tenant: None,
    }
}

fn token(c: &Claims) -> String {
    mint(
        &SigningSettings {
            algorithm: jsonwebtoken::Algorithm::HS256,
            key: SigningKeySource::Secret(SECRET.as_bytes().to_vec()),
            kid: None,
        },
        c,
    )
    .unwrap()
}

fn jwt_config() -> Config {
    let mut cfg = test_config(2);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    cfg.auth.jwt.algorithms = vec!["HS256".into()];
    cfg.api.keys = vec![KEY.into()];
    cfg
}

fn read_json(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn send(ws: &mut WebSocket<TcpStream>, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// Send `v` and return the reply.
fn ask(ws: &mut WebSocket<TcpStream>, v: Value) -> Value {
    send(ws, v);
    read_json(ws)
}

/// The close code the server ends the connection with.
fn close_code(ws: &mut WebSocket<TcpStream>) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return f.code.into(),
            Ok(Message::Close(None)) => return 0,
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

fn login(addr: SocketAddr, c: &Claims) -> WebSocket<TcpStream> {
    let mut ws = ws(addr, &format!("/ws?token={}", token(c)));
    let w = read_json(&mut ws);
    assert_eq!(w["type"], "connected", "{w}");
    ws
}

/// The status line and body of a raw HTTP exchange.
fn http_status(addr: SocketAddr, request: &str) -> (u16, String) {
    let resp = http(addr, request);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    http_status(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

// ---------------------------------------------------------------------------
// Point 1 (issue 12) and point 13 (issue 11): one id rule everywhere.

/// `alice` used to read `user:alice:bob`, the channel of the user
/// `alice:bob`, and a `sub` with a space logged in although the API refuses
/// that id. Now an id follows one rule at login, in messages and in the
/// API (no whitespace, no `:`), so `user:<id>` and the names below it have
/// exactly one owner.
#[test]
fn ids_with_the_separator_or_spaces_cannot_log_in() {
    let server = start(jwt_config());
    let addr = server.local_addr();

    for (c, code) in [
        (claims("alice:bob"), "invalid_subject"),
        (claims("bob smith"), "invalid_subject"),
        (
            Claims {
                tenant: Some("acme:corp".into()),
                ..claims("carol")
            },
            "invalid_tenant",
        ),
    ] {
        // In the upgrade and in an `authenticate` message alike.
        let mut a = ws(addr, &format!("/ws?token={}", token(&c)));
        let e = read_json(&mut a);
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{e}"
        );
        assert_eq!(close_code(&mut a), 4003);
        let mut b = ws(addr, "/ws");
        let e = ask(&mut b, json!({"type":"authenticate","token":token(&c)}));
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(close_code(&mut b), 4003);
    }

    // The API refuses the same ids (it always did): whoever can log in can
    // be revoked, disconnected and sent to.
    let (status, body) = post_json(addr, "/api/revoke", &json!({"userId":"alice:bob"}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_user"), "{body}");
    let (status, body) = post_json(addr, "/api/send", &json!({"userId":"alice:bob","data":1}));
    assert_eq!(status, 400, "{body}");

    // A direct message to such an id is refused like any invalid `to`.
    let mut alice = login(addr, &claims("alice"));
    let e = ask(&mut alice, json!({"type":"send","to":"alice:bob","data":1}));
    assert_eq!(e["code"], "missing_field", "{e}");
}

/// In mode `none` (and with the shared token) `?userId=` names the user:
/// an id with the separator is not taken.
#[test]
fn query_user_ids_follow_the_rule() {
    let server = start(test_config(1));
    let addr = server.local_addr();
    let mut a = ws(addr, "/ws?userId=alice:bob");
    let w = read_json(&mut a);
    assert_eq!(w["type"], "connected");
    assert_ne!(w["userId"], "alice:bob", "{w}");
    let mut b = ws(addr, "/ws?userId=alice");
    assert_eq!(read_json(&mut b)["userId"], "alice");
}

/// The owner and tenant rules, on the id segment, for every way a client
/// reads or writes a channel: subscribe, recovery (subscribe with
/// `since`), publish, presence and history.
#[test]
fn owner_and_tenant_rules_hold_for_every_channel_operation() {
    let mut cfg = jwt_config();
    for ns in ["user", "tenant"] {
        if let Some(r) = cfg.channels.namespaces.get_mut(ns) {
            r.publish = r.subscribe;
        }
    }
    let server = start(cfg);
    let addr = server.local_addr();
    let mut alice = login(
        addr,
        &Claims {
            tenant: Some("acme".into()),
            ..claims("alice")
        },
    );

    // Bob's channels: every operation is refused to alice.
    for channel in [
        "user:bob",
        "user:bob:feed",
        "tenant:globex",
        "tenant:globex:x",
    ] {
        let ops = [
            json!({"type":"subscribe","channel":channel,"requestId":1}),
            json!({"type":"subscribe","channel":channel,"since":{"offset":0,"epoch":""},"requestId":2}),
            json!({"type":"publish","channel":channel,"data":"x","requestId":3}),
            json!({"type":"request","requestId":4,"action":"presence","data":{"channel":channel}}),
            json!({"type":"request","requestId":5,"action":"history","data":{"channel":channel}}),
        ];
        for op in ops {
            let r = ask(&mut alice, op.clone());
            assert_eq!(r["code"], "forbidden", "{op} -> {r}");
        }
    }
    // Look-alikes are not hers either: the segment must be her whole id.
    for channel in ["user:alicex", "user:alic", "tenant:acmecorp"] {
        let r = ask(&mut alice, json!({"type":"subscribe","channel":channel}));
        assert_eq!(r["code"], "forbidden", "{channel} -> {r}");
    }
    // Her own channels and the names below them are.
    for channel in ["user:alice", "user:alice:feed", "tenant:acme:reports"] {
        let r = ask(&mut alice, json!({"type":"subscribe","channel":channel}));
        assert_eq!(r["type"], "subscribed", "{channel} -> {r}");
        let r = ask(
            &mut alice,
            json!({"type":"request","requestId":"h","action":"history","data":{"channel":channel}}),
        );
        assert_eq!(r["type"], "response", "{channel} -> {r}");
    }
    send(
        &mut alice,
        json!({"type":"publish","channel":"user:alice:feed","data":"mine"}),
    );
    let mut got = vec![read_json(&mut alice), read_json(&mut alice)];
    got.sort_by_key(|v| v["type"].as_str().unwrap_or_default().to_owned());
    assert_eq!(got[0]["type"], "message", "{got:?}");
    assert_eq!(got[1]["type"], "published", "{got:?}");
    let r = ask(
        &mut alice,
        json!({"type":"subscribe","channel":"user:alice:feed","since":{"offset":0,"epoch":got[1]["epoch"]}}),
    );
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["publications"][0]["data"], "mine", "{r}");
}

// ---------------------------------------------------------------------------
// Point 3 (issue 12): cross-site simple requests, console headers.

/// A web page can make its visitor's browser POST to any site without a
/// preflight when the body is `text/plain`, a form, or has no type. With
/// `api.allow_anonymous` such a request used to publish. A POST to the API
/// must now declare JSON, which a browser sends cross-site only after a
/// CORS preflight this server never grants.
#[test]
fn cross_site_simple_posts_are_refused() {
    let mut cfg = test_config(1);
    cfg.api.allow_anonymous = true;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut sub = ws(addr, "/ws?userId=watcher");
    assert_eq!(read_json(&mut sub)["type"], "connected");
    assert_eq!(
        ask(
            &mut sub,
            json!({"type":"subscribe","channel":"public:news"})
        )["type"],
        "subscribed"
    );
    let body = r#"{"channel":"public:news","data":"forged"}"#;
    let post = |ctype: Option<&str>| {
        let ctype = ctype.map_or(String::new(), |t| format!("Content-Type: {t}\r\n"));
        http_status(
            addr,
            &format!(
                "POST /api/publish HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    for ctype in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let (status, resp) = post(ctype);
        assert_eq!(status, 415, "{ctype:?}: {resp}");
        assert!(resp.contains("unsupported_media_type"), "{resp}");
    }
    // Declared JSON is served (as a backend or curl with -H sends it).
    let (status, resp) = post(Some("application/json; charset=utf-8"));
    assert_eq!(status, 200, "{resp}");
    let m = read_json(&mut sub);
    assert_eq!(
        (m["type"].as_str(), m["data"].as_str()),
        (Some("message"), Some("forged")),
        "{m}"
    );
    // Nothing else was published by the refused requests: the next
    // publication's offset follows the one above.
    let (status, _) = post(Some("application/json"));
    assert_eq!(status, 200);
    let m2 = read_json(&mut sub);
    assert_eq!(
        m2["offset"].as_u64(),
        m["offset"].as_u64().map(|o| o + 1),
        "{m2}"
    );
}

/// The console page holds an API key and a token while in use: it must not
/// be framed, run foreign or inline code, or have its files sniffed.
#[test]
fn console_files_carry_security_headers() {
    let server = start(test_config(1));
    let addr = server.local_addr();
    for path in ["/", "/index.html", "/console.js", "/console.css"] {
        let (status, resp) = http_status(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(status, 200, "{resp}");
        let head = resp
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        for expected in [
            "\r\nx-frame-options: deny\r\n",
            "\r\nx-content-type-options: nosniff\r\n",
            "\r\ncontent-security-policy: default-src 'none'; script-src 'self'; style-src 'self';",
            "frame-ancestors 'none'",
        ] {
            assert!(
                head.contains(expected),
                "GET {path}: no {expected:?} in\n{head}"
            );
        }
        assert!(!head.contains("unsafe-inline"), "{head}");
    }
}

// ---------------------------------------------------------------------------
// Point 2 (issue 12): tokens expire on open connections, or are refreshed.

/// A config whose tokens close at `exp` exactly (no leeway) and warn
/// `warning` before.
fn expiring_config(warning: Duration) -> Config {
    let mut cfg = jwt_config();
    cfg.auth.jwt.leeway = Duration::ZERO;
    cfg.auth.expiry_warning = warning;
    cfg
}

/// The next message of type `kind`, skipping others (returned too).
fn next_of(ws: &mut WebSocket<TcpStream>, kind: &str) -> (Value, Vec<Value>) {
    let mut skipped = Vec::new();
    loop {
        let m = read_json(ws);
        if m["type"] == kind {
            return (m, skipped);
        }
        skipped.push(m);
    }
}

/// An open connection used to keep working after its token's `exp`: only
/// new logins were refused. Now it gets `token_expiring` ahead of time,
/// then `token_expired` and close 4004 at the expiry.
#[test]
fn an_unrefreshed_token_closes_its_connection_at_expiry() {
    let server = start(expiring_config(Duration::from_secs(1)));
    let addr = server.local_addr();
    let exp = now() + 4;
    let mut c = login(
        addr,
        &Claims {
            exp: Some(exp),
            ..claims("alice")
        },
    );
    assert_eq!(ask(&mut c, json!({"type":"ping"}))["type"], "pong");
    let (warning, skipped) = next_of(&mut c, "token_expiring");
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(warning["expiresAt"].is_string(), "{warning}");
    assert!(
        warning["closesIn"].as_u64().is_some_and(|s| s <= 1),
        "{warning}"
    );
    let (expired, skipped) = next_of(&mut c, "token_expired");
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(expired["message"].is_string(), "{expired}");
    assert_eq!(close_code(&mut c), 4004);
    // Never before `exp` (whole seconds: the server's clock may be ahead
    // of ours by less than a second).
    assert!(now() + 1 >= exp, "closed at {} for exp {exp}", now());
    let metrics = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.contains("switchboard_token_expired_closes_total{shard=\"0\"} 1")
            || metrics.contains("switchboard_token_expired_closes_total{shard=\"1\"} 1"),
        "{metrics}"
    );
}

/// `refresh` with a new token before expiry keeps the connection open past
/// the old token's expiry, and the new token's claims apply from then on.
/// A token for another user, a broken token or a revoked one changes
/// nothing and does not close the connection.
#[test]
fn refresh_in_place_before_expiry() {
    let mut cfg = expiring_config(Duration::from_secs(2));
    cfg.shards = 1;
    let server = start(cfg);
    let addr = server.local_addr();
    // The warning may come between any request and its answer.
    let mut warnings = Vec::new();
    let exp = now() + 5;
    let mut c = login(
        addr,
        &Claims {
            exp: Some(exp),
            ..claims("alice")
        },
    );
    assert_eq!(
        ask_noting(
            &mut c,
            &mut warnings,
            json!({"type":"subscribe","channel":"room:1"})
        )["code"],
        "forbidden"
    );
    let refused = [
        (token(&claims("mallory")), "token_mismatch"),
        (
            token(&Claims {
                tenant: Some("acme".into()),
                ..claims("alice")
            }),
            "token_mismatch",
        ),
        ("not-a-jwt".to_owned(), "malformed_token"),
        (
            token(&Claims {
                exp: Some(now() - 10),
                ..claims("alice")
            }),
            "token_expired",
        ),
    ];
    for (t, code) in &refused {
        let r = ask_noting(
            &mut c,
            &mut warnings,
            json!({"type":"refresh","token":t,"requestId":"r"}),
        );
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some(*code)),
            "{r}"
        );
        assert_eq!(r["requestId"], "r");
    }
    // A revoked token id is refused too (one shard: once a new login sees
    // the revocation, so does this connection).
    server
        .revoke(switchboard::store::RevocationKind::Token, "stolen", "lost")
        .unwrap();
    let revoked = token(&Claims {
        jti: Some("stolen".into()),
        ..claims("alice")
    });
    wait_until("the revocation reaches the shard", || {
        let mut probe = ws(addr, &format!("/ws?token={revoked}"));
        read_json(&mut probe)["code"] == "token_revoked"
    });
    let r = ask_noting(
        &mut c,
        &mut warnings,
        json!({"type":"refresh","token":revoked}),
    );
    assert_eq!(r["code"], "token_revoked", "{r}");

    // The warning comes; the client refreshes with a token that allows more.
    let warning = match warnings.pop() {
        Some(w) => w,
        None => next_of(&mut c, "token_expiring").0,
    };
    assert!(
        warning["closesIn"].as_u64().is_some_and(|s| s <= 2),
        "{warning}"
    );
    let fresh = Claims {
        channels: vec!["room:*".into()],
        ..claims("alice")
    };
    let r = ask_noting(
        &mut c,
        &mut warnings,
        json!({"type":"refresh","token":token(&fresh),"requestId":7}),
    );
    assert_eq!(r["type"], "refreshed", "{r}");
    assert_eq!(r["requestId"], 7);
    assert!(r["expiresAt"].is_string(), "{r}");
    assert_eq!(
        ask_noting(
            &mut c,
            &mut warnings,
            json!({"type":"subscribe","channel":"room:1"})
        )["type"],
        "subscribed"
    );
    // Past the old token's expiry the connection still serves, and nothing
    // else came (no `token_expired`, no close).
    while now() <= exp + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        ask_noting(&mut c, &mut warnings, json!({"type":"ping"}))["type"],
        "pong"
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// Send `v` and return its answer, setting aside `token_expiring` events.
fn ask_noting(ws: &mut WebSocket<TcpStream>, seen: &mut Vec<Value>, v: Value) -> Value {
    send(ws, v);
    loop {
        let m = read_json(ws);
        if m["type"] != "token_expiring" {
            return m;
        }
        seen.push(m);
    }
}
