//! The PostgreSQL backend: every table in one schema (`storage.postgres.schema`)
//! of a database that several Switchboard nodes can share, written by this
//! node's writer thread over one connection.
//!
//! Why it looks like this:
//! - One connection, not a pool: the writer applies one batch at a time in
//!   one transaction (group commit) and answers in order, so a second
//!   connection would only reorder commits. Reads of a batch run on the same
//!   connection after its commit, so they see its writes.
//! - The `postgres` crate runs its own small tokio runtime on this thread's
//!   behalf; the shards never see it.
//! - The semantics are SQLite's (`sqlite.rs`), op for op: one bad operation
//!   fails alone (refused before any statement, or isolated and the batch
//!   retried once without it), nothing is half applied, a write answered
//!   `Ok` was committed. The differences are named where they are: text
//!   cannot hold NUL, history rows are ordered by a `seq` column instead of
//!   SQLite's rowid, and `storage.synchronous` maps to `synchronous_commit`.
//! - A lost connection is an episode, not a flood: the batch in flight is
//!   answered `storage_error` (its commit may or may not have happened; a
//!   client retry with the same record id is then a duplicate, never a second
//!   row), the error is logged once, later batches are refused at once
//!   without touching the network, and the writer reconnects with a growing
//!   backoff ([`Backend::reconnect`]). `/readyz` says not ready meanwhile.
//! - The schema is versioned in `switchboard_schema` with an ordered list of
//!   migrations, each applied in its own transaction under an advisory lock
//!   (several nodes may start at once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, Statement, Transaction};

use super::{
    Backend, InboxMsg, InboxQuota, Loaded, LoadedChannel, NewEpoch, Op, Outcome, Record, Refusal,
    Revocation, RevocationKind, StoreError, StoredPublication,
};
use crate::clock::now_ms;
use crate::config::{PgTls, PostgresConfig, SyncMode};

