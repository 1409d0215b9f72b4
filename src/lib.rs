//! Switchboard: a real-time WebSocket gateway on its own sharded mio event loop.
//!
//! See docs/ARCHITECTURE.md for the map of modules and threads.

#![forbid(unsafe_code)]

pub mod accept;
pub mod admission;
pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod conn;
pub mod console;
pub mod deadline;
pub mod decrypt;
pub mod env;
pub mod error;
pub mod history;
pub mod http;
pub mod id;
pub mod ingest;
pub mod logging;
pub mod migrate;
pub mod policy;
pub mod proto;
pub mod revoke;
pub mod route;
pub mod server;
pub mod session;
pub mod shard;
pub mod stats;
pub mod store;
pub mod timer;
pub mod tls;
pub mod work;
pub mod ws;

pub use config::Config;
pub use error::StartError;
pub use server::Server;

/// Raise the open-file soft limit to the hard limit; returns (before, after, hard).
/// Each connection is one descriptor, so the soft limit caps connections.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64, u64)> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    let (now, _) = rlimit::Resource::NOFILE.get()?;
    Ok((soft, now, hard))
}
