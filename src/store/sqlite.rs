//! The SQLite backend: one file `<data_dir>/switchboard.db` in WAL mode,
//! written by the writer thread alone.
//!
//! Why it looks like this:
//! - One `BEGIN IMMEDIATE ... COMMIT` per batch: with `synchronous = FULL`
//!   the fsync at commit is most of the cost of a write, so a batch of a
//!   thousand records costs about what one does.
//! - One bad operation must not fail the others in its batch. Input that
//!   cannot be stored (an offset over `i64::MAX`, text that is not UTF-8) is
//!   refused before any statement runs and the transaction goes on. A
//!   statement that fails rolls the transaction back; the batch is then
//!   retried once without that operation. If the retry fails too (a full
//!   disk, a read-only file) every operation left gets the error. Nothing is
//!   ever half applied: a write answered `Ok` was committed, one answered
//!   `Err` was not.
//! - Statements are prepared once and cached (`prepare_cached`); the
//!   ingest table's SQL strings are built once per table.
//! - The schema is versioned with `PRAGMA user_version` and an ordered list
//!   of migrations, each applied in its own transaction at open.

use crate::clock::now_ms;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    Backend, CLEAN_MARKER, InboxMsg, InboxQuota, Loaded, LoadedChannel, NewEpoch, Op, Outcome,
    Record, Refusal, Revocation, RevocationKind, StoreError, StoredPublication,
};
use crate::config::{IntegrityCheck, StorageConfig, SyncMode};

/// The database file inside `storage.data_dir`.
pub const DB_FILE: &str = "switchboard.db";

/// Schema migrations, in order: entry `i` brings the schema to version `i + 1`.
/// Never edit an entry once released; append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: history, offline inbox, revocations. The ingest table is created
    // separately: its name is configurable.
    r#"
    CREATE TABLE channels (
        channel TEXT PRIMARY KEY,
        epoch TEXT NOT NULL,
        top_offset INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE history (
        channel TEXT NOT NULL,
        "offset" INTEGER NOT NULL,
        payload TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, "offset")
    );
    CREATE INDEX history_expires ON history (expires_at_ms);
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX inbox_user ON inbox (user_id, id);
    CREATE INDEX inbox_expires ON inbox (expires_at_ms);
    CREATE TABLE revocations (
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        revoked_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (kind, value)
    ) WITHOUT ROWID;
    "#,
    // 2: the clean-shutdown token (see `Backend::mark`): a marker file beside
    // the database is trusted only if it names the token stored here.
    r#"
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 3: inbox quotas. Who sent each message (NULL: the backend, which a
    // client's message may not push out) and its size, for the byte quotas
    // per user and per sender.
    r#"
    ALTER TABLE inbox ADD COLUMN sender TEXT;
    ALTER TABLE inbox ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE inbox SET bytes = length(CAST(payload AS BLOB));
    CREATE INDEX inbox_sender ON inbox (sender, bytes) WHERE sender IS NOT NULL;
    "#,
];

/// The `meta` key of the clean-shutdown token.
const CLEAN_KEY: &str = "clean_shutdown";

/// The schema version this build writes.
pub fn schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// The SQL of one ingest table, built once (the table name is not a parameter).
struct IngestSql {
    insert: String,
    find: String,
    records: String,
}

impl IngestSql {
    fn new(table: &str) -> IngestSql {
        let t = quote_ident(table);
        IngestSql {
            insert: format!(
                "INSERT INTO {t} (type, user_id, connection_id, client_id, received_at, data) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ),
            find: format!("SELECT id FROM {t} WHERE user_id = ?1 AND client_id = ?2"),
            records: format!(
                "SELECT id, type, user_id, connection_id, client_id, received_at, data FROM {t} \
                 WHERE id > ?1 ORDER BY id LIMIT ?2"
            ),
        }
    }
}

/// Why one op failed inside a transaction.
enum Fail {
    /// Refused before any statement ran: the transaction goes on.
    Invalid(StoreError),
    /// A statement failed: the transaction must be rolled back.
    Db(StoreError),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Db(StoreError::Sql(e))
    }
}

type OpResult = Result<Outcome, Arc<StoreError>>;

/// A committed transaction's outcomes (op index, outcome), or the index of
/// the op whose statement failed (`None`: BEGIN or COMMIT failed) and why.
type Attempt = Result<Vec<(usize, Outcome)>, (Option<usize>, StoreError)>;