/// Schema migrations, in order: entry `i` brings the schema to version `i + 1`.
/// Never edit an entry once released; append a new one. Version 1 is the
/// SQLite schema's version 2 (history, inbox, revocations, meta), version 2
/// its version 3 (inbox senders and sizes).
pub const MIGRATIONS: &[&str] = &[
    // 1: history, offline inbox, revocations, the clean-shutdown token. The
    // ingest table is created separately: its name is configurable.
    r#"
    CREATE TABLE channels (
        channel TEXT PRIMARY KEY,
        epoch TEXT NOT NULL,
        top_offset BIGINT NOT NULL
    );
    CREATE TABLE history (
        seq BIGSERIAL NOT NULL,
        channel TEXT NOT NULL,
        "offset" BIGINT NOT NULL,
        payload TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        PRIMARY KEY (channel, "offset")
    );
    CREATE INDEX history_expires ON history (expires_at_ms);
    CREATE INDEX history_seq ON history (seq);
    CREATE TABLE inbox (
        id BIGSERIAL PRIMARY KEY,
        user_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL
    );
    CREATE INDEX inbox_user ON inbox (user_id, id);
    CREATE INDEX inbox_expires ON inbox (expires_at_ms);
    CREATE TABLE revocations (
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        revoked_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (kind, value)
    );
    CREATE INDEX revocations_expires ON revocations (expires_at_ms);
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 2: inbox quotas (the SQLite schema's version 3). Who sent each message
    // (NULL: the backend, which a client's message may not push out) and its
    // size in bytes, for the byte quotas per user and per sender.
    r#"
    ALTER TABLE inbox ADD COLUMN sender TEXT;
    ALTER TABLE inbox ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
    UPDATE inbox SET bytes = octet_length(payload);
    CREATE INDEX inbox_sender ON inbox (sender, bytes) WHERE sender IS NOT NULL;
    "#,
];

/// The `meta` key of the clean-shutdown token (as in SQLite).
const CLEAN_KEY: &str = "clean_shutdown";

/// The advisory lock key migrations take (any constant; "sb" in ASCII).
const MIGRATION_LOCK: i64 = 0x7362_0001;

/// First wait after a lost connection; it doubles up to `reconnect_max`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The schema version this build writes.
pub fn schema_version() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// Statements of the fixed tables, prepared once per connection.
struct Stmts {
    channel_get: Statement,
    channel_put: Statement,
    history_del_channel: Statement,
    history_del_one: Statement,
    history_insert: Statement,
    history_trim: Statement,
    inbox_insert: Statement,
    inbox_sender_bytes: Statement,
    inbox_user_usage: Statement,
    inbox_oldest_any: Statement,
    inbox_oldest_clients: Statement,
    inbox_delete: Statement,
    inbox_ack: Statement,
    inbox_read: Statement,
    revoke: Statement,
}

impl Stmts {
    fn prepare(c: &mut Client) -> Result<Stmts, postgres::Error> {
        Ok(Stmts {
            channel_get: c.prepare(
                "SELECT epoch = $2, top_offset FROM channels WHERE channel = $1 FOR UPDATE",
            )?,
            channel_put: c.prepare(
                "INSERT INTO channels (channel, epoch, top_offset) VALUES ($1, $2, $3) \
                 ON CONFLICT (channel) DO UPDATE SET epoch = excluded.epoch, \
                 top_offset = excluded.top_offset",
            )?,
            history_del_channel: c.prepare(
                "DELETE FROM history WHERE channel = $1 RETURNING octet_length(payload)::BIGINT",
            )?,
            history_del_one: c.prepare(
                r#"DELETE FROM history WHERE channel = $1 AND "offset" = $2
                   RETURNING octet_length(payload)::BIGINT"#,
            )?,
            history_insert: c.prepare(
                r#"INSERT INTO history (channel, "offset", payload, at_ms, expires_at_ms)
                   VALUES ($1, $2, $3, $4, $5)"#,
            )?,
            history_trim: c.prepare(
                r#"DELETE FROM history WHERE channel = $1 AND "offset" <= $2
                   RETURNING octet_length(payload)::BIGINT"#,
            )?,
            inbox_insert: c.prepare(
                "INSERT INTO inbox (user_id, payload, created_at_ms, expires_at_ms, sender, bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )?,
            inbox_sender_bytes: c
                .prepare("SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM inbox WHERE sender = $1")?,
            inbox_user_usage: c.prepare(
                "SELECT COUNT(*)::BIGINT, COALESCE(SUM(bytes), 0)::BIGINT FROM inbox \
                 WHERE user_id = $1",
            )?,
            inbox_oldest_any: c
                .prepare("SELECT id, bytes FROM inbox WHERE user_id = $1 ORDER BY id")?,
            inbox_oldest_clients: c.prepare(
                "SELECT id, bytes FROM inbox WHERE user_id = $1 AND sender IS NOT NULL \
                 ORDER BY id",
            )?,
            inbox_delete: c.prepare("DELETE FROM inbox WHERE id = ANY($1)")?,
            inbox_ack: c.prepare("DELETE FROM inbox WHERE id = $1 AND user_id = $2")?,
            inbox_read: c.prepare(
                "SELECT id, payload, created_at_ms, expires_at_ms FROM inbox \
                 WHERE user_id = $1 AND expires_at_ms > $2 ORDER BY id LIMIT $3",
            )?,
            revoke: c.prepare(
                "INSERT INTO revocations (kind, value, revoked_at_ms, expires_at_ms, reason) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, value) DO UPDATE SET \
                 reason = CASE WHEN excluded.revoked_at_ms >= revocations.revoked_at_ms \
                 THEN excluded.reason ELSE revocations.reason END, \
                 revoked_at_ms = GREATEST(revocations.revoked_at_ms, excluded.revoked_at_ms), \
                 expires_at_ms = GREATEST(revocations.expires_at_ms, excluded.expires_at_ms)",
            )?,
        })
    }
}

/// The statements of one ingest table (its name is not a parameter).
struct IngestStmts {
    find: Statement,
    insert: Statement,
    records: Statement,
    /// `n` ids from the table's sequence, ascending.
    ids: Statement,
    /// The table's id sequence, for `ids`.
    seq: String,
    /// Many rows in one statement (arrays through `unnest`), with their ids.
    insert_many: Statement,
}

/// Why one op failed inside a transaction.
enum Fail {
    /// Refused before any statement ran: the transaction goes on.
    Invalid(StoreError),
    /// A statement failed: the transaction must be rolled back.
    Db(postgres::Error),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Self {
        Fail::Db(e)
    }
}

type OpResult = Result<Outcome, Arc<StoreError>>;

/// A committed transaction's outcomes (op index, outcome), or the index of
/// the op whose statement failed (`None`: BEGIN or COMMIT failed) and why.
type Attempt = Result<Vec<(usize, Outcome)>, (Option<usize>, postgres::Error)>;

/// A live connection and what was prepared on it.
struct Live {
    client: Client,
    stmts: Stmts,
    tables: HashMap<Arc<str>, IngestStmts>,
}

/// The connection is down: since when, and when to try again.
struct Down {
    since: Instant,
    next_try: Instant,
    backoff: Duration,
    attempts: u32,
    /// The last reconnection failure logged: a new kind of failure (the
    /// server answers again but refuses us) is logged once, a repeat is not.
    said: Option<String>,
}

pub struct PostgresBackend {
    cfg: PostgresConfig,
    /// Parsed `url`, with the timeout applied.
    pg: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    live: Option<Live>,
    down: Option<Down>,
    /// Where we are connected, without a password (for logs).
    describe: String,
    /// Ingest tables created so far (created again after a reconnect, in
    /// case the database was replaced).
    ingest_tables: Vec<Arc<str>>,
    sync: SyncMode,
    history_bytes: u64,
    history_budget: u64,
}

impl PostgresBackend {
    /// Connect (retrying for `start_retry` if the database is unreachable),
    /// create the schema if missing, bring it up to date and create `ingest_table`.
    pub fn open(
        cfg: &PostgresConfig,
        sync: SyncMode,
        ingest_table: &str,
    ) -> Result<PostgresBackend, StoreError> {
        Self::open_waiting(cfg, sync, ingest_table, &mut || {})
    }

    /// [`Self::open`], calling `on_wait` once before it starts waiting for
    /// an unreachable database (the server writes out its held start-up
    /// log lines then, so the wait is visible while it lasts).
    pub fn open_waiting(
        cfg: &PostgresConfig,
        sync: SyncMode,
        ingest_table: &str,
        on_wait: &mut dyn FnMut(),
    ) -> Result<PostgresBackend, StoreError> {
        let (pg, tls) = client_config(cfg)?;
        let describe = describe(&pg, &cfg.schema);
        let mut b = PostgresBackend {
            cfg: cfg.clone(),
            pg,
            tls,
            live: None,
            down: None,
            describe,
            ingest_tables: vec![Arc::from(ingest_table)],
            sync,
            history_bytes: 0,
            history_budget: u64::MAX,
        };
        let deadline = Instant::now() + cfg.start_retry;
        let mut backoff = FIRST_BACKOFF;
        let mut said = false;
        loop {
            match b.connect() {
                Ok(live) => {
                    b.live = Some(live);
                    break;
                }
                // Only an unreachable server is worth waiting for; a wrong
                // password or a schema too new will not fix itself.
                Err(e) if is_unreachable(&e) && Instant::now() + backoff < deadline => {
                    if !said {
                        on_wait();
                        log::warn!(
                            "storage: cannot reach PostgreSQL at {} ({e}); retrying for up to {:?}",
                            b.describe,
                            cfg.start_retry
                        );
                        said = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(cfg.reconnect_max);
                }
                Err(e) => return Err(e),
            }
        }
        b.history_bytes = b.count_history_bytes()?;
        Ok(b)
    }

    /// `user@host:port/db, schema s` (never the password).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// See `SqliteBackend::set_history_budget`.
    pub fn set_history_budget(&mut self, bytes: u64) {
        self.history_budget = bytes;
    }

    /// Bytes of publication text stored in `history`.
    pub fn history_bytes(&self) -> u64 {
        self.history_bytes
    }

    /// The schema version in the database.
    pub fn version(&mut self) -> Result<i32, StoreError> {
        let live = self.live_mut()?;
        let row = live
            .client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM switchboard_schema",
                &[],
            )
            .map_err(StoreError::Pg)?;
        Ok(row.get(0))
    }

    fn live_mut(&mut self) -> Result<&mut Live, StoreError> {
        self.live.as_mut().ok_or(StoreError::Unavailable)
    }

    /// Open a connection and make it ready: session settings, schema,
    /// migrations, prepared statements, ingest tables.
    fn connect(&self) -> Result<Live, StoreError> {
        let connected = match &self.tls {
            None => self.pg.connect(postgres::NoTls),
            Some(tls) => self.pg.connect(tls.clone()),
        };
        let mut client = connected.map_err(|err| StoreError::PgConnect {
            target: self.describe.clone(),
            err,
        })?;
        let schema = quote_ident(&self.cfg.schema);
        let timeout_ms = self.cfg.statement_timeout.as_millis();
        let commit = match self.sync {
            SyncMode::Full => "on",
            SyncMode::Normal => "off",
        };
        let setup = format!(
            "SET statement_timeout = {timeout_ms}; \
             SET synchronous_commit = {commit}; \
             SET client_min_messages = warning; \
             CREATE SCHEMA IF NOT EXISTS {schema}; \
             SET search_path TO {schema};"
        );
        // Two nodes starting at once may both try CREATE SCHEMA; the loser
        // sees a unique violation: it exists now, go on.
        if let Err(e) = client.batch_execute(&setup) {
            if e.code() != Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
                return Err(StoreError::Pg(e));
            }
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {timeout_ms}; SET synchronous_commit = {commit}; \
                     SET search_path TO {schema};"
                ))
                .map_err(StoreError::Pg)?;
        }
        migrate(&mut client, &self.describe)?;
        let stmts = Stmts::prepare(&mut client).map_err(StoreError::Pg)?;
        let mut live = Live {
            client,
            stmts,
            tables: HashMap::new(),
        };
        for t in &self.ingest_tables {
            ensure_table(&mut live, t).map_err(StoreError::Pg)?;
        }
        Ok(live)
    }

    fn count_history_bytes(&mut self) -> Result<u64, StoreError> {
        let live = self.live_mut()?;
        let row = live
            .client
            .query_one(
                "SELECT COALESCE(SUM(octet_length(payload)), 0)::BIGINT FROM history",
                &[],
            )
            .map_err(StoreError::Pg)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// After `err`: if the connection is gone, start an episode (logged
    /// once) and return the error the batch is answered with.
    fn note_failure(&mut self, err: postgres::Error) -> StoreError {
        let lost = err.is_closed()
            || self.live.as_ref().is_none_or(|l| l.client.is_closed())
            || is_connection_code(&err);
        if !lost {
            return StoreError::Pg(err);
        }
        self.live = None;
        if self.down.is_none() {
            log::error!(
                "storage: lost the connection to PostgreSQL at {} ({err}); requests are \
                 answered storage_error until it is back, reconnecting",
                self.describe
            );
            let now = Instant::now();
            self.down = Some(Down {
                since: now,
                next_try: now,
                backoff: FIRST_BACKOFF,
                attempts: 0,
                said: None,
            });
        }
        StoreError::Lost(err)
    }

    /// One write transaction over `ops[i]` for `i` in `todo`.
    fn transaction(
        &mut self,
        ops: &[Op],
        todo: &[usize],
        results: &mut [Option<OpResult>],
        relaxed: bool,
    ) -> Attempt {
        let budget = self.history_budget;
        let bytes = self.history_bytes;
        let Some(live) = self.live.as_mut() else {
            return Ok(Vec::new()); // the caller checked
        };
        let Live {
            client,
            stmts,
            tables,
        } = live;
        let mut tx = client.transaction().map_err(|e| (None, e))?;
        if relaxed {
            // History copies and inbox acks alone: see `apply`.
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .map_err(|e| (None, e))?;
        }
        let mut done = Vec::with_capacity(todo.len());
        let mut delta: i64 = 0;
        // Records first, a few statements per table instead of one round
        // trip each (they touch no table the other ops touch).
        let mut grouped = std::collections::HashSet::new();
        for (table, members) in ingest_groups(ops, todo, tables, results) {
            let Some(sql) = tables.get(&table) else {
                continue;
            };
            // A failing group must not fail its good records: back to the
            // savepoint, and the loop below writes them one by one, which
            // isolates the one that fails.
            tx.batch_execute("SAVEPOINT records")
                .map_err(|e| (None, e))?;
            match insert_records(&mut tx, sql, ops, &members) {
                Ok(outcomes) => {
                    for (i, outcome) in outcomes {
                        grouped.insert(i);
                        done.push((i, outcome));
                    }
                }
                Err(e) => {
                    log::debug!("storage: records of {table} one by one after: {e}");
                    tx.batch_execute("ROLLBACK TO SAVEPOINT records")
                        .map_err(|e| (None, e))?;
                }
            }
        }
        for &i in todo {
            if grouped.contains(&i) {
                continue;
            }
            let Some(op) = ops.get(i) else { continue };
            match write(&mut tx, stmts, tables, op, &mut delta) {
                Ok(outcome) => done.push((i, outcome)),
                Err(Fail::Invalid(e)) => {
                    if let Some(r) = results.get_mut(i) {
                        *r = Some(Err(Arc::new(e)));
                    }
                }
                Err(Fail::Db(e)) => return Err((Some(i), e)), // rolls back on drop
            }
        }
        let excess = bytes.saturating_add_signed(delta).saturating_sub(budget);
        if excess > 0 {
            delta -= evict_oldest(&mut tx, excess).map_err(|e| (None, e))?;
        }
        tx.commit().map_err(|e| (None, e))?;
        self.history_bytes = self.history_bytes.saturating_add_signed(delta);
        Ok(done)
    }

    fn read(&mut self, op: &Op) -> Result<Outcome, StoreError> {
        let live = self.live_mut()?;
        match op {
            Op::Inbox { user, limit } => {
                let rows = live
                    .client
                    .query(&live.stmts.inbox_read, &[&&**user, &now_ms(), &sat(*limit)])
                    .map_err(StoreError::Pg)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    out.push(InboxMsg {
                        id: r.try_get(0).map_err(StoreError::Pg)?,
                        user: user.to_string(),
                        payload: r
                            .try_get::<_, String>(1)
                            .map_err(StoreError::Pg)?
                            .into_bytes(),
                        created_at_ms: r.try_get(2).map_err(StoreError::Pg)?,
                        expires_at_ms: r.try_get(3).map_err(StoreError::Pg)?,
                    });
                }
                Ok(Outcome::Inbox(out))
            }
            Op::Records {
                table,
                after_id,
                limit,
            } => {
                // A table nobody wrote to is not created by reading it.
                let st = match live.tables.get(table) {
                    Some(st) => st.records.clone(),
                    None => live
                        .client
                        .prepare(&format!(
                            "SELECT id, type, user_id, connection_id, client_id, received_at, \
                             data FROM {} WHERE id > $1 ORDER BY id LIMIT $2",
                            quote_ident(table)
                        ))
                        .map_err(StoreError::Pg)?,
                };
                let rows = live
                    .client
                    .query(&st, &[after_id, &sat(*limit)])
                    .map_err(StoreError::Pg)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    out.push(Record {
                        id: r.try_get(0).map_err(StoreError::Pg)?,
                        kind: r.try_get(1).map_err(StoreError::Pg)?,
                        user: r.try_get(2).map_err(StoreError::Pg)?,
                        connection: r.try_get(3).map_err(StoreError::Pg)?,
                        client_id: r.try_get(4).map_err(StoreError::Pg)?,
                        received_at_ms: r.try_get(5).map_err(StoreError::Pg)?,
                        data: r.try_get(6).map_err(StoreError::Pg)?,
                    });
                }
                Ok(Outcome::Records(out))
            }
            _ => Err(StoreError::NoResult),
        }
    }

    /// A transaction for `load`, `prune` and `mark`, with the episode
    /// bookkeeping of a lost connection.
    fn with_tx<T>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let live = self.live_mut()?;
        let run = (|| {
            let mut tx = live.client.transaction()?;
            let v = f(&mut tx)?;
            tx.commit()?;
            Ok(v)
        })();
        run.map_err(|e| self.note_failure(e))
    }
}

