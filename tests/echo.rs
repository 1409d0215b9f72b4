//! The raw echo endpoint with real clients: text, binary, fragmentation,
//! interleaved control frames, large messages, many connections over shards.

mod common;

use common::*;
use tungstenite::Message;

#[test]
fn text_and_binary_echo_with_tungstenite() {
    let server = start(test_config(2));
    let mut ws = ws(server.local_addr(), "/echo");
    ws.send(Message::text("hello switchboard")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello switchboard"));
    let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::binary(bin.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(bin));
    ws.send(Message::text("")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(""));
    ws.close(None).unwrap();
    // The close reply comes back, then the server closes TCP.
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => continue,
            Ok(m) => panic!("unexpected {m:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn fragmented_message_with_interleaved_pings() {
    let server = start(test_config(1));
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(false, 0x1, "fragm".as_bytes());
    raw.send(true, 0x9, b"ping-1");
    raw.send(false, 0x0, "ented ".as_bytes());
    raw.send(true, 0x9, b"ping-2");
    raw.send(true, 0x0, "κόσμε".as_bytes());
    assert_eq!(raw.read_frame(), Some((true, 0xA, b"ping-1".to_vec())));
    assert_eq!(raw.read_frame(), Some((true, 0xA, b"ping-2".to_vec())));
    assert_eq!(
        raw.read_frame(),
        Some((true, 0x1, "fragmented κόσμε".as_bytes().to_vec()))
    );
    // Binary in many small fragments.
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    for (i, chunk) in data.chunks(7).enumerate() {
        let last = (i + 1) * 7 >= data.len();
        raw.send(last, if i == 0 { 0x2 } else { 0x0 }, chunk);
    }
    assert_eq!(raw.read_frame(), Some((true, 0x2, data)));
}

#[test]
fn frames_split_across_writes_and_coalesced() {
    let server = start(test_config(1));
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    // Ten frames in one write.
    let mut batch = Vec::new();
    for i in 0..10u8 {
        switchboard::ws::frame::encode_client_frame(&mut batch, true, 0x2, &[i; 300], [1, 2, 3, 4]);
    }
    raw.send_bytes(&batch);
    for i in 0..10u8 {
        assert_eq!(raw.read_frame(), Some((true, 0x2, vec![i; 300])));
    }
    // One frame dribbled a byte at a time.
    let mut one = Vec::new();
    switchboard::ws::frame::encode_client_frame(&mut one, true, 0x1, b"slowly", [9, 8, 7, 6]);
    for b in &one {
        raw.send_bytes(&[*b]);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(raw.read_frame(), Some((true, 0x1, b"slowly".to_vec())));
}

#[test]
fn first_frame_in_the_same_packet_as_the_upgrade_request() {
    use std::io::Write;
    let server = start(test_config(1));
    let addr = server.local_addr();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut bytes = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    switchboard::ws::frame::encode_client_frame(&mut bytes, true, 0x1, b"early", [5, 5, 5, 5]);
    stream.write_all(&bytes).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut raw = Raw {
        stream,
        buf: Vec::new(),
    };
    let head = raw.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(raw.read_frame(), Some((true, 0x1, b"early".to_vec())));
}

#[test]
fn two_thousand_connections_over_four_shards() {
    let server = start(test_config(4));
    let addr = server.local_addr();
    let n = 2000;
    let mut clients: Vec<_> = (0..n).map(|_| ws(addr, "/echo")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(Message::text(format!("client {i}"))).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.read().unwrap(), Message::text(format!("client {i}")));
    }
    wait_until("stats published", || server.stats().connections == n as u64);
    let per_shard: Vec<u64> = server.shard_stats().iter().map(|s| s.connections).collect();
    assert_eq!(per_shard.iter().sum::<u64>(), n as u64);
    for c in &per_shard {
        assert_eq!(
            *c,
            n as u64 / 4,
            "round-robin hand-off spreads evenly: {per_shard:?}"
        );
    }
    assert_eq!(server.open_connections(), n);
    drop(clients);
    wait_until("all connections released", || {
        server.open_connections() == 0
    });
    wait_until("gauges back to zero", || {
        let s = server.stats();
        s.connections == 0 && s.sockets == 0
    });
}

#[test]
fn reuseport_mode_serves_too() {
    let mut cfg = test_config(2);
    cfg.accept = switchboard::config::AcceptMode::Reuseport;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut clients: Vec<_> = (0..50).map(|_| ws(addr, "/echo")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(Message::binary(vec![i as u8; 10])).unwrap();
        assert_eq!(c.read().unwrap(), Message::binary(vec![i as u8; 10]));
    }
    assert_eq!(server.open_connections(), 50);
}