pub struct SqliteBackend {
    conn: Connection,
    path: PathBuf,
    /// Ingest tables known to exist, with their SQL.
    tables: HashMap<Arc<str>, IngestSql>,
    /// `storage.synchronous`.
    sync: SyncMode,
    /// The connection currently commits without fsync (a batch that
    /// acknowledges nothing durable, see `apply`).
    relaxed: bool,
    /// Bytes of publication text in `history` (committed), kept up to date
    /// by every statement that inserts or deletes history rows.
    history_bytes: u64,
    /// `history.max_bytes`: past it the oldest rows of any channel go.
    history_budget: u64,
}

impl SqliteBackend {
    /// Create `data_dir` if needed, open `<data_dir>/switchboard.db`, bring
    /// its schema up to date and create `ingest_table`.
    pub fn open(cfg: &StorageConfig, ingest_table: &str) -> Result<SqliteBackend, StoreError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|err| StoreError::Io {
            path: cfg.data_dir.clone(),
            err,
        })?;
        let path = cfg.data_dir.join(DB_FILE);
        check_not_emptied(&cfg.data_dir, &path)?;
        let conn = Connection::open(&path).map_err(|err| open_error(&path, err))?;
        configure(&conn, cfg.synchronous).map_err(|err| open_error(&path, err))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|err| open_error(&path, err))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal { path, mode });
        }
        check_integrity(&conn, &path, cfg.integrity_check)?;
        migrate(&conn, &path)?;
        let history_bytes: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(length(CAST(payload AS BLOB))), 0) FROM history",
                [],
                |r| r.get(0),
            )
            .map_err(|err| open_error(&path, err))?;
        let mut backend = SqliteBackend {
            conn,
            path,
            tables: HashMap::new(),
            sync: cfg.synchronous,
            relaxed: false,
            history_bytes: u64::try_from(history_bytes).unwrap_or(0),
            history_budget: u64::MAX,
        };
        backend.ensure_table(ingest_table)?;
        Ok(backend)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep at most `bytes` of publication text in `history` (all channels
    /// together): past it each batch deletes the oldest rows, whatever their
    /// channel, in the same transaction. Applied from the next write on.
    pub fn set_history_budget(&mut self, bytes: u64) {
        self.history_budget = bytes;
    }

    /// Bytes of publication text stored in `history`.
    pub fn history_bytes(&self) -> u64 {
        self.history_bytes
    }

    /// The schema version of the open file.
    pub fn version(&self) -> Result<u32, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Create an ingest table and its dedup index if missing (outside any
    /// transaction, so a rolled-back batch cannot leave the cache wrong).
    fn ensure_table(&mut self, table: &str) -> Result<(), StoreError> {
        if self.tables.contains_key(table) {
            return Ok(());
        }
        let t = quote_ident(table);
        let index = quote_ident(&format!("{table}_user_client"));
        self.conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                type TEXT NOT NULL,
                user_id TEXT NOT NULL,
                connection_id TEXT NOT NULL,
                client_id TEXT,
                received_at INTEGER NOT NULL, -- ms since the Unix epoch
                data TEXT NOT NULL            -- JSON
            );
            CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {t} (user_id, client_id)
                WHERE client_id IS NOT NULL;"
        ))?;
        self.tables.insert(Arc::from(table), IngestSql::new(table));
        Ok(())
    }

    /// One write transaction over `ops[i]` for `i` in `todo`. On success the
    /// outcomes, in `todo` order. On failure the index of the op whose
    /// statement failed (`None`: BEGIN or COMMIT failed) and the error.
    fn transaction(
        &mut self,
        ops: &[Op],
        todo: &[usize],
        results: &mut [Option<OpResult>],
    ) -> Attempt {
        if !self.conn.is_autocommit() {
            // A rollback that failed earlier left a transaction open.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| (None, StoreError::Sql(e)))?;
        let mut done = Vec::with_capacity(todo.len());
        // Change of `history_bytes`, applied only once the commit succeeded.
        let mut delta: i64 = 0;
        for &i in todo {
            match write(&tx, &self.tables, &ops[i], &mut delta) {
                Ok(outcome) => done.push((i, outcome)),
                Err(Fail::Invalid(e)) => results[i] = Some(Err(Arc::new(e))),
                Err(Fail::Db(e)) => return Err((Some(i), e)), // tx rolls back on drop
            }
        }
        let excess = self
            .history_bytes
            .saturating_add_signed(delta)
            .saturating_sub(self.history_budget);
        if excess > 0 {
            delta -= evict_oldest(&tx, excess).map_err(|e| (None, StoreError::Sql(e)))?;
        }
        tx.commit().map_err(|e| (None, StoreError::Sql(e)))?;
        self.history_bytes = self.history_bytes.saturating_add_signed(delta);
        Ok(done)
    }

    fn read(&self, op: &Op) -> Result<Outcome, StoreError> {
        match op {
            Op::Inbox { user, limit } => {
                let mut stmt = self.conn.prepare_cached(
                    "SELECT id, payload, created_at_ms, expires_at_ms FROM inbox \
                     WHERE user_id = ?1 AND expires_at_ms > ?2 ORDER BY id LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![&**user, now_ms(), sat(*limit)], |r| {
                    Ok(InboxMsg {
                        id: r.get(0)?,
                        user: user.to_string(),
                        payload: bytes(r, 1)?.to_vec(),
                        created_at_ms: r.get(2)?,
                        expires_at_ms: r.get(3)?,
                    })
                })?;
                Ok(Outcome::Inbox(rows.collect::<Result<_, _>>()?))
            }
            Op::Records {
                table,
                after_id,
                limit,
            } => {
                let owned;
                let sql = match self.tables.get(table) {
                    Some(sql) => sql.records.as_str(),
                    None => {
                        owned = IngestSql::new(table).records;
                        owned.as_str()
                    }
                };
                let mut stmt = self.conn.prepare_cached(sql)?;
                let rows = stmt.query_map(params![after_id, sat(*limit)], |r| {
                    Ok(Record {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        user: r.get(2)?,
                        connection: r.get(3)?,
                        client_id: r.get(4)?,
                        received_at_ms: r.get(5)?,
                        data: r.get(6)?,
                    })
                })?;
                Ok(Outcome::Records(rows.collect::<Result<_, _>>()?))
            }
            _ => Err(StoreError::NoResult),
        }
    }
}

