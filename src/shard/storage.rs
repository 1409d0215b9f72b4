//! Storage tickets: requests handed to the writer and what their answers
//! mean for the connection that asked; inbox deliveries tracked until
//! acknowledged and redelivered on the timer wheel.

use std::sync::Arc;
use std::time::Instant;

use crate::deadline::{TimerKind, TimerRef};
use crate::id::ConnId;
use crate::proto::ErrorCode;
use crate::proto::encode::{shared_frame, with_ack_id};
use crate::store::{Done, Op, Outcome, Refusal, Request, SendError, Ticket};
use crate::work::{Asker, Audience, ReplyKind, ShardQuery, StoreWait, Work};

use super::inbox::ShardMsg;
use super::state::{MAX_REDELIVERIES, Pending, Retry, Shard};

impl Shard {
    /// Hand a request to the storage writer; its answer comes back as `Stored`.
    pub(super) fn send_to_writer(&mut self, to: Asker, op: Op, wait: StoreWait, now: Instant) {
        let p = Pending {
            to,
            wait,
            started: now,
        };
        let Some(w) = &self.env.writer else {
            self.store_failed(p, ErrorCode::StorageDisabled, "this server stores nothing");
            return;
        };
        let token = self.pending.insert(p);
        let req = Request {
            op,
            ticket: Some(Ticket {
                shard: self.env.shard,
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
        self.io.c.store_rejected += 1;
        if let Some(p) = self.pending.try_remove(token) {
            self.store_failed(p, code, message);
        }
    }

    /// Tell the connection its storage request failed (nothing was acknowledged).
    pub(super) fn store_failed(&mut self, p: Pending, code: ErrorCode, message: &str) {
        let (to, rid) = match p.wait {
            StoreWait::Ingest { request_id, .. } => (p.to, request_id),
            StoreWait::InboxPut { reply, .. }
            | StoreWait::Revoke {
                reply: Some(reply), ..
            } => match reply.kind {
                ReplyKind::Api(pending) => {
                    let overloaded = code == ErrorCode::Overloaded;
                    let resp = crate::api::render::storage_failure(&pending, overloaded, message);
                    self.http_answer(reply.to, resp, pending.started, Instant::now());
                    return;
                }
                ReplyKind::Ws { request_id, .. } => (reply.to, request_id),
            },
            StoreWait::Revoke { reply: None, .. } => return,
            StoreWait::Inbox => {
                log::warn!("conn={} inbox not loaded: {message}", p.to.conn);
                return;
            }
        };
        let text = crate::session::render::storage_failure(code, message, rid.as_deref());
        self.send_text(to, &text);
    }

    /// Results from the writer, in the order the requests were made.
    pub(super) fn stored(&mut self, done: Vec<Done>, now: Instant) {
        for d in done {
            let Ok(token) = usize::try_from(d.token) else {
                continue;
            };
            let Some(p) = self.pending.try_remove(token) else {
                continue;
            };
            self.io
                .histos
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
                    self.io.c.records_stored += 1;
                    self.send_text(p.to, &b);
                }
                (
                    StoreWait::InboxPut {
                        to,
                        payload,
                        mut reply,
                    },
                    Ok(Outcome::Stored { id }),
                ) => {
                    let frame = shared_frame(&with_ack_id(&payload, id));
                    self.io.c.inbox_stored += 1;
                    reply.set_stored_id(id);
                    self.desk.work.push(Work::Deliver {
                        audience: Audience::User(to),
                        frame,
                        reply: Some(reply),
                        ack: Some(id),
                    });
                }
                (StoreWait::InboxPut { reply, .. }, Ok(Outcome::Refused(r))) => {
                    self.io.c.inbox_refused += 1;
                    match &reply.kind {
                        ReplyKind::Api(pending) => {
                            let too_large = r == Refusal::TooLarge;
                            let resp =
                                crate::api::render::inbox_refused(pending, too_large, r.message());
                            self.http_answer(reply.to, resp, pending.started, now);
                        }
                        ReplyKind::Ws { request_id, .. } => {
                            let text = crate::session::render::storage_failure(
                                ErrorCode::InboxFull,
                                r.message(),
                                request_id.as_deref(),
                            );
                            self.send_text(reply.to, &text);
                        }
                    }
                }
                (StoreWait::Revoke { revocation, reply }, Ok(_)) => match reply {
                    Some(reply) => self.desk.work.push(Work::Query {
                        shards: self.env.router.all(),
                        query: ShardQuery::Revoke(revocation),
                        reply,
                    }),
                    None => {
                        for shard in 0..self.env.router.shard_count() {
                            self.peers.send(shard, ShardMsg::Revoke(revocation.clone()));
                        }
                    }
                },
                (StoreWait::Inbox, Ok(Outcome::Inbox(msgs))) => {
                    for m in msgs {
                        let frame = shared_frame(&with_ack_id(&m.payload, m.id));
                        self.deliver_to(p.to.key, p.to.conn, frame, Some(m.id), now);
                    }
                }
                (wait, Err(e)) => {
                    // The writer logs the episode once (an outage of the
                    // database too); here only the count.
                    self.io.c.store_failures += 1;
                    if !e.is_outage() {
                        log::debug!("storage request of conn={} failed: {e}", p.to.conn);
                    }
                    self.store_failed(
                        Pending {
                            to: p.to,
                            wait,
                            started: p.started,
                        },
                        ErrorCode::StorageError,
                        "the store could not commit; nothing was acknowledged",
                    );
                }
                (_, Ok(other)) => {
                    log::error!(
                        "unexpected storage outcome for conn={}: {other:?}",
                        p.to.conn
                    );
                }
            }
        }
    }

    /// Queue one frame for one connection (if it is still the same one),
    /// tracking it for redelivery when it is an inbox message.
    pub(super) fn deliver_to(
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
        self.io.c.messages_out += 1;
        conn.queue_flush(key, &mut self.flush);
        if let Some(id) = ack {
            self.track_retry(key, conn_id, id, frame, now);
        }
        true
    }

    pub(super) fn track_retry(
        &mut self,
        key: usize,
        conn: ConnId,
        id: i64,
        frame: Arc<[u8]>,
        now: Instant,
    ) {
        // At most `inbox.max_per_user` tracked per connection: past it the
        // message was sent once and waits in the store for the next login.
        let tracked = self.retry_counts.entry(conn).or_insert(0);
        if *tracked as usize >= self.env.cfg.inbox.max_per_user {
            return;
        }
        *tracked += 1;
        let delay = self.env.cfg.inbox.retry_initial;
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
        self.io.wheel.insert(
            now,
            delay,
            TimerRef {
                key,
                id: conn,
                kind: TimerKind::Retry(id, generation),
            },
        );
    }

    pub(super) fn untrack(&mut self, conn: ConnId) {
        if let Some(n) = self.retry_counts.get_mut(&conn) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.retry_counts.remove(&conn);
            }
        }
    }

    pub(super) fn forget_retry(&mut self, key: usize, id: i64) {
        if let Some(r) = self.retries.remove(&(key, id)) {
            self.untrack(r.conn);
        }
    }

    /// A redelivery timer fired: send again (doubling the wait) unless acknowledged.
    pub(super) fn redeliver(&mut self, t: TimerRef, id: i64, generation: u32, now: Instant) {
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
        r.delay = (r.delay * 2).min(self.env.cfg.inbox.retry_max);
        let (frame, delay) = (r.frame.clone(), r.delay);
        if let Some(conn) = self.conns.get_mut(t.key)
            && conn.deliver(frame)
        {
            self.io.c.redeliveries += 1;
            self.io.c.messages_out += 1;
            conn.queue_flush(t.key, &mut self.flush);
        }
        self.io.wheel.insert(now, delay, t);
    }

    /// Inbox message `id` of `user` was acknowledged: stop redelivering it here.
    pub(super) fn forget_acked(&mut self, user: &str, id: i64) {
        let keys: Vec<usize> = self
            .desk
            .local
            .user_conns(user)
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        for key in keys {
            self.forget_retry(key, id);
        }
    }
}
