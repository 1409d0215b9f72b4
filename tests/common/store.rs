//! The store under test, for the storage tests that run against both
//! backends: SQLite in a temporary directory, or PostgreSQL in a schema of
//! its own on the test cluster (`switchboard::store::testpg`, started once
//! per test binary and stopped with it). The same test body runs on each;
//! where the SQL differs, this is the only place that knows.

use std::path::PathBuf;
use std::time::Duration;

use switchboard::config::{Config, StorageBackend};
use switchboard::store::testpg::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// One test's store: a temporary directory (the SQLite file or the
/// clean-shutdown marker) and, for PostgreSQL, a fresh schema.
pub struct TestStore {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub schema: String,
}

/// A write lock held by the test (the writer waits behind it).
pub enum Lock {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl Lock {
    pub fn release(self) {
        match self {
            Lock::Sqlite(c) => c.execute_batch("ROLLBACK").unwrap(),
            Lock::Postgres(mut c) => c.batch_execute("ROLLBACK").unwrap(),
        }
    }
}

impl TestStore {
    pub fn new(kind: Kind) -> TestStore {
        let schema = match kind {
            Kind::Sqlite => String::new(),
            Kind::Postgres => Cluster::shared().fresh_schema(),
        };
        TestStore {
            kind,
            dir: tempfile::tempdir().unwrap(),
            schema,
        }
    }

    /// `storage.data_dir`.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Point `cfg` at this store.
    pub fn apply(&self, cfg: &mut Config) {
        cfg.storage.data_dir = self.data();
        match self.kind {
            Kind::Sqlite => cfg.storage.backend = StorageBackend::Sqlite,
            Kind::Postgres => {
                cfg.storage.backend = StorageBackend::Postgres;
                cfg.storage.postgres.url = Cluster::shared().url();
                cfg.storage.postgres.schema = self.schema.clone();
            }
        }
    }

    /// A test config (see `common::test_config`) storing here.
    pub fn config(&self, shards: usize) -> Config {
        let mut cfg = super::test_config(shards);
        self.apply(&mut cfg);
        cfg
    }

    /// TOML for a config file: `[storage]` with `extra` keys, then
    /// `[storage.postgres]` when needed.
    pub fn toml(&self, extra: &str) -> String {
        let data = self.data();
        match self.kind {
            Kind::Sqlite => format!("[storage]\ndata_dir = {data:?}\n{extra}"),
            Kind::Postgres => format!(
                "[storage]\nbackend = \"postgres\"\ndata_dir = {data:?}\n{extra}\
                 [storage.postgres]\nurl = {:?}\nschema = {:?}\n",
                Cluster::shared().url(),
                self.schema
            ),
        }
    }

    fn sqlite(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.data().join("switchboard.db"))
            .expect("the database file exists");
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    fn pg(&self) -> postgres::Client {
        Cluster::shared().client(&self.schema).unwrap()
    }

    /// One integer from SQL that both databases understand.
    pub fn scalar(&self, sql: &str) -> i64 {
        match self.kind {
            Kind::Sqlite => self.sqlite().query_row(sql, [], |r| r.get(0)).unwrap(),
            Kind::Postgres => self.pg().query_one(sql, &[]).unwrap().get(0),
        }
    }

    pub fn count(&self, table: &str) -> i64 {
        self.scalar(&format!("SELECT count(*) FROM \"{table}\""))
    }

    /// Rows of `channel` in the stored history.
    pub fn stored(&self, channel: &str) -> i64 {
        let channel = channel.replace('\'', "''");
        self.scalar(&format!(
            "SELECT count(*) FROM history WHERE channel = '{channel}'"
        ))
    }

    /// A channel's stored top offset, if it has a row.
    pub fn top_offset(&self, channel: &str) -> Option<i64> {
        match self.kind {
            Kind::Sqlite => self
                .sqlite()
                .query_row(
                    "SELECT top_offset FROM channels WHERE channel = ?1",
                    [channel],
                    |r| r.get(0),
                )
                .ok(),
            Kind::Postgres => self
                .pg()
                .query_opt(
                    "SELECT top_offset FROM channels WHERE channel = $1",
                    &[&channel],
                )
                .unwrap()
                .map(|r| r.get(0)),
        }
    }