impl Backend for SqliteBackend {
    fn apply(&mut self, ops: Vec<Op>) -> Vec<OpResult> {
        let mut results: Vec<Option<OpResult>> = ops.iter().map(|_| None).collect();
        // Ingest tables first, each in its own autocommit statement.
        for (i, op) in ops.iter().enumerate() {
            if let Op::Ingest { table, .. } = op
                && let Err(e) = self.ensure_table(table)
            {
                results[i] = Some(Err(Arc::new(e)));
            }
        }
        let mut todo: Vec<usize> = (0..ops.len())
            .filter(|&i| results[i].is_none() && !ops[i].is_read())
            .collect();
        // With `synchronous = FULL`, fsync only batches whose commit someone
        // is told about (records, stored messages, revocations). History
        // copies and inbox acks commit without it (WAL stays consistent; the
        // next FULL commit makes them durable too): a publication is
        // answered before its copy commits anyway, and a lost ack only means
        // a redelivery. Measured: see docs/BENCHMARKS.md (fan-out).
        if self.sync == SyncMode::Full {
            let durable = todo.iter().any(|&i| {
                matches!(
                    ops[i],
                    Op::Ingest { .. } | Op::InboxPut { .. } | Op::Revoke(_)
                )
            });
            if durable == self.relaxed {
                let mode = if durable { "FULL" } else { "NORMAL" };
                match self.conn.pragma_update(None, "synchronous", mode) {
                    Ok(()) => self.relaxed = !durable,
                    Err(e) if durable => {
                        // Never acknowledge durable data from a relaxed commit.
                        let e = Arc::new(StoreError::Sql(e));
                        for &i in &todo {
                            results[i] = Some(Err(e.clone()));
                        }
                        todo.clear();
                    }
                    // Still FULL with nothing durable to commit: safe.
                    Err(e) => log::warn!("cannot set synchronous = {mode}: {e}"),
                }
            }
        }
        if !todo.is_empty() {
            let mut attempt = self.transaction(&ops, &todo, &mut results);
            if let Err((Some(bad), e)) = attempt {
                // Isolate the op whose statement failed; retry the others once.
                results[bad] = Some(Err(Arc::new(e)));
                todo.retain(|&i| i != bad && results[i].is_none());
                attempt = if todo.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.transaction(&ops, &todo, &mut results)
                };
            }
            match attempt {
                Ok(done) => {
                    for (i, outcome) in done {
                        results[i] = Some(Ok(outcome));
                    }
                }
                Err((_, e)) => {
                    let e = Arc::new(e);
                    for &i in &todo {
                        results[i].get_or_insert_with(|| Err(e.clone()));
                    }
                }
            }
        }
        for (i, op) in ops.iter().enumerate() {
            if op.is_read() {
                results[i] = Some(self.read(op).map_err(Arc::new));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Arc::new(StoreError::NoResult))))
            .collect()
    }

    fn load(&mut self, now_ms: i64) -> Result<Loaded, StoreError> {
        let tx = self.conn.transaction()?; // one consistent snapshot
        let mut channels: Vec<LoadedChannel> = {
            let mut stmt =
                tx.prepare("SELECT channel, epoch, top_offset FROM channels ORDER BY channel")?;
            stmt.query_map([], |r| {
                Ok(LoadedChannel {
                    channel: r.get(0)?,
                    epoch: r.get(1)?,
                    top_offset: get_u64(r, 2)?,
                    publications: Vec::new(),
                })
            })?
            .collect::<Result<_, _>>()?
        };
        {
            let mut stmt = tx.prepare(
                r#"SELECT channel, "offset", payload, at_ms, expires_at_ms FROM history
                   WHERE expires_at_ms > ?1 ORDER BY channel, "offset""#,
            )?;
            let mut rows = stmt.query([now_ms])?;
            let mut at = 0; // both lists ascend by channel: merge
            while let Some(r) = rows.next()? {
                let channel = text(r, 0)?;
                while at < channels.len() && channels[at].channel.as_str() < channel {
                    at += 1;
                }
                let Some(ch) = channels.get_mut(at).filter(|c| c.channel == channel) else {
                    continue; // history without channel meta: unusable
                };
                ch.publications.push(StoredPublication {
                    offset: get_u64(r, 1)?,
                    payload: Arc::from(bytes(r, 2)?),
                    at_ms: r.get(3)?,
                    expires_at_ms: r.get(4)?,
                });
            }
        }
        let mut revocations = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT kind, value, revoked_at_ms, expires_at_ms, reason FROM revocations \
                 WHERE expires_at_ms > ?1 ORDER BY kind, value",
            )?;
            let mut rows = stmt.query([now_ms])?;
            while let Some(r) = rows.next()? {
                let Some(kind) = RevocationKind::parse(text(r, 0)?) else {
                    continue; // written by a newer build
                };
                revocations.push(Revocation {
                    kind,
                    value: r.get(1)?,
                    revoked_at_ms: r.get(2)?,
                    expires_at_ms: r.get(3)?,
                    reason: r.get(4)?,
                });
            }
        }
        let clean_token = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", [CLEAN_KEY], |r| {
                r.get(0)
            })
            .optional()?;
        tx.commit()?;
        Ok(Loaded {
            channels,
            revocations,
            clean_token,
        })
    }

    fn prune(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0;
        let mut freed = 0;
        {
            let mut st = tx.prepare_cached(
                "DELETE FROM history WHERE expires_at_ms <= ?1 \
                 RETURNING length(CAST(payload AS BLOB))",
            )?;
            let mut rows = st.query([now_ms])?;
            while let Some(r) = rows.next()? {
                freed += r.get::<_, i64>(0)?;
                n += 1;
            }
        }
        for sql in [
            "DELETE FROM inbox WHERE expires_at_ms <= ?1",
            "DELETE FROM revocations WHERE expires_at_ms <= ?1",
        ] {
            n += tx.prepare_cached(sql)?.execute([now_ms])?;
        }
        tx.commit()?;
        self.history_bytes = self.history_bytes.saturating_add_signed(-freed);
        Ok(n)
    }

    fn set_history_budget(&mut self, bytes: u64) {
        SqliteBackend::set_history_budget(self, bytes);
    }

    fn history_bytes(&self) -> u64 {
        SqliteBackend::history_bytes(self)
    }

    fn mark(&mut self, epochs: &[NewEpoch], clean: Option<&str>) -> Result<(), StoreError> {
        // Durable whatever `storage.synchronous` says: the clean token must
        // never be on disk before what it vouches for, and a new epoch must
        // not be lost once a client may have seen it.
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.relaxed = false;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut freed = 0;
        for e in epochs {
            tx.prepare_cached("UPDATE channels SET epoch = ?2 WHERE channel = ?1")?
                .execute(params![&*e.channel, &*e.epoch])?;
            freed += sum_returned(
                &mut tx.prepare_cached(
                    "DELETE FROM history WHERE channel = ?1 \
                     RETURNING length(CAST(payload AS BLOB))",
                )?,
                [&*e.channel],
            )?;
        }
        match clean {
            Some(token) => tx
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                .execute(params![CLEAN_KEY, token])?,
            None => tx
                .prepare_cached("DELETE FROM meta WHERE key = ?1")?
                .execute([CLEAN_KEY])?,
        };
        tx.commit()?;
        self.history_bytes = self.history_bytes.saturating_add_signed(-freed);
        if self.sync == SyncMode::Normal {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        Ok(())
    }
}