impl Backend for PostgresBackend {
    fn apply(&mut self, ops: Vec<Op>) -> Vec<OpResult> {
        let mut results: Vec<Option<OpResult>> = ops.iter().map(|_| None).collect();
        if self.live.is_none() {
            // Down: answer at once, without a network round trip (the
            // writer calls `reconnect` between batches).
            let e = Arc::new(StoreError::Unavailable);
            return ops.iter().map(|_| Err(e.clone())).collect();
        }
        // Ingest tables first, each in its own autocommit statement.
        for (i, op) in ops.iter().enumerate() {
            if let Op::Ingest { table, .. } = op
                && let Some(live) = self.live.as_mut()
                && !live.tables.contains_key(table)
            {
                match ensure_table(live, table) {
                    Ok(()) => self.ingest_tables.push(table.clone()),
                    Err(e) => {
                        let e = self.note_failure(e);
                        results[i] = Some(Err(Arc::new(e)));
                    }
                }
            }
        }
        let mut todo: Vec<usize> = (0..ops.len())
            .filter(|&i| results[i].is_none() && !ops[i].is_read())
            .collect();
        // As in SQLite: only batches whose commit someone is told about
        // wait for the WAL flush (`synchronous_commit = on`).
        let relaxed = self.sync == SyncMode::Full
            && !todo.iter().any(|&i| {
                matches!(
                    ops[i],
                    Op::Ingest { .. } | Op::InboxPut { .. } | Op::Revoke(_)
                )
            });
        if !todo.is_empty() && self.live.is_some() {
            let mut attempt = self.transaction(&ops, &todo, &mut results, relaxed);
            if let Err((Some(bad), e)) = attempt {
                let e = self.note_failure(e);
                let lost = matches!(e, StoreError::Lost(_));
                results[bad] = Some(Err(Arc::new(e)));
                todo.retain(|&i| i != bad && results[i].is_none());
                if lost {
                    // Not the op's fault: the others get "unavailable".
                    let e = Arc::new(StoreError::Unavailable);
                    for &i in &todo {
                        results[i] = Some(Err(e.clone()));
                    }
                    todo.clear();
                }
                attempt = if todo.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.transaction(&ops, &todo, &mut results, relaxed)
                };
            }
            match attempt {
                Ok(done) => {
                    for (i, outcome) in done {
                        results[i] = Some(Ok(outcome));
                    }
                }
                Err((_, e)) => {
                    let e = Arc::new(self.note_failure(e));
                    for &i in &todo {
                        results[i].get_or_insert_with(|| Err(e.clone()));
                    }
                }
            }
        }
        for (i, op) in ops.iter().enumerate() {
            if op.is_read() {
                results[i] = Some(match self.read(op) {
                    Ok(o) => Ok(o),
                    Err(StoreError::Pg(e)) => Err(Arc::new(self.note_failure(e))),
                    Err(e) => Err(Arc::new(e)),
                });
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Arc::new(StoreError::NoResult))))
            .collect()
    }

    fn load(&mut self, now_ms: i64) -> Result<Loaded, StoreError> {
        self.with_tx(|tx| {
            // One consistent snapshot of every table.
            tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
            let mut channels: Vec<LoadedChannel> = Vec::new();
            for r in tx.query(
                "SELECT channel, epoch, top_offset FROM channels ORDER BY channel COLLATE \"C\"",
                &[],
            )? {
                let top: i64 = r.try_get(2)?;
                let Ok(top_offset) = u64::try_from(top) else {
                    continue; // not written by Switchboard
                };
                channels.push(LoadedChannel {
                    channel: r.try_get(0)?,
                    epoch: r.try_get(1)?,
                    top_offset,
                    publications: Vec::new(),
                });
            }
            let rows = tx.query(
                r#"SELECT channel, "offset", payload, at_ms, expires_at_ms FROM history
                   WHERE expires_at_ms > $1 ORDER BY channel COLLATE "C", "offset""#,
                &[&now_ms],
            )?;
            let mut at = 0; // both lists ascend by channel (byte order): merge
            for r in rows {
                let channel: &str = r.try_get(0)?;
                while at < channels.len() && channels[at].channel.as_str() < channel {
                    at += 1;
                }
                let Some(ch) = channels.get_mut(at).filter(|c| c.channel == channel) else {
                    continue; // history without channel meta: unusable
                };
                let Ok(offset) = u64::try_from(r.try_get::<_, i64>(1)?) else {
                    continue;
                };
                ch.publications.push(StoredPublication {
                    offset,
                    payload: Arc::from(r.try_get::<_, &str>(2)?.as_bytes()),
                    at_ms: r.try_get(3)?,
                    expires_at_ms: r.try_get(4)?,
                });
            }
            let mut revocations = Vec::new();
            for r in tx.query(
                "SELECT kind, value, revoked_at_ms, expires_at_ms, reason FROM revocations \
                 WHERE expires_at_ms > $1 ORDER BY kind COLLATE \"C\", value COLLATE \"C\"",
                &[&now_ms],
            )? {
                let Some(kind) = RevocationKind::parse(r.try_get(0)?) else {
                    continue; // written by a newer build
                };
                revocations.push(Revocation {
                    kind,
                    value: r.try_get(1)?,
                    revoked_at_ms: r.try_get(2)?,
                    expires_at_ms: r.try_get(3)?,
                    reason: r.try_get(4)?,
                });
            }
            let clean_token = tx
                .query_opt("SELECT value FROM meta WHERE key = $1", &[&CLEAN_KEY])?
                .map(|r| r.try_get(0))
                .transpose()?;
            Ok(Loaded {
                channels,
                revocations,
                clean_token,
            })
        })
    }

    fn prune(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        let (n, freed) = self.with_tx(|tx| {
            let mut n = 0usize;
            let mut freed = 0i64;
            for r in tx.query(
                "DELETE FROM history WHERE expires_at_ms <= $1 \
                 RETURNING octet_length(payload)::BIGINT",
                &[&now_ms],
            )? {
                freed = freed.saturating_add(r.try_get::<_, i64>(0)?);
                n += 1;
            }
            for sql in [
                "DELETE FROM inbox WHERE expires_at_ms <= $1",
                "DELETE FROM revocations WHERE expires_at_ms <= $1",
            ] {
                n += usize::try_from(tx.execute(sql, &[&now_ms])?).unwrap_or(usize::MAX);
            }
            Ok((n, freed))
        })?;
        self.history_bytes = self.history_bytes.saturating_add_signed(-freed);
        Ok(n)
    }

    fn mark(&mut self, epochs: &[NewEpoch], clean: Option<&str>) -> Result<(), StoreError> {
        let freed = self.with_tx(|tx| {
            // Durable whatever `storage.synchronous` says (see the trait).
            tx.batch_execute("SET LOCAL synchronous_commit = on")?;
            let mut freed = 0i64;
            for e in epochs {
                tx.execute(
                    "UPDATE channels SET epoch = $2 WHERE channel = $1",
                    &[&&*e.channel, &&*e.epoch],
                )?;
                for r in tx.query(
                    "DELETE FROM history WHERE channel = $1 RETURNING octet_length(payload)::BIGINT",
                    &[&&*e.channel],
                )? {
                    freed = freed.saturating_add(r.try_get::<_, i64>(0)?);
                }
            }
            match clean {
                Some(token) => tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&CLEAN_KEY, &token],
                )?,
                None => tx.execute("DELETE FROM meta WHERE key = $1", &[&CLEAN_KEY])?,
            };
            Ok(freed)
        })?;
        self.history_bytes = self.history_bytes.saturating_add_signed(-freed);
        Ok(())
    }

    fn available(&self) -> bool {
        self.live.is_some()
    }

    fn set_history_budget(&mut self, bytes: u64) {
        PostgresBackend::set_history_budget(self, bytes);
    }

    fn history_bytes(&self) -> u64 {
        PostgresBackend::history_bytes(self)
    }

    fn reconnect(&mut self) -> bool {
        if self.live.is_some() {
            return true;
        }
        let now = Instant::now();
        let Some(down) = self.down.as_mut() else {
            // Gone without an episode (cannot happen): start one.
            self.down = Some(Down {
                since: now,
                next_try: now,
                backoff: FIRST_BACKOFF,
                attempts: 0,
                said: None,
            });
            return false;
        };
        if now < down.next_try {
            return false;
        }
        down.attempts += 1;
        match self.connect() {
            Ok(live) => {
                self.live = Some(live);
                if let Some(d) = self.down.take() {
                    log::warn!(
                        "storage: reconnected to PostgreSQL at {} after {:.1} s ({} attempts)",
                        self.describe,
                        d.since.elapsed().as_secs_f64(),
                        d.attempts
                    );
                }
                // Another node may have changed history meanwhile.
                if let Ok(bytes) = self.count_history_bytes() {
                    self.history_bytes = bytes;
                }
                true
            }
            Err(e) => {
                if let Some(d) = self.down.as_mut() {
                    // Unreachable is what the episode's first line said;
                    // anything else (a refused login, a schema too new)
                    // would otherwise stay invisible.
                    let kind = if is_unreachable(&e) {
                        "unreachable".to_owned()
                    } else {
                        e.to_string()
                    };
                    if d.said.as_deref() != Some(kind.as_str()) {
                        if kind == "unreachable" {
                            log::debug!("storage: reconnecting to PostgreSQL: {e}");
                        } else {
                            log::error!("storage: reconnecting to PostgreSQL: {e}");
                        }
                        d.said = Some(kind);
                    }
                    d.next_try = Instant::now() + d.backoff;
                    d.backoff = (d.backoff * 2).min(self.cfg.reconnect_max);
                }
                false
            }
        }
    }

    fn retry_in(&self) -> Option<Duration> {
        self.down
            .as_ref()
            .map(|d| d.next_try.saturating_duration_since(Instant::now()))
    }
}

