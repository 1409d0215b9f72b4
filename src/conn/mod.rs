//! One client connection: a state machine over a [`Transport`].
//!
//! ```text
//! Handshake --101--> Open --close/error/slow/timeout--> Closing --> dropped
//!     \--4xx/5xx--> Rejecting --response flushed, FIN, EOF or linger--> dropped
//! ```
//!
//! The connection owns almost nothing while idle: the socket, a few flags,
//! one timer handle. Reads land in the shard's scratch buffer; replies are
//! appended to the shard's cork buffer and written with one syscall after the
//! read burst; only what the socket does not take is copied into the
//! connection's own [`OutQueue`].

mod http;
pub mod outq;
pub mod transport;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::deadline::{TimerKind, TimerRef};
use crate::env::{Desk, Env, Handling};
use crate::id::ConnId;
use crate::proto::socketio::EioPacket;
use crate::proto::{self, ErrorCode};
use crate::session::{Replies, Session, SioState, TokenStep, Verdict, close};
use crate::stats::{Counters, LocalHistos};
use crate::timer::{TimerKey, TimerWheel};
use crate::ws::frame::{self, CloseCode, OpCode};
use crate::ws::{BufPool, Flow, Inbound, Message};

/// How long an HTTP request may wait for other shards or the store before
/// the connection is dropped (answers normally take milliseconds).
const AWAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// One fan-out's Socket.IO encoding, made for its first Socket.IO recipient
/// and shared by the next ones: (namespace, `message_strings`, frame).
pub type SioShared = Option<(Box<str>, bool, Arc<[u8]>)>;

pub use outq::OutQueue;
pub use transport::{ReadOutcome, Transport, WriteOutcome};

/// What a WebSocket connection was opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Raw echo (T2): every text and binary message comes back.
    Echo,
    /// The Switchboard JSON protocol.
    App,
    /// Engine.IO v4 / Socket.IO v5 over WebSocket (docs/SOCKETIO.md).
    SocketIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Open(Endpoint),
    /// Our close frame is queued or sent. Once it is flushed we send FIN
    /// (the server closes TCP first, RFC 6455 7.1.1), then wait for the
    /// peer's close frame or EOF, at most `close_timeout`.
    Closing {
        peer_closed: bool,
        write_shut: bool,
    },
    /// An HTTP error response is queued; after it, FIN, then wait for EOF.
    Rejecting {
        write_shut: bool,
    },
}

/// What the shard should do with the connection after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Keep,
    Drop,
}

/// The shard's state that connections use for I/O.
pub struct Io {
    /// One write per connection per turn: replies are corked here first.
    pub cork: Vec<u8>,
    pub wheel: TimerWheel<TimerRef>,
    pub c: Counters,
    /// Spare buffers for large partial frames.
    pub pool: BufPool,
    pub histos: LocalHistos,
}

/// A connection call's context: the shard's surroundings, the state
/// handlers change, the I/O state, which connection, and when. Borrowed
/// field by field from the shard, so its slab entry can be borrowed too.
pub struct Ctx<'a> {
    pub env: &'a Env,
    pub desk: &'a mut Desk,
    pub io: &'a mut Io,
    pub key: usize,
    pub now: Instant,
}

impl<'a> Ctx<'a> {
    pub fn new(env: &'a Env, desk: &'a mut Desk, io: &'a mut Io, key: usize, now: Instant) -> Self {
        Ctx {
            env,
            desk,
            io,
            key,
            now,
        }
    }
}

pub struct Conn {
    id: ConnId,
    io: Transport,
    peer: SocketAddr,
    state: State,
    /// Partial HTTP request head (handshake only).
    hs: Vec<u8>,
    inbound: Inbound,
    out: OutQueue,
    /// Protocol state on `ws_path` (None on the echo endpoint).
    session: Option<Box<Session>>,
    timer: Option<TimerKey>,
    /// Edge-triggered readiness as last seen: cleared only on WouldBlock.
    pub readable: bool,
    pub writable: bool,
    /// In the shard's run list (dedup flag).
    pub queued: bool,
    /// In the shard's flush list (output queued by deliveries).
    pub flush_queued: bool,
    awaiting_pong: bool,
    /// Pings sent since the last pong (the first of them started the pong
    /// deadline): with `pong_timeout` longer than `heartbeat_interval`, pings
    /// keep coming every interval while the deadline runs.
    unanswered: u32,
    /// Holds an [`Admission`] slot.
    counted: bool,
    /// HTTP: a request waits for other shards; later ones stay buffered.
    awaiting: bool,
    /// HTTP: that request asked for `Connection: close`.
    close_after: bool,
    /// HTTP: buffered requests wait for output room.
    held: bool,
    /// The client's address: the peer's, or behind a trusted proxy the one
    /// the proxy names (set at the upgrade request; `/api/clients` shows it).
    client: IpAddr,
    /// Wheel tick of the last data received (idle timeout).
    last_seen: u32,
}

