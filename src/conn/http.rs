//! The HTTP side of a connection before (or instead of) an upgrade: the
//! request head, the choice between an upgrade, a refusal and the HTTP
//! API, keep-alive and pipelined requests answered in order, back-pressure
//! while an answer is awaited or unread.

use std::net::IpAddr;
use std::time::Instant;

use crate::api;
use crate::config::Cidr;
use crate::env::Handling;
use crate::http::{Request, Response, parse_request};
use crate::session::{ConnectParams, Session};

use super::{AWAIT_TIMEOUT, Conn, Ctx, Endpoint, Next, OpCode, Sink, State, TimerKind};

/// An Engine.IO handshake this server cannot take, answered as Engine.IO
/// servers do: 400 with `{"code","message"}` (codes of the Engine.IO
/// protocol: 0 transport unknown, 3 bad request, 5 unsupported version).
fn engine_io_refusal(req: &Request) -> Option<Response> {
    let (code, message) = if req.query_param("EIO").as_deref() != Some("4") {
        (5, "Unsupported protocol version")
    } else if req.query_param("transport").as_deref() != Some("websocket") {
        // Long-polling is not served yet (docs/SOCKETIO.md).
        (0, "Transport unknown")
    } else if req.query_param("sid").is_some() {
        // An upgrade of a polling session: there are none yet.
        (1, "Session ID unknown")
    } else {
        return None;
    };
    let body = format!("{{\"code\":{code},\"message\":\"{message}\"}}");
    Some(Response::json(400, body.as_bytes(), true))
}

pub(super) enum Route {
    Upgrade(Endpoint),
    Reject(Response),
    /// Not a WebSocket path: the HTTP API (health, metrics, console too).
    Http,
}

impl Conn {
    /// Bytes of the HTTP phase: requests are served in order (keep-alive,
    /// pipelining) until one upgrades to WebSocket or the connection closes.
    pub(super) fn handshake_bytes(&mut self, data: &mut [u8], ctx: &mut Ctx<'_>) {
        if self.hs.is_empty() && !self.awaiting {
            // The common case: whole requests in this read, nothing buffered.
            let used = self.http_requests(data, ctx);
            if self.in_http()
                && let Some(rest) = data.get(used..)
                && !rest.is_empty()
            {
                self.hs.extend_from_slice(rest);
            }
            return;
        }
        // Bounded: no read happens while a request awaits its answer or
        // responses pile up (see `on_ready`), and one incomplete request is
        // at most a head plus a body.
        self.hs.extend_from_slice(data);
        if !self.awaiting {
            self.resume_http(ctx);
        }
    }

    /// Responses queued past `max_outbound_bytes`: serve no more requests
    /// until the client reads them.
    pub(super) fn http_backlogged(&self, ctx: &Ctx<'_>) -> bool {
        self.out.bytes() + ctx.io.cork.len() > ctx.env.cfg.max_outbound_bytes
    }

    pub(super) fn in_http(&self) -> bool {
        matches!(self.state, State::Handshake)
    }

    /// Serve the requests buffered in `hs`.
    pub(super) fn resume_http(&mut self, ctx: &mut Ctx<'_>) {
        let mut buf = std::mem::take(&mut self.hs);
        let used = self.http_requests(&mut buf, ctx);
        if self.in_http() && used < buf.len() {
            buf.drain(..used);
            self.hs = buf;
        }
    }

