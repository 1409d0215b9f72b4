//! Questions: how long does decoding one client message take with simd-json
//! (per-shard reused buffers, in place) against a serde_json baseline on the
//! same bytes; what does a routing-table lookup cost while other threads
//! update it; and what does a fan-out cost per publish (encode once) and per
//! recipient (queue a shared frame)?

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::conn::OutQueue;
use switchboard::proto::Out;
use switchboard::proto::encode::shared_frame;
use switchboard::route::Router;

fn messages() -> Vec<(&'static str, Vec<u8>)> {
    let big = format!(
        r#"{{"type":"publish","channel":"room:lobby","requestId":"r-1","data":{{"items":[{}]}}}}"#,
        (0..60)
            .map(|i| format!(r#"{{"id":{i},"name":"item number {i}","ok":true,"score":{i}.5}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    vec![
        ("ping", br#"{"type":"ping"}"#.to_vec()),
        ("subscribe", br#"{"type":"subscribe","channel":"room:lobby","requestId":17}"#.to_vec()),
        (
            "publish_200B",
            br#"{"type":"publish","channel":"room:lobby","requestId":"abc-123","data":{"text":"hello everyone, how are you today?","from":"alice","mentions":["bob","carol"],"n":42,"ok":true}}"#.to_vec(),
        ),
        ("publish_4KB", big.into_bytes()),
    ]
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let mut buffers = simd_json::Buffers::default();
    for (name, msg) in messages() {
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_function(format!("simd_json/{name}"), |b| {
            let mut work = msg.clone();
            b.iter(|| {
                work.copy_from_slice(&msg); // parsing is in place
                let d = switchboard::proto::decode(&mut work, &mut buffers).ok();
                black_box(d.map(|d| d.type_name().len()));
            })
        });
        g.bench_function(format!("serde_json/{name}"), |b| {
            let mut work = msg.clone();
            b.iter(|| {
                work.copy_from_slice(&msg); // same copy, for a fair comparison
                let v: serde_json::Value = serde_json::from_slice(&work).unwrap();
                black_box(v.get("type").and_then(|t| t.as_str()).map(str::len));
            })
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    let router = Arc::new(Router::new(4));
    let users: Vec<Arc<str>> = (0..10_000)
        .map(|i| Arc::from(format!("user-{i}")))
        .collect();
    for (i, u) in users.iter().enumerate() {
        router.user_joined(u, i % 4);
    }
    g.bench_function("lookup/quiet", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % users.len();
            black_box(router.user_shards(&users[i]))
        })
    });
    // The same lookups while another thread keeps joining and leaving.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (router, stop, users) = (router.clone(), stop.clone(), users.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let u = &users[i % users.len()];
                router.user_joined(u, 5);
                router.user_left(u, 5);
                i += 1;
            }
        })
    };
    g.bench_function("lookup/while_updating", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % users.len();
            black_box(router.user_shards(&users[i]))
        })
    });
    g.bench_function("join_leave/while_updating", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % users.len();
            router.channel_joined(&users[i], 2);
            router.channel_left(&users[i], 2);
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for size in [32usize, 256, 4096] {
        let data = serde_json::Value::String("x".repeat(size));
        let mut text = serde_json::to_vec(&serde_json::json!({ "data": data })).unwrap();
        let mut bufs = simd_json::Buffers::default();
        let parsed = simd_json::to_borrowed_value_with_buffers(&mut text, &mut bufs).unwrap();
        let data = &parsed["data"];
        g.bench_function(format!("encode_once/{size}B"), |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(size + 128);
                Out::new(&mut out, "message")
                    .str("channel", "room:lobby")
                    .str("from", "alice")
                    .value("data", data)
                    .finish();
                black_box(shared_frame(&out))
            })
        });
    }
    // Per recipient: queue the shared frame on 10,000 connections' queues.
    let frame = shared_frame(br#"{"type":"message","channel":"c","data":1}"#);
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("queue_shared/10k_recipients", |b| {
        b.iter_batched(
            || (0..10_000).map(|_| OutQueue::new()).collect::<Vec<_>>(),
            |mut queues| {
                for q in queues.iter_mut() {
                    q.push_shared(frame.clone());
                }
                queues
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, parse, routing, fanout);
criterion_main!(benches);
