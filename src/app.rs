//! The protocol state of one connection on `ws_path`, and the handlers for
//! every client message (docs/PROTOCOL.md). Sans-IO: handlers write replies
//! into a byte sink and ask the shard for deliveries through `Outgoing`.

use std::sync::Arc;
use std::time::Instant;

use simd_json::prelude::*;

use crate::auth::{Authenticator, Identity};
use crate::config::{Config, Rule};
use crate::id::ConnId;
use crate::proto::{self, ErrorCode, Out, field, field_str};
use crate::route::Router;
use crate::shard::local::LocalIndex;
use crate::ws::frame::{self, OpCode};

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
    user: Option<Arc<str>>,
    identity: Option<Box<Identity>>,
    subs: Vec<Arc<str>>,
    params: Option<Box<ConnectParams>>,
    /// Token bucket for the per-connection message rate limit.
    tokens: f32,
    refilled: Option<Instant>,
    /// Ingestible messages received (seed 000 `dataReceived`).
    data_received: u32,
    /// Channels subscribed with `since` whose recovery is still on its way:
    /// live publications for them are dropped (the recovery carries them).
    recovering: Vec<Arc<str>>,
    /// When the upgrade completed (ms since the epoch).
    connected_at_ms: i64,
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

/// Who a delivery is for.
#[derive(Debug, Clone)]
pub enum Audience {
    User(Arc<str>),
    /// Several users (the HTTP API's `/websocket/message/users`).
    Users(Arc<[Arc<str>]>),
    Channel(Arc<str>),
    /// Every authenticated connection.
    All,
}

/// Where to send the outcome of a cross-shard operation.
#[derive(Debug, Clone)]
pub struct Reply {
    pub key: usize,
    pub conn: ConnId,
    pub request_id: Option<Vec<u8>>,
    pub kind: ReplyKind,
}

#[derive(Debug, Clone)]
pub enum ReplyKind {
    /// `{"type":"sent","to",...,"connections":n}` after a direct message or broadcast.
    Sent { to: Arc<str> },
    /// `sent` for a message stored in the offline inbox first (`stored`, `id`).
    SentStored { to: Arc<str>, id: i64 },
    /// `{"type":"response","action":"presence",...}`.
    Presence { channel: Arc<str>, upper: bool },
    /// `{"type":"published","channel","offset","epoch"}` once the home shard numbered it.
    Published { channel: Arc<str> },
    /// `subscribed` with the recovery outcome.
    Subscribed { channel: Arc<str> },
    /// `{"type":"response","action":"history",...}`.
    History { channel: Arc<str>, upper: bool },
    /// An HTTP API response (the connection is an HTTP one).
    Api(Box<crate::api::Pending>),
}

/// A channel publication on its way to the channel's home shard.
#[derive(Debug, Clone)]
pub struct PubEvent {
    /// The publishing user (absent for the HTTP API).
    pub from: Option<Arc<str>>,
    /// The `data` JSON text, verbatim.
    pub data: Box<[u8]>,
}

/// What a shard asks a channel's home shard about its history.
#[derive(Debug, Clone)]
pub enum HistoryQuery {
    /// Everything after `offset` in `epoch` (a subscribe with `since`).
    Recover { offset: u64, epoch: Box<str> },
    /// A page: after `since` (ascending), or the latest `limit`.
    Page { since: Option<u64>, limit: usize },
}

/// What the writer's answer to a storage request is for.
#[derive(Debug)]
pub enum StoreWait {
    /// An ingested record: `ack` to the connection.
    Ingest {
        request_id: Option<Vec<u8>>,
        client_id: Option<String>,
    },
    /// A direct message stored in the recipient's inbox: deliver it with
    /// its id, then `sent` to the sender.
    /// Its `reply` kind is completed with the id once stored.
    InboxPut {
        to: Arc<str>,
        payload: Box<[u8]>,
        reply: Reply,
    },
    /// A revocation committed: apply it on every shard, then answer.
    Revoke {
        revocation: Arc<crate::store::Revocation>,
        reply: Option<Reply>,
    },
    /// The user's pending inbox, to deliver to the connection that logged in.
    Inbox,
}

/// Work a handler asks the shard to do once the connection's turn ends.
#[derive(Debug)]
pub enum Outgoing {
    Deliver {
        audience: Audience,
        frame: Arc<[u8]>,
        reply: Option<Reply>,
        /// An inbox message id: track for redelivery until acknowledged.
        ack: Option<i64>,
    },
    Presence {
        channel: Arc<str>,
        reply: Reply,
    },
    /// A channel publication: numbered by its home shard, then fanned out.
    Publish {
        channel: Arc<str>,
        event: PubEvent,
        reply: Option<Reply>,
    },
    /// Recovery or a history page, answered by the channel's home shard.
    History {
        channel: Arc<str>,
        query: HistoryQuery,
        reply: Reply,
    },
    /// A request for the storage writer; the answer comes back to this connection.
    Store {
        key: usize,
        conn: ConnId,
        op: crate::store::Op,
        wait: StoreWait,
    },
    /// A client acknowledged inbox message `id`: stop its redeliveries everywhere.
    Acked {
        user: Arc<str>,
        id: i64,
    },
    /// An HTTP API query to some shards (`shards` is a bitmask).
    Query {
        shards: u64,
        query: crate::api::ShardQuery,
        reply: Reply,
    },
    /// Store a revocation (when storage is on), then apply it everywhere.
    Revoke {
        revocation: crate::store::Revocation,
        reply: Option<Reply>,
    },
}

