//! Every RFC 6455 rule the server enforces, seen from a raw client: the close
//! code, then the server closing TCP. Each case uses a fresh connection, and
//! the server keeps serving others.

mod common;

use common::*;

fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    switchboard::ws::frame::encode_client_frame(&mut v, fin, op, payload, [0x11, 0x22, 0x33, 0x44]);
    v
}

fn expect_close_for(server: &switchboard::Server, bytes: &[u8], code: u16) {
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send_bytes(bytes);
    raw.expect_close(code);
    raw.expect_eof();
}

#[test]
fn protocol_errors_close_1002() {
    let server = start(test_config(1));
    let mut rsv = frame(true, 0x1, b"x");
    rsv[0] |= 0x40; // RSV1 without an extension
    let mut rsv3 = frame(true, 0x2, b"x");
    rsv3[0] |= 0x10;
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved bit 1", rsv),
        ("reserved bit 3", rsv3),
        ("unmasked client frame", unmasked),
        ("opcode 3", frame(true, 0x3, b"")),
        ("opcode 7", frame(true, 0x7, b"")),
        ("opcode 11", frame(true, 0xB, b"")),
        ("opcode 15", frame(true, 0xF, b"x")),
        ("ping over 125 bytes", frame(true, 0x9, &[0u8; 126])),
        ("fragmented ping", frame(false, 0x9, b"x")),
        ("continuation first", frame(true, 0x0, b"x")),
        (
            "text inside a fragmented message",
            [frame(false, 0x1, b"a"), frame(true, 0x1, b"b")].concat(),
        ),
        ("close with one byte", frame(true, 0x8, &[0x03])),
        ("close code 1005", frame(true, 0x8, &1005u16.to_be_bytes())),
        ("close code 999", frame(true, 0x8, &999u16.to_be_bytes())),
        ("close code 2000", frame(true, 0x8, &2000u16.to_be_bytes())),
        ("close code 5000", frame(true, 0x8, &5000u16.to_be_bytes())),
    ];
    for (name, bytes) in cases {
        eprintln!("case: {name}");
        expect_close_for(&server, &bytes, 1002);
    }
    // Still serving.
    let mut ok = Raw::connect(server.local_addr(), "/echo");
    ok.send(true, 0x1, b"alive");
    assert_eq!(ok.read_frame(), Some((true, 0x1, b"alive".to_vec())));
    wait_until("16 protocol errors counted", || {
        server.stats().protocol_errors >= 16
    });
}

#[test]
fn invalid_utf8_closes_1007() {
    let server = start(test_config(1));
    expect_close_for(
        &server,
        &frame(
            true,
            0x1,
            &[
                0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80,
                0x65, 0x64, 0x69, 0x74, 0x65, 0x64,
            ],
        ),
        1007,
    );
    // Invalid in the middle fragment: refused before the final fragment is sent.
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(false, 0x1, b"ok so far ");
    raw.send(false, 0x0, &[0xF4, 0x90, 0x80, 0x80]); // above U+10FFFF
    raw.expect_close(1007);
    raw.expect_eof();
    // A code point split across fragments is fine.
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(false, 0x1, &[0xCE]);
    raw.send(true, 0x0, &[0xBA]);
    assert_eq!(raw.read_frame(), Some((true, 0x1, "κ".as_bytes().to_vec())));
    // A close reason that is not UTF-8.
    expect_close_for(&server, &frame(true, 0x8, &[0x03, 0xE8, 0xFF, 0xFE]), 1007);
}

#[test]
fn too_big_closes_1009() {
    let mut cfg = test_config(1);
    cfg.max_frame_size = 1000;
    cfg.max_message_size = 1500;
    let server = start(cfg);
    // One frame over max_frame_size: refused from its header.
    let big = frame(true, 0x2, &[0u8; 1001]);
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send_bytes(&big[..10]);
    raw.expect_close(1009);
    raw.expect_eof();
    // Fragments that add up past max_message_size.
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(false, 0x2, &[0u8; 800]);
    raw.send(true, 0x0, &[0u8; 800]);
    raw.expect_close(1009);
    raw.expect_eof();
    // At the limit is fine.
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(false, 0x2, &[1u8; 1000]);
    raw.send(true, 0x0, &[2u8; 500]);
    let (_, op, payload) = raw.read_frame().unwrap();
    assert_eq!(op, 0x2);
    assert_eq!(payload.len(), 1500);
}

#[test]
fn close_handshake_echoes_the_code() {
    let server = start(test_config(1));
    for code in [1000u16, 1001, 3000, 4999] {
        let mut raw = Raw::connect(server.local_addr(), "/echo");
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        raw.send(true, 0x8, &payload);
        assert_eq!(raw.expect_close(code), "");
        raw.expect_eof();
    }
    // Empty close: empty close back.
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(true, 0x8, b"");
    assert_eq!(raw.read_frame(), Some((true, 0x8, vec![])));
    raw.expect_eof();
    // Data after a close is ignored; only the close reply comes back.
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    let mut bytes = frame(true, 0x8, &1000u16.to_be_bytes());
    bytes.extend(frame(true, 0x1, b"ignored"));
    raw.send_bytes(&bytes);
    raw.expect_close(1000);
    raw.expect_eof();
}

#[test]
fn ping_payload_comes_back_in_the_pong() {
    let server = start(test_config(1));
    let mut raw = Raw::connect(server.local_addr(), "/echo");
    raw.send(true, 0x9, &[7u8; 125]);
    assert_eq!(raw.read_frame(), Some((true, 0xA, vec![7u8; 125])));
    raw.send(true, 0x9, b"");
    assert_eq!(raw.read_frame(), Some((true, 0xA, vec![])));
    // An unsolicited pong is ignored.
    raw.send(true, 0xA, b"unsolicited");
    raw.send(true, 0x1, b"after");
    assert_eq!(raw.read_frame(), Some((true, 0x1, b"after".to_vec())));
}
