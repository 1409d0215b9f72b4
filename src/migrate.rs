//! `switchboard migrate-store`: copy a SQLite store (`storage.data_dir`)
//! into the PostgreSQL database of `[storage.postgres]`, for a deployment
//! that grows out of one box (docs/STORAGE.md, "Moving to PostgreSQL").
//!
//! Why it looks like this:
//! - One PostgreSQL transaction for everything: a copy that fails half-way
//!   leaves the target as it was, and it can simply be run again.
//! - The target must be empty: merging two stores would mix record ids,
//!   offsets and epochs that were never meant to meet.
//! - Ids are copied as they are (records, inbox messages) and each sequence
//!   is set past the highest id SQLite ever gave out, so a client's stored
//!   id still names the same record and no id is given out twice.
//! - History rows are copied in SQLite's insertion order, so the byte
//!   budget evicts the same rows first; the clean-shutdown token is copied
//!   too: a store that was stopped cleanly (and whose marker file stays in
//!   `storage.data_dir`) keeps its epochs, so clients can still recover.
//! - The SQLite file is opened read-only; stop the server first (a running
//!   server would go on writing to the file after the copy).

use std::fmt;
use std::path::PathBuf;

use postgres::types::ToSql;
use rusqlite::OpenFlags;

use crate::config::{Config, ConfigError};
use crate::store::StoreError;
use crate::store::postgres::{connect_tool, ingest_table_ddl, prepare_schema};

/// Rows copied, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<(String, u64)>,
    /// Where they went (no password).
    pub target: String,
}

/// Why nothing was copied.
#[derive(Debug)]
#[non_exhaustive]
pub enum MigrateError {
    Config(ConfigError),
    /// No SQLite store in `storage.data_dir`.
    NoDatabase {
        path: PathBuf,
    },
    /// The SQLite store could not be read.
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The SQLite store has another schema version than this build writes.
    SqliteVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// PostgreSQL could not be reached or prepared.
    Pg(StoreError),
    /// A table of the target already holds rows.
    NotEmpty {
        table: String,
        target: String,
    },
    /// Copying a table failed (the transaction was rolled back).
    Copy {
        table: String,
        source: postgres::Error,
    },
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Config(e) => e.fmt(f),
            MigrateError::NoDatabase { path } => write!(
                f,
                "no SQLite store at {} (check storage.data_dir)",
                path.display()
            ),
            MigrateError::Sqlite { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            MigrateError::SqliteVersion {
                path,
                found,
                supported,
            } => write!(
                f,
                "{} has schema version {found}, this build copies version {supported}: start \
                 this build's server on it once (it upgrades the file), stop it, then copy",
                path.display()
            ),
            MigrateError::Pg(e) => e.fmt(f),
            MigrateError::NotEmpty { table, target } => write!(
                f,
                "table {table:?} of {target} is not empty; nothing was copied (copy into an \
                 empty schema: set storage.postgres.schema to a new name)"
            ),
            MigrateError::Copy { table, source } => {
                let detail = source
                    .as_db_error()
                    .map_or_else(|| source.to_string(), |d| d.message().to_owned());
                write!(
                    f,
                    "copying table {table:?} failed: {detail}; nothing was copied"
                )
            }
        }
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateError::Config(e) => Some(e),
            MigrateError::Sqlite { source, .. } => Some(source),
            MigrateError::Pg(e) => Some(e),
            MigrateError::Copy { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A value read from SQLite for one PostgreSQL parameter.
#[derive(Debug)]
enum Val {
    Int(i64),
    Text(String),
    NullText,
}

impl Val {
    fn param(&self) -> &(dyn ToSql + Sync) {
        const NONE: Option<&str> = None;
        match self {
            Val::Int(i) => i,
            Val::Text(s) => s,
            Val::NullText => &NONE,
        }
    }
}

/// One table to copy: its columns (the same names on both sides), the
/// SQLite order, and the serial column whose sequence follows the ids.
struct Table {
    name: String,
    columns: &'static [(&'static str, Kind)],
    order: &'static str,
    serial: Option<&'static str>,
}

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    OptText,
}

const INGEST_COLUMNS: &[(&str, Kind)] = &[
    ("id", Kind::Int),
    ("type", Kind::Text),
    ("user_id", Kind::Text),
    ("connection_id", Kind::Text),
    ("client_id", Kind::OptText),
    ("received_at", Kind::Int),
    ("data", Kind::Text),
];