/// Shard state a handler may use.
pub struct AppCtx<'a> {
    pub cfg: &'a Config,
    pub auth: &'a Authenticator,
    pub router: &'a Router,
    pub local: &'a mut LocalIndex,
    pub shard: usize,
    pub key: usize,
    pub conn: ConnId,
    pub json: &'a mut simd_json::Buffers,
    /// Scratch for a copy of the message before in-place parsing.
    pub raw: &'a mut Vec<u8>,
    pub outgoing: &'a mut Vec<Outgoing>,
    pub now: Instant,
    /// Seconds the server has been up (for `status`).
    pub uptime_secs: u64,
    pub open_connections: usize,
    /// A storage writer runs (`storage.backend` is not `none`).
    pub storage: bool,
    pub sealer: Option<&'a crate::ingest::Sealer>,
    pub revoked: &'a crate::revoke::Revocations,
}

/// Replies to the connection itself: each call is one text frame.
pub trait Replies {
    fn text(&mut self, json: &[u8]);
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
    fn left(&mut self, channel: &str, local: &mut LocalIndex) {
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

    /// Right after the upgrade: authenticate from the connect parameters if
    /// possible; otherwise wait for an `authenticate` message.
    pub fn on_open(&mut self, ctx: &mut AppCtx<'_>, out: &mut dyn Replies) -> Verdict {
        let token = self.params.as_ref().and_then(|p| p.token.clone());
        match (ctx.auth, token) {
            (Authenticator::None, _) => {
                let user = self
                    .params
                    .as_ref()
                    .and_then(|p| p.dev_user.clone())
                    .filter(|u| valid_name(u, 128))
                    .unwrap_or_else(|| format!("anon-{}", ctx.conn));
                self.login(anonymous(user), ctx, out, None)
            }
            (_, Some(token)) => self.authenticate(&token, ctx, out, None),
            (_, None) => Verdict::Continue,
        }
    }

    fn authenticate(
        &mut self,
        token: &str,
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
        rid: Option<&[u8]>,
    ) -> Verdict {
        match ctx.auth.authenticate(token) {
            Ok(mut identity) => {
                // A shared static token says nothing about who holds it: the
                // client may name itself with `?userId=`.
                if let (Authenticator::StaticToken(_), Some(u)) = (
                    ctx.auth,
                    self.params.as_ref().and_then(|p| p.dev_user.as_deref()),
                ) && valid_name(u, 128)
                {
                    identity.user_id = u.to_owned();
                }
                self.login(identity, ctx, out, rid)
            }
            Err(e) => {
                let mut b = Vec::new();
                Out::new(&mut b, "error")
                    .str("code", e.code())
                    .str("message", &e.to_string())
                    .opt_raw("requestId", rid)
                    .finish();
                out.text(&b);
                Verdict::Close(close::AUTH_FAILED, "authentication failed")
            }
        }
    }

    fn login(
        &mut self,
        identity: Identity,
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
        rid: Option<&[u8]>,
    ) -> Verdict {
        if ctx.revoked.covers(&identity, crate::clock::now_ms()) {
            reply_error(
                out,
                ErrorCode::TokenRevoked,
                "this token was revoked",
                rid,
                false,
            );
            return Verdict::Close(close::TOKEN_REVOKED, "token revoked");
        }
        let user: Arc<str> = Arc::from(identity.user_id.as_str());
        ctx.local.add_user(ctx.router, ctx.shard, &user, ctx.key);
        let params = self.params.take();
        // Seed 004 targeting: tenant-wide and artifact channels from claims
        // and connect parameters, joined without a permission check.
        let mut auto = Vec::new();
        if let Some(t) = identity.tenant.as_deref().filter(|t| valid_name(t, 128)) {
            auto.push(format!("tenant:{t}"));
            if let Some(a) = params
                .as_ref()
                .and_then(|p| p.artifact_id.as_deref())
                .filter(|a| valid_name(a, 128))
            {
                auto.push(format!("tenant:{t}:artifact:{a}"));
            }
        }
        for ch in auto {
            let ch: Arc<str> = Arc::from(ch);
            if ctx.local.subscribe(ctx.router, ctx.shard, &ch, ctx.key) {
                self.subs.push(ch);
            }
        }
        let mut b = Vec::new();
        let subs: Vec<&str> = self.subs.iter().map(|s| &**s).collect();
        Out::new(&mut b, "connected")
            .str("connectionId", &ctx.conn.to_string())
            .str("userId", &user)
            .strs(
                "features",
                if ctx.storage {
                    FEATURES
                } else {
                    FEATURES_NO_STORAGE
                },
            )
            .strs("channels", &subs)
            .opt_raw("requestId", rid)
            .finish();
        out.text(&b);
        if ctx.storage {
            // Deliver what waited in the offline inbox, in order.
            ctx.outgoing.push(Outgoing::Store {
                key: ctx.key,
                conn: ctx.conn,
                op: crate::store::Op::Inbox {
                    user: user.clone(),
                    limit: ctx.cfg.inbox.max_per_user,
                },
                wait: StoreWait::Inbox,
            });
        }
        self.user = Some(user);
        self.identity = Some(Box::new(identity));
        Verdict::Authenticated
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

    fn rate_limited(&mut self, cfg: &Config, now: Instant) -> bool {
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

    /// Handle one text message.
    pub fn on_text(
        &mut self,
        text: &mut [u8],
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        // The original bytes: simd-json rewrites `text` in place, and `data`
        // is forwarded verbatim from here.
        let mut raw = std::mem::take(ctx.raw);
        raw.clear();
        raw.extend_from_slice(text);
        let verdict = self.on_message(text, &raw, ctx, out);
        *ctx.raw = raw;
        verdict
    }

    fn on_message(
        &mut self,
        text: &mut [u8],
        raw: &[u8],
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        let msg = match proto::decode::decode(text, ctx.json) {
            Ok(m) => m,
            Err((code, message, rid)) => {
                reply_error(out, code, &message, rid.as_deref(), false);
                return Verdict::Continue;
            }
        };
        let rid = msg.request_id.as_deref();
        let kind = msg.kind();
        if self.rate_limited(ctx.cfg, ctx.now) {
            reply_error(
                out,
                ErrorCode::RateLimited,
                "message rate limit exceeded",
                rid,
                false,
            );
            return Verdict::Continue;
        }
        let v = &msg.value;
        match kind {
            "ping" => {
                let mut b = Vec::new();
                Out::new(&mut b, "pong").opt_raw("requestId", rid).finish();
                out.text(&b);
                return Verdict::Continue;
            }
            "authenticate" | "authentication" => {
                if self.is_authenticated() {
                    reply_error(
                        out,
                        ErrorCode::AlreadyAuthenticated,
                        "already authenticated",
                        rid,
                        false,
                    );
                    return Verdict::Continue;
                }
                let Some(token) = field_str(v, "token") else {
                    reply_error(
                        out,
                        ErrorCode::MissingField,
                        "\"token\" (string) is required",
                        rid,
                        false,
                    );
                    return Verdict::Continue;
                };
                let token = token.to_owned();
                return self.authenticate(&token, ctx, out, rid);
            }
            _ => {}
        }
        let (Some(user), Some(identity)) = (self.user.clone(), self.identity.as_deref()) else {
            let known = matches!(
                kind,
                "subscribe"
                    | "unsubscribe"
                    | "publish"
                    | "send"
                    | "chat"
                    | "broadcast"
                    | "request"
                    | "REQUEST"
                    | "ack"
            ) || ctx.cfg.ingest.types.iter().any(|t| t == kind);
            if known {
                reply_error(
                    out,
                    ErrorCode::NotAuthenticated,
                    "authenticate first",
                    rid,
                    false,
                );
            } else {
                unknown_type(out, kind, rid);
            }
            return Verdict::Continue;
        };
        let identity = identity.clone();
        match kind {
            "subscribe" => self.subscribe(v, rid, &identity, ctx, out),
            "unsubscribe" => self.unsubscribe(v, rid, ctx, out),
            "publish" => publish(v, raw, rid, &user, &identity, ctx, out),
            "send" | "chat" => direct(kind, v, raw, rid, &user, &identity, ctx, out),
            "broadcast" => broadcast(v, raw, rid, &user, &identity, ctx, out),
            "ack" => ack(v, rid, &user, ctx, out),
            k if ctx.cfg.ingest.types.iter().any(|t| t == k) => {
                self.data_received = self.data_received.saturating_add(1);
                ingest(k, v, rid, &user, ctx, out);
            }
            k if k.eq_ignore_ascii_case("request") => {
                let upper = k == "REQUEST";
                self.request(v, rid, upper, &user, &identity, ctx, out)
            }
            other => unknown_type(out, other, rid),
        }
        Verdict::Continue
    }

    fn subscribe(
        &mut self,
        v: &simd_json::BorrowedValue<'_>,
        rid: Option<&[u8]>,
        id: &Identity,
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
    ) {
        let Some(channel) = permitted_channel(v, rid, id, Action::Subscribe, ctx.cfg, out) else {
            return;
        };
        let since = match field(v, "since") {
            None => None,
            Some(since) => {
                let offset = since.get("offset").and_then(|o| o.as_u64());
                let epoch = since.get_str("epoch");
                match (offset, epoch) {
                    (Some(o), Some(e)) => Some((o, e)),
                    _ => {
                        reply_error(
                            out,
                            ErrorCode::MissingField,
                            "\"since\" needs \"offset\" (number) and \"epoch\" (string)",
                            rid,
                            false,
                        );
                        return;
                    }
                }
            }
        };
        if !self.subs.iter().any(|s| &**s == channel) {
            if self.subs.len() >= ctx.cfg.channels.max_subscriptions {
                reply_error(
                    out,
                    ErrorCode::TooManySubscriptions,
                    &format!(
                        "at most {} subscriptions per connection",
                        ctx.cfg.channels.max_subscriptions
                    ),
                    rid,
                    false,
                );
                return;
            }
            let ch: Arc<str> = Arc::from(channel);
            ctx.local.subscribe(ctx.router, ctx.shard, &ch, ctx.key);
            self.subs.push(ch);
        }
        if let Some((offset, epoch)) = since {
            // Subscribed first, so every later publication reaches us; the
            // home shard's answer carries the ones before it.
            let ch: Arc<str> = Arc::from(channel);
            // One entry per recovery in flight (bounded: a connection's
            // subscriptions times the queries it may send).
            if self.recovering.len() < 4 * ctx.cfg.channels.max_subscriptions {
                ctx.local.recovery_started(&ch);
                self.recovering.push(ch.clone());
            }
            ctx.outgoing.push(Outgoing::History {
                channel: ch.clone(),
                query: HistoryQuery::Recover {
                    offset,
                    epoch: Box::from(epoch),
                },
                reply: Reply {
                    key: ctx.key,
                    conn: ctx.conn,
                    request_id: rid.map(<[u8]>::to_vec),
                    kind: ReplyKind::Subscribed { channel: ch },
                },
            });
            return;
        }
        let mut b = Vec::new();
        Out::new(&mut b, "subscribed")
            .str("channel", channel)
            .opt_raw("requestId", rid)
            .finish();
        out.text(&b);
    }

    fn unsubscribe(
        &mut self,
        v: &simd_json::BorrowedValue<'_>,
        rid: Option<&[u8]>,
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
    ) {
        let Some(channel) = channel_arg(v, rid, ctx.cfg, out) else {
            return;
        };
        let Some(i) = self.subs.iter().position(|s| &**s == channel) else {
            reply_error(
                out,
                ErrorCode::NotSubscribed,
                &format!("not subscribed to {channel:?}"),
                rid,
                false,
            );
            return;
        };
        let ch = self.subs.swap_remove(i);
        self.left(&ch, ctx.local);
        ctx.local.unsubscribe(ctx.router, ctx.shard, &ch, ctx.key);
        let mut b = Vec::new();
        Out::new(&mut b, "unsubscribed")
            .str("channel", channel)
            .opt_raw("requestId", rid)
            .finish();
        out.text(&b);
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        v: &simd_json::BorrowedValue<'_>,
        rid: Option<&[u8]>,
        upper: bool,
        user: &Arc<str>,
        id: &Identity,
        ctx: &mut AppCtx<'_>,
        out: &mut dyn Replies,
    ) {
        let Some(rid) = rid else {
            reply_error(
                out,
                ErrorCode::MissingField,
                "\"requestId\" (string or number) is required",
                None,
                upper,
            );
            return;
        };
        let Some(action) = field_str(v, "action") else {
            reply_error(
                out,
                ErrorCode::MissingField,
                "\"action\" (string) is required",
                Some(rid),
                upper,
            );
            return;
        };
        let data = field(v, "data");
        let mut b = Vec::new();
        match action {
            "whoami" => {
                let subs: Vec<&str> = self.subs.iter().map(|s| &**s).collect();
                let chans: Vec<&str> = id.channels.iter().map(String::as_str).collect();
                response_head(&mut b, upper, rid, action);
                b.extend_from_slice(b"{\"userId\":");
                proto::write_str(&mut b, user);
                b.extend_from_slice(b",\"connectionId\":");
                proto::write_str(&mut b, &ctx.conn.to_string());
                b.extend_from_slice(b",\"role\":");
                opt_json_str(&mut b, id.role.as_deref());
                b.extend_from_slice(b",\"tenant\":");
                opt_json_str(&mut b, id.tenant.as_deref());
                b.extend_from_slice(b",\"allowedChannels\":");
                json_strs(&mut b, &chans);
                b.extend_from_slice(b",\"subscriptions\":");
                json_strs(&mut b, &subs);
                b.extend_from_slice(b"}");
                response_tail(&mut b);
                out.text(&b);
            }
            "status" => {
                response_head(&mut b, upper, rid, action);
                b.extend_from_slice(b"{\"version\":");
                proto::write_str(&mut b, env!("CARGO_PKG_VERSION"));
                use std::io::Write;
                let _ = write!(
                    b,
                    ",\"uptimeSeconds\":{},\"connections\":{},\"shards\":{},\"usersOnline\":{},\"channels\":{}}}",
                    ctx.uptime_secs,
                    ctx.open_connections,
                    ctx.router.shard_count(),
                    ctx.router.user_count(),
                    ctx.router.channel_count()
                );
                response_tail(&mut b);
                out.text(&b);
            }
            "presence" => {
                let Some(channel) = visible_channel(data, v, rid, upper, id, ctx.cfg, out) else {
                    return;
                };
                ctx.outgoing.push(Outgoing::Presence {
                    channel: Arc::from(channel),
                    reply: Reply {
                        key: ctx.key,
                        conn: ctx.conn,
                        request_id: Some(rid.to_vec()),
                        kind: ReplyKind::Presence {
                            channel: Arc::from(channel),
                            upper,
                        },
                    },
                });
            }
            "history" => {
                let Some(channel) = visible_channel(data, v, rid, upper, id, ctx.cfg, out) else {
                    return;
                };
                let num = |name: &str| match data.and_then(|d| d.get(name)) {
                    None => Ok(None),
                    Some(v) => v.as_u64().map(Some).ok_or(name.to_owned()),
                };
                let (since, limit) = match (num("since"), num("limit")) {
                    (Ok(s), Ok(l)) => (s, l),
                    (Err(name), _) | (_, Err(name)) => {
                        reply_error(
                            out,
                            ErrorCode::MissingField,
                            &format!("data.{name} must be a whole number"),
                            Some(rid),
                            upper,
                        );
                        return;
                    }
                };
                let max = ctx.cfg.history.max_page;
                let limit = limit.map_or(max, |l| (l as usize).clamp(1, max));
                let ch: Arc<str> = Arc::from(channel);
                ctx.outgoing.push(Outgoing::History {
                    channel: ch.clone(),
                    query: HistoryQuery::Page { since, limit },
                    reply: Reply {
                        key: ctx.key,
                        conn: ctx.conn,
                        request_id: Some(rid.to_vec()),
                        kind: ReplyKind::History { channel: ch, upper },
                    },
                });
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                reply_error(
                    out,
                    ErrorCode::UnknownAction,
                    &format!("unknown action {shown:?}"),
                    Some(rid),
                    upper,
                );
            }
        }
    }
}

/// The channel a `request` action reads (`data.channel`, or `channel`),
/// if valid and the identity may see it; otherwise the error is sent.
fn visible_channel<'v>(
    data: Option<&'v simd_json::BorrowedValue<'_>>,
    v: &'v simd_json::BorrowedValue<'_>,
    rid: &[u8],
    upper: bool,
    id: &Identity,
    cfg: &Config,
    out: &mut dyn Replies,
) -> Option<&'v str> {
    let Some(channel) = data
        .and_then(|d| d.get_str("channel"))
        .or_else(|| field_str(v, "channel"))
    else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "this action needs data.channel",
            Some(rid),
            upper,
        );
        return None;
    };
    let problem = if !valid_channel(channel, cfg) {
        Some((ErrorCode::InvalidChannel, "invalid channel name".to_owned()))
    } else if !allowed(cfg, Action::Subscribe, channel, id) {
        Some((
            ErrorCode::Forbidden,
            format!("not allowed to see {channel:?}"),
        ))
    } else {
        None
    };
    if let Some((code, message)) = problem {
        reply_error(out, code, &message, Some(rid), upper);
        return None;
    }
    Some(channel)
}

