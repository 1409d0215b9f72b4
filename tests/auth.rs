//! Authentication from real clients: JWT in the Authorization header, in
//! ?token=, or in a first `authenticate` message; every failure gets its
//! error code and close 4003; claims drive permissions; static token mode;
//! the `switchboard token` helper mints tokens the server accepts.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use switchboard::auth::{Claims, SigningKeySource, SigningSettings, mint};
use switchboard::config::{AuthMode, Config};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const SECRET: &str = "integration-test-secret";

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

fn hs256(c: &Claims, secret: &str) -> String {
    mint(
        &SigningSettings {
            algorithm: jsonwebtoken::Algorithm::HS256,
            key: SigningKeySource::Secret(secret.as_bytes().to_vec()),
            kid: None,
        },
        c,
    )
    .unwrap()
}

fn jwt_config(shards: usize) -> Config {
    let mut cfg = test_config(shards);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    cfg.auth.jwt.algorithms = vec!["HS256".into()];
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

fn expect_close(ws: &mut WebSocket<TcpStream>, code: u16) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(cf))) => {
                assert_eq!(u16::from(cf.code), code, "{cf:?}");
                return;
            }
            Ok(Message::Ping(_)) => continue,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

fn ws_with_header(addr: SocketAddr, path: &str, token: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tungstenite::client::client(req, stream).unwrap().0
}

#[test]
fn token_in_header_query_or_first_message() {
    let server = start(jwt_config(2));
    let addr = server.local_addr();
    let token = hs256(&claims("alice"), SECRET);

    let mut a = ws_with_header(addr, "/ws", &token);
    let w = read_json(&mut a);
    assert_eq!(w["type"], "connected");
    assert_eq!(w["userId"], "alice");

    let mut b = ws(addr, &format!("/ws?token={token}"));
    assert_eq!(read_json(&mut b)["userId"], "alice");

    let mut c = ws(addr, "/ws");
    c.send(Message::text(
        r#"{"type":"subscribe","channel":"public:x"}"#,
    ))
    .unwrap();
    assert_eq!(read_json(&mut c)["code"], "not_authenticated");
    c.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
    assert_eq!(read_json(&mut c)["type"], "pong", "ping works before auth");
    // Seed 003 shape: {"type":"authenticate","payload":{"token":...}}
    c.send(Message::text(
        json!({"type":"authenticate","payload":{"token":token},"requestId":9}).to_string(),
    ))
    .unwrap();
    let w = read_json(&mut c);
    assert_eq!(w["type"], "connected");
    assert_eq!(w["requestId"], 9);
    // Seed 000 spelling.
    let mut d = ws(addr, "/ws");
    d.send(Message::text(
        json!({"type":"authentication","token":token}).to_string(),
    ))
    .unwrap();
    assert_eq!(read_json(&mut d)["type"], "connected");
    // Direct messages reach the three alice connections.
    d.send(Message::text(
        json!({"type":"send","to":"alice","data":1}).to_string(),
    ))
    .unwrap();
    // d is alice too: its own copy and the result, in either order.
    let mut got: Vec<Value> = vec![read_json(&mut d), read_json(&mut d)];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!(got[0]["type"], "direct");
    assert_eq!(got[1]["type"], "sent");
    assert_eq!(got[1]["connections"], 4);
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(read_json(ws)["type"], "direct");
    }
}

#[test]
fn each_failure_has_its_code_then_close_4003() {
    let server = start(jwt_config(1));
    let addr = server.local_addr();
    let mut expired = claims("u");
    expired.exp = Some(now() - 3600);
    let mut early = claims("u");
    early.nbf = Some(now() + 3600);
    let mut no_exp = claims("u");
    no_exp.exp = None;
    let no_sub_payload = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(br#"{"alg":"none","typ":"JWT"}"#),
            e.encode(json!({"sub":"u","exp":now()+60}).to_string())
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (hs256(&expired, SECRET), "token_expired"),
        (hs256(&early, SECRET), "token_not_yet_valid"),
        (hs256(&no_exp, SECRET), "missing_expiry"),
        (hs256(&claims("u"), "wrong-secret"), "invalid_signature"),
        (no_sub_payload, "unsupported_algorithm"),
        ("not.a.jwt".into(), "malformed_token"),
        ("garbage".into(), "malformed_token"),
    ];
    for (token, code) in cases {
        let mut c = ws(addr, &format!("/ws?token={token}"));
        let e = read_json(&mut c);
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], code, "{e}");
        expect_close(&mut c, 4003);
    }
    // The same through the first message.
    let mut c = ws(addr, "/ws");
    c.send(Message::text(
        json!({"type":"authenticate","token":hs256(&expired, SECRET)}).to_string(),
    ))
    .unwrap();
    assert_eq!(read_json(&mut c)["code"], "token_expired");
    expect_close(&mut c, 4003);
    let mut c = ws(addr, "/ws");
    c.send(Message::text(r#"{"type":"authenticate"}"#)).unwrap();
    assert_eq!(read_json(&mut c)["code"], "missing_field");
}

#[test]
fn auth_timeout_closes_4008() {
    let mut cfg = jwt_config(1);
    cfg.auth.timeout = Duration::from_millis(300);
    let server = start(cfg);
    let mut c = ws(server.local_addr(), "/ws");
    let e = read_json(&mut c);
    assert_eq!(e["code"], "not_authenticated");
    expect_close(&mut c, 4008);
}

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/auth/testdata")
        .join(name)
}