/// Apply one write op inside the open transaction.
fn write(
    conn: &Connection,
    tables: &HashMap<Arc<str>, IngestSql>,
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
            let data = utf8(data, "the record's data")?;
            let Some(sql) = tables.get(table) else {
                return Err(Fail::Invalid(StoreError::NoResult)); // ensure_table failed
            };
            if let Some(client_id) = client_id {
                // Looked up first: a conflicting INSERT would still use up an id.
                let found = conn
                    .prepare_cached(&sql.find)?
                    .query_row(params![&**user, client_id], |r| r.get(0))
                    .optional()?;
                if let Some(id) = found {
                    return Ok(Outcome::Ingested {
                        id,
                        duplicate: true,
                    });
                }
            }
            conn.prepare_cached(&sql.insert)?.execute(params![
                kind,
                &**user,
                connection,
                client_id,
                received_at_ms,
                data
            ])?;
            Ok(Outcome::Ingested {
                id: conn.last_insert_rowid(),
                duplicate: false,
            })
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
            let payload = utf8(payload, "the publication")?;
            let (channel, epoch) = (&**channel, &**epoch);
            let known: Option<(bool, i64)> = conn
                .prepare_cached("SELECT epoch = ?2, top_offset FROM channels WHERE channel = ?1")?
                .query_row(params![channel, epoch], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let top = match known {
                Some((true, top)) => top.max(offset), // a late one keeps the top
                Some((false, _)) => {
                    // A new epoch starts the offsets over: the old epoch's rows go.
                    *history_delta -= sum_returned(
                        &mut conn.prepare_cached(
                            "DELETE FROM history WHERE channel = ?1 \
                             RETURNING length(CAST(payload AS BLOB))",
                        )?,
                        [channel],
                    )?;
                    offset
                }
                None => offset,
            };
            if known != Some((true, top)) {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO channels (channel, epoch, top_offset) \
                     VALUES (?1, ?2, ?3)",
                )?
                .execute(params![channel, epoch, top])?;
            }
            // A row already there (the same offset again) is replaced: its
            // bytes leave the count first.
            *history_delta -= sum_returned(
                &mut conn.prepare_cached(
                    r#"DELETE FROM history WHERE channel = ?1 AND "offset" = ?2
                       RETURNING length(CAST(payload AS BLOB))"#,
                )?,
                params![channel, offset],
            )?;
            conn.prepare_cached(
                r#"INSERT INTO history (channel, "offset", payload, at_ms, expires_at_ms)
                   VALUES (?1, ?2, ?3, ?4, ?5)"#,
            )?
            .execute(params![channel, offset, payload, at_ms, expires_at_ms])?;
            *history_delta += sat(payload.len());
            *history_delta -= sum_returned(
                &mut conn.prepare_cached(
                    r#"DELETE FROM history WHERE channel = ?1 AND "offset" <= ?2
                       RETURNING length(CAST(payload AS BLOB))"#,
                )?,
                params![channel, offset.saturating_sub(sat(*keep))],
            )?;
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
            let text = utf8(payload, "the inbox message")?;
            let bytes = payload.len();
            if let Some(refusal) = make_room(conn, user, sender.as_deref(), bytes, quota)? {
                return Ok(Outcome::Refused(refusal));
            }
            conn.prepare_cached(
                "INSERT INTO inbox (user_id, payload, created_at_ms, expires_at_ms, sender, bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &**user,
                text,
                created_at_ms,
                expires_at_ms,
                sender.as_deref(),
                sat(bytes)
            ])?;
            let id = conn.last_insert_rowid();
            Ok(Outcome::Stored { id })
        }
        Op::InboxAck { user, id } => {
            let n = conn
                .prepare_cached("DELETE FROM inbox WHERE id = ?1 AND user_id = ?2")?
                .execute(params![id, &**user])?;
            Ok(Outcome::Acked { found: n > 0 })
        }
        Op::Revoke(r) => {
            conn.prepare_cached(
                "INSERT INTO revocations (kind, value, revoked_at_ms, expires_at_ms, reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (kind, value) DO UPDATE SET \
                 reason = CASE WHEN excluded.revoked_at_ms >= revoked_at_ms \
                 THEN excluded.reason ELSE reason END, \
                 revoked_at_ms = max(revoked_at_ms, excluded.revoked_at_ms), \
                 expires_at_ms = max(expires_at_ms, excluded.expires_at_ms)",
            )?
            .execute(params![
                r.kind.as_str(),
                r.value,
                r.revoked_at_ms,
                r.expires_at_ms,
                r.reason
            ])?;
            Ok(Outcome::Done)
        }
        Op::Inbox { .. } | Op::Records { .. } => Err(Fail::Invalid(StoreError::NoResult)),
    }
}

