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

use crate::admission::{Admission, IpLimiter};
use crate::app::{self, Audience, HistoryQuery, Outgoing, PubEvent, Reply, ReplyKind, StoreWait};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::conn::{Conn, Ctx, Next, Transport};
use crate::deadline::{TimerKind, TimerRef};
use crate::history::{History, Page};
use crate::id::ConnId;
use crate::proto::ErrorCode;
use crate::revoke::Revocations;
use crate::route::{Router, shards_in};
use crate::stats::{Counters, ShardStats};
use crate::store::{self, Done, Op, Outcome, Request, Revocation, SendError, Ticket, WriterHandle};
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
/// How often expired history and revocations are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Messages other threads send to a shard.
pub enum ShardMsg {
    /// A new TCP connection for this shard to serve.
    Adopt {
        stream: TcpStream,
        peer: SocketAddr,
        rate_limited: bool,
    },
    /// Stop accepting, close every client with 1001, exit by the deadline.
    Shutdown {
        deadline: Instant,
    },
    /// Deliver a pre-encoded frame to the local connections of an audience.
    /// With `ack`, it is inbox message `ack`: redeliver until acknowledged.
    Deliver {
        audience: Audience,
        frame: Arc<[u8]>,
        report: Option<ReportTo>,
        ack: Option<i64>,
    },
    /// A publication for a channel whose home is this shard.
    Publish {
        channel: Arc<str>,
        event: PubEvent,
        report: Option<ReportTo>,
    },
    /// The home shard numbered a publication and sent it to `shards` other
    /// shards (each reports `Delivered`); `connections` were reached there.
    Published {
        gather: usize,
        offset: u64,
        epoch: Arc<str>,
        shards: usize,
        connections: u64,
    },
    /// Recovery or a history page, for the channel's home shard.
    HistoryQuery {
        channel: Arc<str>,
        query: HistoryQuery,
        report: ReportTo,
    },
    HistoryReply {
        gather: usize,
        page: Page,
    },
    /// Results from the storage writer.
    Stored(Vec<Done>),
    /// Inbox message `id` of `user` was acknowledged: stop redelivering it.
    Acked {
        user: Arc<str>,
        id: i64,
    },
    /// A revocation: remember it, close the connections it covers (4001).
    Revoke(Arc<Revocation>),
    /// An HTTP API query; answered with `Delivered` (a count) or `Clients`.
    Query {
        query: crate::api::ShardQuery,
        report: ReportTo,
    },
    Clients {
        gather: usize,
        clients: Vec<crate::api::ClientInfo>,
    },
    /// How many local connections a `Deliver` reached (to the origin shard).
    Delivered {
        gather: usize,
        connections: u64,
    },
    /// Who is subscribed to a channel on this shard.
    PresenceQuery {
        channel: Arc<str>,
        report: ReportTo,
    },
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
    /// Answers to wait for; unknown until the home shard says (publish).
    expected: Option<usize>,
    received: usize,
    connections: u64,
    presence: HashMap<Arc<str>, u32>,
    published: Option<(u64, Arc<str>)>,
    page: Option<Page>,
    clients: Vec<crate::api::ClientInfo>,
}

impl Gather {
    fn new(reply: Reply) -> Self {
        Gather {
            reply,
            expected: None,
            received: 0,
            connections: 0,
            presence: HashMap::new(),
            published: None,
            page: None,
            clients: Vec::new(),
        }
    }

    fn done(&self) -> bool {
        self.expected.is_some_and(|e| self.received >= e)
    }
}

/// A storage request whose answer goes to a connection.
struct Pending {
    key: usize,
    conn: ConnId,
    wait: StoreWait,
    started: Instant,
}

/// An inbox message sent to a connection and not yet acknowledged.
struct Retry {
    conn: ConnId,
    frame: Arc<[u8]>,
    delay: Duration,
    /// Which timer chain owns the entry (a re-tracked entry starts a new one).
    generation: u32,
    /// Redeliveries left; then the message waits for the next login.
    left: u8,
}