/// `{"channel":..,"connections":n,"users":[{"userId","connections"}]}`.
pub fn presence_json(b: &mut Vec<u8>, channel: &str, connections: u64, users: &[(Arc<str>, u32)]) {
    use std::io::Write;
    b.extend_from_slice(b"{\"channel\":");
    proto::write_str(b, channel);
    let _ = write!(b, ",\"connections\":{connections},\"users\":[");
    for (i, (u, n)) in users.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(b"{\"userId\":");
        proto::write_str(b, u);
        let _ = write!(b, ",\"connections\":{n}}}");
    }
    b.extend_from_slice(b"]}");
}

fn opt_json_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => proto::write_str(b, s),
        None => b.extend_from_slice(b"null"),
    }
}

fn json_strs(b: &mut Vec<u8>, items: &[&str]) {
    b.push(b'[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        proto::write_str(b, s);
    }
    b.push(b']');
}

/// `{"type":"response","requestId":..,"action":..,"data":` (the caller writes data).
pub fn response_head(b: &mut Vec<u8>, upper: bool, rid: &[u8], action: &str) {
    b.extend_from_slice(if upper {
        b"{\"type\":\"RESPONSE\",\"requestId\":".as_slice()
    } else {
        b"{\"type\":\"response\",\"requestId\":".as_slice()
    });
    b.extend_from_slice(rid);
    b.extend_from_slice(b",\"action\":");
    proto::write_str(b, action);
    b.extend_from_slice(b",\"data\":");
}

