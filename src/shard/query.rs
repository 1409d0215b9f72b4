//! API queries answered from this shard's connections (client lists,
//! disconnects, server-side membership) and revocations.

use std::time::Instant;

use crate::conn::{Ctx, Next};
use crate::proto::encode::shared_frame;
use crate::revoke::Revocations;
use crate::store::{self, Revocation};
use crate::work::{ClientInfo, ShardQuery};

use super::inbox::{ReportTo, ShardMsg};
use super::state::Shard;

impl Shard {
    /// This shard's part of an API query. Returns a count for the gather;
    /// a client list is sent (or added) separately.
    pub(super) fn answer_query(
        &mut self,
        query: &ShardQuery,
        report: ReportTo,
        now: Instant,
    ) -> u64 {
        match query {
            ShardQuery::Clients { user } => {
                let keys: Vec<usize> = match user {
                    Some(u) => self
                        .desk
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
                            ip: c.client_ip(),
                            connected_at_ms: s.map_or(0, |s| s.connected_at_ms()),
                            authenticated: s.is_some_and(|s| s.is_authenticated()),
                            user: c.user().cloned(),
                            data_received: s.map_or(0, |s| s.data_received()),
                            subscriptions: s.map_or(0, |s| s.subscriptions().len() as u32),
                        }
                    })
                    .collect();
                if report.shard == self.env.shard {
                    if let Some(g) = self.gathers.get_mut(report.gather) {
                        g.clients.extend(clients);
                    }
                } else {
                    self.peers.send(
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
                    .desk
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
                    let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
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
                    .desk
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
                let note = shared_frame(&note);
                let mut n = 0;
                for key in keys {
                    let Some(conn) = self.conns.get_mut(key) else {
                        continue;
                    };
                    let Some(session) = conn.session_mut() else {
                        continue;
                    };
                    if *subscribe
                        && session.subscriptions().len() >= self.env.cfg.channels.max_subscriptions
                    {
                        continue;
                    }
                    let changed = session.server_membership(
                        channel,
                        *subscribe,
                        &mut self.desk.local,
                        &self.env.router,
                        self.env.shard,
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

    /// A revocation reached this shard: remember it and close what it covers.
    pub(super) fn revoke(&mut self, r: &Revocation, now: Instant) -> u64 {
        self.desk.revoked.apply(r);
        let mut closed = 0;
        let keys: Vec<usize> = match r.kind {
            store::RevocationKind::User => self
                .desk
                .local
                .user_conns(&r.value)
                .map(|m| m.iter().collect())
                .unwrap_or_default(),
            store::RevocationKind::Token => self.desk.local.authed().iter().copied().collect(),
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
            conn.push_text(&event, self.env.cfg.max_outbound_bytes);
            self.io.c.revoked_closes += 1;
            closed += 1;
            let mut ctx = Ctx::new(&self.env, &mut self.desk, &mut self.io, key, now);
            conn.close_code(
                crate::session::close::TOKEN_REVOKED,
                "token revoked",
                &mut ctx,
            );
            if conn.after_io(&mut ctx) == Next::Drop {
                self.remove(key, now);
            }
        }
        closed
    }
}
