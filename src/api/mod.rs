//! The HTTP API for backends and operators (docs/API.md, docs/openapi.yaml),
//! served by the shard loops on the WebSocket port, HTTP/1.1 keep-alive with
//! pipelining (the connection state machine answers requests in order).
//!
//! Sans-IO like the protocol handlers: [`handle`] turns one request into a
//! response now, or into work for the shard (`Outgoing`) whose gathered
//! result becomes the response later ([`later_response`]).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::{self, Audience, HistoryQuery, Outgoing, PubEvent, Reply, ReplyKind, StoreWait};
use crate::auth::{Authenticator, Identity};
use crate::config::Config;
use crate::history::Page;
use crate::http::{Request, Response};
use crate::id::ConnId;
use crate::proto;
use crate::route::Router;
use crate::stats::{Counters, ShardStats};
use crate::store::{self, Revocation, RevocationKind};

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Publish,
    Send,
    SendUsers,
    Broadcast,
    Notification,
    UsersConnected,
    UserStatus,
    MeStatus,
    Disconnect,
    Revoke,
    Subscribe,
    Unsubscribe,
    Presence,
    History,
    Status,
    Clients,
    Token,
    Metrics,
    Healthz,
    Readyz,
    Console,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, metrics, the console's static files).
    Public,
    /// Any valid client token (its own status).
    User,
    /// An API key, or a JWT with `role: admin`.
    Admin,
}

pub struct Route {
    pub method: &'static str,
    /// `{name}` matches one path segment (percent-decoded).
    pub path: &'static str,
    pub handler: Handler,
    pub access: Access,
}

const fn r(method: &'static str, path: &'static str, handler: Handler, access: Access) -> Route {
    Route {
        method,
        path,
        handler,
        access,
    }
}

/// Every route. docs/openapi.yaml describes exactly these (a test checks both ways).
pub const ROUTES: &[Route] = &[
    r("POST", "/api/publish", Handler::Publish, Access::Admin),
    r("POST", "/api/send", Handler::Send, Access::Admin),
    r("POST", "/api/broadcast", Handler::Broadcast, Access::Admin),
    r("POST", "/api/revoke", Handler::Revoke, Access::Admin),
    r("POST", "/api/subscribe", Handler::Subscribe, Access::Admin),
    r(
        "POST",
        "/api/unsubscribe",
        Handler::Unsubscribe,
        Access::Admin,
    ),
    r(
        "GET",
        "/api/channels/{channel}/presence",
        Handler::Presence,
        Access::Admin,
    ),
    r(
        "GET",
        "/api/channels/{channel}/history",
        Handler::History,
        Access::Admin,
    ),
    r("GET", "/api/status", Handler::Status, Access::Admin),
    r("GET", "/api/clients", Handler::Clients, Access::Admin),
    r("POST", "/api/token", Handler::Token, Access::Admin),
    // Seed 002, exactly as written there.
    r(
        "POST",
        "/websocket/message/user",
        Handler::Send,
        Access::Admin,
    ),
    r(
        "POST",
        "/websocket/message/users",
        Handler::SendUsers,
        Access::Admin,
    ),
    r(
        "POST",
        "/websocket/message/broadcast",
        Handler::Broadcast,
        Access::Admin,
    ),
    r(
        "POST",
        "/websocket/notification",
        Handler::Notification,
        Access::Admin,
    ),
    r(
        "GET",
        "/websocket/users/connected",
        Handler::UsersConnected,
        Access::Admin,
    ),
    r(
        "GET",
        "/websocket/users/{userId}/status",
        Handler::UserStatus,
        Access::Admin,
    ),
    r(
        "GET",
        "/websocket/me/status",
        Handler::MeStatus,
        Access::User,
    ),
    r(
        "DELETE",
        "/websocket/users/{userId}/disconnect",
        Handler::Disconnect,
        Access::Admin,
    ),
    r("GET", "/metrics", Handler::Metrics, Access::Public),
    r("GET", "/healthz", Handler::Healthz, Access::Public),
    r("GET", "/readyz", Handler::Readyz, Access::Public),
    r("GET", "/", Handler::Console, Access::Public),
    r("GET", "/index.html", Handler::Console, Access::Public),
    r("GET", "/console.js", Handler::Console, Access::Public),
    r("GET", "/console.css", Handler::Console, Access::Public),
];