/// Where replies go while a connection is being served: the shard's cork
/// buffer when nothing is queued before them, else the connection's queue.
struct Sink<'a> {
    cork: &'a mut Vec<u8>,
    out: &'a mut OutQueue,
}

impl Sink<'_> {
    fn frame(&mut self, op: OpCode, payload: &[u8]) {
        if self.out.is_empty() {
            frame::encode_frame(self.cork, op, payload);
        } else {
            self.out.push_frame(op, payload);
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        if self.out.is_empty() {
            self.cork.extend_from_slice(b);
        } else {
            self.out.push_bytes(b);
        }
    }
}

impl Replies for Sink<'_> {
    fn text(&mut self, json: &[u8]) {
        self.frame(OpCode::Text, json);
    }
    fn binary(&mut self, data: &[u8]) {
        self.frame(OpCode::Binary, data);
    }

    fn queued(&self) -> usize {
        // The cork holds only this connection's replies during its turn.
        self.cork.len() + self.out.bytes()
    }
}

impl Conn {
    pub fn new(id: ConnId, io: Transport, peer: SocketAddr) -> Self {
        Conn {
            id,
            io,
            peer,
            state: State::Handshake,
            hs: Vec::new(),
            inbound: Inbound::new(),
            out: OutQueue::new(),
            session: None,
            timer: None,
            readable: true,
            writable: true,
            queued: false,
            flush_queued: false,
            awaiting_pong: false,
            unanswered: 0,
            counted: false,
            awaiting: false,
            close_after: false,
            held: false,
            client: peer.ip().to_canonical(),
            last_seen: 0,
        }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's IP address (see `trusted_proxies`).
    pub fn client_ip(&self) -> IpAddr {
        self.client
    }

    pub fn socket(&mut self) -> &mut mio::net::TcpStream {
        self.io.socket()
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Heap bytes this connection holds beyond its slab slot (memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.hs.capacity() + self.inbound.heap_bytes() + self.out.heap_bytes()
    }

    /// Called once the socket is registered.
    pub fn start(&mut self, ctx: &mut Ctx<'_>) {
        ctx.io.c.sockets += 1;
        ctx.io.c.accepted += 1;
        self.set_timer(ctx, ctx.env.cfg.handshake_timeout, TimerKind::Handshake);
    }

    /// Called when the connection leaves the slab, whatever the reason.
    pub fn release(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(k) = self.timer.take() {
            ctx.io.wheel.cancel(k);
        }
        ctx.io.c.sockets = ctx.io.c.sockets.saturating_sub(1);
        self.leave_open(ctx);
    }

    /// The connection stops counting as open (its close began, or it is gone):
    /// its `max_connections` slot is free for the next upgrade.
    fn leave_open(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(session) = self.session.as_mut() {
            session.on_close(&mut ctx.desk.local, &ctx.env.router, ctx.env.shard, ctx.key);
            // A token may live for days: its entry must not outlive us.
            if let Some(k) = session.take_token_timer() {
                ctx.io.wheel.cancel(k);
            }
        }
        if self.counted {
            self.counted = false;
            ctx.env.admission.release();
            ctx.io.c.connections = ctx.io.c.connections.saturating_sub(1);
        }
    }

    fn set_timer(&mut self, ctx: &mut Ctx<'_>, after: Duration, kind: TimerKind) {
        if let Some(k) = self.timer.take() {
            ctx.io.wheel.cancel(k);
        }
        let r = TimerRef {
            key: ctx.key,
            id: self.id,
            kind,
        };
        self.timer = Some(ctx.io.wheel.insert(ctx.now, after, r));
    }

    /// Serve a readiness event: flush, then read up to the budget.
    /// Returns whether the socket may still hold unread bytes (budget used up).
    pub fn on_ready(&mut self, scratch: &mut [u8], ctx: &mut Ctx<'_>) -> (Next, bool) {
        if self.writable
            && (!self.out.is_empty() || self.io.has_pending_output())
            && self.after_io(ctx) == Next::Drop
        {
            return (Next::Drop, false);
        }
        if self.in_http() && !self.awaiting && !self.hs.is_empty() && !self.http_backlogged(ctx) {
            // Requests that waited (behind an answer, or for output room).
            self.resume_http(ctx);
        }
        let mut budget = ctx.env.cfg.read_budget;
        while self.readable {
            if budget == 0 {
                return (self.after_io(ctx), true);
            }
            if self.in_http() && (self.awaiting || self.http_backlogged(ctx)) {
                // HTTP back-pressure: read no more requests until the one
                // awaiting an answer is answered, or the client has read
                // enough of its responses; the kernel buffers the rest.
                // `readable` stays set: the answer, a WRITABLE event, or
                // (if this flush already made room) the next loop turn
                // brings us back here. Edge-triggered: nothing else would.
                let next = self.after_io(ctx);
                let room = !self.awaiting && !self.http_backlogged(ctx);
                return (next, room);
            }
            match self.io.read(scratch) {
                ReadOutcome::Data(n) => {
                    budget = budget.saturating_sub(n);
                    ctx.io.c.bytes_in += n as u64;
                    let Some(data) = scratch.get_mut(..n) else {
                        return (Next::Drop, false);
                    };
                    self.process(data, ctx);
                }
                ReadOutcome::WouldBlock => self.readable = false,
                ReadOutcome::Eof if self.awaiting => {
                    // Half-closed after a request whose answer is on its
                    // way: send it, then close.
                    self.close_after = true;
                    self.readable = false;
                    return (self.after_io(ctx), false);
                }
                ReadOutcome::Eof => {
                    log::debug!("conn={} peer closed ({:?})", self.id, self.state);
                    if self.after_io(ctx) == Next::Drop
                        || (self.out.is_empty() && !self.io.has_pending_output())
                    {
                        return (Next::Drop, false);
                    }
                    // The peer only half-closed and replies (or our close frame)
                    // are still queued: keep flushing, at most `close_timeout`.
                    self.leave_open(ctx);
                    if !matches!(self.state, State::Closing { .. } | State::Rejecting { .. }) {
                        self.set_timer(ctx, ctx.env.cfg.close_timeout, TimerKind::Linger);
                    }
                    self.state = State::Closing {
                        peer_closed: true,
                        write_shut: false,
                    };
                    self.readable = false;
                    return (Next::Keep, false);
                }
                ReadOutcome::Error(e) => {
                    ctx.io.cork.clear();
                    log::debug!("conn={} read error: {e}", self.id);
                    return (Next::Drop, false);
                }
            }
        }
        let next = self.after_io(ctx);
        // Requests left buffered for want of output room, and the room is
        // there now: serve them next turn (no event would announce it).
        let held = self.held && !self.awaiting && !self.http_backlogged(ctx);
        (next, held)
    }

    fn process(&mut self, data: &mut [u8], ctx: &mut Ctx<'_>) {
        match self.state {
            State::Handshake => self.handshake_bytes(data, ctx),
            State::Open(ep) => self.ws_bytes(data, ep, ctx),
            State::Closing { .. } => self.closing_bytes(data, ctx),
            State::Rejecting { .. } => {} // discard: the answer is already decided
        }
    }

    fn ws_bytes(&mut self, data: &mut [u8], ep: Endpoint, ctx: &mut Ctx<'_>) {
        let now_tick = ctx.io.wheel.tick_of(ctx.now) as u32;
        let conn_id = self.id;
        let Conn {
            inbound,
            out,
            awaiting_pong,
            last_seen,
            session,
            ..
        } = self;
        let mut sink = Sink {
            cork: &mut ctx.io.cork,
            out,
        };
        let c = &mut ctx.io.c;
        let mut actx = Handling {
            env: ctx.env,
            desk: &mut *ctx.desk,
            key: ctx.key,
            conn: conn_id,
            now: ctx.now,
        };
        let mut peer_close: Option<Option<u16>> = None;
        let mut verdict = Verdict::Continue;
        let pool = &mut ctx.io.pool;
        let result = inbound.feed_pooled(data, &ctx.env.limits, pool, &mut |m| {
            match m {
                Message::Text(bytes) => {
                    if ep == Endpoint::SocketIo
                        && matches!(proto::socketio::decode_eio(bytes), Ok(EioPacket::Pong(_)))
                    {
                        // The Engine.IO heartbeat answer, as a WebSocket pong.
                        *awaiting_pong = false;
                        return Flow::Continue;
                    }
                    *last_seen = now_tick; // data, not control frames, counts as activity
                    c.messages_in += 1;
                    // Keep the strongest verdict of the read (Close >
                    // Authenticated > Refreshed > Continue): an `authenticate`
                    // followed by another message in the same read must
                    // still start the heartbeat.
                    let v = match (ep, session.as_deref_mut()) {
                        (Endpoint::SocketIo, Some(s)) => {
                            Some(s.on_sio_text(bytes, &mut actx, &mut sink))
                        }
                        (Endpoint::App, Some(s)) => Some(s.on_text(bytes, &mut actx, &mut sink)),
                        _ => None,
                    };
                    match v {
                        Some(v @ Verdict::Close(..)) => {
                            verdict = v;
                            return Flow::Stop;
                        }
                        Some(Verdict::Authenticated) => verdict = Verdict::Authenticated,
                        Some(Verdict::Refreshed) => {
                            if verdict == Verdict::Continue {
                                verdict = Verdict::Refreshed;
                            }
                        }
                        Some(Verdict::Continue) => {}
                        None => {
                            // The echo endpoint: the message goes back as is.
                            c.messages_out += 1;
                            sink.frame(OpCode::Text, bytes);
                        }
                    }
                }
                Message::Binary(b) => {
                    *last_seen = now_tick;
                    c.messages_in += 1;
                    if ep == Endpoint::SocketIo
                        && session
                            .as_deref()
                            .and_then(Session::sio)
                            .is_some_and(SioState::is_plain)
                    {
                        // The conformance Engine.IO echo: binary data back.
                        c.messages_out += 1;
                        sink.frame(OpCode::Binary, b);
                    } else if let (Endpoint::SocketIo, Some(s)) = (ep, session.as_deref_mut()) {
                        // An attachment of the BINARY_EVENT/BINARY_ACK before it.
                        if let v @ Verdict::Close(..) = s.on_sio_binary(b, &mut actx, &mut sink) {
                            verdict = v;
                            return Flow::Stop;
                        }
                    } else if ep == Endpoint::App {
                        let mut e = Vec::new();
                        proto::error(
                            &mut e,
                            ErrorCode::BinaryNotSupported,
                            "the protocol uses JSON text frames",
                            None,
                        );
                        sink.frame(OpCode::Text, &e);
                    } else {
                        c.messages_out += 1;
                        sink.frame(OpCode::Binary, b);
                    }
                }
                // RFC 6455 5.5.3: a Pong carries the Ping's application data.
                Message::Ping(p) => sink.frame(OpCode::Pong, p),
                Message::Pong(_) => *awaiting_pong = false,
                Message::Close(close) => {
                    peer_close = Some(close.map(|(code, _)| code));
                    // 5.5.1: reply with a close, echoing the status code.
                    let mut f = Vec::with_capacity(4);
                    match close {
                        Some((code, _)) => frame::encode_close(&mut f, code, ""),
                        None => frame::encode_header(&mut f, OpCode::Close, 0),
                    }
                    sink.bytes(&f);
                    return Flow::Stop;
                }
            }
            Flow::Continue
        });
        match result {
            Ok(_) if peer_close.is_some() => {
                log::debug!(
                    "conn={} closed by peer ({:?})",
                    self.id,
                    peer_close.flatten()
                );
                self.state = State::Closing {
                    peer_closed: true,
                    write_shut: false,
                };
                self.leave_open(ctx);
                self.set_timer(ctx, ctx.env.cfg.close_timeout, TimerKind::Linger);
            }
            Ok(_) => {
                self.apply(verdict, ctx);
                // Before `authenticate` only a small message is expected:
                // an unauthenticated connection may not hold more than
                // `pre_auth_max_bytes` of an unfinished one (the full
                // limits would let each hold a megabyte).
                if ep == Endpoint::App
                    && self.is_open()
                    && self.session.as_ref().is_some_and(|s| !s.is_authenticated())
                    && self.inbound.buffered() > ctx.env.cfg.pre_auth_max_bytes
                {
                    ctx.io.c.pre_auth_refused += 1;
                    self.inbound = Inbound::new();
                    self.close(
                        CloseCode::TooBig,
                        "message too big before authentication",
                        ctx,
                    );
                }
            }
            Err(e) => {
                ctx.io.c.protocol_errors += 1;
                log::debug!("conn={} protocol error: {}", self.id, e.reason());
                self.close(e.close_code(), e.reason(), ctx);
            }
        }
    }

    /// Run `f` with the session, an application context and the reply sink.
    fn with_app<T>(
        &mut self,
        ctx: &mut Ctx<'_>,
        f: impl FnOnce(&mut Session, &mut Handling<'_>, &mut Sink<'_>) -> T,
        session: &mut Session,
    ) -> T {
        let mut actx = Handling {
            env: ctx.env,
            desk: &mut *ctx.desk,
            key: ctx.key,
            conn: self.id,
            now: ctx.now,
        };
        let mut sink = Sink {
            cork: &mut ctx.io.cork,
            out: &mut self.out,
        };
        f(session, &mut actx, &mut sink)
    }

    /// Act on what the protocol handler decided.
    fn apply(&mut self, verdict: Verdict, ctx: &mut Ctx<'_>) {
        match verdict {
            Verdict::Continue => {
                // Unauthenticated: the auth deadline is the only timer.
                if self.timer.is_none()
                    && self.session.as_ref().is_some_and(|s| !s.is_authenticated())
                {
                    self.set_timer(ctx, ctx.env.cfg.auth.timeout, TimerKind::Auth);
                }
            }
            Verdict::Authenticated => {
                self.set_timer(ctx, self.ping_interval(ctx), TimerKind::Ping);
                self.schedule_token(ctx);
            }
            Verdict::Refreshed => self.schedule_token(ctx),
            Verdict::Close(code, reason) => self.close_code(code, reason, ctx),
        }
    }

    /// Heartbeat period: Engine.IO's `pingInterval` for Socket.IO clients.
    fn ping_interval(&self, ctx: &Ctx<'_>) -> Duration {
        match self.state {
            State::Open(Endpoint::SocketIo) => ctx.env.cfg.socketio.ping_interval,
            _ => ctx.env.cfg.heartbeat_interval,
        }
    }

    /// How long a ping may go unanswered.
    fn pong_timeout(&self, ctx: &Ctx<'_>) -> Duration {
        match self.state {
            State::Open(Endpoint::SocketIo) => ctx.env.cfg.socketio.ping_timeout,
            _ => ctx.env.cfg.pong_timeout,
        }
    }

    /// A Socket.IO session that has not connected a namespace yet: the time
    /// left of `auth.timeout` since the upgrade (its heartbeat timer never
    /// waits longer, so the deadline holds within a wheel tick). None for
    /// every other connection.
    pub(super) fn connect_left(&self, ctx: &Ctx<'_>) -> Option<Duration> {
        let s = self.session.as_ref()?;
        if !self.is_socketio() || s.is_authenticated() || s.sio().is_none_or(SioState::is_plain) {
            return None;
        }
        let waited = crate::clock::now_ms().saturating_sub(s.connected_at_ms());
        let waited = Duration::from_millis(u64::try_from(waited).unwrap_or(0));
        Some(ctx.env.cfg.auth.timeout.saturating_sub(waited))
    }

    /// Is this a Socket.IO connection (native messages are re-encoded)?
    pub fn is_socketio(&self) -> bool {
        matches!(self.state, State::Open(Endpoint::SocketIo))
    }

    /// (Re)arm the token's expiry timer from the session's current token:
    /// one wheel entry per connection whose token expires, replaced on
    /// refresh, cancelled when the connection stops being open.
    fn schedule_token(&mut self, ctx: &mut Ctx<'_>) {
        let Some(session) = self.session.as_deref_mut() else {
            return;
        };
        if let Some(k) = session.take_token_timer() {
            ctx.io.wheel.cancel(k);
        }
        if let Some(wait) = session.token_wait(&ctx.env.cfg, crate::clock::now_ms()) {
            let r = TimerRef {
                key: ctx.key,
                id: self.id,
                kind: TimerKind::TokenExpiry,
            };
            session.set_token_timer(ctx.io.wheel.insert(ctx.now, wait, r));
        }
    }

    /// The token timer fired: warn, wait again, or close 4004.
    fn on_token_timer(&mut self, ctx: &mut Ctx<'_>) -> Next {
        if !self.is_open() {
            return Next::Keep;
        }
        let Some(mut session) = self.session.take() else {
            return Next::Keep;
        };
        let _fired = session.take_token_timer(); // the wheel already removed it
        let step = self.with_app(
            ctx,
            |s, actx, sink| s.on_token_timer(&actx.env.cfg, crate::clock::now_ms(), sink),
            &mut session,
        );
        self.session = Some(session);
        match step {
            TokenStep::Close(code, reason) => {
                ctx.io.c.token_expired_closes += 1;
                log::info!("conn={} token expired, closing {code}", self.id);
                self.close_code(code, reason, ctx);
            }
            TokenStep::Wait => self.schedule_token(ctx),
        }
        self.after_io(ctx)
    }

    /// Queue a text frame for this connection (a reply produced outside its
    /// read turn), encoded straight into its queue; the shard flushes it.
    /// Past `limit` queued bytes nothing more is queued: the flush closes
    /// the connection as a slow consumer (1008) anyway, and memory stays
    /// bounded.
    pub fn push_text(&mut self, json: &[u8], limit: usize) {
        if self.is_open() && self.out.bytes() <= limit {
            if self.is_socketio() {
                if let Some(b) = self
                    .session
                    .as_mut()
                    .and_then(|s| s.sio_mut())
                    .and_then(|st| st.render(json, None))
                {
                    self.out.push_frame(OpCode::Text, &b);
                }
            } else {
                self.out.push_frame(OpCode::Text, json);
            }
        }
    }

    /// Bytes queued for this connection and not yet taken by the socket.
    pub fn queued_bytes(&self) -> usize {
        self.out.bytes()
    }

    /// Put the connection on the shard's flush list (once per turn).
    pub fn queue_flush(&mut self, key: usize, list: &mut Vec<usize>) {
        if !self.flush_queued {
            self.flush_queued = true;
            list.push(key);
        }
    }

    /// Is the connection reading again (for the shard to serve it)?
    pub fn wants_read(&self) -> bool {
        self.readable
    }

    /// Bytes after our close: look only for the peer's close frame.
    fn closing_bytes(&mut self, data: &mut [u8], ctx: &mut Ctx<'_>) {
        let mut got_close = false;
        let r = self
            .inbound
            .feed_pooled(data, &ctx.env.limits, &mut ctx.io.pool, &mut |m| {
                if let Message::Close(_) = m {
                    got_close = true;
                    return Flow::Stop;
                }
                Flow::Continue
            });
        if got_close || r.is_err() {
            // A broken stream after our close ends it just the same.
            self.state = State::Closing {
                peer_closed: true,
                write_shut: false,
            };
        }
    }

    /// Start the closing handshake with `code` (RFC 6455 7.1.2).
    pub fn close(&mut self, code: CloseCode, reason: &str, ctx: &mut Ctx<'_>) {
        self.close_code(code.as_u16(), reason, ctx);
    }

    /// As [`Conn::close`] with a numeric (application, 4xxx) code.
    pub fn close_code(&mut self, code: u16, reason: &str, ctx: &mut Ctx<'_>) {
        if !self.is_open() {
            return;
        }
        let mut f = Vec::with_capacity(16 + reason.len());
        if code == close::TOKEN_REVOKED
            && let Some(home) = self
                .session
                .as_ref()
                .and_then(|s| s.sio())
                .and_then(SioState::home)
        {
            // Socket.IO DISCONNECT first: the client does not reconnect
            // to a server that sent it ("io server disconnect"). Only for a
            // revocation: after a shutdown, a heartbeat timeout or a slow
            // consumer close the client should reconnect, as it does when
            // socket.io closes the transport ("transport close").
            let mut d = Vec::with_capacity(4 + home.len());
            proto::socketio::disconnect(&mut d, home);
            frame::encode_frame(&mut f, OpCode::Text, &d);
        }
        frame::encode_close(&mut f, code, reason);
        Sink {
            cork: &mut ctx.io.cork,
            out: &mut self.out,
        }
        .bytes(&f);
        self.state = State::Closing {
            peer_closed: false,
            write_shut: false,
        };
        self.leave_open(ctx);
        self.set_timer(ctx, ctx.env.cfg.close_timeout, TimerKind::Linger);
    }

    /// Move the cork and the queue towards the socket, then apply the outbound
    /// budget and the closing transitions.
    pub fn after_io(&mut self, ctx: &mut Ctx<'_>) -> Next {
        if !ctx.io.cork.is_empty() {
            if self.out.is_empty() && self.writable {
                match self.io.write_direct(&ctx.io.cork) {
                    Ok(n) => {
                        ctx.io.c.bytes_out += n as u64;
                        if n < ctx.io.cork.len() {
                            self.out
                                .push_bytes(ctx.io.cork.get(n..).unwrap_or_default());
                        }
                    }
                    Err(e) => {
                        ctx.io.cork.clear();
                        log::debug!("conn={} write error: {e}", self.id);
                        return Next::Drop;
                    }
                }
            } else {
                self.out.push_bytes(&ctx.io.cork);
            }
            ctx.io.cork.clear();
        }
        if self.writable && (!self.out.is_empty() || self.io.has_pending_output()) {
            let (n, outcome) = self.io.write_queue(&mut self.out);
            ctx.io.c.bytes_out += n as u64;
            match outcome {
                WriteOutcome::Done => {}
                WriteOutcome::WouldBlock => self.writable = false,
                WriteOutcome::Error(e) => {
                    log::debug!("conn={} write error: {e}", self.id);
                    return Next::Drop;
                }
            }
        }
        if self.out.bytes() > ctx.env.cfg.max_outbound_bytes && self.is_open() {
            // A slow consumer: it must not hold the shard's memory or time.
            ctx.io.c.slow_consumers += 1;
            log::info!(
                "conn={} slow consumer: {} bytes queued, closing 1008",
                self.id,
                self.out.bytes()
            );
            self.out.drop_unsent();
            self.close(CloseCode::Policy, "slow consumer", ctx);
            // `close` put the frame behind the kept remainder; try to send it.
            return self.after_io(ctx);
        }
        let drained = self.out.is_empty() && !self.io.has_pending_output();
        match self.state {
            State::Closing {
                peer_closed: true, ..
            } if drained => Next::Drop,
            State::Closing {
                peer_closed: false,
                write_shut: false,
            } if drained => {
                self.io.shutdown_write();
                self.state = State::Closing {
                    peer_closed: false,
                    write_shut: true,
                };
                Next::Keep
            }
            State::Rejecting { write_shut: false } if drained => {
                self.io.shutdown_write();
                self.state = State::Rejecting { write_shut: true };
                Next::Keep
            }
            _ => Next::Keep,
        }
    }

    /// A timer of this connection fired.
    pub fn on_timer(&mut self, kind: TimerKind, ctx: &mut Ctx<'_>) -> Next {
        if kind == TimerKind::TokenExpiry {
            // The session's own wheel entry, not the connection's slot.
            return self.on_token_timer(ctx);
        }
        self.timer = None;
        match (kind, self.state) {
            (TimerKind::Handshake, State::Handshake) => {
                ctx.io.c.handshake_timeouts += 1;
                log::debug!("conn={} handshake timeout", self.id);
                if !self.awaiting && self.body_incomplete(ctx) {
                    // A whole head and part of its body: the caller is told
                    // why (408) instead of seeing the connection vanish. A
                    // head that never finished gets nothing (slowloris).
                    ctx.io.c.body_timeouts += 1;
                    self.respond(self.body_timeout(ctx), ctx);
                    return self.after_io(ctx);
                }
                Next::Drop
            }
            (TimerKind::Ping, State::Open(_)) => {
                let tick = ctx.io.wheel.tick_len();
                if self.connect_left(ctx).is_some_and(|d| d < tick) {
                    // No namespace CONNECT within `auth.timeout` (connectTimeout;
                    // within a wheel tick: the wall clock counts whole ms).
                    self.close_code(close::AUTH_TIMEOUT, "no CONNECT in time", ctx);
                    return self.after_io(ctx);
                }
                let idle = ctx.env.cfg.idle_timeout;
                let now_tick = ctx.io.wheel.tick_of(ctx.now) as u32;
                // Ticks are floored: one tick less than measured, so never early.
                let tick_ms = ctx.io.wheel.tick_len().as_millis();
                if !idle.is_zero()
                    && u128::from(now_tick.wrapping_sub(self.last_seen).saturating_sub(1)) * tick_ms
                        >= idle.as_millis()
                {
                    self.close(CloseCode::Normal, "idle timeout", ctx);
                    return self.after_io(ctx);
                }
                if self.is_socketio() {
                    self.out.push_frame(OpCode::Text, b"2"); // Engine.IO ping
                } else {
                    self.out.push_frame(OpCode::Ping, b"");
                }
                if !self.awaiting_pong {
                    self.awaiting_pong = true;
                    self.unanswered = 0;
                }
                self.unanswered = self.unanswered.saturating_add(1);
                ctx.io.c.pings_sent += 1;
                // One timer per connection: whichever comes first, the next
                // ping (every interval, as documented) or the pong deadline
                // (the pong timeout after the first unanswered ping).
                let interval = self.ping_interval(ctx);
                let left = self.pong_time_left(ctx);
                if left <= interval {
                    self.set_timer(ctx, left, TimerKind::PongDeadline);
                } else {
                    self.set_timer(ctx, interval, TimerKind::Ping);
                }
                self.after_io(ctx)
            }
            (TimerKind::PongDeadline, State::Open(_)) => {
                if self.awaiting_pong {
                    ctx.io.c.heartbeat_timeouts += 1;
                    log::info!(
                        "conn={} no pong within {:?}, closing",
                        self.id,
                        self.pong_timeout(ctx)
                    );
                    self.close(CloseCode::Error, "heartbeat timeout", ctx);
                    return self.after_io(ctx);
                }
                // The deadline came `left` after the last ping; the next
                // ping is due one interval after that ping.
                let rest = self
                    .ping_interval(ctx)
                    .saturating_sub(self.pong_time_left(ctx));
                let rest = self.connect_left(ctx).map_or(rest, |left| rest.min(left));
                if rest.is_zero() {
                    return self.on_timer(TimerKind::Ping, ctx);
                }
                self.set_timer(ctx, rest, TimerKind::Ping);
                Next::Keep
            }
            (TimerKind::Auth, State::Open(_)) => {
                if self.is_socketio()
                    && self.session.as_ref().is_some_and(|s| !s.is_authenticated())
                {
                    // No namespace CONNECT succeeded in time (connectTimeout).
                    self.close_code(close::AUTH_TIMEOUT, "no CONNECT in time", ctx);
                    return self.after_io(ctx);
                }
                if self.session.as_ref().is_some_and(|s| !s.is_authenticated()) {
                    let mut e = Vec::new();
                    proto::error(
                        &mut e,
                        ErrorCode::NotAuthenticated,
                        "no authenticate message within the auth timeout",
                        None,
                    );
                    self.out.push_frame(OpCode::Text, &e);
                    self.close_code(close::AUTH_TIMEOUT, "authentication timeout", ctx);
                    return self.after_io(ctx);
                }
                // Authenticated meanwhile: the heartbeat takes over the timer.
                self.set_timer(ctx, self.ping_interval(ctx), TimerKind::Ping);
                Next::Keep
            }
            (TimerKind::Linger, _) => Next::Drop,
            _ => Next::Keep,
        }
    }

    /// Time from the last ping sent to the pong deadline: `pong_timeout`
    /// after the first of the `unanswered` pings, which went out one
    /// interval apart (timers never fire early, so the deadline is never
    /// early either).
    fn pong_time_left(&self, ctx: &Ctx<'_>) -> Duration {
        let waited = self
            .ping_interval(ctx)
            .saturating_mul(self.unanswered.saturating_sub(1));
        self.pong_timeout(ctx).saturating_sub(waited)
    }

    /// Server shutdown: close open connections with 1001, drop handshakes.
    pub fn begin_shutdown(&mut self, ctx: &mut Ctx<'_>) -> Next {
        match self.state {
            State::Handshake => Next::Drop,
            State::Open(_) => {
                self.close(CloseCode::Away, "server shutting down", ctx);
                self.after_io(ctx)
            }
            _ => Next::Keep,
        }
    }

    /// Queue a frame encoded once for many connections (fan-out).
    /// Returns false if the connection is no longer open.
    pub fn deliver(&mut self, frame: Arc<[u8]>) -> bool {
        if self.is_socketio() {
            // For this connection alone: an inbox delivery gets an ack id.
            let packet = self
                .session
                .as_mut()
                .and_then(|s| s.sio_mut())
                .zip(proto::socketio::frame_payload(&frame))
                .and_then(|(st, json)| st.delivery(json));
            return match packet {
                Some(p) => {
                    self.out.push_frame(OpCode::Text, &p);
                    true
                }
                None => false,
            };
        }
        if self.is_open() {
            self.out.push_shared(frame);
            true
        } else {
            false
        }
    }

    /// Queue a native frame shared by many connections; a Socket.IO client
    /// gets it re-encoded as an event, once per fan-out: `sio` keeps the
    /// re-encoded frame (with its namespace) for the next such recipient.
    pub fn deliver_as(&mut self, frame: Arc<[u8]>, sio: &mut SioShared) -> bool {
        if !self.is_socketio() {
            return self.deliver(frame);
        }
        let Some(st) = self.session.as_ref().and_then(|s| s.sio()) else {
            return false;
        };
        let Some(home) = st.home() else {
            return false; // no namespace connected yet: nothing to receive on
        };
        let shared = match sio {
            Some((nsp, strings, f)) if **nsp == *home && *strings == st.strings() => f.clone(),
            _ => {
                let Some(json) = proto::socketio::frame_payload(&frame) else {
                    return false;
                };
                let f = proto::encode::shared_frame(&st.push(home, json));
                *sio = Some((home.into(), st.strings(), f.clone()));
                f
            }
        };
        self.out.push_shared(shared);
        true
    }

    /// The authenticated user on the protocol path.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.session.as_ref().and_then(|s| s.user())
    }

    pub fn identity(&self) -> Option<&crate::auth::Identity> {
        self.session.as_ref().and_then(|s| s.identity())
    }

    pub fn session(&self) -> Option<&Session> {
        self.session.as_deref()
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.session.as_deref_mut()
    }

    /// Is a recovery for `channel` on its way to this connection?
    pub fn recovering(&self, channel: &str) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.is_recovering(channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Socket.IO connection joined to `/`, over a real loopback socket.
    fn socketio_conn(seq: u64, env: &Env, desk: &mut Desk) -> (Conn, std::net::TcpStream) {
        struct Discard;
        impl Replies for Discard {
            fn text(&mut self, _: &[u8]) {}
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let io = Transport::Plain(mio::net::TcpStream::from_std(server));
        let mut conn = Conn::new(ConnId::new(0, seq), io, peer);
        conn.state = State::Open(Endpoint::SocketIo);
        let mut session = Session::socketio(crate::session::ConnectParams::default());
        let mut h = Handling {
            env,
            desk,
            key: seq as usize,
            conn: conn.id,
            now: Instant::now(),
        };
        assert_eq!(
            session.on_sio_text(b"40", &mut h, &mut Discard),
            Verdict::Authenticated
        );
        conn.session = Some(Box::new(session));
        (conn, client)
    }

    /// A fan-out is encoded once for its Socket.IO recipients: every one of
    /// them queues the same shared frame (one allocation), an event carrying
    /// the native message.
    #[test]
    fn socketio_fan_out_shares_one_encoding() {
        let env = Env::detached(
            crate::config::Config::default(),
            crate::auth::Authenticator::None,
            None,
        );
        let mut desk = Desk::default();
        let (mut a, _ca) = socketio_conn(1, &env, &mut desk);
        let (mut b, _cb) = socketio_conn(2, &env, &mut desk);
        let native =
            crate::proto::encode::shared_frame(br#"{"type":"message","channel":"c","data":1}"#);
        let mut shared = None;
        assert!(a.deliver_as(native.clone(), &mut shared));
        assert!(b.deliver_as(native.clone(), &mut shared));
        let (fa, fb) = (a.out.front().unwrap(), b.out.front().unwrap());
        assert_eq!(fa.as_ptr(), fb.as_ptr(), "one frame, shared");
        assert_eq!(
            proto::socketio::frame_payload(fa),
            Some(&br#"42["message",{"type":"message","channel":"c","data":1}]"#[..])
        );
        // It is a new encoding beside the native frame, which native
        // recipients keep sharing.
        assert!(!std::ptr::eq(fa.as_ptr(), native.as_ptr()));
    }

    /// The per-connection footprint is a design target (about 1 KiB per idle
    /// connection in all, see docs/BENCHMARKS.md): keep the struct small.
    #[test]
    fn connection_state_stays_small() {
        let conn = std::mem::size_of::<Conn>();
        eprintln!("Conn = {conn} bytes");
        assert!(conn <= 256, "Conn grew to {conn} bytes");
    }
}
