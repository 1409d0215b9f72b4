//! The reactor: one thread, one mio `Poll`, a slab of connections, a timer
//! wheel and an inbox. Every loop turn runs the same phases in order:
//!
//! 1. poll (timeout: the wheel's next tick, 0 if a connection still has
//!    unread bytes from a budget-limited read);
//! 2. record readiness per token (edge-triggered: a flag is cleared only by
//!    `WouldBlock`), note waker and listener events;
//! 3. drain the inbox (sockets handed over, shutdown, later: deliveries);
//! 4. accept (SO_REUSEPORT mode);
//! 5. serve each ready connection once: flush, read up to the budget,
//!    decode, reply through the cork buffer, one write;
//! 6. expire timers (heartbeats, handshake and linger deadlines);
//! 7. publish counters; during shutdown, stop when empty or at the deadline.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

pub mod local;

use std::collections::HashMap;

use crate::accept::IpLimiter;
use crate::app::{self, Audience, Outgoing, Reply, ReplyKind};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::conn::{Admission, Conn, ConnId, Ctx, Next, TimerRef, Transport};
use crate::route::{Router, shards_in};
use crate::stats::{Counters, ShardStats};
use crate::timer::TimerWheel;
use crate::ws::Limits;
use local::LocalIndex;

const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);

/// Timer wheel tick: heartbeat and timeout precision. 100 ms is far below any
/// deadline we keep and wakes an idle shard only 10 times a second.
pub const TICK: Duration = Duration::from_millis(100);
/// 512 slots x 100 ms = 51 s, one lap for the default 30 s heartbeat.
const WHEEL_SLOTS: usize = 512;
/// One read lands here; a multiple of the socket buffer's usual burst.
const SCRATCH: usize = 64 << 10;
/// Retry after the process ran out of file descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Messages other threads send to a shard.
pub enum ShardMsg {
    /// A new TCP connection for this shard to serve.
    Adopt {
        stream: TcpStream,
        peer: SocketAddr,
        rate_limited: bool,
    },
    /// Stop accepting, close every client with 1001, exit by the deadline.
    Shutdown { deadline: Instant },
    /// Deliver a pre-encoded frame to the local connections of an audience.
    Deliver {
        audience: Audience,
        frame: Arc<[u8]>,
        report: Option<ReportTo>,
    },
    /// How many local connections a `Deliver` reached (to the origin shard).
    Delivered { gather: usize, connections: u64 },
    /// Who is subscribed to a channel on this shard.
    PresenceQuery { channel: Arc<str>, report: ReportTo },
    /// The answer: (user, connections) pairs.
    PresenceReply {
        gather: usize,
        entries: Vec<(Arc<str>, u32)>,
    },
}

/// Where a shard sends the result of its part of a cross-shard operation.
#[derive(Debug, Clone, Copy)]
pub struct ReportTo {
    pub shard: usize,
    pub gather: usize,
}

/// A cross-shard operation waiting for its shards' answers.
struct Gather {
    reply: Reply,
    remaining: usize,
    connections: u64,
    presence: HashMap<Arc<str>, u32>,
}

/// The sending side of a shard's inbox. Wakes coalesce: the waker is
/// signalled only when the shard is not already due to drain the inbox.
#[derive(Clone)]
pub struct Inbox {
    tx: Sender<ShardMsg>,
    waker: Arc<Waker>,
    notified: Arc<AtomicBool>,
}

impl Inbox {
    /// Queue a message and wake the shard if it is not already awake for its
    /// inbox. Returns false if the shard has exited.
    pub fn send(&self, msg: ShardMsg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        if !self.notified.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
        true
    }
}

/// What the server keeps of a running shard.
pub struct ShardHandle {
    pub inbox: Inbox,
    pub stats: Arc<ShardStats>,
    pub thread: Option<JoinHandle<()>>,
}

/// A connection call's context, borrowed field by field from the shard so
/// the slab entry can be borrowed at the same time.
macro_rules! ctx {
    ($s:ident, $key:expr, $now:expr) => {
        Ctx {
            cfg: &$s.cfg,
            limits: $s.limits,
            cork: &mut $s.cork,
            wheel: &mut $s.wheel,
            now: $now,
            key: $key,
            c: &mut $s.c,
            admission: &$s.admission,
            shutting_down: $s.shutdown.is_some(),
            shard: $s.id,
            auth: &$s.auth,
            router: &$s.router,
            local: &mut $s.local,
            json: &mut $s.json,
            raw: &mut $s.raw,
            outgoing: &mut $s.outgoing,
            uptime_secs: $s.started.elapsed().as_secs(),
            pool: &mut $s.pool,
            all_stats: &$s.all_stats,
        }
    };
}