#[test]
fn rs256_and_algorithm_confusion() {
    let mut cfg = test_config(1);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.algorithms = vec!["RS256".into()];
    cfg.auth.jwt.public_key_file = Some(testdata("rsa_a_public.pem"));
    let server = start(cfg);
    let addr = server.local_addr();
    let rs = mint(
        &SigningSettings {
            algorithm: jsonwebtoken::Algorithm::RS256,
            key: SigningKeySource::Pem(std::fs::read(testdata("rsa_a_private.pem")).unwrap()),
            kid: None,
        },
        &claims("rsa-user"),
    )
    .unwrap();
    let mut ok = ws(addr, &format!("/ws?token={rs}"));
    assert_eq!(read_json(&mut ok)["userId"], "rsa-user");
    // HS256 signed with the public key PEM as the HMAC secret: refused.
    let public = std::fs::read_to_string(testdata("rsa_a_public.pem")).unwrap();
    let forged = hs256(&claims("mallory"), &public);
    let mut bad = ws(addr, &format!("/ws?token={forged}"));
    assert_eq!(read_json(&mut bad)["code"], "unsupported_algorithm");
    expect_close(&mut bad, 4003);
    // Signed by another RSA key.
    let other = mint(
        &SigningSettings {
            algorithm: jsonwebtoken::Algorithm::RS256,
            key: SigningKeySource::Pem(std::fs::read(testdata("rsa_b_private.pem")).unwrap()),
            kid: None,
        },
        &claims("x"),
    )
    .unwrap();
    let mut bad = ws(addr, &format!("/ws?token={other}"));
    assert_eq!(read_json(&mut bad)["code"], "invalid_signature");
}

#[test]
fn claims_drive_permissions_and_targeting() {
    let server = start(jwt_config(2));
    let addr = server.local_addr();
    let mut c = claims("carol");
    c.channels = vec!["room:*".into()];
    c.tenant = Some("acme".into());
    let mut carol = ws(
        addr,
        &format!("/ws?token={}&artifactId=doc7", hs256(&c, SECRET)),
    );
    let w = read_json(&mut carol);
    assert_eq!(
        w["channels"],
        json!(["tenant:acme", "tenant:acme:artifact:doc7"])
    );
    let sub = |ws: &mut WebSocket<TcpStream>, ch: &str| {
        ws.send(Message::text(
            json!({"type":"subscribe","channel":ch}).to_string(),
        ))
        .unwrap();
        read_json(ws)
    };
    assert_eq!(sub(&mut carol, "room:42")["type"], "subscribed");
    assert_eq!(sub(&mut carol, "other:1")["code"], "forbidden");
    assert_eq!(sub(&mut carol, "tenant:acme:reports")["type"], "subscribed");
    assert_eq!(sub(&mut carol, "tenant:globex")["code"], "forbidden");

    // An admin broadcasts and publishes to the tenant; carol receives both.
    let mut a = claims("root");
    a.role = Some("admin".into());
    let mut admin = ws(addr, &format!("/ws?token={}", hs256(&a, SECRET)));
    read_json(&mut admin);
    admin
        .send(Message::text(
            json!({"type":"publish","channel":"tenant:acme","data":"t"}).to_string(),
        ))
        .unwrap();
    assert_eq!(read_json(&mut admin)["type"], "published");
    admin
        .send(Message::text(
            json!({"type":"broadcast","data":{"notice":"maintenance"}}).to_string(),
        ))
        .unwrap();
    // The admin is a recipient too: its copy and the result, in either order.
    let mut got: Vec<Value> = vec![read_json(&mut admin), read_json(&mut admin)];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!(got[0]["type"], "broadcast");
    assert_eq!(got[1]["type"], "sent");
    assert_eq!(got[1]["connections"], 2);
    let m = read_json(&mut carol);
    assert_eq!(
        (m["type"].clone(), m["channel"].clone()),
        (json!("message"), json!("tenant:acme"))
    );
    let b = read_json(&mut carol);
    assert_eq!(b["type"], "broadcast");
    assert_eq!(b["from"], "root");
    // Carol (no admin role) may not broadcast.
    carol
        .send(Message::text(
            json!({"type":"broadcast","data":1}).to_string(),
        ))
        .unwrap();
    assert_eq!(read_json(&mut carol)["code"], "forbidden");
}