    /// Serve the complete requests at the front of `buf`, in order, until one
    /// must wait for other shards; returns the bytes used.
    pub(super) fn http_requests(&mut self, buf: &mut [u8], ctx: &mut Ctx<'_>) -> usize {
        let mut pos = 0;
        self.held = false;
        while self.in_http() && !self.awaiting {
            if self.http_backlogged(ctx) {
                self.held = pos < buf.len();
                break;
            }
            let Some(rest) = buf.get_mut(pos..) else {
                break;
            };
            if rest.is_empty() {
                break;
            }
            let (req, head) = match parse_request(rest, ctx.env.cfg.max_header_bytes) {
                Ok(None) => break,
                Err(e) => {
                    log::debug!("conn={} bad request: {e:?}", self.id);
                    self.reject(e.response(), ctx);
                    return buf.len();
                }
                Ok(Some(r)) => r,
            };
            if req.transfer_encoding {
                self.reject(
                    Response::error(411, "Length Required", "send the body with Content-Length"),
                    ctx,
                );
                return buf.len();
            }
            if req.content_length > ctx.env.cfg.api.max_body_bytes {
                self.reject(
                    Response::error(
                        413,
                        "Content Too Large",
                        &format!(
                            "bodies are at most {} bytes",
                            ctx.env.cfg.api.max_body_bytes
                        ),
                    ),
                    ctx,
                );
                return buf.len();
            }
            if req.content_length > ctx.env.cfg.pre_auth_max_bytes {
                let refused = if self.is_ws_path(&req, ctx) {
                    Some(api::too_large(ctx.env.cfg.pre_auth_max_bytes, true))
                } else {
                    let actx = Handling {
                        env: ctx.env,
                        desk: &mut *ctx.desk,
                        key: ctx.key,
                        conn: self.id,
                        now: ctx.now,
                    };
                    api::refuse_body(&req, &actx)
                };
                if let Some(resp) = refused {
                    ctx.io.c.pre_auth_refused += 1;
                    self.reject(resp, ctx);
                    return buf.len();
                }
            }
            let total = head + req.content_length;
            if rest.len() < total {
                break; // the body is still coming
            }
            pos += total;
            match self.route(&req, ctx) {
                Route::Upgrade(ep) => {
                    self.upgrade(&req, ep, ctx);
                    // Bytes after the request are the first frames.
                    if self.is_open()
                        && let Some(frames) = buf.get_mut(pos..)
                        && !frames.is_empty()
                    {
                        self.ws_bytes(frames, ep, ctx);
                    }
                    return buf.len();
                }
                Route::Reject(resp) => {
                    log::debug!(
                        "conn={} {} {} -> {}",
                        self.id,
                        req.method,
                        req.path,
                        resp.status
                    );
                    self.reject(resp, ctx);
                    return buf.len();
                }
                Route::Http => {
                    let body = rest.get(head..total).unwrap_or_default();
                    self.api_request(&req, body, ctx);
                }
            }
        }
        pos
    }

    /// One request for the HTTP API (or health, metrics, console).
    pub(super) fn api_request(&mut self, req: &Request, body: &[u8], ctx: &mut Ctx<'_>) {
        ctx.io.c.api_requests += 1;
        let mut actx = Handling {
            env: ctx.env,
            desk: &mut *ctx.desk,
            key: ctx.key,
            conn: self.id,
            now: ctx.now,
        };
        match api::handle(req, body, &mut actx) {
            api::Handled::Now(resp) => {
                ctx.io
                    .histos
                    .api
                    .observe(Instant::now().saturating_duration_since(ctx.now));
                self.http_write(resp, req.close, ctx);
            }
            api::Handled::Later => {
                self.awaiting = true;
                self.close_after = req.close;
            }
        }
        if self.in_http() {
            // Keep-alive: the idle deadline restarts with every request; an
            // answer from other shards or the store gets more time.
            let idle = if self.awaiting {
                ctx.env.cfg.handshake_timeout.max(AWAIT_TIMEOUT)
            } else {
                ctx.env.cfg.handshake_timeout
            };
            self.set_timer(ctx, idle, TimerKind::Handshake);
        }
    }

    /// Queue a response; `close` makes it the last one (FIN after it).
    pub(super) fn http_write(&mut self, resp: Response, close: bool, ctx: &mut Ctx<'_>) {
        if close {
            self.respond(resp, ctx);
        } else {
            Sink {
                cork: &mut ctx.io.cork,
                out: &mut self.out,
            }
            .bytes(&resp.bytes);
        }
    }

    /// The answer to the request that waited on other shards; requests
    /// pipelined behind it are served next.
    pub fn http_answer(&mut self, resp: Response, ctx: &mut Ctx<'_>) -> Next {
        if !self.awaiting || !self.in_http() {
            return Next::Keep;
        }
        self.awaiting = false;
        let close = std::mem::take(&mut self.close_after);
        self.http_write(resp, close, ctx);
        if self.in_http() {
            self.set_timer(ctx, ctx.env.cfg.handshake_timeout, TimerKind::Handshake);
            if !self.hs.is_empty() {
                self.resume_http(ctx);
            }
        }
        self.after_io(ctx)
    }