/// The driver's configuration from `[storage.postgres]`, and the TLS
/// connector when `tls` asks for one.
fn client_config(
    cfg: &PostgresConfig,
) -> Result<
    (
        postgres::Config,
        Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ),
    StoreError,
> {
    let mut pg: postgres::Config = cfg.url.parse().map_err(|err| StoreError::PgConfig {
        message: format!("storage.postgres.url: {err}"),
    })?;
    pg.connect_timeout(cfg.connect_timeout);
    // A silent peer (a cable pulled, a host gone) is noticed in seconds, not hours.
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
    // And data sent but never acknowledged by the peer (a cut while a
    // batch is in flight): give up after 20 s instead of TCP's ~15 min.
    pg.tcp_user_timeout(Duration::from_secs(20));
    // `tls` decides, whatever the URL's `sslmode` says.
    let tls = match cfg.tls {
        PgTls::Disable => {
            pg.ssl_mode(postgres::config::SslMode::Disable);
            None
        }
        PgTls::VerifyFull => {
            pg.ssl_mode(postgres::config::SslMode::Require);
            Some(tls_connector(cfg)?)
        }
    };
    Ok((pg, tls))
}

/// A plain connection for the command-line tools (`decrypt`,
/// `migrate-store`): the same URL, TLS and timeouts as the server, the
/// search path set to `schema`, nothing created. `read_only`: every
/// transaction is read-only (safe beside a running server).
pub fn connect_tool(cfg: &PostgresConfig, read_only: bool) -> Result<(Client, String), StoreError> {
    let (pg, tls) = client_config(cfg)?;
    let target = describe(&pg, &cfg.schema);
    let connected = match tls {
        None => pg.connect(postgres::NoTls),
        Some(tls) => pg.connect(tls),
    };
    let mut client = connected.map_err(|err| StoreError::PgConnect {
        target: target.clone(),
        err,
    })?;
    let mut setup = format!(
        "SET search_path TO {}; SET statement_timeout = {};",
        quote_ident(&cfg.schema),
        cfg.statement_timeout.as_millis()
    );
    if read_only {
        setup.push_str(" SET default_transaction_read_only = on;");
    }
    client.batch_execute(&setup).map_err(StoreError::Pg)?;
    Ok((client, target))
}