/// Check the quotas for a message of `bytes` from `sender` (`None`: the
/// backend) to `user` and delete what it pushes out (the rule is on
/// [`InboxQuota`]); `Some` if it must be refused, with nothing deleted.
fn make_room(
    conn: &Connection,
    user: &str,
    sender: Option<&str>,
    bytes: usize,
    quota: &InboxQuota,
) -> Result<Option<Refusal>, Fail> {
    if bytes > quota.max_bytes_per_user {
        return Ok(Some(Refusal::TooLarge));
    }
    if let Some(s) = sender {
        let held: i64 = conn
            .prepare_cached("SELECT COALESCE(SUM(bytes), 0) FROM inbox WHERE sender = ?1")?
            .query_row(params![s], |r| r.get(0))?;
        if usize::try_from(held)
            .unwrap_or(usize::MAX)
            .saturating_add(bytes)
            > quota.max_bytes_per_sender
        {
            return Ok(Some(Refusal::SenderFull));
        }
    }
    let (count, total): (i64, i64) = conn
        .prepare_cached("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM inbox WHERE user_id = ?1")?
        .query_row(params![user], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let total = usize::try_from(total).unwrap_or(usize::MAX);
    let mut extra_count = (count + 1).saturating_sub(quota.max_per_user);
    let mut extra_bytes = total
        .saturating_add(bytes)
        .saturating_sub(quota.max_bytes_per_user);
    if extra_count == 0 && extra_bytes == 0 {
        return Ok(None);
    }
    // Oldest first; a client's message may push out only clients' messages.
    let sql = if sender.is_some() {
        "SELECT id, bytes FROM inbox WHERE user_id = ?1 AND sender IS NOT NULL ORDER BY id"
    } else {
        "SELECT id, bytes FROM inbox WHERE user_id = ?1 ORDER BY id"
    };
    let mut evict = Vec::new();
    {
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![user])?;
        while extra_count > 0 || extra_bytes > 0 {
            let Some(row) = rows.next()? else {
                return Ok(Some(Refusal::UserFull));
            };
            let id: i64 = row.get(0)?;
            let b: i64 = row.get(1)?;
            evict.push(id);
            extra_count = extra_count.saturating_sub(1);
            extra_bytes = extra_bytes.saturating_sub(usize::try_from(b).unwrap_or(0));
        }
    }
    let mut del = conn.prepare_cached("DELETE FROM inbox WHERE id = ?1")?;
    for id in evict {
        del.execute(params![id])?;
    }
    Ok(None)
}

