//! Direct messages to a user (stored in the offline inbox when asked for an
//! ack or when the user is offline), broadcast, and inbox acks.

use std::sync::Arc;

use simd_json::prelude::*;

use crate::auth::Identity;
use crate::env::Handling;
use crate::policy::{rule_allows, valid_id};
use crate::proto::encode::shared_frame;
use crate::proto::{Dialect, ErrorCode, Out, field, field_str};
use crate::work::{Audience, Reply, Work, WsReply};

use super::reply::{Replies, forwarded, reply_error, required};
use super::state::Bucket;

#[allow(clippy::too_many_arguments)]
pub(super) fn direct(
    chat: bool,
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    id: &Identity,
    stored: &mut Bucket,
    ctx: &mut Handling<'_>,
    out: &mut dyn Replies,
) {
    if !rule_allows(ctx.env.cfg.channels.direct, id) {
        reply_error(
            out,
            ErrorCode::Forbidden,
            "direct messages are not allowed for this identity",
            rid,
            Dialect::Native,
        );
        return;
    }
    let to = ["to", "userId", "recipient"]
        .iter()
        .find_map(|k| field_str(v, k));
    let Some(to) = to.filter(|t| valid_id(t)) else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"to\" (a user id) is required",
            rid,
            Dialect::Native,
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
            Dialect::Native,
        );
        return;
    };
    let event = if chat { "chat" } else { "direct" };
    let mut b = Vec::new();
    Out::new(&mut b, event)
        .str("from", user)
        .str("to", to)
        .raw("data", &data)
        .finish();
    let to: Arc<str> = Arc::from(to);
    let want_ack = field(v, "ack").and_then(|a| a.as_bool()) == Some(true);
    if want_ack && !ctx.env.storage() {
        reply_error(
            out,
            ErrorCode::StorageDisabled,
            "acknowledged delivery needs storage (storage.backend = \"none\")",
            rid,
            Dialect::Native,
        );
        return;
    }
    if ctx.env.storage() && (want_ack || ctx.env.router.user_shards(&to) == 0) {
        if stored_limited(stored, ctx) {
            ctx.desk.refused.inbox_rate += 1;
            reply_error(
                out,
                ErrorCode::RateLimited,
                "stored messages rate exceeded (inbox.stored_per_second); retry later",
                rid,
                Dialect::Native,
            );
            return;
        }
        store_direct(ctx, Some(user.clone()), to, b, rid);
        return;
    }
    deliver_counted(ctx, Audience::User(to.clone()), &b, rid, to);
}

/// Take one token from the connection's bucket of stored messages
/// (`inbox.stored_per_second`, burst `inbox.stored_burst`); true if empty.
/// Storing costs a commit and keeps bytes for days: it has its own rate,
/// below the rate of messages.
fn stored_limited(bucket: &mut Bucket, ctx: &Handling<'_>) -> bool {
    let cfg = &ctx.env.cfg.inbox;
    if cfg.stored_per_second == 0 {
        return false;
    }
    !bucket.take(cfg.stored_per_second, cfg.stored_burst, 1, ctx.now)
}

/// Keep a direct message in `to`'s inbox; once stored it is delivered with
/// its id (and redelivered until acknowledged).
pub fn store_direct(
    ctx: &mut Handling<'_>,
    from: Option<Arc<str>>,
    to: Arc<str>,
    event: Vec<u8>,
    rid: Option<&[u8]>,
) {
    let reply = Reply::ws(
        ctx.asker(),
        rid,
        Dialect::Native,
        WsReply::SentStored {
            to: to.clone(),
            id: 0,
        },
    );
    let work = Work::store_direct(ctx.asker(), from, to, event, &ctx.env.cfg.inbox, reply);
    ctx.desk.work.push(work);
}

/// Queue `event` for `audience`; the sender gets `sent {to, connections}`
/// once every target shard has said how many connections it reached.
fn deliver_counted(
    ctx: &mut Handling<'_>,
    audience: Audience,
    event: &[u8],
    rid: Option<&[u8]>,
    to: Arc<str>,
) {
    ctx.desk.work.push(Work::Deliver {
        audience,
        frame: shared_frame(event),
        reply: Some(Reply::ws(
            ctx.asker(),
            rid,
            Dialect::Native,
            WsReply::Sent { to },
        )),
        ack: None,
    });
}

#[allow(clippy::too_many_arguments)]
pub(super) fn broadcast(
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    id: &Identity,
    ctx: &mut Handling<'_>,
    out: &mut dyn Replies,
) {
    if !rule_allows(ctx.env.cfg.channels.broadcast, id) {
        reply_error(
            out,
            ErrorCode::Forbidden,
            "broadcast is not allowed for this identity",
            rid,
            Dialect::Native,
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

/// `{"type":"ack","id":N}` from a client: inbox message `id` arrived.
pub(super) fn ack(
    v: &simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    user: &Arc<str>,
    ctx: &mut Handling<'_>,
    out: &mut dyn Replies,
) {
    let Some(id) = field(v, "id").and_then(|i| i.as_i64()) else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"id\" (the message id, a number) is required",
            rid,
            Dialect::Native,
        );
        return;
    };
    ctx.desk.work.push(Work::Acked {
        user: user.clone(),
        id,
    });
}