/// Bring a schema up to date on a connection from [`connect_tool`]
/// (creating the schema if missing), as the server does at start.
pub fn prepare_schema(
    client: &mut Client,
    cfg: &PostgresConfig,
    target: &str,
) -> Result<(), StoreError> {
    let schema = quote_ident(&cfg.schema);
    if let Err(e) = client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        && e.code() != Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
    {
        return Err(StoreError::Pg(e));
    }
    migrate(client, target)
}

/// The DDL of an ingest table (and its dedup index) in the current schema.
pub fn ingest_table_ddl(table: &str) -> String {
    let t = quote_ident(table);
    let index = quote_ident(&format!("{table}_user_client"));
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
            id BIGSERIAL PRIMARY KEY,
            type TEXT NOT NULL,
            user_id TEXT NOT NULL,
            connection_id TEXT NOT NULL,
            client_id TEXT,
            received_at BIGINT NOT NULL, -- ms since the Unix epoch
            data TEXT NOT NULL           -- JSON
        );
        CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {t} (user_id, client_id)
            WHERE client_id IS NOT NULL;"
    )
}

/// The records of `todo` that can go into one statement per table: their
/// text checked here (a refused one gets its error in `results` and is left
/// out), their table's statements ready. In `todo` order.
fn ingest_groups(
    ops: &[Op],
    todo: &[usize],
    tables: &HashMap<Arc<str>, IngestStmts>,
    results: &mut [Option<OpResult>],
) -> Vec<(Arc<str>, Vec<usize>)> {
    let mut groups: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
    for &i in todo {
        let Some(op @ Op::Ingest { table, .. }) = ops.get(i) else {
            continue;
        };
        if !tables.contains_key(table) {
            continue; // answered by `write` (ensure_table failed)
        }
        if let Err(Fail::Invalid(e)) = check_ingest(op) {
            if let Some(r) = results.get_mut(i) {
                *r = Some(Err(Arc::new(e)));
            }
            continue;
        }
        match groups.iter_mut().find(|(t, _)| t == table) {
            Some((_, members)) => members.push(i),
            None => groups.push((table.clone(), vec![i])),
        }
    }
    groups
}

