//! `switchboard decrypt`: the operator's export of ingested records, with
//! the encrypted fields opened (docs/STORAGE.md, "Ingested records and
//! encryption").
//!
//! The database is opened read-only, so this is safe beside a running
//! server: it reads committed records and never takes a write lock. With
//! `storage.backend = "postgres"` the records come from `[storage.postgres]`
//! (a read-only session, in pages of 1,000), otherwise from the SQLite file.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{OpenFlags, params};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::clock::rfc3339_ms;
use crate::config::{Config, ConfigError, Overrides, StorageBackend};
use crate::ingest::{IngestSetupError, OpenError, Sealer, reveal_with};

/// The database file under `storage.data_dir`.
pub const DB_FILE: &str = "switchboard.db";

/// What to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// The table (default: `ingest.table`).
    pub table: Option<String>,
    /// Only records with a larger id (for paging: the last id printed).
    pub after_id: i64,
    /// At most this many records (default: all).
    pub limit: Option<u64>,
    /// Only this user's records.
    pub user: Option<String>,
}

/// Why the export stopped.
#[derive(Debug)]
pub enum DecryptError {
    Config(ConfigError),
    Key(IngestSetupError),
    /// `--table` is not a plain SQL identifier.
    BadTable {
        table: String,
    },
    NoDatabase {
        path: PathBuf,
    },
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    NoTable {
        table: String,
        path: PathBuf,
    },
    Query {
        table: String,
        source: rusqlite::Error,
    },
    /// A row whose columns do not have the schema's types.
    Row {
        id: Option<i64>,
        source: rusqlite::Error,
    },
    /// A record whose data cannot be decrypted.
    Record {
        id: i64,
        source: OpenError,
    },
    Write(std::io::Error),
    /// The PostgreSQL database could not be reached or used.
    Pg(crate::store::StoreError),
    /// No such table in the PostgreSQL schema.
    NoPgTable {
        table: String,
        target: String,
    },
    /// A PostgreSQL query or row failed.
    PgQuery {
        table: String,
        source: postgres::Error,
    },
}

impl fmt::Display for DecryptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecryptError::Config(e) => e.fmt(f),
            DecryptError::Key(e) => e.fmt(f),
            DecryptError::BadTable { table } => write!(
                f,
                "table {table:?} must be a SQL identifier (letters, digits, _)"
            ),
            DecryptError::NoDatabase { path } => write!(
                f,
                "no database at {} (check storage.data_dir)",
                path.display()
            ),
            DecryptError::Open { path, source } => {
                write!(f, "cannot open {} read-only: {source}", path.display())
            }
            DecryptError::NoTable { table, path } => write!(
                f,
                "no table {table:?} in {} (check ingest.table or --table)",
                path.display()
            ),
            DecryptError::Query { table, source } => {
                write!(f, "cannot read table {table:?}: {source}")
            }
            DecryptError::Row {
                id: Some(id),
                source,
            } => {
                write!(f, "record {id}: unreadable row: {source}")
            }
            DecryptError::Row { id: None, source } => write!(f, "unreadable row: {source}"),
            DecryptError::Record { id, source } => write!(f, "record {id}: {source}"),
            DecryptError::Write(e) => write!(f, "cannot write output: {e}"),
            DecryptError::Pg(e) => e.fmt(f),
            DecryptError::NoPgTable { table, target } => write!(
                f,
                "no table {table:?} in {target} (check ingest.table or --table)"
            ),
            DecryptError::PgQuery { table, source } => {
                let detail = source
                    .as_db_error()
                    .map_or_else(|| source.to_string(), |d| d.message().to_owned());
                write!(f, "cannot read table {table:?}: {detail}")
            }
        }
    }
}

impl std::error::Error for DecryptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecryptError::Config(e) => Some(e),
            DecryptError::Key(e) => Some(e),
            DecryptError::Open { source, .. }
            | DecryptError::Query { source, .. }
            | DecryptError::Row { source, .. } => Some(source),
            DecryptError::Record { source, .. } => Some(source),
            DecryptError::Write(e) => Some(e),
            DecryptError::Pg(e) => Some(e),
            DecryptError::PgQuery { source, .. } => Some(source),
            DecryptError::BadTable { .. }
            | DecryptError::NoDatabase { .. }
            | DecryptError::NoTable { .. }
            | DecryptError::NoPgTable { .. } => None,
        }
    }
}

