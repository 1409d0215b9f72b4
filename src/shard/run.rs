//! The loop itself and the phases that touch sockets: poll, the inbox,
//! accepting, serving ready connections, timers, the flush, shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use mio::net::TcpStream;
use mio::{Events, Interest, Token};

use crate::admission::{AcceptBackoff, AcceptFailure};
use crate::conn::{Conn, Ctx, Next, Transport};
use crate::deadline::TimerKind;
use crate::id::ConnId;
use crate::work::ShardQuery;

use super::inbox::{ShardMsg, weight};
use super::state::{LISTENER, SCRATCH, SWEEP_EVERY, Shard, WAKER};

impl Shard {
    pub(super) fn run(mut self: Box<Self>) {
        let mut events = Events::with_capacity(1024);
        log::debug!("shard {} running", self.env.shard);
        loop {
            let now = Instant::now();
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("shard {} poll failed: {e}", self.env.shard);
                break;
            }
            self.io.c.loop_turns += 1;
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
            if inbox || self.inbox_more {
                let budget = self.env.cfg.shard_turn_bytes;
                self.drain_inbox(now, budget);
            }
            // While accepting is paused (descriptors exhausted), listener
            // readiness is ignored; the pause's end brings us back.
            if (accept || self.accept_backoff.until().is_some())
                && self.accept_backoff.may_accept(now)
            {
                self.accept(now);
            }
            self.serve_ready(now);
            self.expire_timers(now);
            self.route_outgoing(now);
            self.flush_pending(now);
            if now >= self.next_sweep {
                self.next_sweep = now + SWEEP_EVERY;
                let now_ms = crate::clock::now_ms();
                let idle = i64::try_from(self.env.cfg.history.ttl.as_millis()).unwrap_or(i64::MAX);
                self.history.sweep(now_ms, idle);
                self.desk.revoked.sweep(now_ms);
                self.io.c.history_channels = self.history.channel_count() as u64;
                self.trim_buffers();
            }
            self.io.c.shard_queue_bytes = self.queued.load(Ordering::Acquire) as u64;
            self.io.c.history_refused = self.desk.refused.history;
            self.io.c.inbox_rate_refused = self.desk.refused.inbox_rate;
            self.io.c.rate_limited = self.desk.refused.rate;
            self.io.c.history_bytes = self.history.bytes() as u64;
            self.io.c.history_evicted = self.history.evicted();
            self.io.c.local_users = self.desk.local.user_count() as u64;
            self.io.c.local_channels = self.desk.local.channel_count() as u64;
            self.stats.publish(&self.io.c);
            self.stats.histograms.publish(&self.io.histos);
            if let Some(deadline) = self.shutdown
                && (self.conns.is_empty() || now >= deadline)
            {
                break;
            }
        }
        // Answer what other shards already asked (delivery counts, presence),
        // so their gathers complete even though this shard is leaving.
        self.drain_inbox(Instant::now(), usize::MAX);
        let left = self.conns.len();
        if left > 0 {
            log::warn!(
                "shard {} exiting with {left} connections still open",
                self.env.shard
            );
        }
        // `sockets` stays as it was: the server reads it to report a timeout.
        self.stats.publish(&self.io.c);
        log::debug!("shard {} stopped", self.env.shard);
    }

    /// Give back the shard's reusable buffers once a burst has grown them
    /// (the cork after a large reply, the parse buffers after a large
    /// message, spare partial-frame buffers): after a flood the shard keeps
    /// its usual working set, not the flood's. Whether the allocator returns
    /// the memory to the OS is its own business (docs/BENCHMARKS.md, memory
    /// after a flood).
    pub(super) fn trim_buffers(&mut self) {
        const KEEP_PARSE: usize = 64 << 10;
        if self.io.cork.is_empty() && self.io.cork.capacity() > 2 * SCRATCH {
            self.io.cork = Vec::with_capacity(SCRATCH);
        }
        if self.desk.raw.capacity() > KEEP_PARSE {
            self.desk.raw = Vec::new();
            self.desk.json = simd_json::Buffers::default();
        }
        self.io.pool.clear();
    }

    pub(super) fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.again.is_empty() || !self.run.is_empty() || self.inbox_more {
            return Some(Duration::ZERO);
        }
        let mut t = self.io.wheel.poll_timeout(now);
        for deadline in [self.shutdown, self.accept_backoff.until()]
            .into_iter()
            .flatten()
        {
            let d = deadline.saturating_duration_since(now);
            t = Some(t.map_or(d, |t| t.min(d)));
        }
        t
    }

    /// Handle inbox messages until the queue is empty or `budget` bytes
    /// (by [`weight`]) were handled this turn. The rest waits for the next
    /// turn: between the two, this shard's own connections are served, its
    /// timers fire and its flush applies the slow-consumer limit, so a flood
    /// from other shards delays them by one budget, not by the whole queue.
    pub(super) fn drain_inbox(&mut self, now: Instant, budget: usize) {
        // Clear the flag before draining: a message sent after the last
        // try_recv sees `false` and wakes us again.
        self.notified.store(false, Ordering::Release);
        self.inbox_more = false;
        let queued = self.queued.load(Ordering::Acquire) as u64;
        self.io.c.shard_queue_peak_bytes = self.io.c.shard_queue_peak_bytes.max(queued);
        let mut handled = 0usize;
        loop {
            if handled >= budget {
                self.inbox_more = true;
                self.io.c.inbox_turns_cut += 1;
                break;
            }
            let msg = self.rx.try_recv();
            if let Ok(m) = &msg {
                let w = weight(m);
                handled = handled.saturating_add(w);
                self.queued.fetch_sub(w, Ordering::AcqRel);
            }
            match msg {
                Ok(ShardMsg::Adopt { stream, peer }) => self.adopt(stream, peer, now),
                Ok(ShardMsg::Shutdown { deadline }) => self.begin_shutdown(deadline, now),
                Ok(ShardMsg::Deliver {
                    audience,
                    frame,
                    report,
                    ack,
                }) => {
                    let n = self.deliver_local(&audience, &frame, ack, now);
                    if let Some(r) = report {
                        self.peers.send(
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
                    self.peers.send(
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
                    if !matches!(query, ShardQuery::Clients { .. }) {
                        self.peers.send(
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
        let handled = handled as u64;
        self.io.c.inbox_turn_peak_bytes = self.io.c.inbox_turn_peak_bytes.max(handled);
    }

    pub(super) fn accept(&mut self, now: Instant) {
        while let Some(listener) = self.listener.as_ref() {
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff.recovered(now);
                    self.adopt(stream, peer, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_backoff.recovered(now);
                    break;
                }
                Err(e) => match AcceptFailure::of(&e) {
                    AcceptFailure::Connection => {}
                    // EMFILE/ENFILE/ENOBUFS: pause (the listener will not
                    // signal again for connections already queued, so the
                    // pause's end is a poll timeout).
                    AcceptFailure::Exhausted => {
                        self.accept_backoff.exhausted(now, &e, &self.env.admission);
                        break;
                    }
                },
            }
        }
    }

    pub(super) fn adopt(&mut self, stream: TcpStream, peer: SocketAddr, now: Instant) {
        if self.shutdown.is_some() {
            return; // dropped: closes the socket
        }
        let _ = stream.set_nodelay(true);
        let io = match &self.tls {
            Some(cfg) => match Transport::tls(stream, cfg.clone()) {
                Ok(t) => t,
                Err(e) => {
                    log::warn!("shard {} TLS setup failed: {e}", self.env.shard);
                    return;
                }
            },
            None => Transport::Plain(stream),
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let id = ConnId::new(self.env.shard, self.seq);
        self.seq += 1;
        let mut conn = Conn::new(id, io, peer);
        if let Err(e) = self.poll.registry().register(
            conn.socket(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("conn={id} register failed: {e}");
            return;
        }
        let conn = entry.insert(conn);
        let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
        conn.start(&mut ctx);
        log::debug!("conn={id} accepted from {peer}");
        // The request may already be waiting: serve it this turn.
        conn.queued = true;
        self.run.push(key);
    }

    pub(super) fn serve_ready(&mut self, now: Instant) {
        let mut run = std::mem::take(&mut self.run);
        run.append(&mut self.again);
        for &key in &run {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.queued = false;
            let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
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

    pub(super) fn expire_timers(&mut self, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.io.wheel.expire(now, &mut fired);
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
            let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, t.key, now);
            if conn.on_timer(t.kind, &mut ctx) == Next::Drop {
                self.remove(t.key, now);
            }
        }
        self.fired = fired;
    }

    /// Phase: one write per connection that received deliveries this turn.
    pub(super) fn flush_pending(&mut self, now: Instant) {
        let mut list = std::mem::take(&mut self.flush);
        for &key in &list {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.flush_queued = false;
            let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
            if conn.after_io(&mut ctx) == Next::Drop {
                self.remove(key, now);
            }
        }
        list.clear();
        if self.flush.is_empty() {
            self.flush = list;
        }
    }

    pub(super) fn begin_shutdown(&mut self, deadline: Instant, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(deadline);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_backoff = AcceptBackoff::default();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        log::info!(
            "shard {} shutting down: closing {} connections",
            self.env.shard,
            keys.len()
        );
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
            if conn.begin_shutdown(&mut ctx) == Next::Drop {
                self.remove(key, now);
            }
        }
    }

    pub(super) fn remove(&mut self, key: usize, now: Instant) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
        conn.release(&mut ctx);
        let _ = self.poll.registry().deregister(conn.socket());
        log::debug!("conn={} removed", conn.id());
    }
}
