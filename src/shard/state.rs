//! The shard's state: what it owns (connections, timers, histories,
//! tickets) and its borrowed parts (`Env`, `Desk`, `Io`), kept as separate
//! fields so a connection and its context can be borrowed at once; and how
//! a shard is built and started.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Interest, Poll, Token, Waker};
use slab::Slab;

use crate::admission::{AcceptBackoff, Admission, IpLimiter};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::conn::{Conn, Io};
use crate::deadline::TimerRef;
use crate::env::{Desk, Env};
use crate::history::{History, Page};
use crate::id::ConnId;
use crate::ingest::Sealer;
use crate::route::Router;
use crate::stats::{Counters, LocalHistos, ShardStats};
use crate::store::{self, Revocation, WriterHandle};
use crate::timer::TimerWheel;
use crate::work::{Asker, ClientInfo, Reply, StoreWait};
use crate::ws::{BufPool, Limits};

use super::inbox::{Inbox, Peers, ShardMsg};

pub(super) const WAKER: Token = Token(usize::MAX);
pub(super) const LISTENER: Token = Token(usize::MAX - 1);

/// Timer wheel tick: heartbeat and timeout precision. 100 ms is far below any
/// deadline we keep and wakes an idle shard only 10 times a second.
pub const TICK: Duration = Duration::from_millis(100);
/// 512 slots x 100 ms = 51 s, one lap for the default 30 s heartbeat.
const WHEEL_SLOTS: usize = 512;
/// One read lands here; a multiple of the socket buffer's usual burst.
pub(super) const SCRATCH: usize = 64 << 10;
/// How often expired history and revocations are dropped.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A cross-shard operation waiting for its shards' answers.
pub(super) struct Gather {
    pub(super) reply: Reply,
    /// Answers to wait for; unknown until the home shard says (publish).
    pub(super) expected: Option<usize>,
    pub(super) received: usize,
    pub(super) connections: u64,
    pub(super) presence: HashMap<Arc<str>, u32>,
    pub(super) published: Option<(u64, Arc<str>)>,
    pub(super) page: Option<Page>,
    pub(super) clients: Vec<ClientInfo>,
}

impl Gather {
    pub(super) fn new(reply: Reply) -> Self {
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

    pub(super) fn done(&self) -> bool {
        self.expected.is_some_and(|e| self.received >= e)
    }
}

/// A storage request whose answer goes to a connection.
pub(super) struct Pending {
    pub(super) to: Asker,
    pub(super) wait: StoreWait,
    pub(super) started: Instant,
}

/// An inbox message sent to a connection and not yet acknowledged.
pub(super) struct Retry {
    pub(super) conn: ConnId,
    pub(super) frame: Arc<[u8]>,
    pub(super) delay: Duration,
    /// Which timer chain owns the entry (a re-tracked entry starts a new one).
    pub(super) generation: u32,
    /// Redeliveries left; then the message waits for the next login.
    pub(super) left: u8,
}

/// Redeliveries of one message on one connection before it is left for the
/// next login (2 s doubling to 1 min: about 5 minutes of trying).
pub(super) const MAX_REDELIVERIES: u8 = 8;

/// What the server keeps of a running shard.
pub struct ShardHandle {
    pub inbox: Inbox,
    pub stats: Arc<ShardStats>,
    pub thread: Option<JoinHandle<()>>,
}

pub struct Shard {
    /// Read-only surroundings: config, auth, routing table, storage handle.
    pub(super) env: Env,
    /// What handlers change: local index, work list, parse buffers, revocations.
    pub(super) desk: Desk,
    /// Connection I/O state: cork, timer wheel, counters, buffer pool.
    pub(super) io: Io,
    /// Every shard's inbox (cross-shard work).
    pub(super) peers: Arc<Peers>,
    pub(super) poll: Poll,
    pub(super) conns: Slab<Conn>,
    pub(super) rx: Receiver<ShardMsg>,
    pub(super) notified: Arc<AtomicBool>,
    /// Bytes queued in this shard's inbox by others (see [`Inbox`]).
    pub(super) queued: Arc<AtomicUsize>,
    /// The last drain stopped at its budget: drain again next turn (no
    /// wake-up announces messages that are already queued).
    pub(super) inbox_more: bool,
    pub(super) scratch: Box<[u8]>,
    pub(super) listener: Option<TcpListener>,
    pub(super) run: Vec<usize>,
    pub(super) again: Vec<usize>,
    pub(super) fired: Vec<TimerRef>,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) seq: u64,
    pub(super) stats: Arc<ShardStats>,
    pub(super) shutdown: Option<Instant>,
    /// Accepting paused while descriptors are exhausted (reuseport mode).
    pub(super) accept_backoff: AcceptBackoff,
    pub(super) gathers: Slab<Gather>,
    /// Connections with output queued outside their own read turn.
    pub(super) flush: Vec<usize>,
    /// Histories of the channels whose home is this shard.
    pub(super) history: History,
    /// Storage requests awaiting the writer (the slab key is the ticket token).
    pub(super) pending: Slab<Pending>,
    /// Unacknowledged inbox messages by (connection key, message id).
    pub(super) retries: HashMap<(usize, i64), Retry>,
    /// Tracked retries per connection (bounded by `inbox.max_per_user`).
    pub(super) retry_counts: HashMap<ConnId, u32>,
    pub(super) retry_generation: u32,
    pub(super) next_sweep: Instant,
}

