//! What a handler sees of its shard. [`Env`] is read-only for the shard's
//! whole life (configuration, authenticator, routing table, storage handle,
//! every shard's published counters); [`Desk`] is the shard's mutable state
//! that handlers change (its local index, the work they ask for, parse
//! buffers, live revocations). [`Handling`] is one handler call: both, plus
//! the connection and the time. Kept apart from the connections' I/O state
//! so a handler and the connection's output buffer can be borrowed at once.

use std::sync::Arc;
use std::time::Instant;

use crate::admission::{Admission, IpLimiter};
use crate::auth::Authenticator;
use crate::config::{Config, StorageBackend};
use crate::id::ConnId;
use crate::ingest::Sealer;
use crate::revoke::Revocations;
use crate::route::{LocalIndex, Router};
use crate::stats::ShardStats;
use crate::store::WriterHandle;
use crate::work::{Asker, Work};
use crate::ws::Limits;

/// A shard's read-only surroundings.
pub struct Env {
    pub cfg: Arc<Config>,
    /// This shard's index.
    pub shard: usize,
    pub limits: Limits,
    pub auth: Arc<Authenticator>,
    pub router: Arc<Router>,
    pub admission: Arc<Admission>,
    /// The per-IP limit on WebSocket upgrades, shared by every shard.
    pub limiter: Arc<IpLimiter>,
    /// Every shard's published counters (`/metrics`, `/api/status`).
    pub all_stats: Arc<[Arc<ShardStats>]>,
    /// The storage writer, when `storage.backend` is not `none`.
    pub writer: Option<WriterHandle>,
    pub sealer: Option<Arc<Sealer>>,
    pub started: Instant,
}

impl Env {
    /// The server stores (`storage.backend` is not `none`): a writer runs.
    pub fn storage(&self) -> bool {
        self.cfg.storage.backend != StorageBackend::None
    }

    /// Surroundings for driving handlers without a running shard (fuzz
    /// targets, benches, unit tests): shard 0 of 1, an empty routing table,
    /// no storage writer (work items stay on the desk, where the caller can
    /// look at them).
    pub fn detached(cfg: Config, auth: Authenticator, sealer: Option<Sealer>) -> Env {
        let limits = Limits {
            max_frame: cfg.max_frame_size,
            max_message: cfg.max_message_size,
        };
        Env {
            admission: Arc::new(Admission::new(cfg.max_connections)),
            limiter: Arc::new(IpLimiter::new(cfg.per_ip_connections_per_minute)),
            cfg: Arc::new(cfg),
            shard: 0,
            limits,
            auth: Arc::new(auth),
            router: Arc::new(Router::new(1)),
            all_stats: Arc::from(vec![Arc::new(ShardStats::default())]),
            writer: None,
            sealer: sealer.map(Arc::new),
            started: Instant::now(),
        }
    }

    /// Seconds the server has been up (for `status`).
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Open WebSocket connections across shards.
    pub fn open_connections(&self) -> usize {
        self.admission.open()
    }
}

/// The shard's state that handlers change.
#[derive(Default)]
pub struct Desk {
    /// This shard's connections per user and subscribers per channel.
    pub local: LocalIndex,
    /// Work asked for during this turn; the shard carries it out after the
    /// connection's turn.
    pub work: Vec<Work>,
    /// simd-json's reused parse buffers.
    pub json: simd_json::Buffers,
    /// Scratch for a copy of a message before in-place parsing.
    pub raw: Vec<u8>,
    /// Live revocations (checked at login and by the API).
    pub revoked: Revocations,
    /// Graceful shutdown has begun.
    pub shutting_down: bool,
    /// What handlers refused for a budget (published with the counters).
    pub refused: Refused,
}

/// Requests handlers refused because a budget was spent, counted where the
/// shard's counters cannot be reached (published each turn by the shard).
#[derive(Debug, Default, Clone, Copy)]
pub struct Refused {
    /// `history` requests past the connection's pending pages or queued bytes.
    pub history: u64,
    /// Direct messages past `inbox.stored_per_second` of their sender.
    pub inbox_rate: u64,
    /// Messages past `rate_limit.messages_per_second` of their connection.
    pub rate: u64,
}

/// One handler call on one connection.
pub struct Handling<'a> {
    pub env: &'a Env,
    pub desk: &'a mut Desk,
    /// The connection's slab key on this shard.
    pub key: usize,
    pub conn: ConnId,
    pub now: Instant,
}

impl Handling<'_> {
    /// Where answers to this connection's work go.
    pub fn asker(&self) -> Asker {
        Asker {
            key: self.key,
            conn: self.conn,
        }
    }
}