/// The text of a record, checked (UTF-8, no NUL).
fn check_ingest(op: &Op) -> Result<&str, Fail> {
    let Op::Ingest {
        kind,
        user,
        connection,
        client_id,
        data,
        ..
    } = op
    else {
        return Err(Fail::Invalid(StoreError::NoResult));
    };
    let data = text(data, "the record's data")?;
    for (s, what) in [
        (kind.as_str(), "the record's type"),
        (&**user, "the user id"),
        (connection.as_str(), "the connection id"),
        (client_id.as_deref().unwrap_or(""), "the record id"),
    ] {
        no_nul(s, what)?;
    }
    Ok(data)
}

/// Insert the records `members` (checked, one table) in one statement:
/// ids taken from the sequence first (ascending, in request order), then
/// every row through `unnest` with `ON CONFLICT DO NOTHING`. A row that
/// was not inserted is a duplicate (of an earlier record, of one before it
/// in this batch, or of one another node committed): its id is looked up.
/// Three round trips for a batch, plus one per duplicate.
fn insert_records(
    tx: &mut Transaction<'_>,
    sql: &IngestStmts,
    ops: &[Op],
    members: &[usize],
) -> Result<Vec<(usize, Outcome)>, postgres::Error> {
    let n = i32::try_from(members.len()).unwrap_or(i32::MAX);
    let ids: Vec<i64> = tx
        .query(&sql.ids, &[&sql.seq, &n])?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut cols = (
        Vec::with_capacity(members.len()),
        Vec::with_capacity(members.len()),
        Vec::with_capacity(members.len()),
        Vec::with_capacity(members.len()),
        Vec::with_capacity(members.len()),
        Vec::with_capacity(members.len()),
        Vec::with_capacity(members.len()),
    );
    let mut rows = Vec::with_capacity(members.len());
    for (&i, &id) in members.iter().zip(&ids) {
        let Some(
            op @ Op::Ingest {
                kind,
                user,
                connection,
                client_id,
                received_at_ms,
                ..
            },
        ) = ops.get(i)
        else {
            continue;
        };
        let Ok(data) = check_ingest(op) else { continue };
        cols.0.push(id);
        cols.1.push(kind.as_str());
        cols.2.push(&**user);
        cols.3.push(connection.as_str());
        cols.4.push(client_id.as_deref());
        cols.5.push(*received_at_ms);
        cols.6.push(data);
        rows.push((i, id, user, client_id));
    }
    let inserted: std::collections::HashSet<i64> = tx
        .query(
            &sql.insert_many,
            &[
                &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6,
            ],
        )?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, id, user, client_id) in rows {
        if inserted.contains(&id) {
            out.push((
                i,
                Outcome::Ingested {
                    id,
                    duplicate: false,
                },
            ));
        } else {
            let r = tx.query_one(&sql.find, &[&&**user, client_id])?;
            out.push((
                i,
                Outcome::Ingested {
                    id: r.try_get(0)?,
                    duplicate: true,
                },
            ));
        }
    }
    Ok(out)
}