/// Close a response started with [`response_head`].
pub fn response_tail(b: &mut Vec<u8>) {
    b.extend_from_slice(b",\"timestamp\":");
    proto::write_str(b, &crate::clock::rfc3339_now());
    b.push(b'}');
}

/// An error reply; `upper` adds the seed 004 shape (`"ERROR"` with a nested `error`).
pub fn reply_error(
    out: &mut dyn Replies,
    code: ErrorCode,
    message: &str,
    rid: Option<&[u8]>,
    upper: bool,
) {
    let mut b = Vec::new();
    if upper {
        Out::new(&mut b, "ERROR")
            .str("code", code.as_str())
            .str("message", message)
            .opt_raw("requestId", rid)
            .raw("error", &{
                let mut e = Vec::new();
                e.extend_from_slice(b"{\"code\":");
                proto::write_str(&mut e, code.as_str());
                e.extend_from_slice(b",\"message\":");
                proto::write_str(&mut e, message);
                e.push(b'}');
                e
            })
            .finish();
    } else {
        proto::error(&mut b, code, message, rid);
    }
    out.text(&b);
}

fn unknown_type(out: &mut dyn Replies, kind: &str, rid: Option<&[u8]>) {
    let shown: String = kind.chars().take(64).collect();
    reply_error(
        out,
        ErrorCode::UnknownType,
        &format!("unknown message type {shown:?}"),
        rid,
        false,
    );
}

