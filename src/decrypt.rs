//! `switchboard decrypt`: the operator's export of ingested records, with
//! the encrypted fields opened (docs/STORAGE.md, "Ingested records and
//! encryption").
//!
//! The database is opened read-only, so this is safe beside a running
//! server: it reads committed records and never takes a write lock.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{OpenFlags, params};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::clock::rfc3339_ms;
use crate::config::{Config, ConfigError, Overrides};
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
            DecryptError::BadTable { .. }
            | DecryptError::NoDatabase { .. }
            | DecryptError::NoTable { .. } => None,
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

    let mut n = 0;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let row = match rows.next() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(source) => return Err(DecryptError::Row { id: None, source }),
        };
        let id: i64 = row
            .get(0)
            .map_err(|source| DecryptError::Row { id: None, source })?;
        let row_err = |source| DecryptError::Row {
            id: Some(id),
            source,
        };
        let kind: String = row.get(1).map_err(row_err)?;
        let user_id: String = row.get(2).map_err(row_err)?;
        let connection_id: String = row.get(3).map_err(row_err)?;
        let client_id: Option<String> = row.get(4).map_err(row_err)?;
        let received_at: i64 = row.get(5).map_err(row_err)?;
        let data: String = row.get(6).map_err(row_err)?;
        let plain = reveal_with(sealer.as_ref(), &data)
            .map_err(|source| DecryptError::Record { id, source })?;
        let data = RawValue::from_string(plain).map_err(|e| DecryptError::Record {
            id,
            source: OpenError::StoredNotJson {
                reason: e.to_string(),
            },
        })?;
        let line = Line {
            id,
            kind: &kind,
            user_id: &user_id,
            connection_id: &connection_id,
            client_id: client_id.as_deref(),
            received_at: rfc3339_ms(received_at),
            data: &data,
        };
        buf.clear();
        serde_json::to_writer(&mut buf, &line)
            .map_err(|e| DecryptError::Write(std::io::Error::other(e)))?;
        buf.push(b'\n');
        out.write_all(&buf).map_err(DecryptError::Write)?;
        n += 1;
    }
    out.flush().map_err(DecryptError::Write)?;
    Ok(n)
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