/// Match `path` against a template; the `{...}` segments, decoded.
fn matches(template: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                params.push(crate::http::handshake::percent_decode_path(ps));
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// The route for a request: Ok((route, params)), or the methods the path has.
pub fn find(method: &str, path: &str) -> Result<(&'static Route, Vec<String>), Vec<&'static str>> {
    let mut allowed = Vec::new();
    for route in ROUTES {
        if let Some(params) = matches(route.path, path) {
            if route.method == method {
                return Ok((route, params));
            }
            allowed.push(route.method);
        }
    }
    Err(allowed)
}

/// Why a request failed: a status and a stable code (docs/API.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn response(&self, close: bool) -> Response {
        let mut b = Vec::new();
        b.extend_from_slice(b"{\"error\":{\"code\":");
        proto::write_str(&mut b, self.code);
        b.extend_from_slice(b",\"message\":");
        proto::write_str(&mut b, &self.message);
        b.extend_from_slice(b"}}");
        let mut resp = Response::json(self.status, &b, close);
        if self.status == 401 {
            resp = Response::with_body(
                401,
                "Unauthorized",
                "application/json",
                &b,
                &[("WWW-Authenticate", "Bearer")],
                close,
            );
        }
        resp
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(400, code, message)
}

/// A response started later: which one, and for timing.
#[derive(Debug, Clone)]
pub struct Pending {
    pub kind: ApiReply,
    pub close: bool,
    pub started: Instant,
}

/// Responses built from a cross-shard result.
#[derive(Debug, Clone)]
pub enum ApiReply {
    Published {
        channel: Arc<str>,
    },
    Sent {
        user: Arc<str>,
        stored: Option<i64>,
    },
    SentMany {
        users: usize,
    },
    Broadcast,
    UserStatus {
        user: Arc<str>,
    },
    Disconnected {
        user: Arc<str>,
    },
    Presence {
        channel: Arc<str>,
    },
    History {
        channel: Arc<str>,
    },
    Clients {
        offset: usize,
        limit: usize,
    },
    Membership {
        user: Arc<str>,
        channel: Arc<str>,
        subscribe: bool,
    },
    Revoked {
        kind: RevocationKind,
        value: String,
    },
}

/// One connection, as `/api/clients` and user status show it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: ConnId,
    pub ip: IpAddr,
    pub connected_at_ms: i64,
    pub authenticated: bool,
    pub user: Option<Arc<str>>,
    pub data_received: u32,
    pub subscriptions: u32,
}

/// A cross-shard query the API asks every (or some) shards.
#[derive(Debug, Clone)]
pub enum ShardQuery {
    /// The shard's connections (of one user, or all).
    Clients { user: Option<Arc<str>> },
    /// Close the user's connections with this code.
    Disconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
    },
    /// Server-side subscribe/unsubscribe of the user's connections, with an
    /// optional event (seed 001 `area_added`) sent to each.
    Membership {
        user: Arc<str>,
        channel: Arc<str>,
        subscribe: bool,
        event: Option<Arc<[u8]>>,
    },
    /// Apply a (committed) revocation and count the connections it closed.
    Revoke(Arc<Revocation>),
}

/// What the handler can see of its shard.
pub struct ApiCtx<'a> {
    pub cfg: &'a Config,
    pub auth: &'a Authenticator,
    pub router: &'a Router,
    pub all_stats: &'a [Arc<ShardStats>],
    pub outgoing: &'a mut Vec<Outgoing>,
    pub key: usize,
    pub conn: ConnId,
    pub shutting_down: bool,
    pub storage: bool,
    /// The storage writer (its queue depth is in the status).
    pub writer: Option<&'a crate::store::WriterHandle>,
    pub open_connections: usize,
    pub uptime_secs: u64,
    pub now: Instant,
    pub revoked: &'a crate::revoke::Revocations,
}

/// The outcome of one request.
pub enum Handled {
    Now(Response),
    /// The shard will answer (`later_response`) once its work completes.
    Later,
}

/// Serve one request with its body.
pub fn handle(req: &Request, body: &[u8], ctx: &mut ApiCtx<'_>) -> Handled {
    let close = req.close;
    match serve(req, body, ctx) {
        Ok(h) => h,
        Err(e) => Handled::Now(e.response(close)),
    }
}