fn configure(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        },
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// An error opening the file; SQLite's "malformed" means a damaged file,
/// not a permission or a path to fix.
fn open_error(path: &Path, err: rusqlite::Error) -> StoreError {
    if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseCorrupt) {
        return StoreError::Damaged {
            path: path.to_owned(),
            check: "opening it",
            found: err.to_string(),
        };
    }
    StoreError::Open {
        path: path.to_owned(),
        err,
    }
}

/// A zero-length database file is what SQLite would happily open as a new,
/// empty store. Where the data directory shows that a store existed (the
/// clean-shutdown marker, or a write-ahead log with content), that is lost
/// data, not a new store: refuse. Otherwise say so in the log and go on.
fn check_not_emptied(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // missing: a new store (a new directory, or a first start)
    };
    if meta.len() > 0 {
        return Ok(());
    }
    let mut evidence = Vec::new();
    if dir.join(CLEAN_MARKER).exists() {
        evidence.push(format!("{CLEAN_MARKER} is present"));
    }
    let wal = dir.join(format!("{DB_FILE}-wal"));
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        evidence.push(format!("{DB_FILE}-wal holds data"));
    }
    if evidence.is_empty() {
        log::warn!(
            "storage: {} is an empty file; starting with an empty store",
            path.display()
        );
        return Ok(());
    }
    Err(StoreError::Emptied {
        path: path.to_owned(),
        evidence: evidence.join(", "),
    })
}

