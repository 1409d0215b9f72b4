//! `request` (and seed 004's `REQUEST`): the built-in actions `whoami`,
//! `status`, `presence` and `history`, answered in the caller's dialect.

use std::sync::Arc;

use simd_json::prelude::*;

use crate::auth::Identity;
use crate::env::Handling;
use crate::proto::encode::{response_head, response_tail};
use crate::proto::{self, Dialect, ErrorCode, field, field_str};
use crate::work::{HistoryQuery, Reply, Work, WsReply};

use super::reply::{Replies, reply_error, visible_channel};
use super::state::{MAX_PENDING_HISTORY, Session};

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn request(
        &mut self,
        v: &simd_json::BorrowedValue<'_>,
        rid: Option<&[u8]>,
        dialect: Dialect,
        user: &Arc<str>,
        id: &Identity,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) {
        let Some(rid) = rid else {
            reply_error(
                out,
                ErrorCode::MissingField,
                "\"requestId\" (string or number) is required",
                None,
                dialect,
            );
            return;
        };
        let Some(action) = field_str(v, "action") else {
            reply_error(
                out,
                ErrorCode::MissingField,
                "\"action\" (string) is required",
                Some(rid),
                dialect,
            );
            return;
        };
        let data = field(v, "data");
        let mut b = Vec::new();
        match action {
            "whoami" => {
                let subs: Vec<&str> = self.subs.iter().map(|s| &**s).collect();
                let chans: Vec<&str> = id.channels.iter().map(String::as_str).collect();
                response_head(&mut b, dialect, rid, action);
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
                response_head(&mut b, dialect, rid, action);
                b.extend_from_slice(b"{\"version\":");
                proto::write_str(&mut b, env!("CARGO_PKG_VERSION"));
                use std::io::Write;
                let _ = write!(
                    b,
                    ",\"uptimeSeconds\":{},\"connections\":{},\"shards\":{},\"usersOnline\":{},\"channels\":{}}}",
                    ctx.env.uptime_secs(),
                    ctx.env.open_connections(),
                    ctx.env.router.shard_count(),
                    ctx.env.router.user_count(),
                    ctx.env.router.channel_count()
                );
                response_tail(&mut b);
                out.text(&b);
            }
            "presence" => {
                let Some(channel) = visible_channel(data, v, rid, dialect, id, &ctx.env.cfg, out)
                else {
                    return;
                };
                ctx.desk.work.push(Work::Presence {
                    channel: Arc::from(channel),
                    reply: Reply::ws(
                        ctx.asker(),
                        Some(rid),
                        dialect,
                        WsReply::Presence {
                            channel: Arc::from(channel),
                        },
                    ),
                });
            }
            "history" => {
                let Some(channel) = visible_channel(data, v, rid, dialect, id, &ctx.env.cfg, out)
                else {
                    return;
                };
                // Checked before any shard builds a page: a client that does
                // not read its answers would have them dropped at the
                // slow-consumer limit after the work was done.
                if self.pending_history >= MAX_PENDING_HISTORY
                    || out.queued() >= ctx.env.cfg.max_outbound_bytes / 2
                {
                    ctx.desk.refused.history += 1;
                    reply_error(
                        out,
                        ErrorCode::Overloaded,
                        "too many history answers waiting to be read; read them, then ask again",
                        Some(rid),
                        dialect,
                    );
                    return;
                }
                self.pending_history += 1;
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
                            dialect,
                        );
                        return;
                    }
                };
                let max = ctx.env.cfg.history.max_page;
                let limit = limit.map_or(max, |l| (l as usize).clamp(1, max));
                let ch: Arc<str> = Arc::from(channel);
                ctx.desk.work.push(Work::History {
                    channel: ch.clone(),
                    query: HistoryQuery::Page { since, limit },
                    reply: Reply::ws(
                        ctx.asker(),
                        Some(rid),
                        dialect,
                        WsReply::History { channel: ch },
                    ),
                });
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                reply_error(
                    out,
                    ErrorCode::UnknownAction,
                    &format!("unknown action {shown:?}"),
                    Some(rid),
                    dialect,
                );
            }
        }
    }
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