fn is_admin(id: &Identity) -> bool {
    id.role.as_deref() == Some("admin")
}

/// The identity of a connection in auth mode `none` (development).
fn anonymous(user: String) -> Identity {
    Identity {
        user_id: user,
        channels: Vec::new(),
        role: None,
        tenant: None,
        token_id: None,
        expires_at: None,
        issued_at: None,
    }
}

/// A name a user id, tenant or artifact may have: printable, no spaces.
fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

pub fn valid_channel(s: &str, cfg: &Config) -> bool {
    valid_name(s, cfg.channels.max_channel_length)
}

/// A required field (any JSON type), or a `missing_field` error.
fn required<'v, 'a>(
    v: &'v simd_json::BorrowedValue<'a>,
    name: &str,
    rid: Option<&[u8]>,
    out: &mut dyn Replies,
) -> Option<&'v simd_json::BorrowedValue<'a>> {
    let found = field(v, name);
    if found.is_none() {
        reply_error(
            out,
            ErrorCode::MissingField,
            &format!("{name:?} is required"),
            rid,
            false,
        );
    }
    found
}

fn channel_arg<'v>(
    v: &'v simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    cfg: &Config,
    out: &mut dyn Replies,
) -> Option<&'v str> {
    let Some(channel) = field_str(v, "channel") else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"channel\" (string) is required",
            rid,
            false,
        );
        return None;
    };
    if !valid_channel(channel, cfg) {
        reply_error(
            out,
            ErrorCode::InvalidChannel,
            &format!(
                "channel names are 1-{} printable characters without spaces",
                cfg.channels.max_channel_length
            ),
            rid,
            false,
        );
        return None;
    }
    Some(channel)
}

