//! Carrying out the work handlers asked for during the turn: each item
//! goes to the local connections, to other shards' inboxes (one message
//! per shard, the frame shared), to a channel's home shard, or to the
//! storage writer.

use std::sync::Arc;
use std::time::Instant;

use crate::id::ConnId;
use crate::store::{Op, Request, Revocation};
use crate::work::{
    Asker, Audience, Gathered, HistoryQuery, PubEvent, Reply, ShardQuery, StoreWait, Work,
};

use super::inbox::{ReportTo, ShardMsg};
use super::state::{Gather, Shard};

impl Shard {
    /// Phase: carry out the work handlers asked for. Frames are shared:
    /// one `Arc` per target shard, one per local recipient.
    pub(super) fn route_outgoing(&mut self, now: Instant) {
        // Handling an item may queue more (a stored inbox message is then
        // delivered): loop until none are left.
        while !self.desk.work.is_empty() {
            let mut work = std::mem::take(&mut self.desk.work);
            for item in work.drain(..) {
                self.route_one(item, now);
            }
            if self.desk.work.is_empty() {
                self.desk.work = work; // keep the allocation
            }
        }
    }

    pub(super) fn route_one(&mut self, item: Work, now: Instant) {
        match item {
            Work::Deliver {
                audience,
                frame,
                reply,
                ack,
            } => self.deliver(audience, frame, reply, ack, now),
            Work::Presence { channel, reply } => self.presence(channel, reply),
            Work::Publish {
                channel,
                event,
                reply,
            } => self.publish(channel, event, reply, now),
            Work::History {
                channel,
                query,
                reply,
            } => self.history(channel, query, reply),
            Work::Store { to, op, wait } => self.send_to_writer(to, op, wait, now),
            Work::Revoke { revocation, reply } => self.store_revocation(revocation, reply, now),
            Work::Query {
                shards,
                query,
                reply,
            } => self.query(shards, query, reply, now),
            Work::Acked { user, id } => self.acked(user, id),
        }
    }

    /// Where a cross-shard answer for gather `g` goes: here.
    fn report(&self, gather: usize) -> ReportTo {
        ReportTo {
            shard: self.env.shard,
            gather,
        }
    }

    /// A frame for an audience on every shard where it has connections;
    /// with a reply, the connections reached are counted across shards.
    fn deliver(
        &mut self,
        audience: Audience,
        frame: Arc<[u8]>,
        reply: Option<Reply>,
        ack: Option<i64>,
        now: Instant,
    ) {
        let router = &self.env.router;
        let mask = match &audience {
            Audience::User(u) => router.user_shards(u),
            Audience::Users(us) => us.iter().fold(0, |m, u| m | router.user_shards(u)),
            Audience::Channel(c) => router.channel_shards(c),
            Audience::All => router.all(),
        };
        let me = 1u64 << self.env.shard;
        let local = if mask & me != 0 {
            self.deliver_local(&audience, &frame, ack, now)
        } else {
            0
        };
        let Some(reply) = reply else {
            self.peers
                .scatter(mask, self.env.shard, || ShardMsg::Deliver {
                    audience: audience.clone(),
                    frame: frame.clone(),
                    report: None,
                    ack,
                });
            return;
        };
        if mask & !me == 0 {
            let result = Gathered {
                connections: local,
                ..Default::default()
            };
            self.finish_reply(&reply, &result);
            return;
        }
        let g = self.gathers.insert(Gather::new(reply));
        let report = self.report(g);
        let sent = self
            .peers
            .scatter(mask, self.env.shard, || ShardMsg::Deliver {
                audience: audience.clone(),
                frame: frame.clone(),
                report: Some(report),
                ack,
            });
        self.start_gather(report.gather, sent, local);
    }