/// Everything a shard is built from, once every shard's inbox exists.
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
    pub sealer: Option<Arc<Sealer>>,
    pub router: Arc<Router>,
    pub peers: Arc<Peers>,
    /// Every shard's published counters (for `/metrics`).
    pub all_stats: Arc<[Arc<ShardStats>]>,
    pub writer: Option<WriterHandle>,
}

/// A shard's poller and inbox, made before any shard starts so every
/// shard's inbox can be handed to every other.
pub struct Opened {
    poll: Poll,
    pub(super) rx: Receiver<ShardMsg>,
    inbox: Inbox,
    stats: Arc<ShardStats>,
}

impl Opened {
    pub fn new() -> io::Result<Opened> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let inbox = Inbox {
            tx,
            waker,
            notified: Arc::new(AtomicBool::new(false)),
            queued: Arc::new(AtomicUsize::new(0)),
        };
        Ok(Opened {
            poll,
            rx,
            inbox,
            stats: Arc::new(ShardStats::default()),
        })
    }

    pub fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    pub fn stats(&self) -> Arc<ShardStats> {
        self.stats.clone()
    }

    /// Build the shard and start its thread (`shard-N`).
    pub fn start(self, setup: ShardSetup) -> io::Result<ShardHandle> {
        let id = setup.id;
        let (shard, inbox, stats) = self.build(setup)?;
        let thread = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || shard.run())?;
        Ok(ShardHandle {
            inbox,
            stats,
            thread: Some(thread),
        })
    }

    /// The shard, whole, not yet running (unit tests drive it directly).
    pub(super) fn build(
        self,
        setup: ShardSetup,
    ) -> io::Result<(Box<Shard>, Inbox, Arc<ShardStats>)> {
        let Opened {
            poll,
            rx,
            inbox,
            stats,
        } = self;
        let mut listener = setup.listener;
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let now_ms = crate::clock::now_ms();
        // Each shard keeps its share of `history.max_bytes`, so all of them
        // together keep at most that (channels are spread by a hash).
        let mut history = History::new(setup.cfg.history.max_bytes / setup.cfg.shards.max(1));
        history.restore(setup.history, now_ms);
        let mut desk = Desk::default();
        for r in &setup.revocations {
            desk.revoked.apply(r);
        }
        let env = Env {
            limits: Limits {
                max_frame: setup.cfg.max_frame_size,
                max_message: setup.cfg.max_message_size,
            },
            cfg: setup.cfg,
            shard: setup.id,
            auth: setup.auth,
            router: setup.router,
            admission: setup.admission,
            limiter: setup.limiter,
            all_stats: setup.all_stats,
            writer: setup.writer,
            sealer: setup.sealer,
            started: Instant::now(),
        };
        let shard = Box::new(Shard {
            env,
            desk,
            io: Io {
                cork: Vec::with_capacity(SCRATCH),
                wheel: TimerWheel::new(TICK, WHEEL_SLOTS),
                c: Counters::default(),
                pool: BufPool::default(),
                histos: LocalHistos::default(),
            },
            peers: setup.peers,
            poll,
            conns: Slab::new(),
            rx,
            notified: inbox.notified.clone(),
            queued: inbox.queued.clone(),
            inbox_more: false,
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            listener,
            run: Vec::new(),
            again: Vec::new(),
            fired: Vec::new(),
            tls: setup.tls,
            seq: 0,
            stats: stats.clone(),
            shutdown: None,
            accept_backoff: AcceptBackoff::default(),
            gathers: Slab::new(),
            flush: Vec::new(),
            history,
            pending: Slab::new(),
            retries: HashMap::new(),
            retry_counts: HashMap::new(),
            retry_generation: 0,
            next_sweep: Instant::now() + SWEEP_EVERY,
        });
        Ok((shard, inbox, stats))
    }
}