/// The caller's identity, if the route needs one.
fn authorize(
    req: &Request,
    access: Access,
    ctx: &ApiCtx<'_>,
) -> Result<Option<Identity>, ApiError> {
    if access == Access::Public {
        return Ok(None);
    }
    let bearer = req
        .authorization
        .as_deref()
        .and_then(crate::auth::bearer_token);
    let presented = req.api_key.as_deref().or(bearer);
    if access == Access::Admin {
        if let Some(k) = presented
            && ctx
                .cfg
                .api
                .keys
                .iter()
                .any(|key| same(key.as_bytes(), k.as_bytes()))
        {
            return Ok(None);
        }
        if ctx.cfg.api.allow_anonymous {
            return Ok(None);
        }
    }
    let Some(token) = bearer else {
        let message = if access == Access::User {
            "send the user's token (Authorization: Bearer <token>)"
        } else {
            "send an API key (Authorization: Bearer <key> or X-API-Key) or an admin token"
        };
        return Err(ApiError::new(401, "unauthorized", message));
    };
    let identity = match ctx.auth {
        Authenticator::None => None,
        auth => auth.authenticate(token).ok(),
    };
    // A revoked token is refused here as on a WebSocket connect.
    let identity = identity.filter(|id| !ctx.revoked.covers(id, crate::clock::now_ms()));
    match (access, identity) {
        (_, None) => Err(ApiError::new(
            401,
            "unauthorized",
            "the API key or token is not valid",
        )),
        (Access::Admin, Some(id)) if id.role.as_deref() != Some("admin") => Err(ApiError::new(
            403,
            "forbidden",
            "this route needs an API key or a token with role \"admin\"",
        )),
        (_, Some(id)) => Ok(Some(id)),
    }
}

/// Constant-time comparison of a presented key with a configured one.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn body_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(bad("bad_json", "a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            bad("invalid_body", e.to_string())
        } else {
            bad("bad_json", e.to_string())
        }
    })
}

fn query_num(req: &Request, name: &str) -> Result<Option<u64>, ApiError> {
    match req.query_param(name) {
        None => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad("invalid_query", format!("{name} must be a whole number"))),
    }
}

fn user_id(s: &str) -> Result<Arc<str>, ApiError> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(
            "invalid_user",
            "user ids are 1-128 bytes of printable characters without spaces",
        ));
    }
    Ok(Arc::from(s))
}

fn channel_name(s: &str, cfg: &Config) -> Result<Arc<str>, ApiError> {
    if !app::valid_channel(s, cfg) {
        return Err(bad(
            "invalid_channel",
            format!(
                "channel names are 1-{} printable characters without spaces",
                cfg.channels.max_channel_length
            ),
        ));
    }
    Ok(Arc::from(s))
}

/// A message `type` a backend may give its events.
fn event_type(t: Option<&str>, default: &'static str) -> Result<String, ApiError> {
    let t = t.unwrap_or(default);
    if t.is_empty()
        || t.len() > 64
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
    {
        return Err(bad(
            "invalid_type",
            "type is 1-64 characters of letters, digits, _ - . :",
        ));
    }
    Ok(t.to_owned())
}