pub struct Shard {
    id: usize,
    poll: Poll,
    conns: Slab<Conn>,
    wheel: TimerWheel<TimerRef>,
    rx: Receiver<ShardMsg>,
    notified: Arc<AtomicBool>,
    scratch: Box<[u8]>,
    cork: Vec<u8>,
    listener: Option<TcpListener>,
    limiter: Arc<IpLimiter>,
    run: Vec<usize>,
    again: Vec<usize>,
    fired: Vec<TimerRef>,
    cfg: Arc<Config>,
    limits: Limits,
    admission: Arc<Admission>,
    tls: Option<Arc<rustls::ServerConfig>>,
    seq: u64,
    c: Counters,
    stats: Arc<ShardStats>,
    shutdown: Option<Instant>,
    accept_retry: Option<Instant>,
    router: Arc<Router>,
    auth: Arc<Authenticator>,
    local: LocalIndex,
    json: simd_json::Buffers,
    raw: Vec<u8>,
    pool: crate::ws::BufPool,
    all_stats: Arc<[Arc<ShardStats>]>,
    outgoing: Vec<Outgoing>,
    gathers: Slab<Gather>,
    /// Connections with output queued outside their own read turn.
    flush: Vec<usize>,
    started: Instant,
}

/// Everything a shard is built from.
pub struct ShardSetup {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub admission: Arc<Admission>,
    pub limiter: Arc<IpLimiter>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Its own listener in SO_REUSEPORT mode.
    pub listener: Option<TcpListener>,
    pub auth: Arc<Authenticator>,
}

/// A shard built but not yet running: its inbox exists, so the router can be
/// made from every shard's inbox before any shard starts.
pub struct Prepared {
    shard: Box<Shard>,
    handle: ShardHandle,
}

impl Prepared {
    pub fn inbox(&self) -> Inbox {
        self.handle.inbox.clone()
    }

    pub fn stats(&self) -> Arc<ShardStats> {
        self.handle.stats.clone()
    }

    /// Start the shard's thread (`shard-N`) with the shared router and every
    /// shard's published counters (for `/metrics`).
    pub fn spawn(
        self,
        router: Arc<Router>,
        all_stats: Arc<[Arc<ShardStats>]>,
    ) -> io::Result<ShardHandle> {
        let Prepared {
            mut shard,
            mut handle,
        } = self;
        shard.router = router;
        shard.all_stats = all_stats;
        let name = format!("shard-{}", shard.id);
        handle.thread = Some(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || shard.run())?,
        );
        Ok(handle)
    }
}

