//! Durable state: the storage writer thread and its backends (D1-D3).
//!
//! Shards never touch the database. They queue a [`Request`] on a bounded
//! queue ([`WriterHandle::try_send`], never blocking the event loop; a full
//! queue is answered `overloaded`), and one thread, the [`Writer`], takes
//! everything queued at once and applies it in one transaction (group
//! commit: one fsync for a whole batch instead of one per record). Results go
//! back to each shard in one [`Notify::done`] call per batch, so a shard is
//! woken once per commit, not once per record.
//!
//! The [`Backend`] trait is the seam between the writer and the database:
//! SQLite ([`SqliteBackend`], the default) and PostgreSQL
//! ([`PostgresBackend`]), with the same promises (docs/STORAGE.md).

#[cfg(test)]
mod conformance;
pub mod postgres;
pub mod sqlite;
#[doc(hidden)]
pub mod testpg;
mod writer;

pub use postgres::PostgresBackend;
pub use sqlite::SqliteBackend;
pub use writer::{LostHistory, PRUNE_EVERY, SendError, Writer, WriterHandle, WriterStats};

use std::fmt;
use std::io;

/// The file, beside the database in `storage.data_dir`, that a graceful
/// shutdown writes after its last commit; it holds the token the shutdown
/// also recorded in the database ([`Backend::mark`]). At start the stored
/// channel offsets are trusted only if both agree.
pub const CLEAN_MARKER: &str = "clean-shutdown";
use std::path::PathBuf;
use std::sync::Arc;

