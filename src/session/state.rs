//! The protocol state of one connection on `ws_path`: who it is, what it
//! subscribed to, its rate-limit bucket and recoveries in flight.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Identity;
use crate::config::Config;
use crate::route::{LocalIndex, Router};
use crate::timer::TimerKey;

/// Close codes of the application protocol (4000-4999 are ours).
pub mod close {
    /// The token was revoked (seed 001 `token_revoked`).
    pub const TOKEN_REVOKED: u16 = 4001;
    /// Authentication failed; the preceding error message says why.
    pub const AUTH_FAILED: u16 = 4003;
    /// The token expired on the open connection (no `refresh` in time).
    pub const TOKEN_EXPIRED: u16 = 4004;
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
    pub(super) rate: Bucket,
    /// Token bucket for messages stored in offline inboxes.
    pub(super) stored: Bucket,
    /// Ingestible messages received (seed 000 `dataReceived`).
    pub(super) data_received: u32,
    /// Channels subscribed with `since` whose recovery is still on its way:
    /// live publications for them are dropped (the recovery carries them).
    pub(super) recovering: Vec<Arc<str>>,
    /// When the upgrade completed (ms since the epoch).
    pub(super) connected_at_ms: i64,
    /// Socket.IO wire state (None for a native client).
    pub(super) sio: Option<Box<super::sio_state::SioState>>,
    /// `history` requests whose page is on its way (at most
    /// [`MAX_PENDING_HISTORY`]).
    pub(super) pending_history: u8,
    /// The wheel entry of the token's expiry (the connection sets and
    /// cancels it: only it holds the wheel).
    token_timer: Option<TimerKey>,
    /// `token_expiring` was sent for the current token.
    pub(super) expiry_warned: bool,
}

/// What the token timer decided ([`Session::on_token_timer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStep {
    /// Nothing more to do until [`Session::token_wait`].
    Wait,
    /// The token expired: close with this code and reason.
    Close(u16, &'static str),
}

/// `history` requests one connection may have on their way at once: each
/// page may be up to half of `max_outbound_bytes`, and one that cannot be
/// queued is built for nothing. A client that waits for its answers never
/// meets the limit; one that pipelines thousands gets `overloaded`.
pub const MAX_PENDING_HISTORY: u8 = 4;