/// The message's valid `channel` if `id` may do `action` on it; otherwise
/// the error reply is sent and `None` returned.
fn permitted_channel<'v>(
    v: &'v simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    id: &Identity,
    action: Action,
    cfg: &Config,
    out: &mut dyn Replies,
) -> Option<&'v str> {
    let channel = channel_arg(v, rid, cfg, out)?;
    if !allowed(cfg, action, channel, id) {
        let verb = match action {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish to",
        };
        reply_error(
            out,
            ErrorCode::Forbidden,
            &format!("not allowed to {verb} {channel:?}"),
            rid,
            false,
        );
        return None;
    }
    Some(channel)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
}

/// May `id` subscribe to (or publish on) `channel`?
///
/// Admins may do anything. Otherwise the channel's namespace (the part before
/// the first `:`) picks the rule from `[channels.namespaces]`, or the default
/// rule; a `channels` claim pattern that matches also allows, unless the
/// rule is `none`.
pub fn allowed(cfg: &Config, action: Action, channel: &str, id: &Identity) -> bool {
    if is_admin(id) {
        return true;
    }
    let (ns, rest) = channel.split_once(':').unwrap_or(("", channel));
    let rules = cfg.channels.namespaces.get(ns);
    let rule = match (action, rules) {
        (Action::Subscribe, Some(r)) => r.subscribe,
        (Action::Publish, Some(r)) => r.publish,
        (Action::Subscribe, None) => cfg.channels.subscribe,
        (Action::Publish, None) => cfg.channels.publish,
    };
    if rule == Rule::None {
        return false;
    }
    if id.channels.iter().any(|p| glob(p, channel)) {
        return true;
    }
    let owner =
        |who: &str| rest == who || rest.strip_prefix(who).is_some_and(|r| r.starts_with(':'));
    match rule {
        Rule::Any => true,
        Rule::Owner => owner(&id.user_id),
        Rule::Tenant => id.tenant.as_deref().is_some_and(owner),
        Rule::Claims | Rule::Admin | Rule::None => false,
    }
}

fn rule_allows(rule: Rule, id: &Identity) -> bool {
    match rule {
        Rule::Any => true,
        Rule::Admin | Rule::Claims | Rule::Owner | Rule::Tenant | Rule::None => is_admin(id),
    }
}

/// Encode a server message once as a shared text frame.
pub fn shared_frame(json: &[u8]) -> Arc<[u8]> {
    Arc::from(frame::frame_bytes(OpCode::Text, json))
}

/// The JSON text to forward for field `name`: the client's own bytes, or
/// (duplicate keys) the parsed value re-encoded.
fn forwarded<'r>(
    v: &simd_json::BorrowedValue<'_>,
    raw: &'r [u8],
    name: &str,
) -> Option<std::borrow::Cow<'r, [u8]>> {
    if let Some(bytes) = proto::raw_field(raw, name) {
        return Some(std::borrow::Cow::Borrowed(bytes));
    }
    field(v, name).map(|value| std::borrow::Cow::Owned(value.encode().into_bytes()))
}

#[allow(clippy::too_many_arguments)]
fn publish(
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    id: &Identity,
    ctx: &mut AppCtx<'_>,
    out: &mut dyn Replies,
) {
    let Some(channel) = permitted_channel(v, rid, id, Action::Publish, ctx.cfg, out) else {
        return;
    };
    if required(v, "data", rid, out).is_none() {
        return;
    }
    let data = forwarded(v, raw, "data").unwrap_or_default();
    let ch: Arc<str> = Arc::from(channel);
    // `published` (with the offset) comes once the home shard numbered it.
    ctx.outgoing.push(Outgoing::Publish {
        channel: ch.clone(),
        event: PubEvent {
            from: Some(user.clone()),
            data: Box::from(&*data),
        },
        reply: Some(Reply {
            key: ctx.key,
            conn: ctx.conn,
            request_id: rid.map(<[u8]>::to_vec),
            kind: ReplyKind::Published { channel: ch },
        }),
    });
}

/// The `message` event of a channel publication, numbered.
pub fn publication_json(channel: &str, event: &PubEvent, offset: u64, epoch: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(96 + channel.len() + event.data.len());
    Out::new(&mut b, "message")
        .str("channel", channel)
        .opt_str("from", event.from.as_deref())
        .raw("data", &event.data)
        .num("offset", offset)
        .str("epoch", epoch)
        .finish();
    b
}

/// `payload` (a stored JSON object) with `"id":id,"ack":true` added.
pub fn with_ack_id(payload: &[u8], id: i64) -> Vec<u8> {
    let body = match payload.iter().rposition(|&c| c == b'}') {
        Some(end) => payload.get(..end).unwrap_or(payload),
        None => payload,
    };
    let mut b = Vec::with_capacity(body.len() + 32);
    b.extend_from_slice(body);
    if body.iter().any(|c| !c.is_ascii_whitespace() && *c != b'{') {
        b.push(b',');
    }
    use std::io::Write;
    let _ = write!(b, "\"id\":{id},\"ack\":true}}");
    b
}