/// `storage.integrity_check` at open. A damaged file would otherwise be
/// used silently: pages that cannot be read lose records, and a damaged
/// de-duplication index stores retries of old records again as new ones.
/// Measured costs are in docs/STORAGE.md.
fn check_integrity(conn: &Connection, path: &Path, mode: IntegrityCheck) -> Result<(), StoreError> {
    let (pragma, check) = match mode {
        IntegrityCheck::Off => return Ok(()),
        IntegrityCheck::Quick => ("PRAGMA quick_check(1)", "quick_check"),
        IntegrityCheck::Full => ("PRAGMA integrity_check(1)", "integrity_check"),
    };
    let started = std::time::Instant::now();
    let found: Result<String, rusqlite::Error> = conn.query_row(pragma, [], |r| r.get(0));
    let found = match found {
        Ok(s) if s == "ok" => {
            let size = std::fs::metadata(path).map_or(0, |m| m.len());
            log::info!(
                "storage: {check} of {} ({} KiB) passed in {} ms",
                path.display(),
                size / 1024,
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        Ok(s) => s,
        // SQLite may give up on a file it cannot even walk (SQLITE_CORRUPT).
        Err(e) => e.to_string(),
    };
    Err(StoreError::Damaged {
        path: path.to_owned(),
        check,
        found: found.lines().next().unwrap_or("").to_owned(),
    })
}

/// Apply the migrations the file does not have yet, each in its own transaction.
fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|err| open_error(path, err))?;
    let supported = schema_version();
    if found > supported {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(found as usize) {
        let step = || -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step().map_err(|err| StoreError::Migration { version, err })?;
        log::info!("database {}: schema version {version}", path.display());
    }
    Ok(())
}

/// `"name"` with inner quotes doubled: safe for any name.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Text columns take UTF-8 only (JSON functions and other readers expect it).
fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, Fail> {
    std::str::from_utf8(bytes).map_err(|err| Fail::Invalid(StoreError::NotUtf8 { what, err }))
}

/// Delete the oldest history rows, whatever their channel, until at least
/// `excess` bytes are freed; returns the bytes freed. Rowids ascend with
/// insertion (a row replaced or moved to a new epoch is a new row), so the
/// oldest rows are a prefix of the table. A channel keeps its epoch and top
/// offset: a recovery from before its first kept row answers
/// `recovered: false`, as after a trim to `history.size`.
fn evict_oldest(conn: &Connection, excess: u64) -> rusqlite::Result<i64> {
    let mut last = None;
    let mut freed = 0u64;
    {
        let mut st = conn.prepare_cached(
            "SELECT rowid, length(CAST(payload AS BLOB)) FROM history ORDER BY rowid",
        )?;
        let mut rows = st.query([])?;
        while freed < excess {
            let Some(r) = rows.next()? else { break };
            last = Some(r.get::<_, i64>(0)?);
            freed += u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0);
        }
    }
    let Some(last) = last else { return Ok(0) };
    sum_returned(
        &mut conn.prepare_cached(
            "DELETE FROM history WHERE rowid <= ?1 RETURNING length(CAST(payload AS BLOB))",
        )?,
        [last],
    )
}