fn reply(ctx: &ApiCtx<'_>, kind: ApiReply, close: bool) -> Reply {
    Reply {
        key: ctx.key,
        conn: ctx.conn,
        request_id: None,
        kind: ReplyKind::Api(Box::new(Pending {
            kind,
            close,
            started: ctx.now,
        })),
    }
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendBody<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    ack: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendManyBody<'a> {
    #[serde(borrow)]
    user_ids: Vec<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BroadcastBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationBody<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    title: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    data: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    ack: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevokeBody<'a> {
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    jti: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MembershipBody<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
    /// An event sent to each connection too (seed 001 `area_added`).
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenBody {
    user_id: String,
    role: Option<String>,
    tenant: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    ttl: Option<String>,
}

fn serve(req: &Request, body: &[u8], ctx: &mut ApiCtx<'_>) -> Result<Handled, ApiError> {
    let close = req.close;
    let (route, params) = match find(&req.method, &req.path) {
        Ok(found) => found,
        Err(allowed) if allowed.is_empty() => {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("no route {}", req.path),
            ));
        }
        Err(allowed) => {
            let allow = allowed.join(", ");
            return Ok(Handled::Now(Response::with_body(
                405,
                "Method Not Allowed",
                "application/json",
                br#"{"error":{"code":"method_not_allowed","message":"method not allowed on this path"}}"#,
                &[("Allow", &allow)],
                close,
            )));
        }
    };
    let console_off = route.handler == Handler::Console && !ctx.cfg.api.console;
    let api_off = route.access != Access::Public && !ctx.cfg.api.enabled;
    if console_off || api_off {
        return Err(ApiError::new(
            404,
            "not_found",
            format!("no route {}", req.path),
        ));
    }
    let who = authorize(req, route.access, ctx)?;
    let param = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
    let ok = |b: &[u8]| Ok(Handled::Now(Response::json(200, b, close)));
    match route.handler {
        Handler::Healthz => Ok(Handled::Now(Response::with_body(
            200,
            "OK",
            "text/plain; charset=utf-8",
            b"ok\n",
            &[],
            close,
        ))),
        Handler::Readyz if ctx.shutting_down => {
            Err(ApiError::new(503, "shutting_down", "server shutting down"))
        }
        Handler::Readyz => Ok(Handled::Now(Response::with_body(
            200,
            "OK",
            "text/plain; charset=utf-8",
            b"ready\n",
            &[],
            close,
        ))),
        Handler::Metrics => {
            let shards: Vec<Counters> = ctx.all_stats.iter().map(|s| s.snapshot()).collect();
            let mut text = crate::stats::prometheus(&shards);
            crate::stats::prometheus_histograms(ctx.all_stats, &mut text);
            Ok(Handled::Now(Response::with_body(
                200,
                "OK",
                "text/plain; version=0.0.4; charset=utf-8",
                text.as_bytes(),
                &[],
                close,
            )))
        }
        Handler::Console => match crate::console::asset(&req.path) {
            Some((ctype, bytes)) => Ok(Handled::Now(Response::with_body(
                200,
                "OK",
                ctype,
                bytes,
                &[("Cache-Control", "no-cache")],
                close,
            ))),
            None => Err(ApiError::new(404, "not_found", "no such file")),
        },
        Handler::Status => ok(&status_json(ctx)),
        Handler::UsersConnected => {
            let mut users = ctx.router.users();
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
            ok(&b)
        }
        Handler::Publish => {
            let p: PublishBody<'_> = body_json(body)?;
            let channel = channel_name(&p.channel, ctx.cfg)?;
            let reply = reply(
                ctx,
                ApiReply::Published {
                    channel: channel.clone(),
                },
                close,
            );
            ctx.outgoing.push(Outgoing::Publish {
                channel,
                event: PubEvent {
                    from: None,
                    data: Box::from(p.data.get().as_bytes()),
                },
                reply: Some(reply),
            });
            Ok(Handled::Later)
        }
        Handler::Send => {
            let p: SendBody<'_> = body_json(body)?;
            let user = user_id(&p.user_id)?;
            let kind = event_type(p.kind.as_deref(), "message")?;
            let data = p.data.map_or("null", |d| d.get());
            let mut event = Vec::new();
            proto::Out::new(&mut event, &kind)
                .str("to", &user)
                .raw("data", data.as_bytes())
                .finish();
            direct(ctx, user, event, p.ack, close)
        }
        Handler::Notification => {
            let p: NotificationBody<'_> = body_json(body)?;
            let user = user_id(&p.user_id)?;
            let mut data = p.data.unwrap_or_default();
            data.insert("title".into(), serde_json::Value::from(&*p.title));
            data.insert("body".into(), serde_json::Value::from(&*p.body));
            let data = serde_json::to_vec(&data).map_err(|e| bad("invalid_body", e.to_string()))?;
            let mut event = Vec::new();
            proto::Out::new(&mut event, "notification")
                .str("to", &user)
                .raw("data", &data)
                .finish();
            direct(ctx, user, event, p.ack, close)
        }
        Handler::SendUsers => {
            let p: SendManyBody<'_> = body_json(body)?;
            if p.user_ids.is_empty() || p.user_ids.len() > 10_000 {
                return Err(bad("invalid_body", "userIds needs 1 to 10000 user ids"));
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
            ctx.outgoing.push(Outgoing::Deliver {
                audience: Audience::Users(Arc::from(users)),
                frame: app::shared_frame(&event),
                reply: Some(reply(ctx, ApiReply::SentMany { users: n }, close)),
                ack: None,
            });
            Ok(Handled::Later)
        }
        Handler::Broadcast => {
            let p: BroadcastBody<'_> = body_json(body)?;
            let kind = event_type(p.kind.as_deref(), "broadcast")?;
            let mut event = Vec::new();
            proto::Out::new(&mut event, &kind)
                .raw("data", p.data.map_or("null", |d| d.get()).as_bytes())
                .finish();
            ctx.outgoing.push(Outgoing::Deliver {
                audience: Audience::All,
                frame: app::shared_frame(&event),
                reply: Some(reply(ctx, ApiReply::Broadcast, close)),
                ack: None,
            });
            Ok(Handled::Later)
        }
        Handler::UserStatus | Handler::MeStatus => {
            let user = match (route.handler, who) {
                (Handler::MeStatus, Some(id)) => user_id(&id.user_id)?,
                (Handler::MeStatus, None) => {
                    return Err(ApiError::new(
                        400,
                        "no_subject",
                        "an API key has no user: use /websocket/users/{userId}/status",
                    ));
                }
                _ => user_id(param(0))?,
            };
            ctx.outgoing.push(Outgoing::Query {
                shards: ctx.router.user_shards(&user),
                query: ShardQuery::Clients {
                    user: Some(user.clone()),
                },
                reply: reply(ctx, ApiReply::UserStatus { user }, close),
            });
            Ok(Handled::Later)
        }
        Handler::Clients => {
            let offset = query_num(req, "offset")?.unwrap_or(0) as usize;
            let limit = query_num(req, "limit")?.unwrap_or(100).clamp(1, 1000) as usize;
            ctx.outgoing.push(Outgoing::Query {
                shards: ctx.router.all(),
                query: ShardQuery::Clients { user: None },
                reply: reply(ctx, ApiReply::Clients { offset, limit }, close),
            });
            Ok(Handled::Later)
        }
        Handler::Disconnect => {
            let user = user_id(param(0))?;
            let code = match query_num(req, "code")? {
                None => 4000,
                Some(c @ (1000 | 1001 | 1008 | 4000..=4999)) => c as u16,
                Some(_) => {
                    return Err(bad(
                        "invalid_query",
                        "code must be 1000, 1001, 1008 or 4000-4999",
                    ));
                }
            };
            let reason: String = req
                .query_param("reason")
                .unwrap_or_else(|| "disconnected by the server".into());
            if reason.len() > 120 {
                return Err(bad("invalid_query", "reason is at most 120 bytes"));
            }
            ctx.outgoing.push(Outgoing::Query {
                shards: ctx.router.user_shards(&user),
                query: ShardQuery::Disconnect {
                    user: user.clone(),
                    code,
                    reason: Arc::from(reason),
                },
                reply: reply(ctx, ApiReply::Disconnected { user }, close),
            });
            Ok(Handled::Later)
        }
        Handler::Subscribe | Handler::Unsubscribe => {
            let p: MembershipBody<'_> = body_json(body)?;
            let user = user_id(&p.user_id)?;
            let channel = channel_name(&p.channel, ctx.cfg)?;
            let subscribe = route.handler == Handler::Subscribe;
            let event = match p.event.as_deref() {
                None => None,
                Some(e) => {
                    let kind = event_type(Some(e), "event")?;
                    let mut b = Vec::new();
                    proto::Out::new(&mut b, &kind)
                        .str("channel", &channel)
                        .raw("data", p.data.map_or("null", |d| d.get()).as_bytes())
                        .finish();
                    Some(app::shared_frame(&b))
                }
            };
            ctx.outgoing.push(Outgoing::Query {
                shards: ctx.router.user_shards(&user),
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
                    close,
                ),
            });
            Ok(Handled::Later)
        }
        Handler::Presence => {
            let channel = channel_name(param(0), ctx.cfg)?;
            ctx.outgoing.push(Outgoing::Presence {
                channel: channel.clone(),
                reply: reply(ctx, ApiReply::Presence { channel }, close),
            });
            Ok(Handled::Later)
        }
        Handler::History => {
            let channel = channel_name(param(0), ctx.cfg)?;
            let max = ctx.cfg.history.max_page;
            let limit = query_num(req, "limit")?.map_or(max, |l| (l as usize).clamp(1, max));
            let since = query_num(req, "since")?;
            ctx.outgoing.push(Outgoing::History {
                channel: channel.clone(),
                query: HistoryQuery::Page { since, limit },
                reply: reply(ctx, ApiReply::History { channel }, close),
            });
            Ok(Handled::Later)
        }
        Handler::Revoke => {
            let p: RevokeBody<'_> = body_json(body)?;
            let (kind, value) = match (&p.user_id, &p.jti) {
                (Some(u), None) => (RevocationKind::User, u.to_string()),
                (None, Some(j)) if !j.is_empty() && j.len() <= 256 => {
                    (RevocationKind::Token, j.to_string())
                }
                _ => {
                    return Err(bad(
                        "invalid_body",
                        "give exactly one of userId or jti (a token id up to 256 bytes)",
                    ));
                }
            };
            if kind == RevocationKind::User {
                user_id(&value)?;
            }
            let now = crate::clock::now_ms();
            let ttl = i64::try_from(ctx.cfg.auth.revocation_ttl.as_millis()).unwrap_or(i64::MAX);
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
            let reply = reply(ctx, ApiReply::Revoked { kind, value }, close);
            ctx.outgoing.push(Outgoing::Revoke {
                revocation,
                reply: Some(reply),
            });
            Ok(Handled::Later)
        }
        Handler::Token => {
            if ctx.cfg.auth.mode != crate::config::AuthMode::Jwt {
                return Err(ApiError::new(
                    409,
                    "not_available",
                    "tokens are minted only in auth mode \"jwt\" (in mode \"none\" connect with ?userId=)",
                ));
            }
            let p: TokenBody = body_json(body)?;
            user_id(&p.user_id)?;
            let ttl = match p.ttl.as_deref() {
                None => std::time::Duration::from_secs(3600),
                Some(t) => crate::config::parse_duration(t)
                    .ok()
                    .filter(|d| d.as_secs() >= 1 && d.as_secs() <= 86_400 * 30)
                    .ok_or_else(|| {
                        bad(
                            "invalid_body",
                            "ttl is a duration like \"1h\" from 1 s to 30 days",
                        )
                    })?,
            };
            let dev = crate::auth_setup::DevToken {
                sub: p.user_id.clone(),
                channels: p.channels,
                role: p.role,
                tenant: p.tenant,
                jti: None,
                ttl,
                private_key: None,
                algorithm: None,
            };
            match crate::auth_setup::mint_dev_token(&ctx.cfg.auth, &dev) {
                Ok(token) => {
                    let exp = crate::clock::now_ms() / 1000 + ttl.as_secs() as i64;
                    let mut b = Vec::new();
                    b.extend_from_slice(b"{\"token\":");
                    proto::write_str(&mut b, &token);
                    b.extend_from_slice(b",\"userId\":");
                    proto::write_str(&mut b, &p.user_id);
                    b.extend_from_slice(format!(",\"expiresAt\":{exp}}}").as_bytes());
                    ok(&b)
                }
                Err(e) => Err(ApiError::new(
                    409,
                    "not_available",
                    format!("cannot mint with this server's keys: {e}"),
                )),
            }
        }
    }
}

