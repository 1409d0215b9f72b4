//! The protocol state of one connection on `ws_path`: who it is, what it
//! subscribed to, its rate-limit bucket and recoveries in flight.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Identity;
use crate::config::Config;
use crate::route::{LocalIndex, Router};

/// Close codes of the application protocol (4000-4999 are ours).
pub mod close {
    /// The token was revoked (seed 001 `token_revoked`).
    pub const TOKEN_REVOKED: u16 = 4001;
    /// Authentication failed; the preceding error message says why.
    pub const AUTH_FAILED: u16 = 4003;
    /// No `authenticate` message within `auth.timeout`.
    pub const AUTH_TIMEOUT: u16 = 4008;
}

/// Features announced in the `connected` welcome.
pub const FEATURES: &[&str] = &[
    "channels",
    "publish",
    "direct",
    "broadcast",
    "presence",
    "request",
    "history",
    "recovery",
    "inbox",
    "ack",
    "ingest",
];

/// Features without storage (`storage.backend = "none"`): no inbox, acks
/// or ingestion; history is kept in memory only.
pub const FEATURES_NO_STORAGE: &[&str] = &[
    "channels",
    "publish",
    "direct",
    "broadcast",
    "presence",
    "request",
    "history",
    "recovery",
];

/// What the client gave at connect time, kept until authentication.
#[derive(Debug, Default, Clone)]
pub struct ConnectParams {
    /// `Authorization: Bearer` or `?token=`.
    pub token: Option<String>,
    /// `?artifactId=` (seed 004 targeting).
    pub artifact_id: Option<String>,
    /// `?userId=`: the user id in auth mode `none` (development).
    pub dev_user: Option<String>,
}

/// Protocol state of an open connection on `ws_path`.
pub struct Session {
    /// Set once authenticated.
    pub(super) user: Option<Arc<str>>,
    pub(super) identity: Option<Box<Identity>>,
    pub(super) subs: Vec<Arc<str>>,
    pub(super) params: Option<Box<ConnectParams>>,
    /// Token bucket for the per-connection message rate limit.
    pub(super) tokens: f32,
    pub(super) refilled: Option<Instant>,
    /// Ingestible messages received (seed 000 `dataReceived`).
    pub(super) data_received: u32,
    /// Channels subscribed with `since` whose recovery is still on its way:
    /// live publications for them are dropped (the recovery carries them).
    pub(super) recovering: Vec<Arc<str>>,
    /// When the upgrade completed (ms since the epoch).
    pub(super) connected_at_ms: i64,
    /// Socket.IO wire state (None for a native client).
    pub(super) sio: Option<Box<super::socketio::SioState>>,
}

/// What the connection should do after a handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Just authenticated: start heartbeats.
    Authenticated,
    /// Close with this code and reason (after the queued replies).
    Close(u16, &'static str),
}

impl Session {
    pub fn new(params: ConnectParams) -> Self {
        Session {
            user: None,
            identity: None,
            subs: Vec::new(),
            params: Some(Box::new(params)),
            tokens: 0.0,
            refilled: None,
            data_received: 0,
            recovering: Vec::new(),
            connected_at_ms: crate::clock::now_ms(),
            sio: None,
        }
    }

    pub fn connected_at_ms(&self) -> i64 {
        self.connected_at_ms
    }

    /// Server-side subscribe or unsubscribe (HTTP API, seed 001
    /// `area_added`/`area_removed`): no permission check, the backend decides.
    /// Returns whether the connection's subscriptions changed.
    pub fn server_membership(
        &mut self,
        channel: &Arc<str>,
        subscribe: bool,
        local: &mut LocalIndex,
        router: &Router,
        shard: usize,
        key: usize,
    ) -> bool {
        let at = self.subs.iter().position(|s| s == channel);
        match (subscribe, at) {
            (true, None) => {
                local.subscribe(router, shard, channel, key);
                self.subs.push(channel.clone());
                true
            }
            (false, Some(i)) => {
                let ch = self.subs.swap_remove(i);
                self.left(&ch, local);
                local.unsubscribe(router, shard, &ch, key);
                true
            }
            _ => false,
        }
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_deref()
    }

    pub fn data_received(&self) -> u32 {
        self.data_received
    }

    /// Is a recovery for `channel` on its way (drop live publications)?
    pub fn is_recovering(&self, channel: &str) -> bool {
        !self.recovering.is_empty() && self.recovering.iter().any(|c| &**c == channel)
    }

    /// The recovery for `channel` arrived: live publications flow again.
    /// One recovery for `channel` arrived (several may be in flight: live
    /// publications flow again once the last one is in).
    pub fn recovered(&mut self, channel: &str, local: &mut LocalIndex) {
        let found = self.recovering.iter().position(|c| &**c == channel);
        if let Some(i) = found {
            self.recovering.swap_remove(i);
            local.recovery_ended(channel, 1);
        }
    }

    /// Forget every recovery of `channel` (it was left).
    pub(super) fn left(&mut self, channel: &str, local: &mut LocalIndex) {
        let before = self.recovering.len();
        self.recovering.retain(|c| &**c != channel);
        local.recovery_ended(channel, (before - self.recovering.len()) as u32);
    }

    pub fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    pub fn is_authenticated(&self) -> bool {
        self.user.is_some()
    }

    pub fn subscriptions(&self) -> &[Arc<str>] {
        &self.subs
    }

    /// The connection stops being open: leave every index.
    pub fn on_close(&mut self, local: &mut LocalIndex, router: &Router, shard: usize, key: usize) {
        for ch in self.recovering.drain(..) {
            local.recovery_ended(&ch, 1);
        }
        for ch in self.subs.drain(..) {
            local.unsubscribe(router, shard, &ch, key);
        }
        if let Some(user) = self.user.take() {
            local.remove_user(router, shard, &user, key);
        }
    }

    pub(super) fn rate_limited(&mut self, cfg: &Config, now: Instant) -> bool {
        let rate = cfg.rate_limit.messages_per_second;
        if rate == 0 {
            return false;
        }
        let burst = cfg.rate_limit.burst.max(1) as f32;
        let last = self.refilled.unwrap_or(now);
        if self.refilled.is_none() {
            self.tokens = burst;
        }
        let gained = now.saturating_duration_since(last).as_secs_f32() * rate as f32;
        self.tokens = (self.tokens + gained).min(burst);
        self.refilled = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            false
        } else {
            true
        }
    }
}