/// What the connection should do after a handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Just authenticated: start heartbeats (and the token's expiry timer).
    Authenticated,
    /// The token was replaced (`refresh`): restart its expiry timer.
    Refreshed,
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
            rate: Bucket::default(),
            stored: Bucket::default(),
            data_received: 0,
            recovering: Vec::new(),
            connected_at_ms: crate::clock::now_ms(),
            sio: None,
            pending_history: 0,
            token_timer: None,
            expiry_warned: false,
        }
    }

    /// When the connection's token stops being accepted (ms since the
    /// epoch): `exp` plus the leeway a login gets, so an open connection
    /// lasts exactly as long as a new login with the same token would work.
    /// `None`: the token never expires (no `exp`, modes `none` and `token`).
    pub fn token_deadline_ms(&self, cfg: &Config) -> Option<i64> {
        let exp = self.identity.as_ref()?.expires_at?;
        let leeway = i64::try_from(cfg.auth.jwt.leeway.as_millis()).unwrap_or(i64::MAX);
        Some(
            i64::try_from(exp)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000)
                .saturating_add(leeway),
        )
    }

    /// How long until the token timer should fire: at the warning
    /// (`auth.expiry_warning` before the deadline) if not sent yet, else at
    /// the deadline. `None`: no expiry.
    pub fn token_wait(&self, cfg: &Config, now_ms: i64) -> Option<std::time::Duration> {
        let deadline = self.token_deadline_ms(cfg)?;
        let warning = i64::try_from(cfg.auth.expiry_warning.as_millis()).unwrap_or(i64::MAX);
        let at = if warning > 0 && !self.expiry_warned {
            deadline.saturating_sub(warning)
        } else {
            deadline
        };
        let ms = u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0);
        Some(std::time::Duration::from_millis(ms))
    }

    /// The token timer fired (wall clock `now_ms`): past the deadline,
    /// `token_expired` and a close; within the warning, `token_expiring`
    /// once. A wheel that fired early (the wall clock is what counts) just
    /// waits again.
    pub fn on_token_timer(
        &mut self,
        cfg: &Config,
        now_ms: i64,
        out: &mut dyn super::Replies,
    ) -> TokenStep {
        let Some(deadline) = self.token_deadline_ms(cfg) else {
            return TokenStep::Wait;
        };
        if now_ms >= deadline {
            let mut b = Vec::new();
            crate::proto::Out::new(&mut b, "token_expired")
                .str(
                    "message",
                    "the token expired: reconnect with a new token (send refresh before expiry to stay connected)",
                )
                .finish();
            out.text(&b);
            return TokenStep::Close(close::TOKEN_EXPIRED, "token expired");
        }
        let warning = i64::try_from(cfg.auth.expiry_warning.as_millis()).unwrap_or(i64::MAX);
        if warning > 0 && !self.expiry_warned && now_ms >= deadline.saturating_sub(warning) {
            self.expiry_warned = true;
            let exp = self
                .identity
                .as_ref()
                .and_then(|i| i.expires_at)
                .and_then(|e| i64::try_from(e).ok())
                .unwrap_or(i64::MAX / 1000);
            let mut b = Vec::new();
            crate::proto::Out::new(&mut b, "token_expiring")
                .str(
                    "expiresAt",
                    &crate::clock::rfc3339_ms(exp.saturating_mul(1000)),
                )
                .num(
                    "closesIn",
                    u64::try_from((deadline - now_ms) / 1000).unwrap_or(0),
                )
                .finish();
            out.text(&b);
        }
        TokenStep::Wait
    }

    /// The wheel entry of the token timer, taken (to cancel or replace it).
    pub fn take_token_timer(&mut self) -> Option<TimerKey> {
        self.token_timer.take()
    }

    pub fn set_token_timer(&mut self, key: TimerKey) {
        self.token_timer = Some(key);
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

    /// A `history` page arrived (or its request ended without one).
    pub fn history_done(&mut self) {
        self.pending_history = self.pending_history.saturating_sub(1);
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

    /// Take `cost` tokens from the bucket (a costly request takes more than
    /// one: `rate_limit.request_cost`); true if there are not enough.
    pub(super) fn rate_limited(&mut self, cfg: &Config, now: Instant, cost: u32) -> bool {
        let rate = cfg.rate_limit.messages_per_second;
        if rate == 0 {
            return false;
        }
        !self.rate.take(rate, cfg.rate_limit.burst, cost, now)
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` kept (full at
/// first use).
#[derive(Debug, Default, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    refilled: Option<Instant>,
}

impl Bucket {
    /// Take `cost` tokens if there are that many; false (nothing taken) if not.
    pub fn take(&mut self, rate: u32, burst: u32, cost: u32, now: Instant) -> bool {
        let burst = burst.max(1) as f32;
        let last = self.refilled.unwrap_or(now);
        if self.refilled.is_none() {
            self.tokens = burst;
        }
        let gained = now.saturating_duration_since(last).as_secs_f32() * rate as f32;
        self.tokens = (self.tokens + gained).min(burst);
        self.refilled = Some(now);
        // A cost above the burst could never be paid: it takes the whole burst.
        let cost = (cost.max(1) as f32).min(burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Texts(Vec<serde_json::Value>);
    impl super::super::Replies for Texts {
        fn text(&mut self, json: &[u8]) {
            self.0
                .push(serde_json::from_slice(json).unwrap_or_default());
        }
    }

    fn with_exp(exp: Option<u64>) -> Session {
        let mut s = Session::new(ConnectParams::default());
        s.identity = Some(Box::new(Identity {
            expires_at: exp,
            ..Identity::user("alice")
        }));
        s
    }

    /// The deadline is `exp` plus the login leeway; the warning comes
    /// `auth.expiry_warning` before it, once; the close at the deadline.
    #[test]
    fn token_timer_warns_once_then_closes_at_exp_plus_leeway() {
        let mut cfg = Config::default();
        cfg.auth.jwt.leeway = Duration::from_secs(30);
        cfg.auth.expiry_warning = Duration::from_secs(60);
        let exp = 1_000_000u64;
        let deadline = 1_000_030_000i64;
        let mut s = with_exp(Some(exp));
        assert_eq!(s.token_deadline_ms(&cfg), Some(deadline));
        let early = deadline - 100_000;
        assert_eq!(s.token_wait(&cfg, early), Some(Duration::from_secs(40)));
        let mut out = Texts(Vec::new());
        // A wheel that fires early (by the wall clock) changes nothing.
        assert_eq!(s.on_token_timer(&cfg, early, &mut out), TokenStep::Wait);
        assert!(out.0.is_empty());
        let warn_at = deadline - 60_000;
        assert_eq!(s.on_token_timer(&cfg, warn_at, &mut out), TokenStep::Wait);
        assert_eq!(out.0.len(), 1);
        assert_eq!(out.0[0]["type"], "token_expiring");
        assert_eq!(out.0[0]["closesIn"], 60);
        assert_eq!(
            s.token_wait(&cfg, warn_at),
            Some(Duration::from_secs(60)),
            "after the warning, the deadline"
        );
        assert_eq!(
            s.on_token_timer(&cfg, warn_at + 1, &mut out),
            TokenStep::Wait
        );
        assert_eq!(out.0.len(), 1, "one warning");
        assert_eq!(
            s.on_token_timer(&cfg, deadline, &mut out),
            TokenStep::Close(close::TOKEN_EXPIRED, "token expired")
        );
        assert_eq!(out.0[1]["type"], "token_expired");
        // Past the deadline already (e.g. a refresh to an almost expired
        // token): due at once.
        assert_eq!(s.token_wait(&cfg, deadline + 5), Some(Duration::ZERO));
        // No warning configured: straight to the deadline.
        cfg.auth.expiry_warning = Duration::ZERO;
        let s = with_exp(Some(exp));
        assert_eq!(s.token_wait(&cfg, early), Some(Duration::from_secs(100)));
        // No `exp`, or no identity: no timer.
        assert_eq!(with_exp(None).token_wait(&cfg, early), None);
        assert_eq!(
            Session::new(ConnectParams::default()).token_wait(&cfg, early),
            None
        );
    }
}