/// A direct message from the API: stored first when asked for an ack or when
/// the user is offline (and storage is on), else delivered now.
fn direct(
    ctx: &mut ApiCtx<'_>,
    user: Arc<str>,
    event: Vec<u8>,
    ack: bool,
    close: bool,
) -> Result<Handled, ApiError> {
    if ack && !ctx.storage {
        return Err(ApiError::new(
            409,
            "storage_disabled",
            "acknowledged delivery needs storage (storage.backend = \"none\")",
        ));
    }
    if ctx.storage && (ack || ctx.router.user_shards(&user) == 0) {
        let now = crate::clock::now_ms();
        let ttl = i64::try_from(ctx.cfg.inbox.ttl.as_millis()).unwrap_or(i64::MAX);
        let payload: Box<[u8]> = event.into_boxed_slice();
        let reply = reply(
            ctx,
            ApiReply::Sent {
                user: user.clone(),
                stored: None,
            },
            close,
        );
        ctx.outgoing.push(Outgoing::Store {
            key: ctx.key,
            conn: ctx.conn,
            op: store::Op::InboxPut {
                user: user.clone(),
                payload: payload.to_vec(),
                created_at_ms: now,
                expires_at_ms: now.saturating_add(ttl),
                max_per_user: ctx.cfg.inbox.max_per_user,
            },
            wait: StoreWait::InboxPut {
                to: user,
                payload,
                reply,
            },
        });
        return Ok(Handled::Later);
    }
    let reply = reply(
        ctx,
        ApiReply::Sent {
            user: user.clone(),
            stored: None,
        },
        close,
    );
    ctx.outgoing.push(Outgoing::Deliver {
        audience: Audience::User(user),
        frame: app::shared_frame(&event),
        reply: Some(reply),
        ack: None,
    });
    Ok(Handled::Later)
}

