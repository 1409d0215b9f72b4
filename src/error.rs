//! Errors that stop the server from starting. Runtime errors on a connection
//! never surface here: they close that connection with a documented code.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigError;

#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    Config(ConfigError),
    /// The address could not be bound (in use, not local, no permission).
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
    /// A certificate or key file is missing or invalid.
    Tls {
        path: PathBuf,
        message: String,
    },
    /// The OS refused a thread, poller or waker.
    Io {
        what: &'static str,
        err: std::io::Error,
    },
    /// The store could not be opened, migrated or loaded.
    Storage(crate::store::StoreError),
    /// The ingestion keys are unusable.
    Ingest(crate::ingest::IngestSetupError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Bind { addr, err } => write!(f, "cannot listen on {addr}: {err}"),
            StartError::Tls { path, message } => {
                write!(
                    f,
                    "TLS configuration error in {}: {message}",
                    path.display()
                )
            }
            StartError::Io { what, err } => write!(f, "cannot create {what}: {err}"),
            StartError::Storage(e) => write!(f, "storage: {e}"),
            StartError::Ingest(e) => write!(f, "ingest: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}
