//! Channels: subscribe (with recovery through `since`), unsubscribe,
//! publish. A publication goes to its channel's home shard to be numbered.

use std::sync::Arc;

use simd_json::prelude::*;

use crate::auth::Identity;
use crate::env::Handling;
use crate::policy::Action;
use crate::proto::{Dialect, ErrorCode, Out, field};
use crate::work::{HistoryQuery, PubEvent, Reply, Work, WsReply};

use super::reply::{Replies, channel_arg, forwarded, permitted_channel, reply_error, required};
use super::state::Session;

impl Session {
    pub(super) fn subscribe(
        &mut self,
        v: &simd_json::BorrowedValue<'_>,
        rid: Option<&[u8]>,
        id: &Identity,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) {
        let Some(channel) = permitted_channel(v, rid, id, Action::Subscribe, &ctx.env.cfg, out)
        else {
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
                            Dialect::Native,
                        );
                        return;
                    }
                }
            }
        };
        if !self.subs.iter().any(|s| &**s == channel) {
            if self.subs.len() >= ctx.env.cfg.channels.max_subscriptions {
                reply_error(
                    out,
                    ErrorCode::TooManySubscriptions,
                    &format!(
                        "at most {} subscriptions per connection",
                        ctx.env.cfg.channels.max_subscriptions
                    ),
                    rid,
                    Dialect::Native,
                );
                return;
            }
            let ch: Arc<str> = Arc::from(channel);
            ctx.desk
                .local
                .subscribe(&ctx.env.router, ctx.env.shard, &ch, ctx.key);
            self.subs.push(ch);
        }
        if let Some((offset, epoch)) = since {
            // Subscribed first, so every later publication reaches us; the
            // home shard's answer carries the ones before it.
            let ch: Arc<str> = Arc::from(channel);
            // One entry per recovery in flight (bounded: a connection's
            // subscriptions times the queries it may send).
            if self.recovering.len() < 4 * ctx.env.cfg.channels.max_subscriptions {
                ctx.desk.local.recovery_started(&ch);
                self.recovering.push(ch.clone());
            }
            ctx.desk.work.push(Work::History {
                channel: ch.clone(),
                query: HistoryQuery::Recover {
                    offset,
                    epoch: Box::from(epoch),
                },
                reply: Reply::ws(
                    ctx.asker(),
                    rid,
                    Dialect::Native,
                    WsReply::Subscribed { channel: ch },
                ),
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

    pub(super) fn unsubscribe(
        &mut self,
        v: &simd_json::BorrowedValue<'_>,
        rid: Option<&[u8]>,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) {
        let Some(channel) = channel_arg(v, rid, &ctx.env.cfg, out) else {
            return;
        };
        let Some(i) = self.subs.iter().position(|s| &**s == channel) else {
            reply_error(
                out,
                ErrorCode::NotSubscribed,
                &format!("not subscribed to {channel:?}"),
                rid,
                Dialect::Native,
            );
            return;
        };
        let ch = self.subs.swap_remove(i);
        self.left(&ch, &mut ctx.desk.local);
        ctx.desk
            .local
            .unsubscribe(&ctx.env.router, ctx.env.shard, &ch, ctx.key);
        let mut b = Vec::new();
        Out::new(&mut b, "unsubscribed")
            .str("channel", channel)
            .opt_raw("requestId", rid)
            .finish();
        out.text(&b);
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn publish(
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    id: &Identity,
    ctx: &mut Handling<'_>,
    out: &mut dyn Replies,
) {
    let Some(channel) = permitted_channel(v, rid, id, Action::Publish, &ctx.env.cfg, out) else {
        return;
    };
    if required(v, "data", rid, out).is_none() {
        return;
    }
    let data = forwarded(v, raw, "data").unwrap_or_default();
    let ch: Arc<str> = Arc::from(channel);
    // `published` (with the offset) comes once the home shard numbered it.
    ctx.desk.work.push(Work::Publish {
        channel: ch.clone(),
        event: PubEvent {
            from: Some(user.clone()),
            data: Box::from(&*data),
        },
        reply: Some(Reply::ws(
            ctx.asker(),
            rid,
            Dialect::Native,
            WsReply::Published { channel: ch },
        )),
    });
}