/// `{"type":"ack","id":N}` from a client: inbox message `id` arrived.
fn ack(
    v: &simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    user: &Arc<str>,
    ctx: &mut AppCtx<'_>,
    out: &mut dyn Replies,
) {
    let Some(id) = field(v, "id").and_then(|i| i.as_i64()) else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"id\" (the message id, a number) is required",
            rid,
            false,
        );
        return;
    };
    ctx.outgoing.push(Outgoing::Acked {
        user: user.clone(),
        id,
    });
}

/// A configured ingestible type (seed 000 `sensor_data`): validate, seal the
/// configured fields, and hand the record to the writer; `ack` follows the commit.
fn ingest(
    kind: &str,
    v: &simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    user: &Arc<str>,
    ctx: &mut AppCtx<'_>,
    out: &mut dyn Replies,
) {
    if !ctx.storage {
        reply_error(
            out,
            ErrorCode::StorageDisabled,
            "this server stores nothing (storage.backend = \"none\")",
            rid,
            false,
        );
        return;
    }
    let Some(data) = required(v, "data", rid, out) else {
        return;
    };
    // A client id makes retries idempotent: the same id is stored once.
    // Integers and strings are both ids (42 and "42" are the same id).
    let client_id = match field(v, "id") {
        None => None,
        Some(i) => match i.value_type() {
            simd_json::ValueType::String => i.as_str().map(str::to_owned),
            simd_json::ValueType::I64 | simd_json::ValueType::U64 => Some(i.encode()),
            _ => {
                reply_error(
                    out,
                    ErrorCode::InvalidData,
                    "\"id\" must be a string or an integer",
                    rid,
                    false,
                );
                return;
            }
        },
    };
    if let Some(c) = &client_id
        && c.len() > 256
    {
        reply_error(
            out,
            ErrorCode::InvalidData,
            "\"id\" is longer than 256 bytes",
            rid,
            false,
        );
        return;
    }
    let stored = match crate::ingest::prepare(&ctx.cfg.ingest, ctx.sealer, data) {
        Ok(s) => s,
        Err(crate::ingest::PrepareError::Invalid(e)) => {
            reply_error(out, ErrorCode::InvalidData, &e.to_string(), rid, false);
            return;
        }
        Err(e) => {
            log::error!("conn={} cannot prepare a record: {e}", ctx.conn);
            reply_error(
                out,
                ErrorCode::StorageError,
                "the record could not be encrypted",
                rid,
                false,
            );
            return;
        }
    };
    ctx.outgoing.push(Outgoing::Store {
        key: ctx.key,
        conn: ctx.conn,
        op: crate::store::Op::Ingest {
            table: Arc::from(ctx.cfg.ingest.table.as_str()),
            kind: kind.to_owned(),
            user: user.clone(),
            connection: ctx.conn.to_string(),
            client_id: client_id.clone(),
            received_at_ms: crate::clock::now_ms(),
            data: stored,
        },
        wait: StoreWait::Ingest {
            request_id: rid.map(<[u8]>::to_vec),
            client_id,
        },
    });
}

#[allow(clippy::too_many_arguments)]
fn direct(
    kind: &str,
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    id: &Identity,
    ctx: &mut AppCtx<'_>,
    out: &mut dyn Replies,
) {
    if !rule_allows(ctx.cfg.channels.direct, id) {
        reply_error(
            out,
            ErrorCode::Forbidden,
            "direct messages are not allowed for this identity",
            rid,
            false,
        );
        return;
    }
    let to = ["to", "userId", "recipient"]
        .iter()
        .find_map(|k| field_str(v, k));
    let Some(to) = to.filter(|t| valid_name(t, 128)) else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"to\" (a user id) is required",
            rid,
            false,
        );
        return;
    };
    let data = forwarded(v, raw, "data").or_else(|| forwarded(v, raw, "message"));
    let Some(data) = data else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"data\" (or \"message\") is required",
            rid,
            false,
        );
        return;
    };
    let event = if kind == "chat" { "chat" } else { "direct" };
    let mut b = Vec::new();
    Out::new(&mut b, event)
        .str("from", user)
        .str("to", to)
        .raw("data", &data)
        .finish();
    let to: Arc<str> = Arc::from(to);
    let want_ack = field(v, "ack").and_then(|a| a.as_bool()) == Some(true);
    if want_ack && !ctx.storage {
        reply_error(
            out,
            ErrorCode::StorageDisabled,
            "acknowledged delivery needs storage (storage.backend = \"none\")",
            rid,
            false,
        );
        return;
    }
    if ctx.storage && (want_ack || ctx.router.user_shards(&to) == 0) {
        store_direct(ctx, to, b, rid);
        return;
    }
    deliver_counted(ctx, Audience::User(to.clone()), &b, rid, to);
}

/// Keep a direct message in `to`'s inbox; once stored it is delivered with
/// its id (and redelivered until acknowledged).
pub fn store_direct(ctx: &mut AppCtx<'_>, to: Arc<str>, event: Vec<u8>, rid: Option<&[u8]>) {
    let now = crate::clock::now_ms();
    let ttl = i64::try_from(ctx.cfg.inbox.ttl.as_millis()).unwrap_or(i64::MAX);
    let payload: Box<[u8]> = event.into_boxed_slice();
    ctx.outgoing.push(Outgoing::Store {
        key: ctx.key,
        conn: ctx.conn,
        op: crate::store::Op::InboxPut {
            user: to.clone(),
            payload: payload.to_vec(),
            created_at_ms: now,
            expires_at_ms: now.saturating_add(ttl),
            max_per_user: ctx.cfg.inbox.max_per_user,
        },
        wait: StoreWait::InboxPut {
            to: to.clone(),
            payload,
            reply: Reply {
                key: ctx.key,
                conn: ctx.conn,
                request_id: rid.map(<[u8]>::to_vec),
                kind: ReplyKind::SentStored { to, id: 0 },
            },
        },
    });
}