fn status_json(ctx: &ApiCtx<'_>) -> Vec<u8> {
    use std::io::Write;
    let shards: Vec<Counters> = ctx.all_stats.iter().map(|s| s.snapshot()).collect();
    let mut t = Counters::default();
    for c in &shards {
        t.add(c);
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"{\"version\":");
    proto::write_str(&mut b, env!("CARGO_PKG_VERSION"));
    let _ = write!(
        b,
        ",\"uptimeSeconds\":{},\"connections\":{},\"usersOnline\":{},\"channels\":{},\"messagesIn\":{},\"messagesOut\":{},\"bytesIn\":{},\"bytesOut\":{},\"slowConsumerCloses\":{},\"rejectedConnections\":{},\"revokedCloses\":{},\"recordsStored\":{},\"writerQueueDepth\":{},\"storage\":{},\"shards\":[",
        ctx.uptime_secs,
        ctx.open_connections,
        ctx.router.user_count(),
        ctx.router.channel_count(),
        t.messages_in,
        t.messages_out,
        t.bytes_in,
        t.bytes_out,
        t.slow_consumers,
        t.rejected,
        t.revoked_closes,
        t.records_stored,
        ctx.writer.map_or(0, |w| w.depth()),
        ctx.storage,
    );
    for (i, c) in shards.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        let _ = write!(
            b,
            "{{\"shard\":{i},\"connections\":{},\"sockets\":{},\"messagesIn\":{},\"messagesOut\":{},\"bytesIn\":{},\"bytesOut\":{},\"slowConsumerCloses\":{},\"rejectedConnections\":{},\"publications\":{}}}",
            c.connections,
            c.sockets,
            c.messages_in,
            c.messages_out,
            c.bytes_in,
            c.bytes_out,
            c.slow_consumers,
            c.rejected,
            c.publications,
        );
    }
    b.extend_from_slice(b"]}");
    b
}