/// The same rule as config validation of `ingest.table`.
fn is_ident(t: &str) -> bool {
    t.len() <= 64
        && t.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One output line.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    id: i64,
    #[serde(rename = "type")]
    kind: &'a str,
    user_id: &'a str,
    connection_id: &'a str,
    client_id: Option<&'a str>,
    received_at: String,
    data: &'a RawValue,
}

/// Writes records as JSON lines, their encrypted fields opened.
struct Emitter<'a> {
    sealer: Option<Sealer>,
    out: &'a mut dyn Write,
    buf: Vec<u8>,
    n: usize,
}

/// One stored record, as read from either database.
struct Row {
    id: i64,
    kind: String,
    user_id: String,
    connection_id: String,
    client_id: Option<String>,
    received_at: i64,
    data: String,
}

impl Emitter<'_> {
    fn emit(&mut self, r: &Row) -> Result<(), DecryptError> {
        let id = r.id;
        let plain = reveal_with(self.sealer.as_ref(), &r.data)
            .map_err(|source| DecryptError::Record { id, source })?;
        let data = RawValue::from_string(plain).map_err(|e| DecryptError::Record {
            id,
            source: OpenError::StoredNotJson {
                reason: e.to_string(),
            },
        })?;
        let line = Line {
            id,
            kind: &r.kind,
            user_id: &r.user_id,
            connection_id: &r.connection_id,
            client_id: r.client_id.as_deref(),
            received_at: rfc3339_ms(r.received_at),
            data: &data,
        };
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, &line)
            .map_err(|e| DecryptError::Write(std::io::Error::other(e)))?;
        self.buf.push(b'\n');
        self.out.write_all(&self.buf).map_err(DecryptError::Write)?;
        self.n += 1;
        Ok(())
    }
}

/// Print the records of `opts` as JSON lines to `out`, encrypted fields
/// opened with the configured keys. Returns the number of records printed.
/// Stops at the first record that cannot be read or decrypted (the lines
/// before it are already written).
pub fn export(
    cfg: &Config,
    opts: &ExportOptions,
    out: &mut dyn Write,
) -> Result<usize, DecryptError> {
    let table = opts.table.as_deref().unwrap_or(&cfg.ingest.table);
    if !is_ident(table) {
        return Err(DecryptError::BadTable {
            table: table.to_owned(),
        });
    }
    let sealer = Sealer::from_config(&cfg.ingest).map_err(DecryptError::Key)?;
    let mut em = Emitter {
        sealer,
        out,
        buf: Vec::with_capacity(4096),
        n: 0,
    };
    if cfg.storage.backend == StorageBackend::Postgres {
        export_postgres(cfg, table, opts, &mut em)?;
    } else {
        export_sqlite(cfg, table, opts, &mut em)?;
    }
    em.out.flush().map_err(DecryptError::Write)?;
    Ok(em.n)
}