/// Why a storage operation failed. Shared (`Arc`) because one failed
/// transaction answers every operation in it with the same error.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be opened or configured.
    Open { path: PathBuf, err: rusqlite::Error },
    /// The data directory could not be created.
    Io { path: PathBuf, err: io::Error },
    /// A statement, a transaction or its commit failed.
    Sql(rusqlite::Error),
    /// Upgrading the schema to `version` failed (the upgrade was rolled back).
    Migration { version: u32, err: rusqlite::Error },
    /// The file was written by a newer build with a schema this one does not know.
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// SQLite refused write-ahead logging (the file system cannot share memory maps).
    NotWal { path: PathBuf, mode: String },
    /// A number SQLite cannot store (it keeps signed 64-bit integers).
    OutOfRange { what: &'static str, value: u64 },
    /// Text meant for a TEXT column is not UTF-8.
    NotUtf8 {
        what: &'static str,
        err: std::str::Utf8Error,
    },
    /// The backend panicked while applying the batch this operation was in.
    BackendPanicked,
    /// The backend returned fewer results than operations (a bug in the backend).
    NoResult,
    /// The database file failed its integrity check at open (`storage.integrity_check`):
    /// a truncated file, an overwritten page. `found` is SQLite's first finding.
    Damaged {
        path: PathBuf,
        check: &'static str,
        found: String,
    },
    /// The database file is empty while the data directory shows that a store
    /// existed there (a clean-shutdown marker or a write-ahead log).
    Emptied { path: PathBuf, evidence: String },
    /// `[storage.postgres]` cannot be used as written (the URL, the CA file).
    PgConfig { message: String },
    /// PostgreSQL could not be reached or refused the connection.
    PgConnect {
        target: String,
        err: ::postgres::Error,
    },
    /// A PostgreSQL statement, transaction or commit failed (the connection lives on).
    Pg(::postgres::Error),
    /// Upgrading the PostgreSQL schema to `version` failed (rolled back).
    PgMigration {
        version: i32,
        err: ::postgres::Error,
    },
    /// The PostgreSQL schema was written by a newer build.
    PgSchemaTooNew {
        target: String,
        found: i32,
        supported: i32,
    },
    /// The connection to the database was lost while this operation was in
    /// flight: it may or may not have been committed (a retry of a record
    /// with the same id is recognised as a duplicate).
    Lost(::postgres::Error),
    /// The connection to the database is down (being re-established):
    /// nothing was tried.
    Unavailable,
    /// Text with a NUL character, which PostgreSQL's text type cannot hold.
    Nul { what: &'static str },
}

impl StoreError {
    /// Part of a storage outage that the backend logs once per episode:
    /// callers should not log it again per request.
    pub fn is_outage(&self) -> bool {
        matches!(self, StoreError::Lost(_) | StoreError::Unavailable)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Open { path, err } => write!(
                f,
                "cannot open the database {}: {err} (check that storage.data_dir is writable \
                 and the file is a SQLite database)",
                path.display()
            ),
            StoreError::Io { path, err } => write!(
                f,
                "cannot create the storage directory {}: {err} (check storage.data_dir and \
                 its permissions)",
                path.display()
            ),
            StoreError::Sql(err) => write!(
                f,
                "database error: {err} (a full disk or a read-only storage.data_dir is the \
                 usual cause)"
            ),
            StoreError::Migration { version, err } => write!(
                f,
                "cannot upgrade the database schema to version {version}: {err} (nothing was \
                 changed; restore a backup or point storage.data_dir elsewhere)"
            ),
            StoreError::SchemaTooNew {
                path,
                found,
                supported,
            } => write!(
                f,
                "the database {} has schema version {found} but this build knows up to \
                 {supported}: run a newer switchboard or point storage.data_dir elsewhere",
                path.display()
            ),
            StoreError::NotWal { path, mode } => write!(
                f,
                "the database {} cannot use write-ahead logging (journal mode stays {mode:?}): \
                 put storage.data_dir on a local file system",
                path.display()
            ),
            StoreError::OutOfRange { what, value } => write!(
                f,
                "{what} {value} is larger than the database can store (at most {})",
                i64::MAX
            ),
            StoreError::NotUtf8 { what, err } => write!(f, "{what} is not UTF-8 text: {err}"),
            StoreError::BackendPanicked => f.write_str(
                "the storage backend panicked while applying this batch (nothing of it was \
                 committed; see the log)",
            ),
            StoreError::NoResult => {
                f.write_str("the storage backend returned no result for this operation (a bug)")
            }
            StoreError::Damaged { path, check, found } => write!(
                f,
                "the database {} is damaged ({check} found: {found}); nothing was changed: \
                 restore a backup, or move the file aside to start with an empty store",
                path.display()
            ),
            StoreError::Emptied { path, evidence } => write!(
                f,
                "the database {} is empty but a store existed there ({evidence}); nothing was \
                 changed: restore a backup, or remove the file to start with an empty store",
                path.display()
            ),
            StoreError::PgConfig { message } => f.write_str(message),
            StoreError::PgConnect { target, err } => write!(
                f,
                "cannot connect to {target}: {} (check storage.postgres.url, that the server \
                 runs and accepts this user; storage.postgres.start_retry waits for it)",
                pg_text(err)
            ),
            StoreError::Pg(err) => write!(
                f,
                "database error: {} (a full disk or a statement timeout on the database \
                 server are the usual causes)",
                pg_text(err)
            ),
            StoreError::PgMigration { version, err } => write!(
                f,
                "cannot upgrade the database schema to version {version}: {} (nothing was \
                 changed)",
                pg_text(err)
            ),
            StoreError::PgSchemaTooNew {
                target,
                found,
                supported,
            } => write!(
                f,
                "{target} has schema version {found} but this build knows up to {supported}: \
                 run a newer switchboard or use another storage.postgres.schema"
            ),
            StoreError::Lost(err) => write!(
                f,
                "the connection to the database was lost ({}); this operation may not have \
                 been committed",
                pg_text(err)
            ),
            StoreError::Unavailable => {
                f.write_str("the database is unreachable (reconnecting); nothing was stored")
            }
            StoreError::Nul { what } => {
                write!(
                    f,
                    "{what} contains a NUL character, which the database cannot store"
                )
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Open { err, .. }
            | StoreError::Sql(err)
            | StoreError::Migration { err, .. } => Some(err),
            StoreError::Io { err, .. } => Some(err),
            StoreError::NotUtf8 { err, .. } => Some(err),
            StoreError::PgConnect { err, .. }
            | StoreError::Pg(err)
            | StoreError::PgMigration { err, .. }
            | StoreError::Lost(err) => Some(err),
            _ => None,
        }
    }
}

/// The server's message (and detail) when there is one: `postgres::Error`'s
/// own Display says only "db error".
fn pg_text(err: &::postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(src) => format!("{err}: {src}"),
            None => err.to_string(),
        },
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Sql(err)
    }
}

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationKind {
    /// Every token of a user (`sub`).
    User,
    /// One token (its `jti`).
    Token,
}