    /// Bytes of publication text in `history`.
    pub fn history_bytes(&self) -> i64 {
        match self.kind {
            Kind::Sqlite => {
                self.scalar("SELECT COALESCE(SUM(length(CAST(payload AS BLOB))), 0) FROM history")
            }
            Kind::Postgres => {
                self.scalar("SELECT COALESCE(SUM(octet_length(payload)), 0)::BIGINT FROM history")
            }
        }
    }

    /// (integer, text) rows of SQL that both databases understand.
    pub fn pairs(&self, sql: &str) -> Vec<(i64, String)> {
        match self.kind {
            Kind::Sqlite => {
                let c = self.sqlite();
                let mut st = c.prepare(sql).unwrap();
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
            Kind::Postgres => self
                .pg()
                .query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        }
    }

    /// (text, text) rows.
    pub fn texts(&self, sql: &str) -> Vec<(String, String)> {
        match self.kind {
            Kind::Sqlite => {
                let c = self.sqlite();
                let mut st = c.prepare(sql).unwrap();
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
            Kind::Postgres => self
                .pg()
                .query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        }
    }

    /// Hold a lock that stops the writer's next write (reads go on).
    pub fn hold_write_lock(&self) -> Lock {
        match self.kind {
            Kind::Sqlite => {
                let c = self.sqlite();
                c.execute_batch("BEGIN IMMEDIATE").unwrap();
                Lock::Sqlite(c)
            }
            Kind::Postgres => {
                let mut c = self.pg();
                c.batch_execute(
                    "BEGIN; LOCK TABLE channels, history, inbox, revocations, meta \
                     IN EXCLUSIVE MODE",
                )
                .unwrap();
                Lock::Postgres(c)
            }
        }
    }

    /// Make inserts into `history` whose payload contains `needle` fail
    /// with `message` (a stand-in for a full disk), until `allow_history`.
    pub fn fail_history_inserts(&self, needle: &str, message: &str) {
        match self.kind {
            Kind::Sqlite => self
                .sqlite()
                .execute_batch(&format!(
                    "CREATE TRIGGER fail_poison BEFORE INSERT ON history \
                     WHEN NEW.payload LIKE '%{needle}%' \
                     BEGIN SELECT RAISE(ABORT, '{message}'); END;"
                ))
                .unwrap(),
            Kind::Postgres => self
                .pg()
                .batch_execute(&format!(
                    "CREATE OR REPLACE FUNCTION fail_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN IF NEW.payload LIKE '%{needle}%' THEN RAISE EXCEPTION '{message}'; \
                     END IF; RETURN NEW; END $$; \
                     CREATE TRIGGER fail_poison BEFORE INSERT ON history FOR EACH ROW \
                     EXECUTE FUNCTION fail_poison();"
                ))
                .unwrap(),
        }
    }

    pub fn allow_history(&self) {
        match self.kind {
            Kind::Sqlite => self
                .sqlite()
                .execute_batch("DROP TRIGGER fail_poison")
                .unwrap(),
            Kind::Postgres => self
                .pg()
                .batch_execute("DROP TRIGGER fail_poison ON history")
                .unwrap(),
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if self.kind == Kind::Postgres
            && let Ok(mut c) = Cluster::shared().client(&self.schema)
        {
            let _ = c.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema));
        }
    }
}

/// `#[test]` functions `on_sqlite::name` and `on_postgres::name` for each
/// `fn name(kind: Kind)` listed.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test]
            fn $name() {
                super::$name(super::Kind::Sqlite);
            })*
        }
        mod on_postgres {
            $(#[test]
            fn $name() {
                super::$name(super::Kind::Postgres);
            })*
        }
    };
}