fn client_json(b: &mut Vec<u8>, c: &ClientInfo) {
    use std::io::Write;
    b.extend_from_slice(b"{\"id\":");
    proto::write_str(b, &c.id.to_string());
    b.extend_from_slice(b",\"ip\":");
    proto::write_str(b, &c.ip.to_string());
    b.extend_from_slice(b",\"connectedAt\":");
    if c.connected_at_ms > 0 {
        proto::write_str(b, &crate::clock::rfc3339_ms(c.connected_at_ms));
    } else {
        b.extend_from_slice(b"null"); // the echo endpoint keeps no session
    }
    let _ = write!(
        b,
        ",\"shard\":{},\"isAuthenticated\":{},\"userId\":",
        c.id.shard(),
        c.authenticated
    );
    match &c.user {
        Some(u) => proto::write_str(b, u),
        None => b.extend_from_slice(b"null"),
    }
    let _ = write!(
        b,
        ",\"dataReceived\":{},\"subscriptions\":{}}}",
        c.data_received, c.subscriptions
    );
}

fn page_json(b: &mut Vec<u8>, channel: &str, page: Option<&Page>) {
    use std::io::Write;
    b.extend_from_slice(b"{\"channel\":");
    proto::write_str(b, channel);
    if let Some(page) = page {
        b.extend_from_slice(b",\"epoch\":");
        proto::write_str(b, &page.epoch);
        let _ = write!(
            b,
            ",\"offset\":{},\"hasMore\":{},\"publications\":[",
            page.top, !page.complete
        );
        for (i, p) in page.publications.iter().enumerate() {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(p);
        }
        b.push(b']');
    }
    b.push(b'}');
}

