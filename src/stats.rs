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
        pub struct ShardStats {
            $($name: AtomicU64,)*
            /// Latency histograms, published beside the counters.
            pub histograms: Histograms,
        }

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

/// A run of the same failure (accept out of descriptors, a full disk),
/// logged as one episode instead of one line per failure: a line when it
/// begins, a line a minute with the count while it lasts, a line with the
/// count when it ends. It ends at the first success [`Episode::QUIET`] or
/// more after its last failure: at a limit, successes and failures
/// alternate (a freed descriptor is taken, the next accept fails), and
/// that is one episode, not one per flip. The caller counts every failure
/// in a metric too.
#[derive(Debug)]
pub struct Episode {
    what: &'static str,
    level: log::Level,
    failures: u64,
    began: Option<std::time::Instant>,
    reported: Option<std::time::Instant>,
    last_failure: Option<std::time::Instant>,
}

impl Episode {
    /// How often a lasting episode says it is still going.
    pub const REPEAT: std::time::Duration = std::time::Duration::from_secs(60);
    /// How long without a failure before a success ends the episode; longer
    /// than the longest accept pause (1 s), so an accept that works once
    /// after a pause does not end an episode that is still going.
    pub const QUIET: std::time::Duration = std::time::Duration::from_secs(5);

    /// `what` names the failure in the log lines (`"accept"`).
    pub const fn new(what: &'static str, level: log::Level) -> Episode {
        Episode {
            what,
            level,
            failures: 0,
            began: None,
            reported: None,
            last_failure: None,
        }
    }

    /// One more failure; logs only at the start and once per [`Self::REPEAT`].
    pub fn failed(&mut self, now: std::time::Instant, err: &dyn std::fmt::Display) {
        self.failures += 1;
        self.last_failure = Some(now);
        match (self.began, self.reported) {
            (None, _) => {
                self.began = Some(now);
                self.reported = Some(now);
                log::log!(
                    self.level,
                    "{} failing: {err} (more failures are counted, not logged, until it recovers)",
                    self.what
                );
            }
            (Some(began), Some(last)) if now.saturating_duration_since(last) >= Self::REPEAT => {
                self.reported = Some(now);
                log::log!(
                    self.level,
                    "{} still failing: {} failures in {:.0?}; last: {err}",
                    self.what,
                    self.failures,
                    now.saturating_duration_since(began)
                );
            }
            _ => {}
        }
    }

    /// A success: an episode whose last failure is [`Self::QUIET`] old
    /// ends, with one line. True if it ended (or none was running).
    pub fn succeeded(&mut self, now: std::time::Instant) -> bool {
        let Some(began) = self.began else {
            return true;
        };
        if self
            .last_failure
            .is_some_and(|t| now.saturating_duration_since(t) < Self::QUIET)
        {
            return false;
        }
        log::warn!(
            "{} recovered after {} failures in {:.1?}",
            self.what,
            self.failures,
            now.saturating_duration_since(began)
        );
        self.began = None;
        self.failures = 0;
        self.reported = None;
        true
    }

    /// Failures in the running episode (0 when none runs).
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];
const NB: usize = BUCKETS_US.len() + 1;

/// A latency histogram kept by one shard thread (plain integers).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Histo {
    pub counts: [u64; NB],
    pub sum_us: u64,
}