impl RevocationKind {
    /// The value stored in the `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::User => "user",
            RevocationKind::Token => "token",
        }
    }

    /// The kind stored as `s`, if any.
    pub fn parse(s: &str) -> Option<RevocationKind> {
        match s {
            "user" => Some(RevocationKind::User),
            "token" => Some(RevocationKind::Token),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub kind: RevocationKind,
    pub value: String,
    pub revoked_at_ms: i64,
    /// After this the revocation is forgotten (the tokens it names have expired).
    pub expires_at_ms: i64,
    pub reason: String,
}

/// A message waiting in a user's offline inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMsg {
    pub id: i64,
    pub user: String,
    /// JSON text of the message as it will be sent (without its id).
    pub payload: Vec<u8>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// What one user's inbox and one sender may hold.
///
/// The eviction rule: a new message that does not fit the user's count or
/// bytes pushes out the user's oldest messages, but a message from a user
/// (a client) pushes out only messages from users, never one the backend
/// sent; when the backend's messages fill the inbox, a client's message is
/// refused instead. A sender's stored messages, to all users together, are
/// bounded by `max_bytes_per_sender` (past it the sender is refused: its own
/// messages are not pushed out either). The backend has no sender quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxQuota {
    pub max_per_user: usize,
    pub max_bytes_per_user: usize,
    pub max_bytes_per_sender: usize,
}

/// Why a message was not stored (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The message alone is larger than `max_bytes_per_user`.
    TooLarge,
    /// The user's inbox is full of messages the sender may not push out.
    UserFull,
    /// The sender has `max_bytes_per_sender` stored already.
    SenderFull,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::TooLarge => {
                "the message is larger than a user's inbox (inbox.max_bytes_per_user)"
            }
            Refusal::UserFull => {
                "the user's inbox is full of messages from the backend (inbox.max_per_user, inbox.max_bytes_per_user)"
            }
            Refusal::SenderFull => {
                "you have too many undelivered stored messages (inbox.max_bytes_per_sender); wait until they are read"
            }
        }
    }
}

/// One publication of a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPublication {
    pub offset: u64,
    /// JSON text.
    pub payload: Arc<[u8]>,
    pub at_ms: i64,
    pub expires_at_ms: i64,
}

/// A channel's history as restored at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedChannel {
    pub channel: String,
    pub epoch: String,
    pub top_offset: u64,
    /// Ascending offset, none expired.
    pub publications: Vec<StoredPublication>,
}

/// Everything to restore at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Ascending channel name.
    pub channels: Vec<LoadedChannel>,
    /// None expired.
    pub revocations: Vec<Revocation>,
    /// The token the last clean shutdown recorded in the database (see
    /// [`Backend::mark`]); `None` when the last run did not end cleanly.
    pub clean_token: Option<String>,
}

/// A channel whose stored offsets can no longer be trusted: it continues in
/// `epoch` (a new one), its kept publications dropped, its top offset kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEpoch {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
}

/// An ingested record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: i64,
    pub kind: String,
    pub user: String,
    pub connection: String,
    pub client_id: Option<String>,
    pub received_at_ms: i64,
    /// JSON text.
    pub data: String,
}

/// One operation for the writer.
#[derive(Debug)]
pub enum Op {
    /// An ingested record (sensor data). Result: [`Outcome::Ingested`].
    /// If `client_id` is `Some` and (user, client_id) already exists in the
    /// table, nothing is inserted: the existing id comes back with `duplicate`.
    Ingest {
        table: Arc<str>,
        kind: String,
        user: Arc<str>,
        connection: String,
        client_id: Option<String>,
        received_at_ms: i64,
        /// JSON text.
        data: Vec<u8>,
    },
    /// A channel publication for history: upsert the channel's epoch and top
    /// offset, insert the row, then delete rows of this channel with
    /// offset <= offset - keep (a new epoch drops the old epoch's rows).
    /// Result: [`Outcome::Done`].
    Publication {
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        payload: Arc<[u8]>,
        at_ms: i64,
        expires_at_ms: i64,
        keep: usize,
    },
    /// Store a message in a user's offline inbox under a new id (ids are
    /// never reused and ascend), within `quota` (see [`InboxQuota`] for the
    /// eviction rule). The payload is JSON object text without the id (the
    /// shard inserts it when sending). Result: [`Outcome::Stored`], or
    /// [`Outcome::Refused`] with nothing changed.
    InboxPut {
        user: Arc<str>,
        /// The sending user; `None`: the backend (HTTP API).
        sender: Option<Arc<str>>,
        payload: Vec<u8>,
        created_at_ms: i64,
        expires_at_ms: i64,
        quota: InboxQuota,
    },
    /// The user acknowledged message `id`: delete it if it is theirs.
    /// Result: [`Outcome::Acked`].
    InboxAck { user: Arc<str>, id: i64 },
    /// Upsert by (kind, value), keeping the later `revoked_at_ms` (with its
    /// reason) and the later `expires_at_ms`. Result: [`Outcome::Done`].
    Revoke(Revocation),
    /// Read: the user's unexpired messages, ascending id, at most `limit`.
    /// Result: [`Outcome::Inbox`]. Reads run after the batch commits.
    Inbox { user: Arc<str>, limit: usize },
    /// Read: records of `table` with id > `after_id`, ascending, at most
    /// `limit`. Result: [`Outcome::Records`].
    Records {
        table: Arc<str>,
        after_id: i64,
        limit: usize,
    },
}

