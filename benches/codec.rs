//! Question: how many bytes per second can one shard thread push through the
//! sans-IO WebSocket codec and the upgrade parser, by payload size? That is:
//! decoding (and unmasking) client frames with `Inbound::feed`, encoding server
//! frames with `encode_frame`, the raw `apply_mask` XOR loop, and parsing a
//! realistic browser upgrade request with `parse_request`.
//!
//! Run: cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::http::parse_request;
use switchboard::ws::frame::{OpCode, apply_mask, encode_client_frame, encode_frame};
use switchboard::ws::inbound::{Flow, Inbound, Limits};

const SIZES: [usize; 5] = [16, 128, 1024, 16384, 65536];

/// Each decode input holds about this many bytes of frames (at least one frame).
const DECODE_BUF: usize = 256 * 1024;

const LIMITS: Limits = Limits {
    max_frame: 1 << 20,
    max_message: 1 << 20,
};

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A buffer of `n` masked, final binary frames of `size` bytes each.
fn client_frames(size: usize, n: usize) -> Vec<u8> {
    let p = payload(size);
    let mut out = Vec::with_capacity(n * (size + 14));
    for _ in 0..n {
        encode_client_frame(&mut out, true, OpCode::Binary as u8, &p, MASK);
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in SIZES {
        let n = (DECODE_BUF / size).max(1);
        let input = client_frames(size, n);
        group.throughput(Throughput::Bytes(input.len() as u64));
        let mut inbound = Inbound::new();
        group.bench_function(format!("{size}B x{n}"), |b| {
            // `feed` unmasks in place, so every iteration gets a fresh copy;
            // the copy is made in the untimed setup.
            b.iter_batched(
                || input.clone(),
                |mut buf| {
                    let mut msgs = 0usize;
                    let flow = inbound.feed(&mut buf, &LIMITS, &mut |m| {
                        black_box(m);
                        msgs += 1;
                        Flow::Continue
                    });
                    assert_eq!(flow, Ok(Flow::Continue));
                    assert_eq!(msgs, n);
                    buf
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in SIZES {
        let p = payload(size);
        let mut out = Vec::with_capacity(size + 16);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                out.clear();
                encode_frame(&mut out, OpCode::Binary, black_box(&p));
                black_box(out.as_slice());
            });
        });
    }
    group.finish();
}

fn mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_mask");
    for size in SIZES {
        let mut buf = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size}B"), |b| {
            // Masking twice restores the input, so one buffer serves every iteration.
            b.iter(|| apply_mask(black_box(&mut buf), black_box(MASK)));
        });
    }
    group.finish();
}

/// What Chrome sends to open `new WebSocket("wss://...")`, give or take.
const BROWSER_UPGRADE: &[u8] = b"GET /ws?room=lobby&token=eyJhbGciOiJIUzI1NiJ9.e30.abc HTTP/1.1\r\n\
Host: chat.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://chat.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Bytes(BROWSER_UPGRADE.len() as u64));
    group.bench_function(format!("parse_request {}B", BROWSER_UPGRADE.len()), |b| {
        b.iter(|| {
            let parsed = parse_request(black_box(BROWSER_UPGRADE), 8192);
            let Ok(Some((req, used))) = parsed else {
                panic!("browser request did not parse: {parsed:?}");
            };
            assert_eq!(used, BROWSER_UPGRADE.len());
            black_box(req)
        });
    });
    group.finish();
}

criterion_group!(benches, decode, encode, mask, handshake);
criterion_main!(benches);
