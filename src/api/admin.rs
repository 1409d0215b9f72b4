//! Administration: who is connected, a user's status, the client list,
//! disconnects, server-side subscriptions, presence, history, revocations,
//! development tokens.

use std::sync::Arc;

use crate::env::Handling;
use crate::http::Request;
use crate::proto;
use crate::proto::encode::shared_frame;
use crate::store::{Revocation, RevocationKind};
use crate::work::{ApiReply, HistoryQuery, ShardQuery, Work};

use super::body::{
    MembershipBody, RevokeBody, TokenBody, body_json, channel_name, event_type, query_num, user_id,
};
use super::call::{Call, Handled, reply};
use super::error::{ApiError, Caller, bad};
use super::routes::Handler;

pub(super) fn users_connected(
    _req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let mut users = ctx.env.router.users();
    users.sort_unstable();
    let mut b = Vec::new();
    b.extend_from_slice(b"{\"success\":true,\"count\":");
    b.extend_from_slice(users.len().to_string().as_bytes());
    b.extend_from_slice(b",\"users\":[");
    for (i, u) in users.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        proto::write_str(&mut b, u);
    }
    b.extend_from_slice(b"]}");
    call.ok(&b)
}

pub(super) fn user_status(
    _req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let user = match (call.handler, call.who.as_ref()) {
        (Handler::MeStatus, Some(id)) => user_id(&id.user_id)?,
        (Handler::MeStatus, None) => {
            return Err(ApiError::caller(
                Caller::NoSubject,
                "an API key has no user: use /websocket/users/{userId}/status",
            ));
        }
        _ => user_id(call.param(0))?,
    };
    ctx.desk.work.push(Work::Query {
        shards: ctx.env.router.user_shards(&user),
        query: ShardQuery::Clients {
            user: Some(user.clone()),
        },
        reply: reply(ctx, ApiReply::UserStatus { user }, call.close),
    });
    Ok(Handled::Later)
}

pub(super) fn clients(
    req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let offset = query_num(req, "offset")?.unwrap_or(0) as usize;
    let limit = query_num(req, "limit")?.unwrap_or(100).clamp(1, 1000) as usize;
    ctx.desk.work.push(Work::Query {
        shards: ctx.env.router.all(),
        query: ShardQuery::Clients { user: None },
        reply: reply(ctx, ApiReply::Clients { offset, limit }, call.close),
    });
    Ok(Handled::Later)
}

pub(super) fn disconnect(
    req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let user = user_id(call.param(0))?;
    let code = match query_num(req, "code")? {
        None => 4000,
        Some(c @ (1000 | 1001 | 1008 | 4000..=4999)) => c as u16,
        Some(_) => {
            return Err(bad(
                Caller::InvalidQuery,
                "code must be 1000, 1001, 1008 or 4000-4999",
            ));
        }
    };
    let reason: String = req
        .query_param("reason")
        .unwrap_or_else(|| "disconnected by the server".into());
    if reason.len() > 120 {
        return Err(bad(Caller::InvalidQuery, "reason is at most 120 bytes"));
    }
    ctx.desk.work.push(Work::Query {
        shards: ctx.env.router.user_shards(&user),
        query: ShardQuery::Disconnect {
            user: user.clone(),
            code,
            reason: Arc::from(reason),
        },
        reply: reply(ctx, ApiReply::Disconnected { user }, call.close),
    });
    Ok(Handled::Later)
}

pub(super) fn membership(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: MembershipBody<'_> = body_json(body)?;
    let user = user_id(&p.user_id)?;
    let channel = channel_name(&p.channel, &ctx.env.cfg)?;
    let subscribe = call.handler == Handler::Subscribe;
    let event = match p.event.as_deref() {
        None => None,
        Some(e) => {
            let kind = event_type(Some(e), "event")?;
            let mut b = Vec::new();
            proto::Out::new(&mut b, &kind)
                .str("channel", &channel)
                .raw("data", p.data.map_or("null", |d| d.get()).as_bytes())
                .finish();
            Some(shared_frame(&b))
        }
    };
    ctx.desk.work.push(Work::Query {
        shards: ctx.env.router.user_shards(&user),
        query: ShardQuery::Membership {
            user: user.clone(),
            channel: channel.clone(),
            subscribe,
            event,
        },
        reply: reply(
            ctx,
            ApiReply::Membership {
                user,
                channel,
                subscribe,
            },
            call.close,
        ),
    });
    Ok(Handled::Later)
}