impl Op {
    /// What the op counts against the writer's byte budget
    /// (`storage.queue_bytes`): the bytes it carries, plus a fixed cost.
    pub fn weight(&self) -> usize {
        const OP: usize = 128;
        OP + match self {
            Op::Ingest { data, .. } => data.len(),
            Op::Publication { payload, .. } => payload.len(),
            Op::InboxPut { payload, .. } => payload.len(),
            Op::Revoke(r) => r.value.len() + r.reason.len(),
            Op::InboxAck { .. } | Op::Inbox { .. } | Op::Records { .. } => 0,
        }
    }

    /// Whether the op only reads (answered after the batch's commit).
    pub fn is_read(&self) -> bool {
        matches!(self, Op::Inbox { .. } | Op::Records { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Ingested {
        id: i64,
        duplicate: bool,
    },
    Stored {
        id: i64,
    },
    /// An inbox message was not stored: why.
    Refused(Refusal),
    Acked {
        found: bool,
    },
    Inbox(Vec<InboxMsg>),
    Records(Vec<Record>),
}

/// Who gets the result: the shard and a token the shard chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub shard: usize,
    pub token: u64,
}

/// An operation and where its result goes (`None`: nobody waits for it).
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub ticket: Option<Ticket>,
}

/// The result of one request, for the shard that sent it.
#[derive(Debug)]
pub struct Done {
    pub token: u64,
    pub result: Result<Outcome, Arc<StoreError>>,
}

/// How results reach shards (the server implements it with shard inboxes;
/// tests with a channel). Called from the writer thread once per shard per
/// batch, with that shard's results in request order.
pub trait Notify: Send + Sync + 'static {
    fn done(&self, shard: usize, results: Vec<Done>);
}

/// A storage backend.
pub trait Backend: Send + 'static {
    /// Apply every write op of the batch in one transaction (group commit)
    /// and answer the read ops after it; one result per op, same order. A
    /// write op that gets an error was not applied; one that gets `Ok` was
    /// committed.
    fn apply(&mut self, ops: Vec<Op>) -> Vec<Result<Outcome, Arc<StoreError>>>;
    /// Everything to restore at start: history per channel and live revocations.
    fn load(&mut self, now_ms: i64) -> Result<Loaded, StoreError>;
    /// Delete expired history, inbox messages and revocations; returns the rows deleted.
    fn prune(&mut self, now_ms: i64) -> Result<usize, StoreError>;
    /// In one durable transaction (fsynced whatever `storage.synchronous`
    /// says): start `epochs` (each channel's kept publications deleted, its
    /// top offset kept) and record `clean` as the clean-shutdown token
    /// (`None` clears it). At start, before anything is served, with `None`;
    /// at a graceful shutdown, after the last commit, with a fresh token
    /// that is also written to the marker file beside the database.
    fn mark(&mut self, epochs: &[NewEpoch], clean: Option<&str>) -> Result<(), StoreError>;
    /// Keep at most `bytes` of publication text in `history` (all channels
    /// together): past it each batch deletes the oldest rows, whatever their
    /// channel, in the same transaction. Applied from the next write on.
    fn set_history_budget(&mut self, bytes: u64);
    /// Bytes of publication text stored in `history` (committed).
    fn history_bytes(&self) -> u64;
    /// Whether the backend can take writes now (false while the connection
    /// to a database server is down). An embedded file is always available.
    fn available(&self) -> bool {
        true
    }
    /// Called by the writer while not [`available`](Backend::available):
    /// try to get the connection back if its backoff allows; returns
    /// whether it is available now.
    fn reconnect(&mut self) -> bool {
        true
    }
    /// While unavailable: how long until the next reconnection attempt is due.
    fn retry_in(&self) -> Option<std::time::Duration> {
        None
    }
}