    /// A validated upgrade: answer 101 and start the WebSocket protocol.
    pub(super) fn upgrade(&mut self, req: &Request, ep: Endpoint, ctx: &mut Ctx<'_>) {
        let key = req.ws_key.as_deref().unwrap_or_default();
        Sink {
            cork: &mut ctx.io.cork,
            out: &mut self.out,
        }
        .bytes(&Response::switching_protocols(key).bytes);
        self.hs = Vec::new();
        self.state = State::Open(ep);
        if let Some(k) = self.timer.take() {
            ctx.io.wheel.cancel(k); // the handshake deadline
        }
        ctx.io.c.upgrades += 1;
        ctx.io.c.connections += 1;
        self.last_seen = ctx.io.wheel.tick_of(ctx.now) as u32;
        log::debug!("conn={} upgraded {} from {}", self.id, req.path, self.peer);
        if ep == Endpoint::SocketIo {
            let token = req
                .authorization
                .as_deref()
                .and_then(crate::auth::bearer_token)
                .map(str::to_owned)
                .or_else(|| req.query_param("token"));
            let params = ConnectParams {
                token,
                artifact_id: req.query_param("artifactId"),
                dev_user: req.query_param("userId"),
            };
            let plain = ctx.env.cfg.socketio.serves_plain(&req.path);
            let session = Box::new(Session::engine_io(
                params,
                plain,
                ctx.env.cfg.socketio.message_strings,
            ));
            if let Some(st) = session.sio() {
                let open = st.open_packet(&ctx.env.cfg.socketio);
                Sink {
                    cork: &mut ctx.io.cork,
                    out: &mut self.out,
                }
                .frame(OpCode::Text, &open);
            }
            self.session = Some(session);
            // The Engine.IO heartbeat starts with the session; until a
            // namespace CONNECT succeeds it also keeps `auth.timeout`
            // (`connect_left`).
            let first = if plain {
                ctx.env.cfg.socketio.ping_interval
            } else {
                ctx.env
                    .cfg
                    .socketio
                    .ping_interval
                    .min(ctx.env.cfg.auth.timeout)
            };
            self.set_timer(ctx, first, TimerKind::Ping);
        } else if ep == Endpoint::App {
            let token = req
                .authorization
                .as_deref()
                .and_then(crate::auth::bearer_token)
                .map(str::to_owned)
                .or_else(|| req.query_param("token"));
            let params = ConnectParams {
                token,
                artifact_id: req.query_param("artifactId"),
                dev_user: req.query_param("userId"),
            };
            let mut session = Box::new(Session::new(params));
            let verdict = self.with_app(
                ctx,
                |session, actx, sink| session.on_open(actx, sink),
                &mut session,
            );
            self.session = Some(session);
            self.apply(verdict, ctx);
        } else {
            self.set_timer(ctx, ctx.env.cfg.heartbeat_interval, TimerKind::Ping);
        }
    }

    /// Is a request with a complete head still waiting for its body?
    pub(super) fn body_incomplete(&self, ctx: &Ctx<'_>) -> bool {
        matches!(
            parse_request(&self.hs, ctx.env.cfg.max_header_bytes),
            Ok(Some((req, head))) if self.hs.len() < head.saturating_add(req.content_length)
        )
    }

    /// 408: the body did not arrive by the deadline (`handshake_timeout`
    /// after the connection was accepted or the previous answer was sent).
    pub(super) fn body_timeout(&self, ctx: &Ctx<'_>) -> Response {
        let message = format!(
            "the request body did not arrive within {:?} (handshake_timeout)",
            ctx.env.cfg.handshake_timeout
        );
        api::ApiError::caller(api::Caller::BodyTimeout, message).response(true)
    }

    /// A WebSocket endpoint (whose upgrade request has no use for a body).
    fn is_ws_path(&self, req: &Request, ctx: &Ctx<'_>) -> bool {
        let cfg = &ctx.env.cfg;
        req.path == cfg.ws_path || (cfg.echo_enabled && req.path == cfg.echo_path)
    }