/// Records from PostgreSQL, in pages (a read-only session).
fn export_postgres(
    cfg: &Config,
    table: &str,
    opts: &ExportOptions,
    em: &mut Emitter<'_>,
) -> Result<(), DecryptError> {
    const PAGE: i64 = 1000;
    let pg = &cfg.storage.postgres;
    let (mut db, target) =
        crate::store::postgres::connect_tool(pg, true).map_err(DecryptError::Pg)?;
    let query_err = |source| DecryptError::PgQuery {
        table: table.to_owned(),
        source,
    };
    let exists = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
            &[&pg.schema, &table],
        )
        .and_then(|r| r.try_get::<_, bool>(0))
        .map_err(query_err)?;
    if !exists {
        return Err(DecryptError::NoPgTable {
            table: table.to_owned(),
            target,
        });
    }
    let user_clause = if opts.user.is_some() {
        " AND user_id = $3"
    } else {
        ""
    };
    let stmt = db
        .prepare(&format!(
            "SELECT id, type, user_id, connection_id, client_id, received_at, data \
             FROM \"{table}\" WHERE id > $1{user_clause} ORDER BY id LIMIT $2"
        ))
        .map_err(query_err)?;
    let mut after = opts.after_id;
    let mut left = opts.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    loop {
        let page = left.map_or(PAGE, |l| l.min(PAGE));
        if page <= 0 {
            return Ok(());
        }
        let rows = match &opts.user {
            Some(u) => db.query(&stmt, &[&after, &page, u]),
            None => db.query(&stmt, &[&after, &page]),
        }
        .map_err(query_err)?;
        let got = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        for r in rows {
            let row = Row {
                id: r.try_get(0).map_err(query_err)?,
                kind: r.try_get(1).map_err(query_err)?,
                user_id: r.try_get(2).map_err(query_err)?,
                connection_id: r.try_get(3).map_err(query_err)?,
                client_id: r.try_get(4).map_err(query_err)?,
                received_at: r.try_get(5).map_err(query_err)?,
                data: r.try_get(6).map_err(query_err)?,
            };
            after = row.id;
            em.emit(&row)?;
        }
        left = left.map(|l| l - got);
        if got < page {
            return Ok(());
        }
    }
}

/// Records from the SQLite file, opened read-only.
fn export_sqlite(
    cfg: &Config,
    table: &str,
    opts: &ExportOptions,
    em: &mut Emitter<'_>,
) -> Result<(), DecryptError> {
    let path = cfg.storage.data_dir.join(DB_FILE);
    if !path.is_file() {
        return Err(DecryptError::NoDatabase { path });
    }
    let db = rusqlite::Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| DecryptError::Open {
        path: path.clone(),
        source,
    })?;
    let query_err = |source| DecryptError::Query {
        table: table.to_owned(),
        source,
    };
    let exists: bool = db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )
        .map_err(|source| DecryptError::Open {
            path: path.clone(),
            source,
        })?;
    if !exists {
        return Err(DecryptError::NoTable {
            table: table.to_owned(),
            path,
        });
    }
    let user_clause = if opts.user.is_some() {
        " AND user_id = ?3"
    } else {
        ""
    };
    let sql = format!(
        "SELECT id, type, user_id, connection_id, client_id, received_at, data \
         FROM \"{table}\" WHERE id > ?1{user_clause} ORDER BY id LIMIT ?2"
    );
    let mut stmt = db.prepare(&sql).map_err(query_err)?;
    // SQLite reads a negative LIMIT as "no limit".
    let limit: i64 = opts
        .limit
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut rows = match &opts.user {
        Some(u) => stmt.query(params![opts.after_id, limit, u]),
        None => stmt.query(params![opts.after_id, limit]),
    }
    .map_err(query_err)?;
    loop {
        let row = match rows.next() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(source) => return Err(DecryptError::Row { id: None, source }),
        };
        let id: i64 = row
            .get(0)
            .map_err(|source| DecryptError::Row { id: None, source })?;
        let row_err = |source| DecryptError::Row {
            id: Some(id),
            source,
        };
        let row = Row {
            id,
            kind: row.get(1).map_err(row_err)?,
            user_id: row.get(2).map_err(row_err)?,
            connection_id: row.get(3).map_err(row_err)?,
            client_id: row.get(4).map_err(row_err)?,
            received_at: row.get(5).map_err(row_err)?,
            data: row.get(6).map_err(row_err)?,
        };
        em.emit(&row)?;
    }
}

/// The CLI: load the configuration as `serve` does (file, environment,
/// defaults) and export to stdout. A closed pipe (`| head`) ends quietly.
pub fn run(config_file: Option<&Path>, opts: &ExportOptions) -> Result<usize, DecryptError> {
    let cfg = Config::load(config_file, &Overrides::default()).map_err(DecryptError::Config)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match export(&cfg, opts, &mut out) {
        Err(DecryptError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_712_000_000_123), "2024-04-01T19:33:20.123Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn identifiers() {
        assert!(is_ident("sensors_data"));
        assert!(is_ident("_t1"));
        assert!(!is_ident("1t"));
        assert!(!is_ident("a\"b"));
        assert!(!is_ident(""));
        assert!(!is_ident(&"a".repeat(65)));
    }
}
