//! Question: how many ingested records per second can the writer commit, and
//! how much does group commit buy? `SqliteBackend::apply` on batches of 1, 64
//! and 1024 `Ingest` ops (~100-byte JSON each, half with a client id, so the
//! dedup lookup is paid too), with `synchronous = FULL` (an fsync per
//! commit) and `NORMAL` (WAL without fsync per commit). The database lives in
//! a temporary directory under the target directory (not /tmp, which may be
//! a RAM disk where fsync costs nothing); it grows during the run, as a real
//! one does.
//!
//! Run: cargo bench --bench store -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::config::{StorageConfig, SyncMode};
use switchboard::store::{Backend, Op, SqliteBackend};

const TABLE: &str = "sensors_data";

fn ops(n: usize, next: &mut u64, table: &Arc<str>, user: &Arc<str>) -> Vec<Op> {
    (0..n)
        .map(|_| {
            *next += 1;
            let i = *next;
            Op::Ingest {
                table: table.clone(),
                kind: "sensor_data".into(),
                user: user.clone(),
                connection: "3.1742".into(),
                client_id: i.is_multiple_of(2).then(|| format!("c-{i}")),
                received_at_ms: 1_750_000_000_000,
                // ~100 bytes of JSON.
                data: format!(
                    r#"{{"device":"thermo-{:04}","temperature":21.{:02},"humidity":48,"battery":0.87,"seq":{i}}}"#,
                    i % 1000,
                    i % 100
                )
                .into_bytes(),
            }
        })
        .collect()
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    let table: Arc<str> = Arc::from(TABLE);
    let user: Arc<str> = Arc::from("user-42");
    for (name, sync) in [("full", SyncMode::Full), ("normal", SyncMode::Normal)] {
        for batch in [1, 64, 1024] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let cfg = StorageConfig {
                data_dir: dir.path().to_owned(),
                synchronous: sync,
                ..StorageConfig::default()
            };
            let mut backend = SqliteBackend::open(&cfg, TABLE).unwrap();
            let mut next = 0;
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(format!("{name}/batch_{batch}"), |b| {
                b.iter_batched(
                    || ops(batch, &mut next, &table, &user),
                    |ops| {
                        let results = backend.apply(ops);
                        assert!(results.iter().all(Result::is_ok));
                        black_box(results)
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
