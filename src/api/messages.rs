//! Messages from the backend: publish to a channel, send to a user or
//! users (stored in the offline inbox when asked for an ack or when the
//! user is offline), notifications, broadcast.

use std::sync::Arc;

use crate::env::Handling;
use crate::http::Request;
use crate::proto;
use crate::proto::encode::shared_frame;
use crate::work::{ApiReply, Audience, PubEvent, Work};

use super::body::{
    BroadcastBody, NotificationBody, PublishBody, SendBody, SendManyBody, body_json, channel_name,
    event_type, user_id,
};
use super::call::{Call, Handled, reply};
use super::error::{ApiError, Caller, bad};

pub(super) fn publish(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: PublishBody<'_> = body_json(body)?;
    let channel = channel_name(&p.channel, &ctx.env.cfg)?;
    let reply = reply(
        ctx,
        ApiReply::Published {
            channel: channel.clone(),
        },
        call.close,
    );
    ctx.desk.work.push(Work::Publish {
        channel,
        event: PubEvent {
            from: None,
            data: Box::from(p.data.get().as_bytes()),
        },
        reply: Some(reply),
    });
    Ok(Handled::Later)
}

pub(super) fn send(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: SendBody<'_> = body_json(body)?;
    let user = user_id(&p.user_id)?;
    let kind = event_type(p.kind.as_deref(), "message")?;
    let data = p.data.map_or("null", |d| d.get());
    let mut event = Vec::new();
    proto::Out::new(&mut event, &kind)
        .str("to", &user)
        .raw("data", data.as_bytes())
        .finish();
    direct(ctx, user, event, p.ack, call.close)
}

pub(super) fn notification(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: NotificationBody<'_> = body_json(body)?;
    let user = user_id(&p.user_id)?;
    let mut data = p.data.unwrap_or_default();
    data.insert("title".into(), serde_json::Value::from(&*p.title));
    data.insert("body".into(), serde_json::Value::from(&*p.body));
    let data = serde_json::to_vec(&data).map_err(|e| bad(Caller::InvalidBody, e.to_string()))?;
    let mut event = Vec::new();
    proto::Out::new(&mut event, "notification")
        .str("to", &user)
        .raw("data", &data)
        .finish();
    direct(ctx, user, event, p.ack, call.close)
}

pub(super) fn send_users(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: SendManyBody<'_> = body_json(body)?;
    if p.user_ids.is_empty() || p.user_ids.len() > 10_000 {
        return Err(bad(
            Caller::InvalidBody,
            "userIds needs 1 to 10000 user ids",
        ));
    }
    let mut users = p
        .user_ids
        .iter()
        .map(|u| user_id(u))
        .collect::<Result<Vec<_>, _>>()?;
    // Each user once, however often listed.
    users.sort_unstable();
    users.dedup();
    let kind = event_type(p.kind.as_deref(), "message")?;
    let mut event = Vec::new();
    proto::Out::new(&mut event, &kind)
        .raw("data", p.data.map_or("null", |d| d.get()).as_bytes())
        .finish();
    let n = users.len();
    ctx.desk.work.push(Work::Deliver {
        audience: Audience::Users(Arc::from(users)),
        frame: shared_frame(&event),
        reply: Some(reply(ctx, ApiReply::SentMany { users: n }, call.close)),
        ack: None,
    });
    Ok(Handled::Later)
}

pub(super) fn broadcast(
    _req: &Request,
    body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let p: BroadcastBody<'_> = body_json(body)?;
    let kind = event_type(p.kind.as_deref(), "broadcast")?;
    let mut event = Vec::new();
    proto::Out::new(&mut event, &kind)
        .raw("data", p.data.map_or("null", |d| d.get()).as_bytes())
        .finish();
    ctx.desk.work.push(Work::Deliver {
        audience: Audience::All,
        frame: shared_frame(&event),
        reply: Some(reply(ctx, ApiReply::Broadcast, call.close)),
        ack: None,
    });
    Ok(Handled::Later)
}

/// A direct message from the API: stored first when asked for an ack or when
/// the user is offline (and storage is on), else delivered now.
fn direct(
    ctx: &mut Handling<'_>,
    user: Arc<str>,
    event: Vec<u8>,
    ack: bool,
    close: bool,
) -> Result<Handled, ApiError> {
    if ack && !ctx.env.storage() {
        return Err(ApiError::caller(
            Caller::StorageDisabled,
            "acknowledged delivery needs storage (storage.backend = \"none\")",
        ));
    }
    let reply = reply(
        ctx,
        ApiReply::Sent {
            user: user.clone(),
            stored: None,
        },
        close,
    );
    if ctx.env.storage() && (ack || ctx.env.router.user_shards(&user) == 0) {
        let work = Work::store_direct(ctx.asker(), None, user, event, &ctx.env.cfg.inbox, reply);
        ctx.desk.work.push(work);
        return Ok(Handled::Later);
    }
    ctx.desk.work.push(Work::Deliver {
        audience: Audience::User(user),
        frame: shared_frame(&event),
        reply: Some(reply),
        ack: None,
    });
    Ok(Handled::Later)
}
