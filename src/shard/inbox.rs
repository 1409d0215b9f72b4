//! A shard's inbox: the only way other threads (other shards, the acceptor,
//! the storage writer, the server) talk to it. [`ShardMsg`] is every
//! message it takes; [`Inbox`] sends one and wakes the shard at most once
//! per drain; [`Peers`] holds every shard's inbox for cross-shard work,
//! with [`Peers::scatter`], the one loop that sends a message to each shard
//! of a bit set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::Sender;
use mio::Waker;
use mio::net::TcpStream;

use crate::history::Page;
use crate::route::shards_in;
use crate::store::{Done, Revocation};
use crate::work::{Audience, ClientInfo, HistoryQuery, PubEvent, ShardQuery};

/// Messages other threads send to a shard.
pub enum ShardMsg {
    /// A new TCP connection for this shard to serve.
    Adopt {
        stream: TcpStream,
        peer: SocketAddr,
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
        query: ShardQuery,
        report: ReportTo,
    },
    Clients {
        gather: usize,
        clients: Vec<ClientInfo>,
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

/// What one queued message counts against its shard's queue budget: the
/// bytes it carries (a publication's data, a frame, a history page) plus a
/// fixed cost for the message itself, so many small messages count too.
pub(super) fn weight(msg: &ShardMsg) -> usize {
    const MESSAGE: usize = 64;
    MESSAGE
        + match msg {
            ShardMsg::Deliver { frame, .. } => frame.len(),
            ShardMsg::Publish { channel, event, .. } => channel.len() + event.data.len(),
            ShardMsg::HistoryReply { page, .. } => {
                page.publications.iter().map(|p| p.len()).sum::<usize>()
            }
            ShardMsg::Stored(done) => done.len() * MESSAGE,
            ShardMsg::Clients { clients, .. } => clients.len() * MESSAGE,
            ShardMsg::PresenceReply { entries, .. } => entries.len() * MESSAGE,
            _ => 0,
        }
}

/// Where a shard sends the result of its part of a cross-shard operation.
#[derive(Debug, Clone, Copy)]
pub struct ReportTo {
    pub shard: usize,
    pub gather: usize,
}

/// The sending side of a shard's inbox. Wakes coalesce: the waker is
/// signalled only when the shard is not already due to drain the inbox.
///
/// The channel itself is unbounded (a shard must never block on another:
/// two shards sending to each other would deadlock), so its size is kept
/// in `queued` ([`weight`] of every message sent and not yet drained) and
/// the senders that can be refused look at it first ([`Peers::has_room`]):
/// a client's publication or message is answered `overloaded` instead of
/// growing the queue without end.
#[derive(Clone)]
pub struct Inbox {
    pub(super) tx: Sender<ShardMsg>,
    pub(super) waker: Arc<Waker>,
    pub(super) notified: Arc<AtomicBool>,
    pub(super) queued: Arc<AtomicUsize>,
}

impl Inbox {
    /// Queue a message and wake the shard if it is not already awake for its
    /// inbox. Returns false if the shard has exited.
    pub fn send(&self, msg: ShardMsg) -> bool {
        let w = weight(&msg);
        // Counted before the send: the receiver may drain (and subtract) it
        // before `send` returns.
        self.queued.fetch_add(w, Ordering::AcqRel);
        if self.tx.send(msg).is_err() {
            self.queued.fetch_sub(w, Ordering::AcqRel);
            return false;
        }
        if !self.notified.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
        true
    }
}

/// Every shard's inbox, by shard index: how a shard reaches the others.
pub struct Peers {
    inboxes: Vec<Inbox>,
}

impl Peers {
    pub fn new(inboxes: Vec<Inbox>) -> Self {
        Peers { inboxes }
    }

    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    /// Bytes queued for `shard` and not yet handled by it.
    pub fn queued(&self, shard: usize) -> usize {
        self.inboxes
            .get(shard)
            .map_or(0, |i| i.queued.load(Ordering::Acquire))
    }

    /// Whether every shard of `mask` has less than `budget` bytes queued (a
    /// new publication or message for them may be taken).
    pub fn has_room(&self, mask: u64, budget: usize) -> bool {
        shards_in(mask).all(|s| self.queued(s) < budget)
    }

    /// Send to one shard's inbox (wakes it if needed). False if it is gone.
    pub fn send(&self, shard: usize, msg: ShardMsg) -> bool {
        self.inboxes.get(shard).is_some_and(|i| i.send(msg))
    }

    /// Send `make()` to every shard in `mask` except `me`; returns how many
    /// took it (a shard that has exited during shutdown does not count, so
    /// a gather never waits for it).
    pub fn scatter(&self, mask: u64, me: usize, mut make: impl FnMut() -> ShardMsg) -> usize {
        let mut sent = 0;
        for shard in shards_in(mask) {
            if shard != me && self.send(shard, make()) {
                sent += 1;
            }
        }
        sent
    }
}