/// Apply one write op inside the open transaction.
fn write(
    tx: &mut Transaction<'_>,
    st: &Stmts,
    tables: &HashMap<Arc<str>, IngestStmts>,
    op: &Op,
    history_delta: &mut i64,
) -> Result<Outcome, Fail> {
    match op {
        Op::Ingest {
            table,
            kind,
            user,
            connection,
            client_id,
            received_at_ms,
            data,
        } => {
            let data = text(data, "the record's data")?;
            for (s, what) in [
                (kind.as_str(), "the record's type"),
                (&**user, "the user id"),
                (connection.as_str(), "the connection id"),
                (client_id.as_deref().unwrap_or(""), "the record id"),
            ] {
                no_nul(s, what)?;
            }
            let Some(sql) = tables.get(table) else {
                return Err(Fail::Invalid(StoreError::NoResult)); // ensure_table failed
            };
            // Inserted first, looked up only on a conflict: one round trip
            // per new record (the common case) instead of two. A duplicate
            // uses up a sequence number (ids may skip; docs/STORAGE.md).
            let params: [&(dyn ToSql + Sync); 6] =
                [kind, &&**user, connection, client_id, received_at_ms, &data];
            match tx.query_opt(&sql.insert, &params)? {
                Some(r) => Ok(Outcome::Ingested {
                    id: r.try_get(0)?,
                    duplicate: false,
                }),
                None => {
                    // The same (user, record id) is there, committed by this
                    // batch, an earlier one, or another node (the insert
                    // waited for that commit): a duplicate.
                    let r = tx.query_one(&sql.find, &[&&**user, client_id])?;
                    Ok(Outcome::Ingested {
                        id: r.try_get(0)?,
                        duplicate: true,
                    })
                }
            }
        }
        Op::Publication {
            channel,
            epoch,
            offset,
            payload,
            at_ms,
            expires_at_ms,
            keep,
        } => {
            let offset = i64::try_from(*offset).map_err(|_| {
                Fail::Invalid(StoreError::OutOfRange {
                    what: "publication offset",
                    value: *offset,
                })
            })?;
            let payload = text(payload, "the publication")?;
            no_nul(channel, "the channel name")?;
            no_nul(epoch, "the epoch")?;
            let (channel, epoch) = (&**channel, &**epoch);
            let known: Option<(bool, i64)> =
                match tx.query_opt(&st.channel_get, &[&channel, &epoch])? {
                    Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
                    None => None,
                };
            let top = match known {
                Some((true, top)) => top.max(offset), // a late one keeps the top
                Some((false, _)) => {
                    // A new epoch starts the offsets over: the old epoch's rows go.
                    *history_delta -= sum_returned(tx, &st.history_del_channel, &[&channel])?;
                    offset
                }
                None => offset,
            };
            if known != Some((true, top)) {
                tx.execute(&st.channel_put, &[&channel, &epoch, &top])?;
            }
            *history_delta -= sum_returned(tx, &st.history_del_one, &[&channel, &offset])?;
            tx.execute(
                &st.history_insert,
                &[&channel, &offset, &payload, at_ms, expires_at_ms],
            )?;
            *history_delta += sat(payload.len());
            let floor = offset.saturating_sub(sat(*keep));
            *history_delta -= sum_returned(tx, &st.history_trim, &[&channel, &floor])?;
            Ok(Outcome::Done)
        }
        Op::InboxPut {
            user,
            sender,
            payload,
            created_at_ms,
            expires_at_ms,
            quota,
        } => {
            let bytes = payload.len();
            let payload = text(payload, "the inbox message")?;
            no_nul(user, "the user id")?;
            if let Some(s) = sender {
                no_nul(s, "the sender")?;
            }
            let sender = sender.as_deref();
            if let Some(refusal) = make_room(tx, st, user, sender, bytes, quota)? {
                return Ok(Outcome::Refused(refusal));
            }
            let r = tx.query_one(
                &st.inbox_insert,
                &[
                    &&**user,
                    &payload,
                    created_at_ms,
                    expires_at_ms,
                    &sender,
                    &sat(bytes),
                ],
            )?;
            let id: i64 = r.try_get(0)?;
            Ok(Outcome::Stored { id })
        }
        Op::InboxAck { user, id } => {
            let n = tx.execute(&st.inbox_ack, &[id, &&**user])?;
            Ok(Outcome::Acked { found: n > 0 })
        }
        Op::Revoke(r) => {
            no_nul(&r.value, "the revoked value")?;
            no_nul(&r.reason, "the reason")?;
            tx.execute(
                &st.revoke,
                &[
                    &r.kind.as_str(),
                    &r.value,
                    &r.revoked_at_ms,
                    &r.expires_at_ms,
                    &r.reason,
                ],
            )?;
            Ok(Outcome::Done)
        }
        Op::Inbox { .. } | Op::Records { .. } => Err(Fail::Invalid(StoreError::NoResult)),
    }
}

/// Check the quotas for a message of `bytes` from `sender` (`None`: the
/// backend) to `user` and delete what it pushes out, as in SQLite (the rule
/// is on [`InboxQuota`]); `Some` if it must be refused, with nothing deleted.
fn make_room(
    tx: &mut Transaction<'_>,
    st: &Stmts,
    user: &str,
    sender: Option<&str>,
    bytes: usize,
    quota: &InboxQuota,
) -> Result<Option<Refusal>, Fail> {
    let size = |v: i64| usize::try_from(v).unwrap_or(0);
    if bytes > quota.max_bytes_per_user {
        return Ok(Some(Refusal::TooLarge));
    }
    if let Some(s) = sender {
        let held: i64 = tx.query_one(&st.inbox_sender_bytes, &[&s])?.try_get(0)?;
        if size(held).saturating_add(bytes) > quota.max_bytes_per_sender {
            return Ok(Some(Refusal::SenderFull));
        }
    }
    let r = tx.query_one(&st.inbox_user_usage, &[&user])?;
    let (count, total): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
    let mut extra_count = (size(count) + 1).saturating_sub(quota.max_per_user);
    let mut extra_bytes = size(total)
        .saturating_add(bytes)
        .saturating_sub(quota.max_bytes_per_user);
    if extra_count == 0 && extra_bytes == 0 {
        return Ok(None);
    }
    // Oldest first; a client's message may push out only clients' messages.
    let candidates = if sender.is_some() {
        &st.inbox_oldest_clients
    } else {
        &st.inbox_oldest_any
    };
    let mut evict: Vec<i64> = Vec::new();
    for row in tx.query(candidates, &[&user])? {
        if extra_count == 0 && extra_bytes == 0 {
            break;
        }
        let (id, b): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        evict.push(id);
        extra_count = extra_count.saturating_sub(1);
        extra_bytes = extra_bytes.saturating_sub(size(b));
    }
    if extra_count > 0 || extra_bytes > 0 {
        return Ok(Some(Refusal::UserFull));
    }
    tx.execute(&st.inbox_delete, &[&evict])?;
    Ok(None)
}