/// The HTTP response for a request whose answer was gathered across shards.
pub fn later_response(p: &Pending, g: &app::Gathered<'_>) -> Response {
    use std::io::Write;
    let mut b = Vec::new();
    match &p.kind {
        ApiReply::Published { channel } => {
            let Some((offset, epoch)) = g.published else {
                return ApiError::new(503, "shutting_down", "the channel's shard is gone")
                    .response(p.close);
            };
            b.extend_from_slice(b"{\"success\":true,\"channel\":");
            proto::write_str(&mut b, channel);
            let _ = write!(b, ",\"offset\":{offset},\"epoch\":");
            proto::write_str(&mut b, epoch);
            let _ = write!(b, ",\"connections\":{}}}", g.connections);
        }
        ApiReply::Sent { user, stored } => {
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            let _ = write!(
                b,
                ",\"connections\":{},\"delivered\":{}",
                g.connections,
                g.connections > 0
            );
            match stored {
                Some(id) => {
                    let _ = write!(b, ",\"stored\":true,\"id\":{id}}}");
                }
                None => b.extend_from_slice(b",\"stored\":false}"),
            }
        }
        ApiReply::SentMany { users } => {
            let _ = write!(
                b,
                "{{\"success\":true,\"users\":{users},\"connections\":{}}}",
                g.connections
            );
        }
        ApiReply::Broadcast => {
            let _ = write!(b, "{{\"success\":true,\"connections\":{}}}", g.connections);
        }
        ApiReply::UserStatus { user } => {
            let mut shards: Vec<usize> = g.clients.iter().map(|c| c.id.shard()).collect();
            shards.sort_unstable();
            shards.dedup();
            let since = g.clients.iter().map(|c| c.connected_at_ms).min();
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            let _ = write!(
                b,
                ",\"online\":{},\"connections\":{},\"shards\":{:?},\"since\":",
                !g.clients.is_empty(),
                g.clients.len(),
                shards
            );
            match since {
                Some(ms) => proto::write_str(&mut b, &crate::clock::rfc3339_ms(ms)),
                None => b.extend_from_slice(b"null"),
            }
            b.extend_from_slice(b",\"clients\":[");
            for (i, c) in g.clients.iter().enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                client_json(&mut b, c);
            }
            b.extend_from_slice(b"]}");
        }
        ApiReply::Disconnected { user } => {
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            let _ = write!(b, ",\"connections\":{}}}", g.connections);
        }
        ApiReply::Membership {
            user,
            channel,
            subscribe,
        } => {
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            b.extend_from_slice(b",\"channel\":");
            proto::write_str(&mut b, channel);
            let _ = write!(
                b,
                ",\"subscribed\":{subscribe},\"connections\":{}}}",
                g.connections
            );
        }
        ApiReply::Presence { channel } => {
            app::presence_json(&mut b, channel, g.connections, g.presence);
        }
        ApiReply::History { channel } => page_json(&mut b, channel, g.page),
        ApiReply::Clients { offset, limit } => {
            let _ = write!(
                b,
                "{{\"total\":{},\"offset\":{offset},\"limit\":{limit},\"clients\":[",
                g.clients.len()
            );
            for (i, c) in g.clients.iter().skip(*offset).take(*limit).enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                client_json(&mut b, c);
            }
            b.extend_from_slice(b"]}");
        }
        ApiReply::Revoked { kind, value } => {
            b.extend_from_slice(b"{\"success\":true,\"revoked\":");
            proto::write_str(&mut b, kind.as_str());
            b.extend_from_slice(b",\"value\":");
            proto::write_str(&mut b, value);
            let _ = write!(b, ",\"connections\":{}}}", g.connections);
        }
    }
    Response::json(200, &b, p.close)
}

/// A storage failure for a request that was waiting on the writer.
pub fn storage_failure(p: &Pending, overloaded: bool, message: &str) -> Response {
    if overloaded {
        ApiError::new(503, "overloaded", message).response(p.close)
    } else {
        ApiError::new(500, "storage_error", message).response(p.close)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_segments() {
        assert_eq!(
            matches(
                "/websocket/users/{userId}/status",
                "/websocket/users/a%3Ab/status"
            ),
            Some(vec!["a:b".to_owned()])
        );
        assert_eq!(
            matches(
                "/websocket/users/{userId}/status",
                "/websocket/users//status"
            ),
            None
        );
        assert_eq!(matches("/api/status", "/api/status/"), None);
        assert!(find("GET", "/api/status").is_ok());
        assert_eq!(find("PUT", "/api/status").err(), Some(vec!["GET"]));
        assert_eq!(find("GET", "/nope").err(), Some(vec![]));
    }

    #[test]
    fn key_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
