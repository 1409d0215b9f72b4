//! Heartbeats from the timer wheel: pings at the interval, a silent client is
//! closed after the pong timeout, a responsive one stays, idle timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

#[test]
fn silent_client_is_closed_after_a_missed_pong() {
    let mut cfg = test_config(1);
    cfg.heartbeat_interval = Duration::from_millis(300);
    cfg.pong_timeout = Duration::from_millis(300);
    let server = start(cfg);
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    let t0 = Instant::now();
    // The raw client reads the ping but never answers it.
    let (_, op, _) = raw.read_frame().expect("a ping");
    assert_eq!(op, 0x9);
    raw.expect_close(1011);
    raw.expect_eof();
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "not before the pong deadline"
    );
    wait_until("counter", || server.stats().heartbeat_timeouts == 1);
    assert_eq!(server.open_connections(), 0);
}

#[test]
fn responsive_client_survives_many_intervals() {
    let mut cfg = test_config(1);
    // A generous pong timeout: a loaded CI machine may be slow to answer.
    cfg.heartbeat_interval = Duration::from_millis(600);
    cfg.pong_timeout = Duration::from_millis(500);
    let server = start(cfg);
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    let mut pings = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        let (_, op, payload) = raw.read_frame().expect("frame");
        assert_eq!(op, 0x9, "only pings arrive");
        pings += 1;
        raw.send(true, 0xA, &payload);
    }
    assert!(pings >= 3, "pings every interval, got {pings}");
    raw.send(true, 0x1, b"still here");
    loop {
        let (_, op, payload) = raw.read_frame().expect("echo");
        if op == 0x1 {
            assert_eq!(payload, b"still here");
            break;
        }
        assert_eq!(op, 0x9);
        raw.send(true, 0xA, &payload);
    }
    assert_eq!(server.stats().heartbeat_timeouts, 0);
}

#[test]
fn tungstenite_client_answers_pings_automatically() {
    let mut cfg = test_config(1);
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.pong_timeout = Duration::from_millis(600);
    let server = start(cfg);
    let mut ws = ws(server.local_addr(), "/echo");
    for i in 0..40 {
        std::thread::sleep(Duration::from_millis(60));
        ws.send(Message::text(format!("m{i}"))).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Ping(_) => continue, // tungstenite queued the pong
                m => {
                    assert_eq!(m, Message::text(format!("m{i}")));
                    break;
                }
            }
        }
    }
    assert_eq!(server.stats().heartbeat_timeouts, 0);
    let s = server.stats();
    assert!(s.pings_sent >= 3, "{s:?}");
}

#[test]
fn idle_timeout_closes_quiet_connections() {
    let mut cfg = test_config(1);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.pong_timeout = Duration::from_millis(1000);
    cfg.idle_timeout = Duration::from_millis(500);
    let server = start(cfg);
    let t0 = Instant::now();
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    loop {
        let (_, op, payload) = raw.read_frame().expect("frame");
        match op {
            0x9 => raw.send(true, 0xA, &payload), // pongs are not activity
            0x8 => {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1000);
                assert_eq!(&payload[2..], b"idle timeout");
                break;
            }
            other => panic!("opcode {other}"),
        }
    }
    assert!(t0.elapsed() >= Duration::from_millis(500));
    raw.expect_eof();
}

/// Regression: `authenticate` and another message in the same read must
/// still start the heartbeat (the second message's verdict used to
/// overwrite the first's, leaving the connection with no timer at all).
#[test]
fn heartbeat_starts_when_auth_and_a_message_share_a_read() {
    let mut cfg = test_config(1);
    cfg.auth.mode = switchboard::config::AuthMode::Token;
    cfg.auth.token = Some("tok".into());
    cfg.auth.timeout = Duration::from_millis(300);
    cfg.heartbeat_interval = Duration::from_millis(300);
    cfg.pong_timeout = Duration::from_millis(300);
    let server = start(cfg);
    let mut raw = Raw::connect(server.local_addr(), "/ws");
    let mut both = Vec::new();
    for text in [
        r#"{"type":"authenticate","token":"tok"}"#,
        r#"{"type":"ping"}"#,
    ] {
        switchboard::ws::frame::encode_client_frame(
            &mut both,
            true,
            0x1,
            text.as_bytes(),
            [9, 9, 9, 9],
        );
    }
    raw.send_bytes(&both);
    let mut texts = 0;
    loop {
        let (_, op, _) = raw.read_frame().expect("frames");
        match op {
            0x1 => texts += 1, // connected, pong
            0x9 => break,      // the heartbeat ping: armed
            other => panic!("opcode {other}"),
        }
    }
    assert_eq!(texts, 2);
    // Not answering it closes the connection.
    raw.expect_close(1011);
    wait_until("heartbeat timeout counted", || {
        server.stats().heartbeat_timeouts == 1
    });
}

/// Issue 11 point 10: with `pong_timeout` longer than `heartbeat_interval`,
/// pings still come every interval (they used to come every pong_timeout),
/// and the deadline still counts from the first unanswered ping. Counted in
/// pings, not time: a silent client gets exactly pong_timeout / interval
/// pings before its 1011, a client that answers stays open meanwhile.
#[test]
fn pings_come_every_interval_when_the_pong_timeout_is_longer() {
    let mut cfg = test_config(1);
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.pong_timeout = Duration::from_millis(2000);
    let server = start(cfg);
    let addr = server.local_addr();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut polite = Raw::connect(addr, "/echo");
    polite
        .stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (a, s) = (answered.clone(), stop.clone());
    let polite = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        while !s.load(std::sync::atomic::Ordering::Acquire) {
            match polite.stream.read(&mut buf) {
                Ok(0) => panic!("the answering client was closed"),
                Ok(n) => {
                    // Empty pings only: 2 bytes each (0x89 0x00).
                    assert!(
                        buf[..n].chunks(2).all(|f| f == [0x89, 0x00]),
                        "{:?}",
                        &buf[..n]
                    );
                    for _ in 0..n / 2 {
                        a.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        polite.send(true, 0xA, b"");
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{e}"),
            }
        }
        polite
    });
    let mut silent = Raw::connect(addr, "/echo");
    let mut pings = 0;
    loop {
        let (_, op, payload) = silent.read_frame().expect("frame");
        match op {
            0x9 => pings += 1,
            0x8 => {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1011);
                break;
            }
            other => panic!("opcode {other}"),
        }
    }
    // Pings at 0, 200, ..., 1800 ms; the deadline at 2000 ms comes before an 11th.
    assert_eq!(pings, 10, "pings every interval until the pong deadline");
    stop.store(true, std::sync::atomic::Ordering::Release);
    let _polite = polite.join().expect("the answering client stayed open");
    let answered = answered.load(std::sync::atomic::Ordering::Acquire);
    assert!(
        answered >= 8,
        "the answering client got pings every interval meanwhile: {answered}"
    );
    assert_eq!(server.stats().heartbeat_timeouts, 1);
}