/// Redeliveries of one message on one connection before it is left for the
/// next login (2 s doubling to 1 min: about 5 minutes of trying).
const MAX_REDELIVERIES: u8 = 8;

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
            storage: $s.writer.is_some(),
            sealer: $s.sealer.as_deref(),
            revoked: &$s.revoked,
            writer: $s.writer.as_ref(),
            histos: &mut $s.histos,
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
    /// Histories of the channels whose home is this shard.
    history: History,
    revoked: Revocations,
    writer: Option<WriterHandle>,
    sealer: Option<Arc<crate::ingest::Sealer>>,
    /// Storage requests awaiting the writer (the slab key is the ticket token).
    pending: Slab<Pending>,
    /// Unacknowledged inbox messages by (connection key, message id).
    retries: HashMap<(usize, i64), Retry>,
    /// Tracked retries per connection (bounded by `inbox.max_per_user`).
    retry_counts: HashMap<ConnId, u32>,
    retry_generation: u32,
    next_sweep: Instant,
    histos: crate::stats::LocalHistos,
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
    /// Stored histories of the channels whose home is this shard.
    pub history: Vec<store::LoadedChannel>,
    pub revocations: Vec<Revocation>,
    pub sealer: Option<Arc<crate::ingest::Sealer>>,
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
        writer: Option<WriterHandle>,
    ) -> io::Result<ShardHandle> {
        let Prepared {
            mut shard,
            mut handle,
        } = self;
        shard.router = router;
        shard.all_stats = all_stats;
        shard.writer = writer;
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
        let now_ms = crate::clock::now_ms();
        let mut history = History::default();
        history.restore(setup.history, now_ms);
        let mut revoked = Revocations::default();
        for r in &setup.revocations {
            revoked.apply(r);
        }
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
            history,
            revoked,
            writer: None,
            sealer: setup.sealer,
            pending: Slab::new(),
            retries: HashMap::new(),
            retry_counts: HashMap::new(),
            retry_generation: 0,
            next_sweep: Instant::now() + SWEEP_EVERY,
            histos: crate::stats::LocalHistos::default(),
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
            self.route_outgoing(now);
            self.flush_pending(now);
            if now >= self.next_sweep {
                self.next_sweep = now + SWEEP_EVERY;
                let now_ms = crate::clock::now_ms();
                let idle = i64::try_from(self.cfg.history.ttl.as_millis()).unwrap_or(i64::MAX);
                self.history.sweep(now_ms, idle);
                self.revoked.sweep(now_ms);
                self.c.history_channels = self.history.channel_count() as u64;
            }
            self.c.local_users = self.local.user_count() as u64;
            self.c.local_channels = self.local.channel_count() as u64;
            self.stats.publish(&self.c);
            self.stats.histograms.publish(&self.histos);
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
                    ack,
                }) => {
                    let n = self.deliver_local(&audience, &frame, ack, now);
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
                Ok(ShardMsg::Publish {
                    channel,
                    event,
                    report,
                }) => self.publish_home(channel, event, report, now),
                Ok(ShardMsg::Published {
                    gather,
                    offset,
                    epoch,
                    shards,
                    connections,
                }) => self.published(gather, offset, epoch, shards, connections),
                Ok(ShardMsg::HistoryQuery {
                    channel,
                    query,
                    report,
                }) => {
                    let page = self.history_page(&channel, &query);
                    self.history_reply(report, page);
                }
                Ok(ShardMsg::HistoryReply { gather, page }) => {
                    if let Some(g) = self.gathers.get_mut(gather) {
                        g.page = Some(page);
                    }
                    self.gathered(gather, 0, Vec::new());
                }
                Ok(ShardMsg::Stored(done)) => self.stored(done, now),
                Ok(ShardMsg::Acked { user, id }) => self.forget_acked(&user, id),
                Ok(ShardMsg::Revoke(r)) => {
                    self.revoke(&r, now);
                }
                Ok(ShardMsg::Query { query, report }) => {
                    let n = self.answer_query(&query, report, now);
                    if !matches!(query, crate::api::ShardQuery::Clients { .. }) {
                        self.router.send(
                            report.shard,
                            ShardMsg::Delivered {
                                gather: report.gather,
                                connections: n,
                            },
                        );
                    }
                }
                Ok(ShardMsg::Clients { gather, clients }) => {
                    if let Some(g) = self.gathers.get_mut(gather) {
                        g.clients.extend(clients);
                    }
                    self.gathered(gather, 0, Vec::new());
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
            if let TimerKind::Retry(id, generation) = t.kind {
                self.redeliver(t, id, generation, now);
                continue;
            }
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
    fn route_outgoing(&mut self, now: Instant) {
        // Handling an item may queue more (a stored inbox message is then
        // delivered): loop until none are left.
        while !self.outgoing.is_empty() {
            let mut work = std::mem::take(&mut self.outgoing);
            for item in work.drain(..) {
                self.route_one(item, now);
            }
            if self.outgoing.is_empty() {
                self.outgoing = work; // keep the allocation
            }
        }
    }

    fn route_one(&mut self, item: Outgoing, now: Instant) {
        match item {
            Outgoing::Deliver {
                audience,
                frame,
                reply,
                ack,
            } => {
                let mask = match &audience {
                    Audience::User(u) => self.router.user_shards(u),
                    Audience::Users(us) => us.iter().fold(0, |m, u| m | self.router.user_shards(u)),
                    Audience::Channel(c) => self.router.channel_shards(c),
                    Audience::All => self.router.all(),
                };
                let remote = mask & !(1u64 << self.id);
                let gather = match reply {
                    Some(reply) if remote != 0 => Some(self.gathers.insert(Gather::new(reply))),
                    Some(reply) => {
                        let n = if mask != 0 {
                            self.deliver_local(&audience, &frame, ack, now)
                        } else {
                            0
                        };
                        self.finish_reply(
                            &reply,
                            &app::Gathered {
                                connections: n,
                                ..Default::default()
                            },
                        );
                        return;
                    }
                    None => None,
                };
                let mut sent = 0;
                let mut local = 0;
                for shard in shards_in(mask) {
                    if shard == self.id {
                        local = self.deliver_local(&audience, &frame, ack, now);
                    } else if self.router.send(
                        shard,
                        ShardMsg::Deliver {
                            audience: audience.clone(),
                            frame: frame.clone(),
                            report: gather.map(|g| ReportTo {
                                shard: self.id,
                                gather: g,
                            }),
                            ack,
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
                let g = self.gathers.insert(Gather::new(reply));
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
            Outgoing::Publish {
                channel,
                event,
                reply,
            } => {
                let report = reply.map(|reply| ReportTo {
                    shard: self.id,
                    gather: self.gathers.insert(Gather::new(reply)),
                });
                let home = self.router.home(&channel);
                if home == self.id {
                    self.publish_home(channel, event, report, now);
                } else if !self.router.send(
                    home,
                    ShardMsg::Publish {
                        channel,
                        event,
                        report,
                    },
                ) && let Some(r) = report
                {
                    // The home shard has exited (shutdown): nothing was published.
                    self.start_gather(r.gather, 0, 0);
                }
            }
            Outgoing::History {
                channel,
                query,
                reply,
            } => {
                let g = self.gathers.insert(Gather::new(reply));
                let report = ReportTo {
                    shard: self.id,
                    gather: g,
                };
                let home = self.router.home(&channel);
                if home == self.id {
                    let page = self.history_page(&channel, &query);
                    self.history_reply(report, page);
                } else if self.router.send(
                    home,
                    ShardMsg::HistoryQuery {
                        channel,
                        query,
                        report,
                    },
                ) {
                    self.start_gather(g, 1, 0);
                } else {
                    self.start_gather(g, 0, 0);
                }
            }
            Outgoing::Store {
                key,
                conn,
                op,
                wait,
            } => self.send_to_writer(key, conn, op, wait, now),
            Outgoing::Revoke { revocation, reply } => {
                if self.writer.is_some() {
                    let (key, conn) = reply
                        .as_ref()
                        .map_or((usize::MAX, ConnId(u64::MAX)), |r| (r.key, r.conn));
                    let revocation = Arc::new(revocation);
                    self.send_to_writer(
                        key,
                        conn,
                        Op::Revoke((*revocation).clone()),
                        StoreWait::Revoke { revocation, reply },
                        now,
                    );
                } else if let Some(reply) = reply {
                    self.route_one(
                        Outgoing::Query {
                            shards: self.router.all(),
                            query: crate::api::ShardQuery::Revoke(Arc::new(revocation)),
                            reply,
                        },
                        now,
                    );
                }
            }
            Outgoing::Query {
                shards,
                query,
                reply,
            } => {
                let g = self.gathers.insert(Gather::new(reply));
                let mut sent = 0;
                let mut local = 0;
                for shard in shards_in(shards) {
                    if shard == self.id {
                        local = self.answer_query(&query, ReportTo { shard, gather: g }, now);
                    } else if self.router.send(
                        shard,
                        ShardMsg::Query {
                            query: query.clone(),
                            report: ReportTo {
                                shard: self.id,
                                gather: g,
                            },
                        },
                    ) {
                        sent += 1;
                    }
                }
                self.start_gather(g, sent, local);
            }
            Outgoing::Acked { user, id } => {
                if let Some(w) = &self.writer
                    && w.try_send(Request {
                        op: Op::InboxAck {
                            user: user.clone(),
                            id,
                        },
                        ticket: None,
                    })
                    .is_err()
                {
                    // The store is full: keep redelivering, so the client
                    // acknowledges again later.
                    self.c.store_rejected += 1;
                    return;
                }
                self.forget_acked(&user, id);
                let mask = self.router.user_shards(&user) & !(1u64 << self.id);
                for shard in shards_in(mask) {
                    self.router.send(
                        shard,
                        ShardMsg::Acked {
                            user: user.clone(),
                            id,
                        },
                    );
                }
            }
        }
    }

    /// Hand a request to the storage writer; its answer comes back as `Stored`.
    fn send_to_writer(&mut self, key: usize, conn: ConnId, op: Op, wait: StoreWait, now: Instant) {
        let p = Pending {
            key,
            conn,
            wait,
            started: now,
        };
        let Some(w) = &self.writer else {
            self.store_failed(p, ErrorCode::StorageDisabled, "this server stores nothing");
            return;
        };
        let token = self.pending.insert(p);
        let req = Request {
            op,
            ticket: Some(Ticket {
                shard: self.id,
                token: token as u64,
            }),
        };
        let (code, message) = match w.try_send(req) {
            Ok(()) => return,
            Err(SendError::Full(_)) => (
                ErrorCode::Overloaded,
                "the storage queue is full; retry later",
            ),
            Err(SendError::Closed(_)) => (ErrorCode::StorageError, "storage is shutting down"),
        };
        self.c.store_rejected += 1;
        if let Some(p) = self.pending.try_remove(token) {
            self.store_failed(p, code, message);
        }
    }

    /// Tell the connection its storage request failed (nothing was acknowledged).
    fn store_failed(&mut self, p: Pending, code: ErrorCode, message: &str) {
        let rid = match p.wait {
            StoreWait::Ingest { request_id, .. } => request_id,
            StoreWait::InboxPut { reply, .. }
            | StoreWait::Revoke {
                reply: Some(reply), ..
            } => {
                if let ReplyKind::Api(pending) = &reply.kind {
                    let resp = crate::api::storage_failure(
                        pending,
                        code == ErrorCode::Overloaded,
                        message,
                    );
                    self.http_answer(reply.key, reply.conn, resp, pending.started, Instant::now());
                    return;
                }
                reply.request_id
            }
            StoreWait::Revoke { reply: None, .. } => return,
            StoreWait::Inbox => {
                log::warn!("conn={} inbox not loaded: {message}", p.conn);
                return;
            }
        };
        let mut b = Vec::new();
        crate::proto::error(&mut b, code, message, rid.as_deref());
        self.send_text(p.key, p.conn, &b);
    }

    /// Results from the writer, in the order the requests were made.
    fn stored(&mut self, done: Vec<Done>, now: Instant) {
        for d in done {
            let Ok(token) = usize::try_from(d.token) else {
                continue;
            };
            let Some(p) = self.pending.try_remove(token) else {
                continue;
            };
            self.histos
                .store
                .observe(now.saturating_duration_since(p.started));
            match (p.wait, d.result) {
                (
                    StoreWait::Ingest {
                        request_id,
                        client_id,
                    },
                    Ok(Outcome::Ingested { id, duplicate }),
                ) => {
                    let mut b = Vec::new();
                    let mut o = crate::proto::Out::new(&mut b, "ack")
                        .raw("id", id.to_string().as_bytes())
                        .opt_str("clientId", client_id.as_deref());
                    if duplicate {
                        o = o.raw("duplicate", b"true");
                    }
                    o.opt_raw("requestId", request_id.as_deref()).finish();
                    self.c.records_stored += 1;
                    self.send_text(p.key, p.conn, &b);
                }
                (
                    StoreWait::InboxPut {
                        to,
                        payload,
                        mut reply,
                    },
                    Ok(Outcome::Stored { id }),
                ) => {
                    let frame = app::shared_frame(&app::with_ack_id(&payload, id));
                    self.c.inbox_stored += 1;
                    match &mut reply.kind {
                        ReplyKind::SentStored { id: slot, .. } => *slot = id,
                        ReplyKind::Api(pending) => {
                            if let crate::api::ApiReply::Sent { stored, .. } = &mut pending.kind {
                                *stored = Some(id);
                            }
                        }
                        _ => {}
                    }
                    self.outgoing.push(Outgoing::Deliver {
                        audience: Audience::User(to),
                        frame,
                        reply: Some(reply),
                        ack: Some(id),
                    });
                }
                (StoreWait::Revoke { revocation, reply }, Ok(_)) => match reply {
                    Some(reply) => self.outgoing.push(Outgoing::Query {
                        shards: self.router.all(),
                        query: crate::api::ShardQuery::Revoke(revocation),
                        reply,
                    }),
                    None => {
                        for shard in 0..self.router.shard_count() {
                            self.router
                                .send(shard, ShardMsg::Revoke(revocation.clone()));
                        }
                    }
                },
                (StoreWait::Inbox, Ok(Outcome::Inbox(msgs))) => {
                    for m in msgs {
                        let frame = app::shared_frame(&app::with_ack_id(&m.payload, m.id));
                        self.deliver_to(p.key, p.conn, frame, Some(m.id), now);
                    }
                }
                (wait, Err(e)) => {
                    log::error!("storage request of conn={} failed: {e}", p.conn);
                    self.store_failed(
                        Pending {
                            key: p.key,
                            conn: p.conn,
                            wait,
                            started: p.started,
                        },
                        ErrorCode::StorageError,
                        "the store could not commit; nothing was acknowledged",
                    );
                }
                (_, Ok(other)) => {
                    log::error!("unexpected storage outcome for conn={}: {other:?}", p.conn);
                }
            }
        }
    }

    /// Queue one frame for one connection (if it is still the same one),
    /// tracking it for redelivery when it is an inbox message.
    fn deliver_to(
        &mut self,
        key: usize,
        conn_id: ConnId,
        frame: Arc<[u8]>,
        ack: Option<i64>,
        now: Instant,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if conn.id() != conn_id {
            return false;
        }
        if let Some(id) = ack
            && self
                .retries
                .get(&(key, id))
                .is_some_and(|r| r.conn == conn_id)
        {
            return true; // already sent and awaiting its ack
        }
        if !conn.deliver(frame.clone()) {
            return false;
        }
        self.c.messages_out += 1;
        conn.queue_flush(key, &mut self.flush);
        if let Some(id) = ack {
            self.track_retry(key, conn_id, id, frame, now);
        }
        true
    }

    fn track_retry(&mut self, key: usize, conn: ConnId, id: i64, frame: Arc<[u8]>, now: Instant) {
        // At most `inbox.max_per_user` tracked per connection: past it the
        // message was sent once and waits in the store for the next login.
        let tracked = self.retry_counts.entry(conn).or_insert(0);
        if *tracked as usize >= self.cfg.inbox.max_per_user {
            return;
        }
        *tracked += 1;
        let delay = self.cfg.inbox.retry_initial;
        self.retry_generation = self.retry_generation.wrapping_add(1);
        let generation = self.retry_generation;
        if let Some(old) = self.retries.insert(
            (key, id),
            Retry {
                conn,
                frame,
                delay,
                generation,
                left: MAX_REDELIVERIES,
            },
        ) {
            self.untrack(old.conn);
        }
        self.wheel.insert(
            now,
            delay,
            TimerRef {
                key,
                id: conn,
                kind: TimerKind::Retry(id, generation),
            },
        );
    }

    fn untrack(&mut self, conn: ConnId) {
        if let Some(n) = self.retry_counts.get_mut(&conn) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.retry_counts.remove(&conn);
            }
        }
    }

    fn forget_retry(&mut self, key: usize, id: i64) {
        if let Some(r) = self.retries.remove(&(key, id)) {
            self.untrack(r.conn);
        }
    }

    /// A redelivery timer fired: send again (doubling the wait) unless acknowledged.
    fn redeliver(&mut self, t: TimerRef, id: i64, generation: u32, now: Instant) {
        let Some(r) = self.retries.get_mut(&(t.key, id)) else {
            return; // acknowledged
        };
        if r.conn != t.id || r.generation != generation {
            return; // a newer delivery owns the entry, with its own timer
        }
        let alive = self
            .conns
            .get(t.key)
            .is_some_and(|c| c.id() == t.id && c.is_open());
        if !alive || r.left == 0 {
            self.forget_retry(t.key, id);
            return;
        }
        r.left -= 1;
        r.delay = (r.delay * 2).min(self.cfg.inbox.retry_max);
        let (frame, delay) = (r.frame.clone(), r.delay);
        if let Some(conn) = self.conns.get_mut(t.key)
            && conn.deliver(frame)
        {
            self.c.redeliveries += 1;
            self.c.messages_out += 1;
            conn.queue_flush(t.key, &mut self.flush);
        }
        self.wheel.insert(now, delay, t);
    }

    /// Inbox message `id` of `user` was acknowledged: stop redelivering it here.
    fn forget_acked(&mut self, user: &str, id: i64) {
        let keys: Vec<usize> = self
            .local
            .user_conns(user)
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        for key in keys {
            self.forget_retry(key, id);
        }
    }

    /// Publication on a channel whose home is this shard: number it, keep
    /// it, persist it, fan it out.
    fn publish_home(
        &mut self,
        channel: Arc<str>,
        event: PubEvent,
        report: Option<ReportTo>,
        now: Instant,
    ) {
        let now_ms = crate::clock::now_ms();
        let (offset, epoch) = self.history.next_offset(&channel, now_ms);
        let json: Arc<[u8]> = Arc::from(app::publication_json(&channel, &event, offset, &epoch));
        let rule = self.cfg.history.rule(&channel);
        if rule.size > 0 {
            let ttl = i64::try_from(rule.ttl.as_millis()).unwrap_or(i64::MAX);
            self.history
                .keep(&channel, offset, json.clone(), now_ms, ttl, rule.size);
            if let Some(w) = &self.writer {
                let req = Request {
                    op: Op::Publication {
                        channel: channel.clone(),
                        epoch: epoch.clone(),
                        offset,
                        payload: json.clone(),
                        at_ms: now_ms,
                        expires_at_ms: now_ms.saturating_add(ttl),
                        keep: rule.size,
                    },
                    ticket: None,
                };
                if w.try_send(req).is_err() {
                    // Recoverable from memory still; only a restart loses it.
                    self.c.store_rejected += 1;
                }
            }
        }
        let frame = app::shared_frame(&json);
        let audience = Audience::Channel(channel);
        let mask = self.router.channel_shards(match &audience {
            Audience::Channel(c) => c,
            _ => "",
        });
        let mut sent = 0;
        let mut local = 0;
        for shard in shards_in(mask) {
            if shard == self.id {
                local = self.deliver_local(&audience, &frame, None, now);
            } else if self.router.send(
                shard,
                ShardMsg::Deliver {
                    audience: audience.clone(),
                    frame: frame.clone(),
                    report,
                    ack: None,
                },
            ) {
                sent += 1;
            }
        }
        self.c.publications += 1;
        if let Some(r) = report {
            if r.shard == self.id {
                self.published(r.gather, offset, epoch, sent, local);
            } else {
                self.router.send(
                    r.shard,
                    ShardMsg::Published {
                        gather: r.gather,
                        offset,
                        epoch,
                        shards: sent,
                        connections: local,
                    },
                );
            }
        }
    }

    fn published(
        &mut self,
        g: usize,
        offset: u64,
        epoch: Arc<str>,
        shards: usize,
        connections: u64,
    ) {
        let Some(gather) = self.gathers.get_mut(g) else {
            return;
        };
        gather.published = Some((offset, epoch));
        gather.expected = Some(shards);
        gather.connections += connections;
        if gather.done() {
            self.complete(g);
        }
    }

    fn history_page(&mut self, channel: &str, query: &HistoryQuery) -> Page {
        let now_ms = crate::clock::now_ms();
        // One reply stays well under the slow-consumer limit.
        let max_bytes = self.cfg.max_outbound_bytes / 2;
        match query {
            HistoryQuery::Recover { offset, epoch } => self.history.recover(
                channel,
                *offset,
                epoch,
                self.cfg.history.max_page,
                max_bytes,
                now_ms,
            ),
            HistoryQuery::Page { since, limit } => self
                .history
                .page(channel, *since, *limit, max_bytes, now_ms),
        }
    }

    fn history_reply(&mut self, report: ReportTo, page: Page) {
        if report.shard == self.id {
            if let Some(g) = self.gathers.get_mut(report.gather) {
                g.page = Some(page);
            }
            self.start_gather(report.gather, 0, 0);
        } else {
            self.router.send(
                report.shard,
                ShardMsg::HistoryReply {
                    gather: report.gather,
                    page,
                },
            );
        }
    }

    /// A revocation reached this shard: remember it and close what it covers.
    fn revoke(&mut self, r: &Revocation, now: Instant) -> u64 {
        self.revoked.apply(r);
        let mut closed = 0;
        let keys: Vec<usize> = match r.kind {
            store::RevocationKind::User => self
                .local
                .user_conns(&r.value)
                .map(|m| m.iter().collect())
                .unwrap_or_default(),
            store::RevocationKind::Token => self.local.authed().iter().copied().collect(),
        };
        let mut event = Vec::new();
        crate::proto::Out::new(&mut event, "token_revoked")
            .str("reason", &r.reason)
            .str("message", "Your token was revoked")
            .finish();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let covered = conn
                .identity()
                .is_some_and(|id| Revocations::matches(r, id));
            if !covered {
                continue;
            }
            conn.push_text(&event, self.cfg.max_outbound_bytes);
            self.c.revoked_closes += 1;
            closed += 1;
            let mut ctx = ctx!(self, key, now);
            conn.close_code(app::close::TOKEN_REVOKED, "token revoked", &mut ctx);
            if conn.after_io(&mut ctx) == Next::Drop {
                self.remove(key, now);
            }
        }
        closed
    }

    /// This shard's part of an API query. Returns a count for the gather;
    /// a client list is sent (or added) separately.
    fn answer_query(
        &mut self,
        query: &crate::api::ShardQuery,
        report: ReportTo,
        now: Instant,
    ) -> u64 {
        use crate::api::{ClientInfo, ShardQuery};
        match query {
            ShardQuery::Clients { user } => {
                let keys: Vec<usize> = match user {
                    Some(u) => self
                        .local
                        .user_conns(u)
                        .map(|m| m.iter().collect())
                        .unwrap_or_default(),
                    None => self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.is_open())
                        .map(|(k, _)| k)
                        .collect(),
                };
                let clients: Vec<ClientInfo> = keys
                    .into_iter()
                    .filter_map(|k| self.conns.get(k))
                    .map(|c| {
                        let s = c.session();
                        ClientInfo {
                            id: c.id(),
                            ip: c.peer().ip(),
                            connected_at_ms: s.map_or(0, |s| s.connected_at_ms()),
                            authenticated: s.is_some_and(|s| s.is_authenticated()),
                            user: c.user().cloned(),
                            data_received: s.map_or(0, |s| s.data_received()),
                            subscriptions: s.map_or(0, |s| s.subscriptions().len() as u32),
                        }
                    })
                    .collect();
                if report.shard == self.id {
                    if let Some(g) = self.gathers.get_mut(report.gather) {
                        g.clients.extend(clients);
                    }
                } else {
                    self.router.send(
                        report.shard,
                        ShardMsg::Clients {
                            gather: report.gather,
                            clients,
                        },
                    );
                }
                0
            }
            ShardQuery::Disconnect { user, code, reason } => {
                let keys: Vec<usize> = self
                    .local
                    .user_conns(user)
                    .map(|m| m.iter().collect())
                    .unwrap_or_default();
                let mut n = 0;
                for key in keys {
                    let Some(conn) = self.conns.get_mut(key) else {
                        continue;
                    };
                    n += 1;
                    let mut ctx = ctx!(self, key, now);
                    conn.close_code(*code, reason, &mut ctx);
                    if conn.after_io(&mut ctx) == Next::Drop {
                        self.remove(key, now);
                    }
                }
                n
            }
            ShardQuery::Membership {
                user,
                channel,
                subscribe,
                event,
            } => {
                let keys: Vec<usize> = self
                    .local
                    .user_conns(user)
                    .map(|m| m.iter().collect())
                    .unwrap_or_default();
                let mut note = Vec::new();
                crate::proto::Out::new(
                    &mut note,
                    if *subscribe {
                        "subscribed"
                    } else {
                        "unsubscribed"
                    },
                )
                .str("channel", channel)
                .raw("server", b"true")
                .finish();
                let note = app::shared_frame(&note);
                let mut n = 0;
                for key in keys {
                    let Some(conn) = self.conns.get_mut(key) else {
                        continue;
                    };
                    let Some(session) = conn.session_mut() else {
                        continue;
                    };
                    if *subscribe
                        && session.subscriptions().len() >= self.cfg.channels.max_subscriptions
                    {
                        continue;
                    }
                    let changed = session.server_membership(
                        channel,
                        *subscribe,
                        &mut self.local,
                        &self.router,
                        self.id,
                        key,
                    );
                    if !changed {
                        continue; // already (not) a member: nothing to tell
                    }
                    n += 1;
                    conn.deliver(note.clone());
                    if let Some(e) = event {
                        conn.deliver(e.clone());
                    }
                    conn.queue_flush(key, &mut self.flush);
                }
                n
            }
            ShardQuery::Revoke(r) => self.revoke(r, now),
        }
    }

    /// An HTTP API answer for connection `key` (if it is still the same one).
    fn http_answer(
        &mut self,
        key: usize,
        conn_id: ConnId,
        resp: crate::http::Response,
        started: Instant,
        now: Instant,
    ) {
        self.histos
            .api
            .observe(now.saturating_duration_since(started));
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.id() != conn_id {
            return;
        }
        let mut ctx = ctx!(self, key, now);
        if conn.http_answer(resp, &mut ctx) == Next::Drop {
            self.remove(key, now);
            return;
        }
        // Reading stopped while the answer was awaited: serve the requests
        // the kernel buffered since (no new edge will announce them).
        if conn.wants_read() && !conn.queued {
            conn.queued = true;
            self.again.push(key);
        }
    }

    /// Queue a reply text for one connection (if it is still the same one).
    fn send_text(&mut self, key: usize, conn_id: ConnId, text: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.id() != conn_id {
            return;
        }
        conn.push_text(text, self.cfg.max_outbound_bytes);
        self.c.messages_out += 1;
        conn.queue_flush(key, &mut self.flush);
    }

    fn start_gather(&mut self, g: usize, remaining: usize, connections: u64) {
        let Some(gather) = self.gathers.get_mut(g) else {
            return;
        };
        gather.expected = Some(remaining);
        gather.connections += connections;
        if gather.done() {
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
        gather.received += 1;
        if gather.done() {
            self.complete(g);
        }
    }

    fn complete(&mut self, g: usize) {
        let Some(gather) = self.gathers.try_remove(g) else {
            return;
        };
        let mut presence: Vec<(Arc<str>, u32)> = gather.presence.into_iter().collect();
        presence.sort_unstable();
        let mut clients = gather.clients;
        clients.sort_unstable_by_key(|c| c.id.0);
        let result = app::Gathered {
            connections: gather.connections,
            presence: &presence,
            clients: &clients,
            published: gather.published.as_ref().map(|(o, e)| (*o, &**e)),
            page: gather.page.as_ref(),
        };
        self.finish_reply(&gather.reply, &result);
    }

    /// Send the result of a cross-shard operation to the connection that asked.
    fn finish_reply(&mut self, reply: &Reply, result: &app::Gathered<'_>) {
        if let ReplyKind::Api(pending) = &reply.kind {
            let resp = crate::api::later_response(pending, result);
            self.http_answer(reply.key, reply.conn, resp, pending.started, Instant::now());
            return;
        }
        let Some(conn) = self.conns.get_mut(reply.key) else {
            return;
        };
        if conn.id() != reply.conn {
            return; // the asker is gone and its slot reused
        }
        if let ReplyKind::Subscribed { channel } = &reply.kind
            && let Some(session) = conn.session_mut()
        {
            session.recovered(channel, &mut self.local);
            if !session.subscriptions().iter().any(|c| c == channel) {
                return; // unsubscribed while the recovery was on its way
            }
        }
        let text = app::reply_text(&reply.kind, reply.request_id.as_deref(), result);
        self.send_text(reply.key, reply.conn, &text);
    }

    /// Queue `frame` on every local connection of `audience`; returns how many.
    /// With `ack` (an inbox message id) each is tracked for redelivery.
    fn deliver_local(
        &mut self,
        audience: &Audience,
        frame: &Arc<[u8]>,
        ack: Option<i64>,
        now: Instant,
    ) -> u64 {
        if let Some(id) = ack {
            // Rare (acknowledged direct messages): one at a time, tracked.
            let keys: Vec<usize> = match audience {
                Audience::User(u) => self
                    .local
                    .user_conns(u)
                    .map(|m| m.iter().collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            let mut n = 0;
            for key in keys {
                let Some(conn_id) = self.conns.get(key).map(Conn::id) else {
                    continue;
                };
                if self.deliver_to(key, conn_id, frame.clone(), Some(id), now) {
                    n += 1;
                }
            }
            return n;
        }
        // A subscriber's own recovery state is looked at only while some
        // connection here recovers this channel (no pointer chase per
        // delivery otherwise).
        let recovering = match audience {
            Audience::Channel(c) if self.local.any_recovering(c) => Some(&**c),
            _ => None,
        };
        let keys: Box<dyn Iterator<Item = usize> + '_> = match audience {
            Audience::Users(us) => {
                let local = &self.local;
                Box::new(
                    us.iter()
                        .filter_map(|u| local.user_conns(u))
                        .flat_map(|m| m.iter()),
                )
            }
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
            if let Some(c) = recovering
                && conn.recovering(c)
            {
                continue; // its recovery, on the way, carries this publication
            }
            if conn.deliver(frame.clone()) {
                n += 1;
                conn.queue_flush(key, &mut self.flush);
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