impl Histo {
    pub fn observe(&mut self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(NB - 1);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The published copy of a [`Histo`].
#[derive(Debug, Default)]
pub struct AtomicHisto {
    counts: [AtomicU64; NB],
    sum_us: AtomicU64,
}

impl AtomicHisto {
    pub fn publish(&self, h: &Histo) {
        for (a, v) in self.counts.iter().zip(h.counts) {
            a.store(v, Relaxed);
        }
        self.sum_us.store(h.sum_us, Relaxed);
    }

    pub fn snapshot(&self) -> Histo {
        let mut h = Histo::default();
        for (v, a) in h.counts.iter_mut().zip(&self.counts) {
            *v = a.load(Relaxed);
        }
        h.sum_us = self.sum_us.load(Relaxed);
        h
    }
}

/// Every latency histogram of a shard.
#[derive(Debug, Default)]
pub struct Histograms {
    /// HTTP API requests: request parsed to response queued.
    pub api: AtomicHisto,
    /// Storage requests (ingest acks, stored direct messages): queued for the
    /// writer to its answer back on the shard (includes the commit).
    pub store: AtomicHisto,
}

/// Local (unpublished) histograms of a shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalHistos {
    pub api: Histo,
    pub store: Histo,
}

impl Histograms {
    pub fn publish(&self, h: &LocalHistos) {
        self.api.publish(&h.api);
        self.store.publish(&h.store);
    }
}

/// Append the latency histograms of every shard (Prometheus text format).
pub fn prometheus_histograms(shards: &[std::sync::Arc<ShardStats>], out: &mut String) {
    use std::fmt::Write;
    type Pick = fn(&Histograms) -> &AtomicHisto;
    let all: [(&str, &str, Pick); 2] = [
        (
            "switchboard_api_request_seconds",
            "HTTP API requests, from parsed request to queued response.",
            |h| &h.api,
        ),
        (
            "switchboard_store_seconds",
            "Storage requests, from queued for the writer to the answer (commit included).",
            |h| &h.store,
        ),
    ];
    for (name, help, pick) in all {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (shard, st) in shards.iter().enumerate() {
            let h = pick(&st.histograms).snapshot();
            let mut cum = 0;
            for (i, c) in h.counts.iter().enumerate() {
                cum += c;
                let le = match BUCKETS_US.get(i) {
                    Some(us) => format!("{}", *us as f64 / 1e6),
                    None => "+Inf".to_owned(),
                };
                let _ = writeln!(out, "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cum}");
            }
            let _ = writeln!(
                out,
                "{name}_sum{{shard=\"{shard}\"}} {}",
                h.sum_us as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {cum}");
        }
    }
}

/// Append process-wide counters (not per shard): name, help, value.
pub fn prometheus_process(counters: &[(&str, &str, u64)], out: &mut String) {
    use std::fmt::Write;
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
}

/// Counters that go up and down (Prometheus gauges); the others only grow.
const GAUGES: &[&str] = &[
    "connections",
    "sockets",
    "local_users",
    "local_channels",
    "history_channels",
    "shard_queue_bytes",
    "shard_queue_peak_bytes",
    "inbox_turn_peak_bytes",
    "history_bytes",
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
    /// Bytes read from sockets (after TLS decryption: WebSocket frames and HTTP requests).
    bytes_in,
    /// Bytes written to sockets (before TLS encryption: frames and HTTP responses).
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
    /// Bytes of publications kept in memory for history on this shard (gauge; at most its share of history.max_bytes).
    history_bytes,
    /// Kept publications dropped, oldest first, because this shard's share of history.max_bytes was full.
    history_evicted,
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
    /// Storage requests the store failed to commit (the asker got storage_error).
    store_failures,
    /// Connections closed because their token was revoked (4001).
    revoked_closes,
    /// Connections closed because their token expired unrefreshed (4004).
    token_expired_closes,
    /// HTTP requests served (API, health, metrics, console).
    api_requests,
    /// Bytes other shards queued for this one and it has not handled yet (gauge).
    shard_queue_bytes,
    /// The most bytes ever seen queued for this shard at the start of a turn (gauge).
    shard_queue_peak_bytes,
    /// Client publications and messages refused (`overloaded`) because a target shard had shard_queue_bytes queued.
    shard_queue_refused,
    /// History pages built (for a `history` request, a recovery or the API).
    history_pages,
    /// `history` requests refused (`overloaded`) because the connection had MAX_PENDING_HISTORY pages on their way or half its max_outbound_bytes queued.
    history_refused,
    /// Client messages refused (`rate_limited`) past rate_limit.messages_per_second (history and presence cost rate_limit.request_cost).
    rate_limited,
    /// Direct messages refused (`rate_limited`) past the sender's inbox.stored_per_second.
    inbox_rate_refused,
    /// Unauthenticated connections closed (1009) or HTTP requests refused before their body for exceeding pre_auth_max_bytes.
    pre_auth_refused,
    /// HTTP requests answered 408 because their body did not arrive within handshake_timeout.
    body_timeouts,
    /// Direct messages not stored: the recipient's inbox or the sender's quota was full (inbox.*).
    inbox_refused,
    /// Replies not built because their connection had more than max_outbound_bytes queued.
    replies_skipped,
    /// Loop turns whose inbox handling stopped at shard_turn_bytes (the rest waited one turn).
    inbox_turns_cut,
    /// The most bytes of inbox messages handled in one loop turn (gauge).
    inbox_turn_peak_bytes,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_episode_ends_only_after_a_quiet_success() {
        let mut e = Episode::new("test", log::Level::Error);
        let t0 = std::time::Instant::now();
        assert!(e.succeeded(t0), "nothing running");
        e.failed(t0, &"boom");
        // Flapping at a limit: a success right after a failure continues it.
        assert!(!e.succeeded(t0 + Duration::from_millis(10)));
        e.failed(t0 + Duration::from_millis(20), &"boom");
        assert_eq!(e.failures(), 2);
        assert!(!e.succeeded(t0 + Duration::from_millis(500)));
        assert!(e.succeeded(t0 + Duration::from_millis(20) + Episode::QUIET));
        assert_eq!(e.failures(), 0);
    }

    /// Issue 11 point 14: `# HELP` lines were empty for bytes in/out.
    #[test]
    fn every_metric_has_help_text() {
        for (name, doc, _) in Counters::default().fields() {
            assert!(!doc.trim().is_empty(), "{name} has no doc line");
        }
        let text = prometheus(&[Counters::default()]);
        for line in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(line.split_whitespace().count() > 3, "empty help: {line}");
        }
    }

    #[test]
    fn histogram_buckets_and_exposition() {
        let mut h = Histo::default();
        h.observe(Duration::from_micros(50)); // <= 100 us
        h.observe(Duration::from_micros(100)); // <= 100 us (inclusive)
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(9)); // +Inf
        assert_eq!(h.count(), 4);
        assert_eq!(h.counts[0], 2);
        assert_eq!(
            h.counts[BUCKETS_US.iter().position(|&b| b == 5_000).unwrap()],
            1
        );
        assert_eq!(h.counts[NB - 1], 1);
        let stats = std::sync::Arc::new(ShardStats::default());
        stats.histograms.publish(&LocalHistos {
            api: h,
            store: Histo::default(),
        });
        assert_eq!(stats.histograms.api.snapshot(), h);
        let mut text = String::new();
        prometheus_histograms(&[stats], &mut text);
        assert!(text.contains("# TYPE switchboard_api_request_seconds histogram"));
        assert!(
            text.contains("switchboard_api_request_seconds_bucket{shard=\"0\",le=\"0.0001\"} 2")
        );
        assert!(text.contains("switchboard_api_request_seconds_bucket{shard=\"0\",le=\"+Inf\"} 4"));
        assert!(text.contains("switchboard_api_request_seconds_count{shard=\"0\"} 4"));
    }
}
