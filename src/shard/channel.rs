//! A channel's home-shard work: numbering publications, keeping and
//! persisting their history, fanning them out; history pages and
//! recovery; local deliveries and presence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::conn::Conn;
use crate::history::Page;
use crate::proto::encode::{self};
use crate::store::{Op, Request};
use crate::work::{Audience, HistoryQuery, PubEvent};

use super::inbox::{ReportTo, ShardMsg};
use super::state::Shard;

impl Shard {
    /// Publication on a channel whose home is this shard: number it, keep
    /// it, persist it, fan it out.
    pub(super) fn publish_home(
        &mut self,
        channel: Arc<str>,
        event: PubEvent,
        report: Option<ReportTo>,
        now: Instant,
    ) {
        let now_ms = crate::clock::now_ms();
        let (offset, epoch) = self.history.next_offset(&channel, now_ms);
        let json: Arc<[u8]> = Arc::from(encode::publication(
            &channel,
            event.from.as_deref(),
            &event.data,
            offset,
            &epoch,
        ));
        let rule = self.env.cfg.history.rule(&channel);
        if rule.size > 0 {
            let ttl = i64::try_from(rule.ttl.as_millis()).unwrap_or(i64::MAX);
            self.history
                .keep(&channel, offset, json.clone(), now_ms, ttl, rule.size);
            if let Some(w) = &self.env.writer {
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
                    self.io.c.store_rejected += 1;
                }
            }
        }
        let frame = encode::shared_frame(&json);
        let mask = self.env.router.channel_shards(&channel);
        let audience = Audience::Channel(channel);
        let local = if mask & (1u64 << self.env.shard) != 0 {
            self.deliver_local(&audience, &frame, None, now)
        } else {
            0
        };
        let sent = self
            .peers
            .scatter(mask, self.env.shard, || ShardMsg::Deliver {
                audience: audience.clone(),
                frame: frame.clone(),
                report,
                ack: None,
            });
        self.io.c.publications += 1;
        if let Some(r) = report {
            if r.shard == self.env.shard {
                self.published(r.gather, offset, epoch, sent, local);
            } else {
                self.peers.send(
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

    pub(super) fn published(
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

    pub(super) fn history_page(&mut self, channel: &str, query: &HistoryQuery) -> Page {
        let now_ms = crate::clock::now_ms();
        self.io.c.history_pages += 1;
        // One reply stays well under the slow-consumer limit.
        let max_bytes = self.env.cfg.max_outbound_bytes / 2;
        match query {
            HistoryQuery::Recover { offset, epoch } => self.history.recover(
                channel,
                *offset,
                epoch,
                self.env.cfg.history.max_page,
                max_bytes,
                now_ms,
            ),
            HistoryQuery::Page { since, limit } => self
                .history
                .page(channel, *since, *limit, max_bytes, now_ms),
        }
    }

    pub(super) fn history_reply(&mut self, report: ReportTo, page: Page) {
        if report.shard == self.env.shard {
            if let Some(g) = self.gathers.get_mut(report.gather) {
                g.page = Some(page);
            }
            self.start_gather(report.gather, 0, 0);
        } else {
            self.peers.send(
                report.shard,
                ShardMsg::HistoryReply {
                    gather: report.gather,
                    page,
                },
            );
        }
    }

    /// Queue `frame` on every local connection of `audience`; returns how many.
    /// With `ack` (an inbox message id) each is tracked for redelivery.
    pub(super) fn deliver_local(
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
                    .desk
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
            Audience::Channel(c) if self.desk.local.any_recovering(c) => Some(&**c),
            _ => None,
        };
        let keys: Box<dyn Iterator<Item = usize> + '_> = match audience {
            Audience::Users(us) => {
                let local = &self.desk.local;
                Box::new(
                    us.iter()
                        .filter_map(|u| local.user_conns(u))
                        .flat_map(|m| m.iter()),
                )
            }
            Audience::User(u) => match self.desk.local.user_conns(u) {
                Some(m) => Box::new(m.iter()),
                None => return 0,
            },
            Audience::Channel(c) => match self.desk.local.subscribers(c) {
                Some(m) => Box::new(m.iter()),
                None => return 0,
            },
            Audience::All => Box::new(self.desk.local.authed().iter().copied()),
        };
        let mut n = 0;
        // The Socket.IO encoding of `frame`, made for the first Socket.IO
        // recipient and shared by the others (one encoding per wire format).
        let mut sio = None;
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if let Some(c) = recovering
                && conn.recovering(c)
            {
                continue; // its recovery, on the way, carries this publication
            }
            if conn.deliver_as(frame.clone(), &mut sio) {
                n += 1;
                conn.queue_flush(key, &mut self.flush);
            }
        }
        self.io.c.messages_out += n;
        n
    }

    /// (user, local connections) subscribed to `channel` on this shard.
    pub(super) fn local_presence(&self, channel: &str) -> Vec<(Arc<str>, u32)> {
        let mut counts: HashMap<Arc<str>, u32> = HashMap::new();
        if let Some(set) = self.desk.local.subscribers(channel) {
            for key in set.iter() {
                if let Some(user) = self.conns.get(key).and_then(Conn::user) {
                    *counts.entry(user.clone()).or_insert(0) += 1;
                }
            }
        }
        counts.into_iter().collect()
    }
}
