//! The real socket.io-client 4.x under node against a real server: the
//! seeds' client code (001 `auth: {token}`, `connected`, API-sent
//! `area_updated`, `token_revoked` then no reconnection; 002 `extraHeaders`
//! Authorization, `ping`/`pong`, API-sent `message`; 004 at `/realtime`
//! with `sessionId`, `connect_error` for a refused token, `REQUEST` ->
//! `RESPONSE` and an `UPDATE` as `message` JSON strings), acks of client
//! events and server acks of offline inbox deliveries, over the WebSocket
//! transport (`transports: ['websocket']`: long-polling is not served yet,
//! docs/SOCKETIO.md).
//!
//! Needs node and `npm ci --prefix tests/socketio` (bash .ci/run does it);
//! `SWITCHBOARD_SKIP_NODE=1` skips it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use switchboard::config::{AuthMode, Config, Rule};

const SECRET: &str = "socketio-client-secret";
const KEY: &str = "socketio-client-api-key";

fn config() -> Config {
    let mut cfg = test_config(2);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt.secret = Some(SECRET.into());
    cfg.auth.jwt.algorithms = vec!["HS256".into()];
    cfg.api.keys = vec![KEY.into()];
    cfg.channels.subscribe = Rule::Any;
    cfg.channels.publish = Rule::Any;
    cfg
}

fn token(sub: &str) -> String {
    hs256_token(SECRET, sub)
}

/// Run one scenario of tests/socketio/client.mjs against `cfg`; its output
/// on success, or None when skipped.
fn scenario(name: &str, cfg: Config) -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio");
    if std::env::var("SWITCHBOARD_SKIP_NODE").is_ok_and(|v| v == "1") {
        eprintln!("SWITCHBOARD_SKIP_NODE=1: skipped the socket.io-client scenario {name}");
        return None;
    }
    assert!(
        dir.join("node_modules/socket.io-client").is_dir(),
        "tests/socketio has no node_modules: run `npm ci --prefix tests/socketio` \
         (bash .ci/run does), or set SWITCHBOARD_SKIP_NODE=1 to skip"
    );
    let server = start(cfg);
    let mut child = Command::new("node")
        .arg(dir.join("client.mjs"))
        .arg(name)
        .arg(format!("http://{}", server.local_addr()))
        .env("SB_API_KEY", KEY)
        .env("SB_TOKEN_ALICE", token("alice"))
        .env("SB_TOKEN_BOB", token("bob"))
        .env("SB_TOKEN_CAROL", token("carol"))
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (install Node.js >= 20, or SWITCHBOARD_SKIP_NODE=1)");
    // A hung client must not hang the suite: every step inside has its own
    // 5 s timeout, this is the backstop.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "scenario {name} failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(&format!("{{\"step\":\"done\",\"value\":\"{name}\"}}")));
    server.shutdown();
    Some(stdout)
}

#[test]
fn seed_001_auth_token_area_events_and_revocation() {
    scenario("seed001", config());
}

#[test]
fn seed_002_extra_headers_ping_pong_and_messages() {
    scenario("seed002", config());
}

#[test]
fn seed_004_realtime_path_and_connect_error() {
    let mut cfg = config();
    cfg.socketio.path = "/realtime".into();
    cfg.socketio.message_strings = true;
    let out = scenario("seed004", cfg);
    if let Some(out) = out {
        assert!(out.contains("\"step\":\"RESPONSE\""), "{out}");
        assert!(out.contains("\"userId\":\"carol\""), "{out}");
        assert!(out.contains("\"step\":\"UPDATE\""), "{out}");
    }
}

#[test]
fn server_acks_for_the_offline_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.storage.backend = switchboard::config::StorageBackend::Sqlite;
    cfg.storage.data_dir = dir.path().to_path_buf();
    scenario("inbox", cfg);
}

#[test]
fn acks_of_client_events_and_a_shared_channel() {
    scenario("acks", config());
}
