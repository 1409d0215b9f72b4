//! Per-shard counters. The shard counts in plain integers on its own thread
//! and publishes them to atomics once per loop turn, so the hot path never
//! does an atomic read-modify-write per message.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Counts kept by the shard thread itself.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Counters { $($(#[doc = $doc])* pub $name: u64,)* }

        /// The published copy, readable from any thread.
        #[derive(Debug, Default)]
        pub struct ShardStats { $($name: AtomicU64,)* }

        impl ShardStats {
            pub fn publish(&self, c: &Counters) {
                $(self.$name.store(c.$name, Relaxed);)*
            }
            pub fn snapshot(&self) -> Counters {
                Counters { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl Counters {
            /// Field-wise sum (totals across shards).
            pub fn add(&mut self, o: &Counters) {
                $(self.$name += o.$name;)*
            }

            /// Every field with its name and its doc line.
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), concat!($($doc),*), self.$name),)*]
            }
        }
    };
}

/// Counters that go up and down (Prometheus gauges); the others only grow.
const GAUGES: &[&str] = &[
    "connections",
    "sockets",
    "local_users",
    "local_channels",
    "history_channels",
];

/// The Prometheus text exposition (format 0.0.4) of every shard's counters,
/// labelled by shard.
pub fn prometheus(shards: &[Counters]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(first) = shards.first() else {
        return out;
    };
    for (i, (name, doc, _)) in first.fields().into_iter().enumerate() {
        let gauge = GAUGES.contains(&name);
        let metric = if gauge {
            format!("switchboard_{name}")
        } else {
            format!("switchboard_{name}_total")
        };
        let _ = writeln!(out, "# HELP {metric} {}", doc.trim());
        let _ = writeln!(
            out,
            "# TYPE {metric} {}",
            if gauge { "gauge" } else { "counter" }
        );
        for (shard, c) in shards.iter().enumerate() {
            if let Some((_, _, v)) = c.fields().get(i) {
                let _ = writeln!(out, "{metric}{{shard=\"{shard}\"}} {v}");
            }
        }
    }
    out
}

counters! {
    /// Open WebSocket connections (gauge).
    connections,
    /// Sockets currently owned, including handshakes and closing ones (gauge).
    sockets,
    /// TCP connections accepted by (or handed to) this shard.
    accepted,
    /// Successful upgrades.
    upgrades,
    /// Requests answered with an HTTP error instead of an upgrade.
    rejected,
    /// Of those, 503 at max_connections.
    rejected_capacity,
    /// Of those, 429 from the per-IP limit.
    rejected_rate,
    /// Data messages received.
    messages_in,
    /// Data messages queued for sending.
    messages_out,
    bytes_in,
    bytes_out,
    /// Connections closed for exceeding max_outbound_bytes.
    slow_consumers,
    /// Connections closed for a protocol, UTF-8 or size violation.
    protocol_errors,
    /// Connections closed because a pong did not arrive.
    heartbeat_timeouts,
    /// Handshakes that timed out.
    handshake_timeouts,
    /// Pings sent by the heartbeat.
    pings_sent,
    /// Loop iterations.
    loop_turns,
    /// Users with connections on this shard (gauge, from the shard's own index).
    local_users,
    /// Channels with subscribers on this shard (gauge).
    local_channels,
    /// Channels whose home is this shard with history state kept (gauge).
    history_channels,
    /// Channel publications numbered by this shard (as the channel's home).
    publications,
    /// Ingested records committed and acknowledged.
    records_stored,
    /// Direct messages stored in an offline inbox.
    inbox_stored,
    /// Inbox messages sent again for want of an ack.
    redeliveries,
    /// Storage requests refused because the writer's queue was full.
    store_rejected,
    /// Connections closed because their token was revoked (4001).
    revoked_closes,
}

impl Counters {
    /// Sum over the given per-shard stats.
    pub fn total<'a>(stats: impl IntoIterator<Item = &'a ShardStats>) -> Counters {
        let mut t = Counters::default();
        for s in stats {
            t.add(&s.snapshot());
        }
        t
    }
}