/// The sum of the one integer column a `DELETE ... RETURNING` gives back.
fn sum_returned(
    st: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> rusqlite::Result<i64> {
    let mut rows = st.query(params)?;
    let mut sum = 0i64;
    while let Some(r) = rows.next()? {
        sum = sum.saturating_add(r.get::<_, i64>(0)?);
    }
    Ok(sum)
}

/// A count as an SQL integer (saturating: limits past i64::MAX mean "all").
fn sat(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A TEXT (or BLOB) column's bytes, without a copy.
fn bytes<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r [u8]> {
    Ok(r.get_ref(i)?.as_bytes()?)
}

fn text<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    Ok(r.get_ref(i)?.as_str()?)
}

fn get_u64(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "sensors_data";

    fn cfg(dir: &Path) -> StorageConfig {
        StorageConfig {
            data_dir: dir.to_owned(),
            ..StorageConfig::default()
        }
    }

    fn open(dir: &Path) -> SqliteBackend {
        SqliteBackend::open(&cfg(dir), TABLE).unwrap()
    }

    fn ingest(user: &str, client_id: Option<&str>, data: &str) -> Op {
        Op::Ingest {
            table: TABLE.into(),
            kind: "sensor_data".into(),
            user: user.into(),
            connection: "0.1".into(),
            client_id: client_id.map(Into::into),
            received_at_ms: 1_000,
            data: data.as_bytes().to_vec(),
        }
    }

    #[test]
    fn only_batches_that_acknowledge_durable_data_are_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(dir.path());
        let mode = |b: &SqliteBackend| -> i64 {
            b.conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(mode(&b), 2, "FULL at start");
        let r = b.apply(vec![publication("c", "e", 1, i64::MAX, 10)]);
        assert!(r[0].is_ok());
        assert_eq!(mode(&b), 1, "a history-only batch commits without fsync");
        let r = b.apply(vec![
            publication("c", "e", 2, i64::MAX, 10),
            ingest("u", None, "{}"),
        ]);
        assert!(r.iter().all(Result::is_ok));
        assert_eq!(mode(&b), 2, "a batch with a record is fsynced");
    }

    fn publication(channel: &str, epoch: &str, offset: u64, expires_at_ms: i64, keep: usize) -> Op {
        Op::Publication {
            channel: channel.into(),
            epoch: epoch.into(),
            offset,
            payload: Arc::from(format!(r#"{{"n":{offset}}}"#).as_bytes()),
            at_ms: 5,
            expires_at_ms,
            keep,
        }
    }

    fn count(dir: &Path, table: &str) -> i64 {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.query_row(
            &format!("SELECT count(*) FROM {}", quote_ident(table)),
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn migrations_run_once_and_reopening_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        assert_eq!(b.version().unwrap(), schema_version());
        assert_eq!(b.path(), dir.path().join(DB_FILE));
        let mode: String = b
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(b);
        let b = open(dir.path());
        assert_eq!(b.version().unwrap(), schema_version());
        assert_eq!(count(dir.path(), TABLE), 0);
        assert_eq!(count(dir.path(), "inbox"), 0);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        match SqliteBackend::open(&cfg(dir.path()), TABLE) {
            Err(StoreError::SchemaTooNew {
                found: 99,
                supported,
                ..
            }) => assert_eq!(supported, schema_version()),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened a newer schema"),
        }
    }

    #[test]
    fn a_missing_data_dir_is_created_and_an_unusable_one_reported() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        drop(open(&nested));
        assert!(nested.join(DB_FILE).exists());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = SqliteBackend::open(&cfg(&file), TABLE).err().unwrap();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        assert!(err.to_string().contains("storage.data_dir"), "{err}");
    }

    /// A database of schema 1 gets the inbox's sender and size columns, the
    /// sizes of the messages already there filled in.
    #[test]
    fn schema_1_inboxes_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO inbox (user_id, payload, created_at_ms, expires_at_ms) \
                 VALUES ('old', '{\"a\":1}', 1, 9223372036854775807)",
                [],
            )
            .unwrap();
        }
        let b = open(dir.path());
        assert_eq!(b.version().unwrap(), schema_version());
        let (sender, bytes): (Option<String>, i64) = b
            .conn
            .query_row("SELECT sender, bytes FROM inbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((sender, bytes), (None, 7));
    }
}