    pub(super) fn route(&mut self, req: &Request, ctx: &mut Ctx<'_>) -> Route {
        let cfg = &ctx.env.cfg;
        let ep = if cfg.echo_enabled && req.path == cfg.echo_path {
            Endpoint::Echo
        } else if req.path == cfg.ws_path {
            Endpoint::App
        } else if cfg.socketio.serves(&req.path) || cfg.socketio.serves_plain(&req.path) {
            if let Some(refused) = engine_io_refusal(req) {
                return Route::Reject(refused);
            }
            Endpoint::SocketIo
        } else {
            return Route::Http;
        };
        if req.method != "GET" {
            return Route::Reject(Response::method_not_allowed());
        }
        if !req.wants_upgrade() || req.ws_version.as_deref() != Some("13") {
            return Route::Reject(Response::upgrade_required());
        }
        if !req.ws_key_valid() {
            return Route::Reject(Response::bad_key());
        }
        if let Some(origin) = req.origin.as_deref()
            && !cfg.allowed_origins.is_empty()
            && !cfg.allowed_origins.iter().any(|o| o == origin)
        {
            return Route::Reject(Response::error(403, "Forbidden", "origin not allowed"));
        }
        if ctx.desk.shutting_down {
            return Route::Reject(Response::shutting_down());
        }
        // The per-IP limit counts WebSocket upgrades only (not API calls,
        // health checks or the console on the same port), by the client's
        // address: behind a trusted proxy, the one it names.
        self.client = client_ip(self.peer.ip(), req, &cfg.trusted_proxies);
        if ctx.env.limiter.is_limited(self.client, ctx.now) {
            ctx.io.c.rejected_rate += 1;
            return Route::Reject(Response::rate_limited());
        }
        if !ctx.env.admission.try_acquire() {
            ctx.io.c.rejected_capacity += 1;
            return Route::Reject(Response::at_capacity());
        }
        self.counted = true;
        Route::Upgrade(ep)
    }

    pub(super) fn reject(&mut self, resp: Response, ctx: &mut Ctx<'_>) {
        ctx.io.c.rejected += 1;
        self.respond(resp, ctx);
    }

    /// Send a final HTTP response, then close (FIN after it, linger for EOF).
    pub(super) fn respond(&mut self, resp: Response, ctx: &mut Ctx<'_>) {
        self.hs = Vec::new();
        ctx.io.cork.extend_from_slice(&resp.bytes);
        self.state = State::Rejecting { write_shut: false };
        self.set_timer(ctx, ctx.env.cfg.close_timeout, TimerKind::Linger);
    }
}

/// The client's address for a request that came from `peer`: `peer` itself
/// unless it is a trusted proxy; then the proxies' chain of `for` addresses
/// (`Forwarded`, else `X-Forwarded-For`) is read from the right, skipping
/// trusted proxies, and the first address that is not one is the client
/// (entries to its left were written by that client and are not believed).
/// A hop that is not an address stops the walk at the last trusted hop.
pub(super) fn client_ip(peer: IpAddr, req: &Request, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(chain) = req.forwarded_for() else {
        return peer;
    };
    let mut client = peer;
    for hop in chain.iter().rev() {
        let Some(ip) = hop else { break };
        client = ip.to_canonical();
        if !is_trusted(client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &str) -> Request {
        let head = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        match parse_request(head.as_bytes(), 8192) {
            Ok(Some((r, _))) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_client_is_the_rightmost_address_no_trusted_proxy_wrote() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = req("X-Forwarded-For: 198.51.100.1, 203.0.113.7, 10.1.1.1\r\n");
        // From a trusted proxy: skip the trusted hops from the right.
        assert_eq!(client_ip(ip("10.0.0.2"), &xff, &trusted), ip("203.0.113.7"));
        // The same header from anyone else is not believed.
        assert_eq!(client_ip(ip("192.0.2.9"), &xff, &trusted), ip("192.0.2.9"));
        assert_eq!(client_ip(ip("10.0.0.2"), &xff, &[]), ip("10.0.0.2"));
        // A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6.
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &xff, &trusted),
            ip("203.0.113.7")
        );
        // Every hop trusted: the leftmost is the client.
        let all = req("X-Forwarded-For: 10.2.2.2, 10.3.3.3\r\n");
        assert_eq!(client_ip(ip("10.0.0.2"), &all, &trusted), ip("10.2.2.2"));
        // A hop that is not an address stops at the last trusted one.
        let unknown = req("Forwarded: for=198.51.100.1, for=unknown, for=10.4.4.4\r\n");
        assert_eq!(
            client_ip(ip("10.0.0.2"), &unknown, &trusted),
            ip("10.4.4.4")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &req(""), &trusted),
            ip("10.0.0.2")
        );
    }
}