fn tables(ingest: &str) -> Vec<Table> {
    vec![
        Table {
            name: "channels".into(),
            columns: &[
                ("channel", Kind::Text),
                ("epoch", Kind::Text),
                ("top_offset", Kind::Int),
            ],
            order: "channel",
            serial: None,
        },
        Table {
            name: "history".into(),
            columns: &[
                ("channel", Kind::Text),
                ("offset", Kind::Int),
                ("payload", Kind::Text),
                ("at_ms", Kind::Int),
                ("expires_at_ms", Kind::Int),
            ],
            // Insertion order: the byte budget evicts by it.
            order: "rowid",
            serial: None,
        },
        Table {
            name: "inbox".into(),
            columns: &[
                ("id", Kind::Int),
                ("user_id", Kind::Text),
                ("payload", Kind::Text),
                ("created_at_ms", Kind::Int),
                ("expires_at_ms", Kind::Int),
                ("sender", Kind::OptText),
                ("bytes", Kind::Int),
            ],
            order: "id",
            serial: Some("id"),
        },
        Table {
            name: "revocations".into(),
            columns: &[
                ("kind", Kind::Text),
                ("value", Kind::Text),
                ("revoked_at_ms", Kind::Int),
                ("expires_at_ms", Kind::Int),
                ("reason", Kind::Text),
            ],
            order: "kind, value",
            serial: None,
        },
        Table {
            name: "meta".into(),
            columns: &[("key", Kind::Text), ("value", Kind::Text)],
            order: "key",
            serial: None,
        },
        Table {
            name: ingest.to_owned(),
            columns: INGEST_COLUMNS,
            order: "id",
            serial: Some("id"),
        },
    ]
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Copy the SQLite store of `cfg.storage.data_dir` into `cfg.storage.postgres`.
pub fn migrate(cfg: &Config) -> Result<Report, MigrateError> {
    let path = cfg.storage.data_dir.join(crate::store::sqlite::DB_FILE);
    if !path.is_file() {
        return Err(MigrateError::NoDatabase { path });
    }
    let sq_err = |source| MigrateError::Sqlite {
        path: path.clone(),
        source,
    };
    let src = rusqlite::Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sq_err)?;
    let found: u32 = src
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sq_err)?;
    let supported = crate::store::sqlite::schema_version();
    if found != supported {
        return Err(MigrateError::SqliteVersion {
            path,
            found,
            supported,
        });
    }
    let pg = &cfg.storage.postgres;
    let (mut db, target) = connect_tool(pg, false).map_err(MigrateError::Pg)?;
    prepare_schema(&mut db, pg, &target).map_err(MigrateError::Pg)?;
    let ingest = &cfg.ingest.table;
    db.batch_execute(&ingest_table_ddl(ingest))
        .map_err(|e| MigrateError::Pg(StoreError::Pg(e)))?;
    // The ingest table may be missing from a store that never got a record.
    let has_ingest: bool = src
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [ingest],
            |r| r.get(0),
        )
        .map_err(sq_err)?;
    let mut tx = db
        .transaction()
        .map_err(|e| MigrateError::Pg(StoreError::Pg(e)))?;
    let mut report = Report {
        tables: Vec::new(),
        target: target.clone(),
    };
    for t in tables(ingest) {
        let copy_err = |source| MigrateError::Copy {
            table: t.name.clone(),
            source,
        };
        let qt = quote(&t.name);
        let busy: bool = tx
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {qt})"), &[])
            .and_then(|r| r.try_get(0))
            .map_err(copy_err)?;
        if busy {
            return Err(MigrateError::NotEmpty {
                table: t.name.clone(),
                target,
            });
        }
        if t.name == *ingest && !has_ingest {
            report.tables.push((t.name.clone(), 0));
            continue;
        }
        let cols: Vec<String> = t.columns.iter().map(|(c, _)| quote(c)).collect();
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {qt} ({}) VALUES ({})",
                cols.join(", "),
                marks.join(", ")
            ))
            .map_err(copy_err)?;
        let mut st = src
            .prepare(&format!(
                "SELECT {} FROM {qt} ORDER BY {}",
                cols.join(", "),
                t.order
            ))
            .map_err(sq_err)?;
        let mut rows = st.query([]).map_err(sq_err)?;
        let mut n = 0u64;
        let mut vals: Vec<Val> = Vec::with_capacity(t.columns.len());
        while let Some(r) = rows.next().map_err(sq_err)? {
            vals.clear();
            for (i, (_, kind)) in t.columns.iter().enumerate() {
                vals.push(match kind {
                    Kind::Int => Val::Int(r.get(i).map_err(sq_err)?),
                    Kind::Text => Val::Text(r.get(i).map_err(sq_err)?),
                    Kind::OptText => match r.get::<_, Option<String>>(i).map_err(sq_err)? {
                        Some(s) => Val::Text(s),
                        None => Val::NullText,
                    },
                });
            }
            let params: Vec<&(dyn ToSql + Sync)> = vals.iter().map(Val::param).collect();
            tx.execute(&insert, &params).map_err(copy_err)?;
            n += 1;
        }
        if let Some(col) = t.serial {
            // Past every id SQLite gave out (AUTOINCREMENT remembers
            // deleted ones in sqlite_sequence), so none is given twice.
            let max_id: i64 = src
                .query_row(
                    &format!("SELECT COALESCE(MAX({col}), 0) FROM {qt}"),
                    [],
                    |r| r.get(0),
                )
                .map_err(sq_err)?;
            let seq: i64 = src
                .query_row(
                    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
                    [&t.name],
                    |r| r.get(0),
                )
                .map_err(sq_err)?;
            let last = max_id.max(seq);
            if last > 0 {
                tx.execute(
                    "SELECT setval(pg_get_serial_sequence($1, $2), $3)",
                    &[&qt, &col, &last],
                )
                .map_err(copy_err)?;
            }
        }
        report.tables.push((t.name.clone(), n));
    }
    tx.commit()
        .map_err(|e| MigrateError::Pg(StoreError::Pg(e)))?;
    Ok(report)
}
