//! Question: what does the shard's hashed timer wheel cost per operation? The
//! common case is a heartbeat or handshake deadline that is inserted and then
//! cancelled before it fires (insert+cancel pair, on an empty wheel and on one
//! already holding 10 000 timers); the burst case is 10 000 deadlines that all
//! come due, expired either by one late `expire` call or tick by tick as the
//! event loop would.
//!
//! Run: cargo bench --bench timer -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::timer::TimerWheel;

const TICK: Duration = Duration::from_millis(100);
const SLOTS: usize = 512;
const N: u32 = 10_000;

/// Deadline of timer `i`: spread over 0..30 s (inside one 51.2 s lap).
fn after(i: u32) -> Duration {
    Duration::from_millis(u64::from(i) * 7919 % 30_000)
}

/// The farthest deadline used by `after`, plus two ticks.
const HORIZON: Duration = Duration::from_millis(30_000 + 200);

fn insert_cancel(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer insert+cancel");
    group.throughput(Throughput::Elements(1));
    for resident in [0u32, N] {
        let mut wheel: TimerWheel<u32> = TimerWheel::new(TICK, SLOTS);
        let now = Instant::now();
        for i in 0..resident {
            wheel.insert(now, after(i), i);
        }
        let mut i = 0u32;
        group.bench_function(format!("{resident} resident"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let key = wheel.insert(now, black_box(after(i)), i);
                black_box(wheel.cancel(key))
            });
        });
        assert_eq!(wheel.len(), resident as usize);
    }
    group.finish();
}

fn insert_expire(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer insert 10k + expire all");
    group.throughput(Throughput::Elements(u64::from(N)));
    group.bench_function("one expire call", |b| {
        b.iter_batched(
            || {
                (
                    TimerWheel::<u32>::new(TICK, SLOTS),
                    Vec::with_capacity(N as usize),
                )
            },
            |(mut wheel, mut out)| {
                let t0 = Instant::now();
                for i in 0..N {
                    wheel.insert(t0, after(i), i);
                }
                wheel.expire(t0 + HORIZON, &mut out);
                assert_eq!(out.len(), N as usize);
                (wheel, out)
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("expire every tick", |b| {
        b.iter_batched(
            || {
                (
                    TimerWheel::<u32>::new(TICK, SLOTS),
                    Vec::with_capacity(N as usize),
                )
            },
            |(mut wheel, mut out)| {
                let t0 = Instant::now();
                for i in 0..N {
                    wheel.insert(t0, after(i), i);
                }
                let mut now = t0;
                while now <= t0 + HORIZON {
                    now += TICK;
                    wheel.expire(now, &mut out);
                }
                assert_eq!(out.len(), N as usize);
                (wheel, out)
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, insert_cancel, insert_expire);
criterion_main!(benches);
