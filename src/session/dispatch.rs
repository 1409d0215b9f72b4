//! One text message: keep the original bytes (forwarded verbatim), decode
//! it once into a typed [`ClientMsg`](crate::proto::ClientMsg), apply the
//! rate limit, and hand it to its handler.

use crate::env::Handling;
use crate::proto::{self, Dialect, ErrorCode, Kind, Out, field_str};

use super::reply::{Replies, reply_error, unknown_type};
use super::state::{Session, Verdict};
use super::{channels, direct, ingest};

impl Session {
    /// Handle one text message.
    pub fn on_text(
        &mut self,
        text: &mut [u8],
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        // The original bytes: simd-json rewrites `text` in place, and `data`
        // is forwarded verbatim from here.
        let mut raw = std::mem::take(&mut ctx.desk.raw);
        raw.clear();
        raw.extend_from_slice(text);
        let verdict = self.on_message(text, &raw, ctx, out);
        ctx.desk.raw = raw;
        verdict
    }

    fn on_message(
        &mut self,
        text: &mut [u8],
        raw: &[u8],
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        let msg = match proto::decode(text, &mut ctx.desk.json) {
            Ok(m) => m,
            Err(e) => {
                reply_error(
                    out,
                    e.code(),
                    &e.to_string(),
                    e.request_id(),
                    Dialect::Native,
                );
                return Verdict::Continue;
            }
        };
        let rid = msg.request_id.as_deref();
        let kind = msg.kind();
        let name = msg.type_name();
        // Refusals before the handler answer in the message's dialect too: a
        // seed 004 client reads `ERROR` with its `error {code, message}`.
        let dialect = msg.dialect;
        // `history` and `presence` make other shards work and may answer
        // with megabytes: they cost more of the bucket than a message.
        let costly = match kind {
            Kind::Request => true,
            Kind::Other(k) => k.eq_ignore_ascii_case("request"),
            _ => false,
        } && matches!(
            field_str(&msg.value, "action"),
            Some("history" | "presence")
        );
        let cost = if costly {
            ctx.env.cfg.rate_limit.request_cost
        } else {
            1
        };
        if self.rate_limited(&ctx.env.cfg, ctx.now, cost) {
            ctx.desk.refused.rate += 1;
            reply_error(
                out,
                ErrorCode::RateLimited,
                "message rate limit exceeded",
                rid,
                dialect,
            );
            return Verdict::Continue;
        }
        let v = &msg.value;
        match kind {
            Kind::Ping => {
                let mut b = Vec::new();
                Out::new(&mut b, "pong").opt_raw("requestId", rid).finish();
                out.text(&b);
                return Verdict::Continue;
            }
            Kind::Authenticate => {
                if self.is_authenticated() {
                    reply_error(
                        out,
                        ErrorCode::AlreadyAuthenticated,
                        "already authenticated",
                        rid,
                        Dialect::Native,
                    );
                    return Verdict::Continue;
                }
                let Some(token) = field_str(v, "token") else {
                    reply_error(
                        out,
                        ErrorCode::MissingField,
                        "\"token\" (string) is required",
                        rid,
                        Dialect::Native,
                    );
                    return Verdict::Continue;
                };
                let token = token.to_owned();
                return self.authenticate(&token, ctx, out, rid);
            }
            _ => {}
        }
        let ingestible = |name: &str| ctx.env.cfg.ingest.types.iter().any(|t| t == name);
        let (Some(user), Some(identity)) = (self.user.clone(), self.identity.as_deref()) else {
            if kind.needs_auth() || ingestible(name) {
                reply_error(
                    out,
                    ErrorCode::NotAuthenticated,
                    "authenticate first",
                    rid,
                    dialect,
                );
            } else {
                unknown_type(out, name, rid);
            }
            return Verdict::Continue;
        };
        let identity = identity.clone();
        match kind {
            Kind::Subscribe => self.subscribe(v, rid, &identity, ctx, out),
            Kind::Unsubscribe => self.unsubscribe(v, rid, ctx, out),
            Kind::Publish => channels::publish(v, raw, rid, &user, &identity, ctx, out),
            Kind::Direct { chat } => {
                let stored = &mut self.stored;
                direct::direct(chat, v, raw, rid, &user, &identity, stored, ctx, out)
            }
            Kind::Broadcast => direct::broadcast(v, raw, rid, &user, &identity, ctx, out),
            Kind::Ack => direct::ack(v, rid, &user, ctx, out),
            Kind::Refresh => {
                let Some(token) = field_str(v, "token") else {
                    reply_error(
                        out,
                        ErrorCode::MissingField,
                        "\"token\" (string) is required",
                        rid,
                        Dialect::Native,
                    );
                    return Verdict::Continue;
                };
                let token = token.to_owned();
                return self.refresh(&token, ctx, out, rid);
            }
            Kind::Request | Kind::Other(_) if ingestible(name) => {
                self.data_received = self.data_received.saturating_add(1);
                ingest::ingest(name, v, raw, rid, &user, ctx, out);
            }
            Kind::Request => self.request(v, rid, msg.dialect, &user, &identity, ctx, out),
            // Any other spelling of `request` is the native dialect.
            Kind::Other(k) if k.eq_ignore_ascii_case("request") => {
                self.request(v, rid, Dialect::Native, &user, &identity, ctx, out)
            }
            Kind::Other(other) => unknown_type(out, other, rid),
            Kind::Ping | Kind::Authenticate => {}
        }
        Verdict::Continue
    }
}