/// Queue `event` for `audience`; the sender gets `sent {to, connections}`
/// once every target shard has said how many connections it reached.
fn deliver_counted(
    ctx: &mut AppCtx<'_>,
    audience: Audience,
    event: &[u8],
    rid: Option<&[u8]>,
    to: Arc<str>,
) {
    ctx.outgoing.push(Outgoing::Deliver {
        audience,
        frame: shared_frame(event),
        reply: Some(Reply {
            key: ctx.key,
            conn: ctx.conn,
            request_id: rid.map(<[u8]>::to_vec),
            kind: ReplyKind::Sent { to },
        }),
        ack: None,
    });
}

#[allow(clippy::too_many_arguments)]
fn broadcast(
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    id: &Identity,
    ctx: &mut AppCtx<'_>,
    out: &mut dyn Replies,
) {
    if !rule_allows(ctx.cfg.channels.broadcast, id) {
        reply_error(
            out,
            ErrorCode::Forbidden,
            "broadcast is not allowed for this identity",
            rid,
            false,
        );
        return;
    }
    if required(v, "data", rid, out).is_none() {
        return;
    }
    let data = forwarded(v, raw, "data").unwrap_or_default();
    let mut b = Vec::new();
    Out::new(&mut b, "broadcast")
        .str("from", user)
        .raw("data", &data)
        .finish();
    deliver_counted(ctx, Audience::All, &b, rid, Arc::from("*"));
}

/// What the shards answered for a cross-shard operation.
#[derive(Debug, Default)]
pub struct Gathered<'a> {
    /// Connections reached (or present).
    pub connections: u64,
    pub presence: &'a [(Arc<str>, u32)],
    /// Connections listed by the shards (API client list, user status).
    pub clients: &'a [crate::api::ClientInfo],
    /// The offset and epoch the home shard gave a publication.
    pub published: Option<(u64, &'a str)>,
    /// A recovery or history page.
    pub page: Option<&'a crate::history::Page>,
}

fn publications(b: &mut Vec<u8>, page: &crate::history::Page) {
    b.push(b'[');
    for (i, p) in page.publications.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(p);
    }
    b.push(b']');
}

/// The text of a finished cross-shard reply.
pub fn reply_text(kind: &ReplyKind, request_id: Option<&[u8]>, g: &Gathered<'_>) -> Vec<u8> {
    use std::io::Write;
    let mut b = Vec::new();
    match kind {
        ReplyKind::Sent { to } => {
            Out::new(&mut b, "sent")
                .str("to", to)
                .num("connections", g.connections)
                .opt_raw("requestId", request_id)
                .finish();
        }
        ReplyKind::SentStored { to, id } => {
            Out::new(&mut b, "sent")
                .str("to", to)
                .num("connections", g.connections)
                .raw("stored", b"true")
                .raw("id", id.to_string().as_bytes())
                .opt_raw("requestId", request_id)
                .finish();
        }
        ReplyKind::Presence { channel, upper } => {
            response_head(&mut b, *upper, request_id.unwrap_or(b"null"), "presence");
            presence_json(&mut b, channel, g.connections, g.presence);
            response_tail(&mut b);
        }
        ReplyKind::Published { .. } if g.published.is_none() => {
            proto::error(
                &mut b,
                ErrorCode::Unavailable,
                "the channel's shard is shutting down; nothing was published",
                request_id,
            );
        }
        ReplyKind::Published { channel } => {
            let (offset, epoch) = g.published.unwrap_or((0, ""));
            Out::new(&mut b, "published")
                .str("channel", channel)
                .num("offset", offset)
                .str("epoch", epoch)
                .opt_raw("requestId", request_id)
                .finish();
        }
        ReplyKind::Subscribed { channel } => {
            let mut o = Out::new(&mut b, "subscribed").str("channel", channel);
            if let Some(page) = g.page {
                let mut pubs = Vec::new();
                publications(&mut pubs, page);
                o = o
                    .raw("recovered", if page.complete { b"true" } else { b"false" })
                    .num("offset", page.top)
                    .str("epoch", &page.epoch)
                    .raw("publications", &pubs);
            }
            o.opt_raw("requestId", request_id).finish();
        }
        ReplyKind::Api(_) => {} // answered as HTTP by the shard
        ReplyKind::History { channel, upper } => {
            response_head(&mut b, *upper, request_id.unwrap_or(b"null"), "history");
            b.extend_from_slice(b"{\"channel\":");
            proto::write_str(&mut b, channel);
            if let Some(page) = g.page {
                b.extend_from_slice(b",\"epoch\":");
                proto::write_str(&mut b, &page.epoch);
                let _ = write!(
                    b,
                    ",\"offset\":{},\"hasMore\":{},\"publications\":",
                    page.top, !page.complete
                );
                publications(&mut b, page);
            }
            b.push(b'}');
            response_tail(&mut b);
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob("*", "anything"));
        assert!(glob("room:*", "room:1"));
        assert!(!glob("room:*", "rooms:1"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
    }
}