pub(super) fn presence(
    _req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let channel = channel_name(call.param(0), &ctx.env.cfg)?;
    ctx.desk.work.push(Work::Presence {
        channel: channel.clone(),
        reply: reply(ctx, ApiReply::Presence { channel }, call.close),
    });
    Ok(Handled::Later)
}

pub(super) fn history(
    req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let channel = channel_name(call.param(0), &ctx.env.cfg)?;
    let max = ctx.env.cfg.history.max_page;
    let limit = query_num(req, "limit")?.map_or(max, |l| (l as usize).clamp(1, max));
    let since = query_num(req, "since")?;
    ctx.desk.work.push(Work::History {
        channel: channel.clone(),
        query: HistoryQuery::Page { since, limit },
        reply: reply(ctx, ApiReply::History { channel }, call.close),
    });
    Ok(Handled::Later)
}

pub(super) fn revoke(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: RevokeBody<'_> = body_json(body)?;
    let (kind, value) = match (&p.user_id, &p.jti) {
        (Some(u), None) => (RevocationKind::User, u.to_string()),
        (None, Some(j)) if !j.is_empty() && j.len() <= 256 => {
            (RevocationKind::Token, j.to_string())
        }
        _ => {
            return Err(bad(
                Caller::InvalidBody,
                "give exactly one of userId or jti (a token id up to 256 bytes)",
            ));
        }
    };
    if kind == RevocationKind::User {
        user_id(&value)?;
    }
    let now = crate::clock::now_ms();
    let ttl = i64::try_from(ctx.env.cfg.auth.revocation_ttl.as_millis()).unwrap_or(i64::MAX);
    let revocation = Revocation {
        kind,
        value: value.clone(),
        revoked_at_ms: now,
        expires_at_ms: now.saturating_add(ttl),
        reason: p
            .reason
            .as_deref()
            .unwrap_or("revoked")
            .chars()
            .take(200)
            .collect(),
    };
    let reply = reply(ctx, ApiReply::Revoked { kind, value }, call.close);
    ctx.desk.work.push(Work::Revoke {
        revocation,
        reply: Some(reply),
    });
    Ok(Handled::Later)
}

pub(super) fn token(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: TokenBody = body_json(body)?;
    user_id(&p.user_id)?;
    let ttl = match p.ttl.as_deref() {
        None => std::time::Duration::from_secs(3600),
        Some(t) => crate::config::parse_duration(t)
            .ok()
            .filter(|d| d.as_secs() >= 1 && d.as_secs() <= 86_400 * 30)
            .ok_or_else(|| {
                bad(
                    Caller::InvalidBody,
                    "ttl is a duration like \"1h\" from 1 s to 30 days",
                )
            })?,
    };
    let dev = crate::auth::dev::DevToken {
        sub: p.user_id.clone(),
        channels: p.channels,
        role: p.role,
        tenant: p.tenant,
        jti: None,
        ttl,
        private_key: None,
        algorithm: None,
    };
    match crate::auth::dev::mint_dev_token(&ctx.env.cfg.auth, &dev) {
        Ok(token) => {
            let mut b = Vec::new();
            b.extend_from_slice(b"{\"token\":");
            proto::write_str(&mut b, &token);
            b.extend_from_slice(b",\"userId\":");
            proto::write_str(&mut b, &p.user_id);
            // The shared token of mode `token` names no user and never
            // expires: say so rather than invent an expiry.
            if ctx.env.cfg.auth.mode == crate::config::AuthMode::Jwt {
                let exp = crate::clock::now_ms() / 1000 + ttl.as_secs() as i64;
                b.extend_from_slice(format!(",\"expiresAt\":{exp}}}").as_bytes());
            } else {
                b.extend_from_slice(b",\"expiresAt\":null}");
            }
            call.ok(&b)
        }
        // Mode `none` (the message says how to connect instead), or a JWT
        // setup that verifies with a public key only.
        Err(e) if ctx.env.cfg.auth.mode == crate::config::AuthMode::None => {
            Err(ApiError::caller(Caller::NotAvailable, e.to_string()))
        }
        Err(e) => Err(ApiError::caller(
            Caller::NotAvailable,
            format!("cannot mint with this server's keys: {e}"),
        )),
    }
}
