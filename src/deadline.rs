//! What a shard's timer wheel holds: one connection's deadline (handshake,
//! heartbeat, pong, auth, linger), its token's expiry, or a redelivery of an unacknowledged inbox
//! message to it. Both the connection (its own timer slot) and the shard
//! (redeliveries) insert these; the shard dispatches them when they fire.

use crate::id::ConnId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// The upgrade request did not complete in time.
    Handshake,
    /// Time to send a heartbeat ping.
    Ping,
    /// The pong for the last ping is due.
    PongDeadline,
    /// A closing connection has waited long enough for its peer.
    Linger,
    /// No `authenticate` message arrived in time.
    Auth,
    /// The connection's token is about to expire (warn) or has expired
    /// (close). Its own slot, held by the session beside the connection's
    /// one timer: it lives as long as the token, across heartbeats.
    TokenExpiry,
    /// Inbox message `id` was not acknowledged yet: redeliver (shard-level,
    /// never the connection's own timer slot). The second field is the
    /// tracking generation, so a stale timer chain does nothing.
    Retry(i64, u32),
}

/// What the shard's timer wheel stores for a connection.
#[derive(Debug, Clone, Copy)]
pub struct TimerRef {
    pub key: usize,
    pub id: ConnId,
    pub kind: TimerKind,
}