#[test]
fn static_token_mode() {
    let mut cfg = test_config(1);
    cfg.auth.mode = AuthMode::Token;
    cfg.auth.token = Some("s3cret".into());
    let server = start(cfg);
    let addr = server.local_addr();
    let mut ok = ws(addr, "/ws?token=s3cret&userId=sensor-1");
    assert_eq!(read_json(&mut ok)["userId"], "sensor-1");
    let mut bad = ws(addr, "/ws?token=nope");
    assert_eq!(read_json(&mut bad)["code"], "invalid_token");
    expect_close(&mut bad, 4003);
}

#[test]
fn token_command_mints_what_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sb.toml");
    std::fs::write(
        &path,
        format!(
            "[auth]\nmode = \"jwt\"\n[auth.jwt]\nsecret = \"{SECRET}\"\nalgorithms = [\"HS256\"]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "token",
            "--config",
            path.to_str().unwrap(),
            "--sub",
            "dev",
            "--channels",
            "room:*,public:*",
            "--ttl",
            "10m",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let server = start(
        Config::load_from(Some(&path), &[], &Default::default())
            .map(|mut c| {
                c.port = 0;
                c
            })
            .unwrap(),
    );
    let mut c = ws(server.local_addr(), &format!("/ws?token={token}"));
    assert_eq!(read_json(&mut c)["userId"], "dev");
    c.send(Message::text(r#"{"type":"subscribe","channel":"room:9"}"#))
        .unwrap();
    assert_eq!(read_json(&mut c)["type"], "subscribed");
}

/// One server per algorithm family, configured from key files as an operator
/// would; a real client connects with a token signed by the matching private
/// key, and a token signed by another key of the same kind is refused.
#[test]
fn every_algorithm_family_end_to_end() {
    use jsonwebtoken::Algorithm::*;
    let secret_server = |alg: &str| {
        let mut cfg = test_config(1);
        cfg.auth.mode = AuthMode::Jwt;
        cfg.auth.jwt.algorithms = vec![alg.into()];
        cfg.auth.jwt.secret = Some(SECRET.into());
        cfg
    };
    let pem_server = |alg: &str, public: &str| {
        let mut cfg = test_config(1);
        cfg.auth.mode = AuthMode::Jwt;
        cfg.auth.jwt.algorithms = vec![alg.into()];
        cfg.auth.jwt.public_key_file = Some(testdata(public));
        cfg
    };
    let pem = |name: &str| SigningKeySource::Pem(std::fs::read(testdata(name)).unwrap());
    let secret = |s: &str| SigningKeySource::Secret(s.as_bytes().to_vec());
    // (algorithm, server config, good key, other key)
    let cases = vec![
        (
            HS256,
            secret_server("HS256"),
            secret(SECRET),
            secret("other"),
        ),
        (
            HS384,
            secret_server("HS384"),
            secret(SECRET),
            secret("other"),
        ),
        (
            HS512,
            secret_server("HS512"),
            secret(SECRET),
            secret("other"),
        ),
        (
            RS256,
            pem_server("RS256", "rsa_a_public.pem"),
            pem("rsa_a_private.pem"),
            pem("rsa_b_private.pem"),
        ),
        (
            RS384,
            pem_server("RS384", "rsa_a_public.pem"),
            pem("rsa_a_private.pem"),
            pem("rsa_b_private.pem"),
        ),
        (
            RS512,
            pem_server("RS512", "rsa_a_public.pem"),
            pem("rsa_a_private.pem"),
            pem("rsa_b_private.pem"),
        ),
        (
            PS256,
            pem_server("PS256", "rsa_b_public.pem"),
            pem("rsa_b_private.pem"),
            pem("rsa_a_private.pem"),
        ),
        (
            PS384,
            pem_server("PS384", "rsa_b_public.pem"),
            pem("rsa_b_private.pem"),
            pem("rsa_a_private.pem"),
        ),
        (
            PS512,
            pem_server("PS512", "rsa_b_public.pem"),
            pem("rsa_b_private.pem"),
            pem("rsa_a_private.pem"),
        ),
        (
            ES256,
            pem_server("ES256", "ec_p256_public.pem"),
            pem("ec_p256_private.pem"),
            {
                // Another key of the same kind: generated by ring, as PKCS#8 PEM.
                let rng = ring::rand::SystemRandom::new();
                let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &rng,
                )
                .unwrap();
                SigningKeySource::Pem(pkcs8_pem(doc.as_ref()))
            },
        ),
        (
            ES384,
            pem_server("ES384", "ec_p384_public.pem"),
            pem("ec_p384_private.pem"),
            {
                let rng = ring::rand::SystemRandom::new();
                let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
                    &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                    &rng,
                )
                .unwrap();
                SigningKeySource::Pem(pkcs8_pem(doc.as_ref()))
            },
        ),
        (
            EdDSA,
            pem_server("EdDSA", "ed25519_public.pem"),
            pem("ed25519_private.pem"),
            {
                let rng = ring::rand::SystemRandom::new();
                let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                SigningKeySource::Pem(pkcs8_pem(doc.as_ref()))
            },
        ),
    ];
    for (alg, cfg, good, other) in cases {
        let server = start(cfg);
        let addr = server.local_addr();
        let sign = |key: SigningKeySource| {
            mint(
                &SigningSettings {
                    algorithm: alg,
                    key,
                    kid: None,
                },
                &claims(&format!("{alg:?}-user")),
            )
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"))
        };
        let mut ok = ws(addr, &format!("/ws?token={}", sign(good)));
        let w = read_json(&mut ok);
        assert_eq!(w["userId"], format!("{alg:?}-user"), "{alg:?}: {w}");
        let mut bad = ws(addr, &format!("/ws?token={}", sign(other)));
        let e = read_json(&mut bad);
        assert_eq!(e["code"], "invalid_signature", "{alg:?}: {e}");
        expect_close(&mut bad, 4003);
    }
}

fn pkcs8_pem(der: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str("-----END PRIVATE KEY-----\n");
    s.into_bytes()
}

/// The remaining auth error codes from a real client: issuer, audience,
/// missing subject, unknown key id (JWKS), a claim of the wrong type.
#[test]
fn issuer_audience_subject_kid_and_claim_errors() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys":[
            {"kty":"oct","kid":"k1","alg":"HS256","k":b64.encode("key-one-secret")},
            {"kty":"oct","kid":"k2","alg":"HS256","k":b64.encode("key-two-secret")}
        ]})
        .to_string(),
    )
    .unwrap();
    let mut cfg = test_config(1);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.algorithms = vec!["HS256".into()];
    cfg.auth.jwt.jwks_file = Some(jwks);
    cfg.auth.jwt.issuer = Some("https://issuer.example".into());
    cfg.auth.jwt.audience = Some("switchboard".into());
    let server = start(cfg);
    let addr = server.local_addr();
    let sign = |kid: &str, secret: &str, c: &Value| {
        mint(
            &SigningSettings {
                algorithm: jsonwebtoken::Algorithm::HS256,
                key: SigningKeySource::Secret(secret.as_bytes().to_vec()),
                kid: Some(kid.into()),
            },
            c,
        )
        .unwrap()
    };
    let good =
        json!({"sub":"kim","exp":now()+600,"iss":"https://issuer.example","aud":"switchboard"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let mut ok = ws(
        addr,
        &format!("/ws?token={}", sign("k2", "key-two-secret", &good)),
    );
    assert_eq!(read_json(&mut ok)["userId"], "kim");
    let cases = vec![
        (
            sign(
                "k1",
                "key-one-secret",
                &with("iss", json!("https://evil.example")),
            ),
            "invalid_issuer",
        ),
        (
            sign("k1", "key-one-secret", &with("aud", json!("other"))),
            "invalid_audience",
        ),
        (
            sign("k1", "key-one-secret", &without("sub")),
            "missing_subject",
        ),
        (sign("k9", "key-one-secret", &good), "unknown_key_id"),
        (sign("k1", "key-two-secret", &good), "invalid_signature"),
        (
            sign("k1", "key-one-secret", &with("channels", json!(42))),
            "invalid_claim",
        ),
    ];
    for (token, code) in cases {
        let mut c = ws(addr, &format!("/ws?token={token}"));
        let e = read_json(&mut c);
        assert_eq!(e["code"], code, "{e}");
        expect_close(&mut c, 4003);
    }
}