impl Shard {
    /// Build the shard on the caller's thread (so errors surface at start).
    pub fn prepare(setup: ShardSetup) -> io::Result<Prepared> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let notified = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ShardStats::default());
        let mut listener = setup.listener;
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let limits = Limits {
            max_frame: setup.cfg.max_frame_size,
            max_message: setup.cfg.max_message_size,
        };
        let shard = Shard {
            id: setup.id,
            poll,
            conns: Slab::new(),
            wheel: TimerWheel::new(TICK, WHEEL_SLOTS),
            rx,
            notified: notified.clone(),
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            cork: Vec::with_capacity(SCRATCH),
            listener,
            limiter: setup.limiter,
            run: Vec::new(),
            again: Vec::new(),
            fired: Vec::new(),
            cfg: setup.cfg,
            limits,
            admission: setup.admission,
            tls: setup.tls,
            seq: 0,
            c: Counters::default(),
            stats: stats.clone(),
            shutdown: None,
            accept_retry: None,
            router: Arc::new(Router::new(Vec::new())),
            auth: setup.auth,
            local: LocalIndex::default(),
            json: simd_json::Buffers::default(),
            raw: Vec::new(),
            pool: crate::ws::BufPool::default(),
            all_stats: Arc::from(Vec::new()),
            outgoing: Vec::new(),
            gathers: Slab::new(),
            flush: Vec::new(),
            started: Instant::now(),
        };
        Ok(Prepared {
            shard: Box::new(shard),
            handle: ShardHandle {
                inbox: Inbox {
                    tx,
                    waker,
                    notified,
                },
                stats,
                thread: None,
            },
        })
    }

    fn run(mut self: Box<Self>) {
        let mut events = Events::with_capacity(1024);
        log::debug!("shard {} running", self.id);
        loop {
            let now = Instant::now();
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("shard {} poll failed: {e}", self.id);
                break;
            }
            self.c.loop_turns += 1;
            let now = Instant::now();
            let mut inbox = false;
            let mut accept = false;
            for ev in events.iter() {
                match ev.token() {
                    WAKER => inbox = true,
                    LISTENER => accept = true,
                    Token(k) => {
                        if let Some(conn) = self.conns.get_mut(k) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                conn.readable = true;
                            }
                            if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                                conn.writable = true;
                            }
                            if !conn.queued {
                                conn.queued = true;
                                self.run.push(k);
                            }
                        }
                    }
                }
            }
            if inbox {
                self.drain_inbox(now);
            }
            if accept || self.accept_retry.is_some_and(|t| now >= t) {
                self.accept(now);
            }
            self.serve_ready(now);
            self.expire_timers(now);
            self.route_outgoing();
            self.flush_pending(now);
            self.c.local_users = self.local.user_count() as u64;
            self.c.local_channels = self.local.channel_count() as u64;
            self.stats.publish(&self.c);
            if let Some(deadline) = self.shutdown
                && (self.conns.is_empty() || now >= deadline)
            {
                break;
            }
        }
        // Answer what other shards already asked (delivery counts, presence),
        // so their gathers complete even though this shard is leaving.
        self.drain_inbox(Instant::now());
        let left = self.conns.len();
        if left > 0 {
            log::warn!(
                "shard {} exiting with {left} connections still open",
                self.id
            );
        }
        // `sockets` stays as it was: the server reads it to report a timeout.
        self.stats.publish(&self.c);
        log::debug!("shard {} stopped", self.id);
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.again.is_empty() || !self.run.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut t = self.wheel.poll_timeout(now);
        for deadline in [self.shutdown, self.accept_retry].into_iter().flatten() {
            let d = deadline.saturating_duration_since(now);
            t = Some(t.map_or(d, |t| t.min(d)));
        }
        t
    }

    fn drain_inbox(&mut self, now: Instant) {
        // Clear the flag before draining: a message sent after the last
        // try_recv sees `false` and wakes us again.
        self.notified.store(false, Ordering::Release);
        loop {
            match self.rx.try_recv() {
                Ok(ShardMsg::Adopt {
                    stream,
                    peer,
                    rate_limited,
                }) => self.adopt(stream, peer, rate_limited, now),
                Ok(ShardMsg::Shutdown { deadline }) => self.begin_shutdown(deadline, now),
                Ok(ShardMsg::Deliver {
                    audience,
                    frame,
                    report,
                }) => {
                    let n = self.deliver_local(&audience, &frame);
                    if let Some(r) = report {
                        self.router.send(
                            r.shard,
                            ShardMsg::Delivered {
                                gather: r.gather,
                                connections: n,
                            },
                        );
                    }
                }
                Ok(ShardMsg::Delivered {
                    gather,
                    connections,
                }) => self.gathered(gather, connections, Vec::new()),
                Ok(ShardMsg::PresenceQuery { channel, report }) => {
                    let entries = self.local_presence(&channel);
                    self.router.send(
                        report.shard,
                        ShardMsg::PresenceReply {
                            gather: report.gather,
                            entries,
                        },
                    );
                }
                Ok(ShardMsg::PresenceReply { gather, entries }) => {
                    let n = entries.iter().map(|(_, c)| u64::from(*c)).sum();
                    self.gathered(gather, n, entries)
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        self.accept_retry = None;
        while let Some(listener) = self.listener.as_ref() {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let limited = self.limiter.is_limited(peer.ip(), now);
                    self.adopt(stream, peer, limited, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the listener will not signal again
                    // for connections already queued, so retry on a timer.
                    log::warn!("shard {} accept failed: {e}; retrying", self.id);
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    break;
                }
            }
        }
    }

    fn adopt(&mut self, stream: TcpStream, peer: SocketAddr, rate_limited: bool, now: Instant) {
        if self.shutdown.is_some() {
            return; // dropped: closes the socket
        }
        let _ = stream.set_nodelay(true);
        let io = match &self.tls {
            Some(cfg) => match Transport::tls(stream, cfg.clone()) {
                Ok(t) => t,
                Err(e) => {
                    log::warn!("shard {} TLS setup failed: {e}", self.id);
                    return;
                }
            },
            None => Transport::Plain(stream),
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let id = ConnId::new(self.id, self.seq);
        self.seq += 1;
        let mut conn = Conn::new(id, io, peer, rate_limited);
        if let Err(e) = self.poll.registry().register(
            conn.socket(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("conn={id} register failed: {e}");
            return;
        }
        let conn = entry.insert(conn);
        let mut ctx = ctx!(self, key, now);
        conn.start(&mut ctx);
        log::debug!("conn={id} accepted from {peer}");
        // The request may already be waiting: serve it this turn.
        conn.queued = true;
        self.run.push(key);
    }

    fn serve_ready(&mut self, now: Instant) {
        let mut run = std::mem::take(&mut self.run);
        run.append(&mut self.again);
        for &key in &run {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.queued = false;
            let mut ctx = ctx!(self, key, now);
            let (next, more) = conn.on_ready(&mut self.scratch, &mut ctx);
            match next {
                Next::Drop => self.remove(key, now),
                Next::Keep if more => {
                    conn.queued = true;
                    self.again.push(key);
                }
                Next::Keep => {}
            }
        }
        run.clear();
        if self.run.is_empty() {
            self.run = run; // keep the allocation
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(now, &mut fired);
        for t in fired.drain(..) {
            let Some(conn) = self.conns.get_mut(t.key) else {
                continue;
            };
            if conn.id() != t.id {
                continue; // slot reused: the timer belonged to a closed connection
            }
            let mut ctx = ctx!(self, t.key, now);
            if conn.on_timer(t.kind, &mut ctx) == Next::Drop {
                self.remove(t.key, now);
            }
        }
        self.fired = fired;
    }

    /// Phase: hand the deliveries handlers asked for to their shards. The
    /// frame is shared: one `Arc` per target shard, one per local recipient.
    fn route_outgoing(&mut self) {
        if self.outgoing.is_empty() {
            return;
        }
        let mut work = std::mem::take(&mut self.outgoing);
        for item in work.drain(..) {
            match item {
                Outgoing::Deliver {
                    audience,
                    frame,
                    reply,
                } => {
                    let mask = match &audience {
                        Audience::User(u) => self.router.user_shards(u),
                        Audience::Channel(c) => self.router.channel_shards(c),
                        Audience::All => self.router.all(),
                    };
                    let remote = mask & !(1u64 << self.id);
                    let gather = match reply {
                        Some(reply) if remote != 0 => Some(self.gathers.insert(Gather {
                            reply,
                            remaining: 0,
                            connections: 0,
                            presence: HashMap::new(),
                        })),
                        Some(reply) => {
                            let n = if mask != 0 {
                                self.deliver_local(&audience, &frame)
                            } else {
                                0
                            };
                            self.finish_reply(&reply, n, &[]);
                            continue;
                        }
                        None => None,
                    };
                    let mut sent = 0;
                    let mut local = 0;
                    for shard in shards_in(mask) {
                        if shard == self.id {
                            local = self.deliver_local(&audience, &frame);
                        } else if self.router.send(
                            shard,
                            ShardMsg::Deliver {
                                audience: audience.clone(),
                                frame: frame.clone(),
                                report: gather.map(|g| ReportTo {
                                    shard: self.id,
                                    gather: g,
                                }),
                            },
                        ) {
                            sent += 1;
                        }
                    }
                    if let Some(g) = gather {
                        self.start_gather(g, sent, local);
                    }
                }
                Outgoing::Presence { channel, reply } => {
                    let mask = self.router.channel_shards(&channel);
                    let local = self.local_presence(&channel);
                    let g = self.gathers.insert(Gather {
                        reply,
                        remaining: 0,
                        connections: 0,
                        presence: HashMap::new(),
                    });
                    let mut sent = 0;
                    for shard in shards_in(mask & !(1u64 << self.id)) {
                        if self.router.send(
                            shard,
                            ShardMsg::PresenceQuery {
                                channel: channel.clone(),
                                report: ReportTo {
                                    shard: self.id,
                                    gather: g,
                                },
                            },
                        ) {
                            sent += 1;
                        }
                    }
                    let n = local.iter().map(|(_, c)| u64::from(*c)).sum();
                    if let Some(gather) = self.gathers.get_mut(g) {
                        for (u, c) in local {
                            *gather.presence.entry(u).or_insert(0) += c;
                        }
                    }
                    self.start_gather(g, sent, n);
                }
            }
        }
        self.outgoing = work; // keep the allocation
    }

    fn start_gather(&mut self, g: usize, remaining: usize, connections: u64) {
        let Some(gather) = self.gathers.get_mut(g) else {
            return;
        };
        gather.remaining = remaining;
        gather.connections += connections;
        if remaining == 0 {
            self.complete(g);
        }
    }

    /// One shard's answer for gather `g` arrived.
    fn gathered(&mut self, g: usize, connections: u64, entries: Vec<(Arc<str>, u32)>) {
        let Some(gather) = self.gathers.get_mut(g) else {
            return;
        };
        gather.connections += connections;
        for (u, c) in entries {
            *gather.presence.entry(u).or_insert(0) += c;
        }
        gather.remaining = gather.remaining.saturating_sub(1);
        if gather.remaining == 0 {
            self.complete(g);
        }
    }

    fn complete(&mut self, g: usize) {
        let Some(gather) = self.gathers.try_remove(g) else {
            return;
        };
        let mut presence: Vec<(Arc<str>, u32)> = gather.presence.into_iter().collect();
        presence.sort_unstable();
        self.finish_reply(&gather.reply, gather.connections, &presence);
    }

    /// Send the result of a cross-shard operation to the connection that asked.
    fn finish_reply(&mut self, reply: &Reply, connections: u64, presence: &[(Arc<str>, u32)]) {
        let Some(conn) = self.conns.get_mut(reply.key) else {
            return;
        };
        if conn.id() != reply.conn {
            return; // the asker is gone and its slot reused
        }
        let text = app::reply_text(
            &reply.kind,
            reply.request_id.as_deref(),
            connections,
            presence,
        );
        conn.push_frame(&crate::ws::frame::frame_bytes(
            crate::ws::OpCode::Text,
            &text,
        ));
        if !conn.flush_queued {
            conn.flush_queued = true;
            self.flush.push(reply.key);
        }
        if let ReplyKind::Presence { .. } = reply.kind {
            self.c.messages_out += 1;
        }
    }

    /// Queue `frame` on every local connection of `audience`; returns how many.
    fn deliver_local(&mut self, audience: &Audience, frame: &Arc<[u8]>) -> u64 {
        let keys: Box<dyn Iterator<Item = usize> + '_> = match audience {
            Audience::User(u) => match self.local.user_conns(u) {
                Some(m) => Box::new(m.iter()),
                None => return 0,
            },
            Audience::Channel(c) => match self.local.subscribers(c) {
                Some(m) => Box::new(m.iter()),
                None => return 0,
            },
            Audience::All => Box::new(self.local.authed().iter().copied()),
        };
        let mut n = 0;
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.deliver(frame.clone()) {
                n += 1;
                if !conn.flush_queued {
                    conn.flush_queued = true;
                    self.flush.push(key);
                }
            }
        }
        self.c.messages_out += n;
        n
    }

    /// (user, local connections) subscribed to `channel` on this shard.
    fn local_presence(&self, channel: &str) -> Vec<(Arc<str>, u32)> {
        let mut counts: HashMap<Arc<str>, u32> = HashMap::new();
        if let Some(set) = self.local.subscribers(channel) {
            for key in set.iter() {
                if let Some(user) = self.conns.get(key).and_then(Conn::user) {
                    *counts.entry(user.clone()).or_insert(0) += 1;
                }
            }
        }
        counts.into_iter().collect()
    }

    /// Phase: one write per connection that received deliveries this turn.
    fn flush_pending(&mut self, now: Instant) {
        let mut list = std::mem::take(&mut self.flush);
        for &key in &list {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.flush_queued = false;
            let mut ctx = ctx!(self, key, now);
            if conn.after_io(&mut ctx) == Next::Drop {
                self.remove(key, now);
            }
        }
        list.clear();
        if self.flush.is_empty() {
            self.flush = list;
        }
    }

    fn begin_shutdown(&mut self, deadline: Instant, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(deadline);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_retry = None;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        log::info!(
            "shard {} shutting down: closing {} connections",
            self.id,
            keys.len()
        );
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let mut ctx = ctx!(self, key, now);
            if conn.begin_shutdown(&mut ctx) == Next::Drop {
                self.remove(key, now);
            }
        }
    }

    fn remove(&mut self, key: usize, now: Instant) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        let mut ctx = ctx!(self, key, now);
        conn.release(&mut ctx);
        let _ = self.poll.registry().deregister(conn.socket());
        log::debug!("conn={} removed", conn.id());
    }
}
