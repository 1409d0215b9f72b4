//! The `switchboard` binary as an operator runs it: graceful shutdown on
//! SIGTERM/SIGINT (every client gets 1001, exit 0), and one-line errors with
//! exit code 2 for bad configuration or an unbindable port.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Start the binary on a free port; returns the child and the address it
/// reports in its "listening on" log line.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--port", "0"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("a log line").expect("utf-8");
        if let Some(i) = line.find("listening on ws://") {
            let rest = &line[i + "listening on ws://".len()..];
            let addr = rest.split_whitespace().next().unwrap();
            break addr.parse().unwrap();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let (mut child, addr) = spawn(&["--shards", "2"], &[]);
    let mut clients: Vec<Raw> = (0..20).map(|_| Raw::connect(addr, "/echo")).collect();
    for c in clients.iter_mut() {
        c.send(true, 0x1, b"hi");
        assert_eq!(c.read_frame(), Some((true, 0x1, b"hi".to_vec())));
    }
    signal(&child, "-TERM");
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(1001), "server shutting down");
        // Answer like a well-behaved client; the server then finishes fast.
        c.send(true, 0x8, &1001u16.to_be_bytes());
        c.expect_eof();
    }
    let st = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn sigint_with_unresponsive_clients_exits_by_the_timeout() {
    let (mut child, addr) = spawn(
        &["--shards", "1"],
        &[
            ("WS_SHUTDOWN_TIMEOUT", "1500"),
            ("SWITCHBOARD_CLOSE_TIMEOUT", "60s"),
        ],
    );
    let mut c = Raw::connect(addr, "/echo");
    let t0 = Instant::now();
    signal(&child, "-INT");
    c.expect_close(1001);
    // The client never answers; the server gives up at the shutdown timeout.
    let st = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
}

fn run_expect_2(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    // One line in all, as the README promises: no INFO line before it, no
    // continuation line after it (issue 11 point 14).
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].starts_with("switchboard: "), "{err}");
    assert!(
        lines[0].contains(needle),
        "{:?} should name {needle}",
        lines[0]
    );
}

#[test]
fn bad_configuration_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max_connections = \"many\"\n").unwrap();
    run_expect_2(
        &["serve", "--config", bad.to_str().unwrap()],
        &[],
        "max_connections",
    );
    run_expect_2(
        &["serve", "--config", "/nonexistent.toml"],
        &[],
        "/nonexistent.toml",
    );
    run_expect_2(&["serve", "--log-level", "chatty"], &[], "log_level");
    // An unknown enum value: toml adds "in `auth.mode`" on a second line.
    let mode = dir.path().join("mode.toml");
    std::fs::write(&mode, "[auth]\nmode = \"bogus\"\n").unwrap();
    run_expect_2(
        &["serve", "--config", mode.to_str().unwrap()],
        &[],
        "auth.mode",
    );
    // A TOML syntax error: toml draws the line with a caret below it.
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(&syntax, "port = 80\nhost = \n").unwrap();
    run_expect_2(
        &["serve", "--config", syntax.to_str().unwrap()],
        &[],
        "line 2",
    );
    run_expect_2(
        &["serve", "--host", "0.0.0.0"],
        &[],
        "allow_unauthenticated_public",
    );
    run_expect_2(
        &["serve"],
        &[("WS_HEARTBEAT_INTERVAL", "often")],
        "heartbeat_interval",
    );
    run_expect_2(
        &["serve", "--port", "0"],
        &[
            ("SWITCHBOARD_TLS_CERT", "/missing.pem"),
            ("SWITCHBOARD_TLS_KEY", "/missing.key"),
        ],
        "/missing.pem",
    );
}

#[test]
fn port_in_use_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    run_expect_2(&["serve", "--port", &port], &[], "cannot listen on");
}

#[test]
fn config_command_prints_effective_configuration() {
    let out = Command::new(BIN)
        .args(["config"])
        .env("WS_PATH", "/from-env")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: toml::Table = text.parse().unwrap();
    assert_eq!(parsed["ws_path"].as_str(), Some("/from-env"));
    assert_eq!(parsed["port"].as_integer(), Some(8080));
}

#[test]
fn json_log_lines_carry_shard_and_connection() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--shards",
            "1",
            "--log-level",
            "debug",
        ])
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut addr: Option<SocketAddr> = None;
    let mut conn_line = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("every line is JSON");
        for key in ["ts", "level", "thread", "target", "msg"] {
            assert!(v.get(key).is_some(), "{key} in {line}");
        }
        let msg = v["msg"].as_str().unwrap().to_owned();
        if let Some(i) = msg.find("listening on ws://") {
            let rest = &msg[i + "listening on ws://".len()..];
            addr = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
            let mut c = Raw::connect(addr.unwrap(), "/echo");
            c.send(true, 0x1, b"x");
            let _ = c.read_frame();
        }
        if msg.contains("conn=0.0 upgraded") {
            assert_eq!(v["thread"], "shard-0");
            conn_line = Some(line);
            break;
        }
    }
    assert!(addr.is_some());
    assert!(conn_line.is_some(), "a debug line names the connection");
    signal(&child, "-TERM");
    std::thread::spawn(move || for _ in lines {});
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}
