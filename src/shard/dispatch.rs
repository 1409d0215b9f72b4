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

/// The answer to a client publication or message refused because a shard's
/// queue is full (`shard_queue_bytes`).
const QUEUE_FULL: &str = "the server is overloaded (a shard's queue is full); retry later";
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

    /// Whether every shard of `mask` has room in its queue
    /// (`shard_queue_bytes`).
    fn room_in(&self, mask: u64) -> bool {
        self.peers.has_room(mask, self.env.cfg.shard_queue_bytes)
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
        if let Some(r) = &reply
            && ack.is_none()
            && !self.room_in(mask & !me)
        {
            // A client's (or the API's) message: refused before any copy of
            // it is queued, so a flood cannot grow another shard's queue.
            // Inbox deliveries (`ack`) were stored already and are sent.
            self.refuse(r, QUEUE_FULL);
            return;
        }
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
        // The home shard, and every shard it will fan the publication out
        // to, must have room: the publisher is told `overloaded` (and may
        // retry) rather than the queues between shards growing.
        // The home shard delivers to its own subscribers directly and sends
        // one message to each other shard with subscribers (this one too).
        let home = self.env.router.home(&channel);
        let hop = if home == self.env.shard {
            0
        } else {
            1u64 << home
        };
        let targets = (self.env.router.channel_shards(&channel) & !(1u64 << home)) | hop;
        if !self.room_in(targets) {
            match &reply {
                Some(r) => self.refuse(r, QUEUE_FULL),
                None => self.io.c.shard_queue_refused += 1,
            }
            return;
        }
        let report = reply.map(|reply| ReportTo {
            shard: self.env.shard,
            gather: self.gathers.insert(Gather::new(reply)),
        });
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

/// Dispatch, scatter/gather and home-shard publishing, driven directly on a
/// shard that is built but not running: its peers' inboxes are read by the
/// test instead of by other shard threads. No sockets.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use crossbeam_channel::Receiver;

    use crate::admission::{Admission, IpLimiter};
    use crate::auth::Authenticator;
    use crate::config::{Config, StorageBackend};
    use crate::id::ConnId;
    use crate::proto::Dialect;
    use crate::route::{Router, home_shard};
    use crate::work::{Asker, Audience, PubEvent, Reply, Work, WsReply};

    use super::super::inbox::{Inbox, Peers, ShardMsg, weight};
    use super::super::state::{Opened, Shard, ShardSetup};

    /// Shard 0 of `n`, built, plus the inboxes of shards 1..n to read.
    fn shard0(n: usize) -> (Box<Shard>, Arc<Router>, Vec<Receiver<ShardMsg>>) {
        let (shard, router, others, _) = shard0_with(n, |_| {});
        (shard, router, others)
    }

    /// As [`shard0`] with a changed config; also shard 0's own inbox.
    fn shard0_with(
        n: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> (Box<Shard>, Arc<Router>, Vec<Receiver<ShardMsg>>, Inbox) {
        let mut cfg = Config {
            shards: n,
            ..Config::default()
        };
        tweak(&mut cfg);
        cfg.storage.backend = StorageBackend::None;
        let cfg = Arc::new(cfg);
        let opened: Vec<Opened> = (0..n).map(|_| Opened::new().unwrap()).collect();
        let peers = Arc::new(Peers::new(opened.iter().map(Opened::inbox).collect()));
        let router = Arc::new(Router::new(n));
        let all_stats = opened.iter().map(Opened::stats).collect();
        let mut opened = opened.into_iter();
        let first = opened.next().unwrap();
        let others: Vec<Receiver<ShardMsg>> = opened.map(|o| o.rx).collect();
        let setup = ShardSetup {
            id: 0,
            admission: Arc::new(Admission::new(cfg.max_connections)),
            limiter: Arc::new(IpLimiter::new(0)),
            tls: None,
            listener: None,
            auth: Arc::new(Authenticator::None),
            history: Vec::new(),
            revocations: Vec::new(),
            sealer: None,
            router: router.clone(),
            peers,
            all_stats,
            writer: None,
            cfg,
        };
        let (shard, inbox, _) = first.build(setup).unwrap();
        (shard, router, others, inbox)
    }

    fn asker() -> Asker {
        Asker {
            key: 7,
            conn: ConnId::new(0, 99),
        }
    }

    /// A channel whose home is `shard` among `n`.
    fn homed(shard: usize, n: usize) -> Arc<str> {
        (0..)
            .map(|i| format!("room:{i}"))
            .find(|c| home_shard(c, n) == shard)
            .map(Arc::from)
            .unwrap()
    }

    #[test]
    fn scatter_skips_itself_and_counts_what_was_sent() {
        let opened: Vec<Opened> = (0..3).map(|_| Opened::new().unwrap()).collect();
        let peers = Peers::new(opened.iter().map(Opened::inbox).collect());
        let sent = peers.scatter(0b111, 1, || ShardMsg::Acked {
            user: Arc::from("u"),
            id: 1,
        });
        assert_eq!(sent, 2);
        let got: Vec<usize> = opened.iter().map(|o| o.rx.try_iter().count()).collect();
        assert_eq!(got, [1, 0, 1]);
        assert_eq!(peers.scatter(0, 1, || unreachable!()), 0);
    }

    #[test]
    fn a_delivery_with_a_reply_is_gathered_across_shards() {
        let (mut shard, router, others) = shard0(3);
        let room: Arc<str> = Arc::from("room:x");
        router.channel_joined(&room, 1);
        router.channel_joined(&room, 2);
        let reply = Reply::ws(
            asker(),
            None,
            Dialect::Native,
            WsReply::Sent { to: room.clone() },
        );
        shard.desk.work.push(Work::Deliver {
            audience: Audience::Channel(room.clone()),
            frame: Arc::from(&b"frame"[..]),
            reply: Some(reply),
            ack: None,
        });
        shard.route_outgoing(Instant::now());
        assert!(shard.desk.work.is_empty());
        let mut gathers = Vec::new();
        for rx in &others {
            match rx.try_recv() {
                Ok(ShardMsg::Deliver {
                    report: Some(r),
                    frame,
                    ..
                }) => {
                    assert_eq!(r.shard, 0);
                    assert_eq!(&*frame, b"frame", "the frame is shared as is");
                    gathers.push(r.gather);
                }
                _ => panic!("each shard with subscribers gets one Deliver"),
            }
        }
        assert_eq!(gathers[0], gathers[1], "one gather for the operation");
        assert_eq!(shard.gathers.len(), 1);
        shard.gathered(gathers[0], 2, Vec::new());
        assert_eq!(shard.gathers.len(), 1, "waits for every shard");
        shard.gathered(gathers[0], 3, Vec::new());
        assert!(shard.gathers.is_empty(), "complete once both answered");
    }

    #[test]
    fn a_delivery_nobody_else_has_is_answered_at_once() {
        let (mut shard, _router, others) = shard0(2);
        let reply = Reply::ws(
            asker(),
            None,
            Dialect::Native,
            WsReply::Sent {
                to: Arc::from("nobody"),
            },
        );
        shard.desk.work.push(Work::Deliver {
            audience: Audience::User(Arc::from("nobody")),
            frame: Arc::from(&b"f"[..]),
            reply: Some(reply),
            ack: None,
        });
        shard.route_outgoing(Instant::now());
        assert!(shard.gathers.is_empty());
        assert!(others[0].try_recv().is_err(), "no message to other shards");
    }

    #[test]
    fn the_home_shard_numbers_publications_and_fans_them_out() {
        let (mut shard, router, others) = shard0(2);
        let home = homed(0, 2);
        router.channel_joined(&home, 1);
        for expected in 1..=2u64 {
            shard.desk.work.push(Work::Publish {
                channel: home.clone(),
                event: PubEvent {
                    from: None,
                    data: Box::from(&b"{\"n\":1}"[..]),
                },
                reply: None,
            });
            shard.route_outgoing(Instant::now());
            match others[0].try_recv() {
                Ok(ShardMsg::Deliver { frame, .. }) => {
                    let text = String::from_utf8_lossy(&frame);
                    assert!(
                        text.contains(&format!("\"offset\":{expected}")),
                        "offset {expected} in {text}"
                    );
                }
                _ => panic!("the subscriber's shard gets the numbered publication"),
            }
        }
        // A channel homed elsewhere goes to its home shard to be numbered.
        let away = homed(1, 2);
        shard.desk.work.push(Work::Publish {
            channel: away.clone(),
            event: PubEvent {
                from: None,
                data: Box::from(&b"1"[..]),
            },
            reply: None,
        });
        shard.route_outgoing(Instant::now());
        match others[0].try_recv() {
            Ok(ShardMsg::Publish { channel, .. }) => assert_eq!(channel, away),
            _ => panic!("a publication goes to its channel's home shard"),
        }
    }

    fn publish_work(channel: &Arc<str>, bytes: usize) -> Work {
        Work::Publish {
            channel: channel.clone(),
            event: PubEvent {
                from: None,
                data: vec![b'1'; bytes].into_boxed_slice(),
            },
            reply: Some(Reply::ws(
                asker(),
                None,
                Dialect::Native,
                WsReply::Published {
                    channel: channel.clone(),
                },
            )),
        }
    }

    /// Issue 12.4: a home shard that does not keep up (here: does not run
    /// at all) gets at most `shard_queue_bytes` of publications; the rest
    /// are refused (`overloaded`) on the publisher's shard. Before the
    /// budget every one of them was queued.
    #[test]
    fn publications_for_a_full_shard_are_refused_not_queued() {
        let budget = 64 << 10;
        let (mut shard, _router, others, _) = shard0_with(2, |c| c.shard_queue_bytes = budget);
        let away = homed(1, 2);
        for _ in 0..1000 {
            shard.desk.work.push(publish_work(&away, 1024));
            shard.route_outgoing(Instant::now());
        }
        let queued: usize = others[0].try_iter().map(|m| weight(&m)).sum();
        assert!(
            queued > 0,
            "publications go to the home shard while it has room"
        );
        assert!(
            queued < budget + 2048,
            "{queued} bytes queued for a shard whose budget is {budget}"
        );
        assert!(
            shard.io.c.shard_queue_refused >= 900,
            "refused {}",
            shard.io.c.shard_queue_refused
        );
        // Handled messages make room again.
        assert_eq!(shard.peers.queued(1), queued, "the count follows the queue");
    }

    /// Issue 12.4: one turn handles at most `shard_turn_bytes` of the
    /// inbox and leaves the rest for the next turn (before: all of it).
    #[test]
    fn one_turn_handles_a_budget_of_the_inbox() {
        let (mut shard, _router, _others, inbox) =
            shard0_with(2, |c| c.shard_turn_bytes = 16 << 10);
        for _ in 0..100 {
            inbox.send(ShardMsg::Deliver {
                audience: Audience::Channel(Arc::from("room:nobody")),
                frame: Arc::from(vec![0u8; 1000]),
                report: None,
                ack: None,
            });
        }
        let before = shard.peers.queued(0);
        assert_eq!(before, 100 * (1000 + 64));
        shard.drain_inbox(Instant::now(), shard.env.cfg.shard_turn_bytes);
        let left = shard.rx.len();
        assert!(shard.inbox_more, "the shard comes back for the rest");
        assert!(
            (80..=86).contains(&left),
            "{left} messages left after one turn"
        );
        assert_eq!(
            shard.queued.load(std::sync::atomic::Ordering::Acquire),
            left * 1064
        );
        let mut turns = 1;
        while shard.inbox_more {
            shard.drain_inbox(Instant::now(), shard.env.cfg.shard_turn_bytes);
            turns += 1;
        }
        assert_eq!(shard.rx.len(), 0);
        assert_eq!(turns, 7, "100 KiB in 16 KiB turns");
        assert_eq!(shard.peers.queued(0), 0);
    }

    /// Issue 12.13: buffers a burst grew (the cork, the parse copy) are
    /// given back at the once-a-second sweep; before they kept the peak.
    #[test]
    fn the_sweep_gives_back_buffers_a_burst_grew() {
        let (mut shard, _router, _others, _) = shard0_with(1, |_| {});
        shard.io.cork.reserve(4 << 20);
        shard.desk.raw.reserve(1 << 20);
        assert!(shard.io.cork.capacity() >= 4 << 20);
        shard.trim_buffers();
        assert!(
            shard.io.cork.capacity() <= 128 << 10,
            "{}",
            shard.io.cork.capacity()
        );
        assert_eq!(shard.desk.raw.capacity(), 0);
        assert_eq!(shard.io.pool.held(), 0);
    }
}
