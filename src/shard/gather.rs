//! Gathering the answers of a cross-shard operation on the shard that
//! asked, and answering the asker (a protocol message or an HTTP response)
//! once every shard has reported.

use std::sync::Arc;
use std::time::Instant;

use crate::conn::{Ctx, Next};
use crate::proto::ErrorCode;
use crate::work::{Asker, Gathered, Reply, ReplyKind, WsReply};

use super::state::Shard;

impl Shard {
    pub(super) fn start_gather(&mut self, g: usize, remaining: usize, connections: u64) {
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
    pub(super) fn gathered(&mut self, g: usize, connections: u64, entries: Vec<(Arc<str>, u32)>) {
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

    pub(super) fn complete(&mut self, g: usize) {
        let Some(gather) = self.gathers.try_remove(g) else {
            return;
        };
        let mut presence: Vec<(Arc<str>, u32)> = gather.presence.into_iter().collect();
        presence.sort_unstable();
        let mut clients = gather.clients;
        clients.sort_unstable_by_key(|c| c.id.0);
        let result = Gathered {
            connections: gather.connections,
            presence: &presence,
            clients: &clients,
            published: gather.published.as_ref().map(|(o, e)| (*o, &**e)),
            page: gather.page.as_ref(),
        };
        self.finish_reply(&gather.reply, &result);
    }

    /// Send the result of a cross-shard operation to the connection that
    /// asked, rendered in its wire format.
    pub(super) fn finish_reply(&mut self, reply: &Reply, result: &Gathered<'_>) {
        let to = reply.to;
        let (request_id, dialect, what) = match &reply.kind {
            ReplyKind::Api(pending) => {
                let resp = crate::api::render::later_response(pending, result);
                self.http_answer(to, resp, pending.started, Instant::now());
                return;
            }
            ReplyKind::Ws {
                request_id,
                dialect,
                what,
            } => (request_id, *dialect, what),
        };
        let Some(conn) = self.conns.get_mut(to.key) else {
            return;
        };
        if conn.id() != to.conn {
            return; // the asker is gone and its slot reused
        }
        if let WsReply::History { .. } = what
            && let Some(session) = conn.session_mut()
        {
            session.history_done();
        }
        if conn.queued_bytes() > self.env.cfg.max_outbound_bytes {
            // Past the slow-consumer limit the reply would be dropped
            // (`push_text`): do not build it.
            if let WsReply::Subscribed { channel } = what
                && let Some(session) = conn.session_mut()
            {
                session.recovered(channel, &mut self.desk.local);
            }
            self.io.c.replies_skipped += 1;
            return;
        }
        if let WsReply::Subscribed { channel } = what
            && let Some(session) = conn.session_mut()
        {
            session.recovered(channel, &mut self.desk.local);
            if !session.subscriptions().iter().any(|c| c == channel) {
                return; // unsubscribed while the recovery was on its way
            }
        }
        let text = crate::session::render::reply_text(what, request_id.as_deref(), dialect, result);
        self.send_text(to, &text);
    }

    /// Refuse a client's or the API's operation before any work was done:
    /// `overloaded` (HTTP 503) with `message`.
    pub(super) fn refuse(&mut self, reply: &Reply, message: &str) {
        self.io.c.shard_queue_refused += 1;
        match &reply.kind {
            ReplyKind::Api(pending) => {
                let resp = crate::api::render::storage_failure(pending, true, message);
                self.http_answer(reply.to, resp, pending.started, Instant::now());
            }
            ReplyKind::Ws { request_id, .. } => {
                let text = crate::session::render::storage_failure(
                    ErrorCode::Overloaded,
                    message,
                    request_id.as_deref(),
                );
                self.send_text(reply.to, &text);
            }
        }
    }

    /// An HTTP API answer for connection `key` (if it is still the same one).
    pub(super) fn http_answer(
        &mut self,
        to: Asker,
        resp: crate::http::Response,
        started: Instant,
        now: Instant,
    ) {
        self.io
            .histos
            .api
            .observe(now.saturating_duration_since(started));
        let Asker { key, conn: conn_id } = to;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.id() != conn_id {
            return;
        }
        let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
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
    pub(super) fn send_text(&mut self, to: Asker, text: &[u8]) {
        let Asker { key, conn: conn_id } = to;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.id() != conn_id {
            return;
        }
        conn.push_text(text, self.env.cfg.max_outbound_bytes);
        self.io.c.messages_out += 1;
        conn.queue_flush(key, &mut self.flush);
    }
}