    /// Who is subscribed to `channel`, gathered from every shard with subscribers.
    fn presence(&mut self, channel: Arc<str>, reply: Reply) {
        let mask = self.env.router.channel_shards(&channel);
        let local = self.local_presence(&channel);
        let g = self.gathers.insert(Gather::new(reply));
        let report = self.report(g);
        let sent = self
            .peers
            .scatter(mask, self.env.shard, || ShardMsg::PresenceQuery {
                channel: channel.clone(),
                report,
            });
        let n = local.iter().map(|(_, c)| u64::from(*c)).sum();
        if let Some(gather) = self.gathers.get_mut(report.gather) {
            for (u, c) in local {
                *gather.presence.entry(u).or_insert(0) += c;
            }
        }
        self.start_gather(report.gather, sent, n);
    }

    /// A publication goes to its channel's home shard to be numbered.
    fn publish(&mut self, channel: Arc<str>, event: PubEvent, reply: Option<Reply>, now: Instant) {
        let report = reply.map(|reply| ReportTo {
            shard: self.env.shard,
            gather: self.gathers.insert(Gather::new(reply)),
        });
        let home = self.env.router.home(&channel);
        if home == self.env.shard {
            self.publish_home(channel, event, report, now);
            return;
        }
        let msg = ShardMsg::Publish {
            channel,
            event,
            report,
        };
        if !self.peers.send(home, msg)
            && let Some(r) = report
        {
            // The home shard has exited (shutdown): nothing was published.
            self.start_gather(r.gather, 0, 0);
        }
    }

    /// Recovery or a history page, answered by the channel's home shard.
    fn history(&mut self, channel: Arc<str>, query: HistoryQuery, reply: Reply) {
        let g = self.gathers.insert(Gather::new(reply));
        let report = self.report(g);
        let home = self.env.router.home(&channel);
        if home == self.env.shard {
            let page = self.history_page(&channel, &query);
            self.history_reply(report, page);
            return;
        }
        let msg = ShardMsg::HistoryQuery {
            channel,
            query,
            report,
        };
        let answers = usize::from(self.peers.send(home, msg));
        self.start_gather(report.gather, answers, 0);
    }

    /// A revocation is stored first (when storage is on), then applied on
    /// every shard.
    fn store_revocation(&mut self, revocation: Revocation, reply: Option<Reply>, now: Instant) {
        if self.env.writer.is_some() {
            // Without a reply (the server's own revoke) nobody is told.
            let to = reply.as_ref().map_or(
                Asker {
                    key: usize::MAX,
                    conn: ConnId(u64::MAX),
                },
                |r| r.to,
            );
            let revocation = Arc::new(revocation);
            let op = Op::Revoke((*revocation).clone());
            self.send_to_writer(to, op, StoreWait::Revoke { revocation, reply }, now);
        } else if let Some(reply) = reply {
            let all = self.env.router.all();
            self.query(all, ShardQuery::Revoke(Arc::new(revocation)), reply, now);
        }
    }

    /// An API query answered by every shard in `shards`.
    fn query(&mut self, shards: u64, query: ShardQuery, reply: Reply, now: Instant) {
        let g = self.gathers.insert(Gather::new(reply));
        let report = self.report(g);
        let local = if shards & (1u64 << self.env.shard) != 0 {
            self.answer_query(&query, report, now)
        } else {
            0
        };
        let sent = self
            .peers
            .scatter(shards, self.env.shard, || ShardMsg::Query {
                query: query.clone(),
                report,
            });
        self.start_gather(report.gather, sent, local);
    }

    /// An inbox message was acknowledged: delete it, stop its redeliveries
    /// on every shard the user is on.
    fn acked(&mut self, user: Arc<str>, id: i64) {
        if let Some(w) = &self.env.writer {
            let req = Request {
                op: Op::InboxAck {
                    user: user.clone(),
                    id,
                },
                ticket: None,
            };
            if w.try_send(req).is_err() {
                // The store is full: keep redelivering, so the client
                // acknowledges again later.
                self.io.c.store_rejected += 1;
                return;
            }
        }
        self.forget_acked(&user, id);
        let mask = self.env.router.user_shards(&user);
        self.peers
            .scatter(mask, self.env.shard, || ShardMsg::Acked {
                user: user.clone(),
                id,
            });
    }
}