/// Create an ingest table, its dedup index and its statements if missing
/// (outside any transaction, as in SQLite).
fn ensure_table(live: &mut Live, table: &Arc<str>) -> Result<(), postgres::Error> {
    if live.tables.contains_key(table) {
        return Ok(());
    }
    let t = quote_ident(table);
    let created = live.client.batch_execute(&ingest_table_ddl(table));
    // Two nodes creating it at once: the loser's catalog insert conflicts;
    // the table is there now.
    if let Err(e) = created
        && e.code() != Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
    {
        return Err(e);
    }
    let stmts = IngestStmts {
        find: live.client.prepare(&format!(
            "SELECT id FROM {t} WHERE user_id = $1 AND client_id = $2"
        ))?,
        insert: live.client.prepare(&format!(
            "INSERT INTO {t} (type, user_id, connection_id, client_id, received_at, data) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id, client_id) WHERE client_id IS NOT NULL DO NOTHING \
             RETURNING id"
        ))?,
        records: live.client.prepare(&format!(
            "SELECT id, type, user_id, connection_id, client_id, received_at, data FROM {t} \
             WHERE id > $1 ORDER BY id LIMIT $2"
        ))?,
        ids: live.client.prepare(
            "SELECT nextval($1::text::regclass) AS id FROM generate_series(1, $2::int) ORDER BY 1",
        )?,
        seq: live
            .client
            .query_one("SELECT pg_get_serial_sequence($1, 'id')", &[&t])?
            .try_get::<_, Option<String>>(0)?
            .unwrap_or_default(),
        insert_many: live.client.prepare(&format!(
            "INSERT INTO {t} (id, type, user_id, connection_id, client_id, received_at, data) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::bigint[], $7::text[]) \
             ON CONFLICT (user_id, client_id) WHERE client_id IS NOT NULL DO NOTHING \
             RETURNING id"
        ))?,
    };
    live.tables.insert(table.clone(), stmts);
    Ok(())
}

/// Apply the migrations the database does not have yet, each in its own
/// transaction, under an advisory lock so that nodes starting together
/// apply each one once.
fn migrate(client: &mut Client, target: &str) -> Result<(), StoreError> {
    let create = client.batch_execute(
        "CREATE TABLE IF NOT EXISTS switchboard_schema (
            version INTEGER PRIMARY KEY,
            applied_at_ms BIGINT NOT NULL
        )",
    );
    if let Err(e) = create
        && e.code() != Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
    {
        return Err(StoreError::Pg(e));
    }
    let supported = schema_version();
    loop {
        let mut tx = client.transaction().map_err(StoreError::Pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(StoreError::Pg)?;
        let found: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM switchboard_schema",
                &[],
            )
            .map_err(StoreError::Pg)?
            .get(0);
        if found > supported {
            return Err(StoreError::PgSchemaTooNew {
                target: target.to_owned(),
                found,
                supported,
            });
        }
        if found == supported {
            return tx.commit().map_err(StoreError::Pg);
        }
        let version = found + 1;
        let Some(sql) = usize::try_from(found).ok().and_then(|i| MIGRATIONS.get(i)) else {
            return Err(StoreError::NoResult);
        };
        let step = tx.batch_execute(sql).and_then(|()| {
            tx.execute(
                "INSERT INTO switchboard_schema (version, applied_at_ms) VALUES ($1, $2)",
                &[&version, &now_ms()],
            )
        });
        if let Err(err) = step.and_then(|_| tx.commit()) {
            return Err(StoreError::PgMigration { version, err });
        }
        log::info!("database {target}: schema version {version}");
    }
}

/// Delete the oldest history rows (by `seq`, the insertion order) until at
/// least `excess` bytes are freed; returns the bytes freed. As in SQLite.
fn evict_oldest(tx: &mut Transaction<'_>, excess: u64) -> Result<i64, postgres::Error> {
    let mut last = None;
    let mut freed = 0u64;
    // Walk in pages: the table may be large and only a prefix is wanted.
    let mut after = i64::MIN;
    'walk: loop {
        let rows = tx.query(
            "SELECT seq, octet_length(payload)::BIGINT FROM history WHERE seq > $1 \
             ORDER BY seq LIMIT 256",
            &[&after],
        )?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            let seq: i64 = r.try_get(0)?;
            after = seq;
            last = Some(seq);
            freed += u64::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0);
            if freed >= excess {
                break 'walk;
            }
        }
    }
    let Some(last) = last else { return Ok(0) };
    let mut sum = 0i64;
    for r in tx.query(
        "DELETE FROM history WHERE seq <= $1 RETURNING octet_length(payload)::BIGINT",
        &[&last],
    )? {
        sum = sum.saturating_add(r.try_get::<_, i64>(0)?);
    }
    Ok(sum)
}

/// The sum of the one integer column a `DELETE ... RETURNING` gives back.
fn sum_returned(
    tx: &mut Transaction<'_>,
    st: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<i64, postgres::Error> {
    let mut sum = 0i64;
    for r in tx.query(st, params)? {
        sum = sum.saturating_add(r.try_get::<_, i64>(0)?);
    }
    Ok(sum)
}

/// Text columns take UTF-8 only; PostgreSQL's text cannot hold NUL at all
/// (SQLite's can): refused before any statement, the batch goes on.
fn text<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, Fail> {
    let s = std::str::from_utf8(bytes)
        .map_err(|err| Fail::Invalid(StoreError::NotUtf8 { what, err }))?;
    no_nul(s, what)?;
    Ok(s)
}

fn no_nul(s: &str, what: &'static str) -> Result<(), Fail> {
    if s.contains('\0') {
        return Err(Fail::Invalid(StoreError::Nul { what }));
    }
    Ok(())
}

/// `"name"` with inner quotes doubled: safe for any name.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A count as an SQL integer (saturating: limits past i64::MAX mean "all").
fn sat(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Codes that mean the server ended the session (a shutdown, a crash, a
/// lost link): the connection will not serve again.
fn is_connection_code(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("08") || code.starts_with("57P")
    })
}

/// A connection attempt that failed because nothing answered (worth
/// waiting for at start), not because the server refused us.
fn is_unreachable(e: &StoreError) -> bool {
    match e {
        StoreError::PgConnect { err, .. } => err.as_db_error().is_none() || is_connection_code(err),
        _ => false,
    }
}

/// `user@host:port/db, schema s` without the password.
fn describe(pg: &postgres::Config, schema: &str) -> String {
    let host = pg
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(s) => s.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("?");
    let db = pg.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db} (schema {schema})")
}

/// rustls with the certificate authorities of `ca_file`; host names are verified.
fn tls_connector(
    cfg: &PostgresConfig,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let Some(path) = &cfg.ca_file else {
        return Err(StoreError::PgConfig {
            message: "storage.postgres.tls = \"verify-full\" needs storage.postgres.ca_file".into(),
        });
    };
    let bad = |message: String| StoreError::PgConfig {
        message: format!("storage.postgres.ca_file {}: {message}", path.display()),
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
