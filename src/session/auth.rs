//! Authentication of a connection: from the connect parameters at the
//! upgrade, or from a first `authenticate` message; then the login (revocation
//! check, local index, seed 004 auto-joined channels, the `connected` welcome,
//! the offline inbox).

use std::sync::Arc;

use crate::auth::{Authenticator, Identity};
use crate::env::Handling;
use crate::policy::valid_id;
use crate::proto::{Dialect, ErrorCode, Out};
use crate::work::{StoreWait, Work};

use super::reply::{Replies, reply_error};
use super::state::{FEATURES, FEATURES_NO_STORAGE, Session, Verdict, close};

impl Session {
    /// Right after the upgrade: authenticate from the connect parameters if
    /// possible; otherwise wait for an `authenticate` message.
    pub fn on_open(&mut self, ctx: &mut Handling<'_>, out: &mut dyn Replies) -> Verdict {
        let token = self.params.as_ref().and_then(|p| p.token.clone());
        match (&*ctx.env.auth, token) {
            (Authenticator::None, _) => {
                let user = self
                    .params
                    .as_ref()
                    .and_then(|p| p.dev_user.clone())
                    .filter(|u| valid_id(u))
                    .unwrap_or_else(|| format!("anon-{}", ctx.conn));
                self.login(anonymous(user), ctx, out, None)
            }
            (_, Some(token)) => self.authenticate(&token, ctx, out, None),
            (_, None) => Verdict::Continue,
        }
    }

    pub(super) fn authenticate(
        &mut self,
        token: &str,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
        rid: Option<&[u8]>,
    ) -> Verdict {
        match ctx.env.auth.authenticate(token) {
            Ok(mut identity) => {
                // A shared static token says nothing about who holds it: the
                // client may name itself with `?userId=`.
                if let (Authenticator::StaticToken(_), Some(u)) = (
                    &*ctx.env.auth,
                    self.params.as_ref().and_then(|p| p.dev_user.as_deref()),
                ) && valid_id(u)
                {
                    identity.user_id = u.to_owned();
                }
                self.login(identity, ctx, out, rid)
            }
            Err(e) => {
                let mut b = Vec::new();
                Out::new(&mut b, "error")
                    .str("code", e.code())
                    .str("message", &e.to_string())
                    .opt_raw("requestId", rid)
                    .finish();
                out.text(&b);
                Verdict::Close(close::AUTH_FAILED, "authentication failed")
            }
        }
    }

    /// `refresh`: a new token for the open connection, before the current
    /// one expires. It must name the same user and tenant; its claims
    /// (channels, role) and expiry replace the old token's for every later
    /// check, and the subscriptions held stay. A refused token changes
    /// nothing: the connection keeps its current token (and expiry).
    pub(super) fn refresh(
        &mut self,
        token: &str,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
        rid: Option<&[u8]>,
    ) -> Verdict {
        let Some(current) = self.identity.as_deref() else {
            return Verdict::Continue; // dispatch lets only authenticated connections here
        };
        let fresh = match (&*ctx.env.auth, ctx.env.auth.authenticate(token)) {
            // Modes `none` and `token` name the user from `?userId=`, not
            // from the token, and their tokens never expire: a valid token
            // keeps the identity as it is.
            (Authenticator::None | Authenticator::StaticToken(_), Ok(_)) => current.clone(),
            (Authenticator::Jwt(_), Ok(identity)) => identity,
            (_, Err(e)) => {
                let mut b = Vec::new();
                Out::new(&mut b, "error")
                    .str("code", e.code())
                    .str("message", &e.to_string())
                    .opt_raw("requestId", rid)
                    .finish();
                out.text(&b);
                return Verdict::Continue;
            }
        };
        if fresh.user_id != current.user_id || fresh.tenant != current.tenant {
            reply_error(
                out,
                ErrorCode::TokenMismatch,
                "the new token must name the same user (sub) and tenant",
                rid,
                Dialect::Native,
            );
            return Verdict::Continue;
        }
        if ctx.desk.revoked.covers(&fresh, crate::clock::now_ms()) {
            reply_error(
                out,
                ErrorCode::TokenRevoked,
                "this token was revoked",
                rid,
                Dialect::Native,
            );
            return Verdict::Continue;
        }
        let expires = fresh
            .expires_at
            .and_then(|e| i64::try_from(e).ok())
            .map(|e| crate::clock::rfc3339_ms(e.saturating_mul(1000)));
        self.identity = Some(Box::new(fresh));
        self.expiry_warned = false;
        let mut b = Vec::new();
        let reply = Out::new(&mut b, "refreshed");
        match &expires {
            Some(at) => reply.str("expiresAt", at),
            None => reply.raw("expiresAt", b"null"),
        }
        .opt_raw("requestId", rid)
        .finish();
        out.text(&b);
        Verdict::Refreshed
    }

    fn login(
        &mut self,
        identity: Identity,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
        rid: Option<&[u8]>,
    ) -> Verdict {
        if ctx.desk.revoked.covers(&identity, crate::clock::now_ms()) {
            reply_error(
                out,
                ErrorCode::TokenRevoked,
                "this token was revoked",
                rid,
                Dialect::Native,
            );
            return Verdict::Close(close::TOKEN_REVOKED, "token revoked");
        }
        let user: Arc<str> = Arc::from(identity.user_id.as_str());
        ctx.desk
            .local
            .add_user(&ctx.env.router, ctx.env.shard, &user, ctx.key);
        let params = self.params.take();
        // Seed 004 targeting: tenant-wide and artifact channels from claims
        // and connect parameters, joined without a permission check.
        let mut auto = Vec::new();
        if let Some(t) = identity.tenant.as_deref().filter(|t| valid_id(t)) {
            auto.push(format!("tenant:{t}"));
            if let Some(a) = params
                .as_ref()
                .and_then(|p| p.artifact_id.as_deref())
                .filter(|a| valid_id(a))
            {
                auto.push(format!("tenant:{t}:artifact:{a}"));
            }
        }
        for ch in auto {
            let ch: Arc<str> = Arc::from(ch);
            if ctx
                .desk
                .local
                .subscribe(&ctx.env.router, ctx.env.shard, &ch, ctx.key)
            {
                self.subs.push(ch);
            }
        }
        let mut b = Vec::new();
        let subs: Vec<&str> = self.subs.iter().map(|s| &**s).collect();
        Out::new(&mut b, "connected")
            .str("connectionId", &ctx.conn.to_string())
            .str("userId", &user)
            .strs(
                "features",
                if ctx.env.storage() {
                    FEATURES
                } else {
                    FEATURES_NO_STORAGE
                },
            )
            .strs("channels", &subs)
            .opt_raw("requestId", rid)
            .finish();
        out.text(&b);
        if ctx.env.storage() {
            // Deliver what waited in the offline inbox, in order.
            ctx.desk.work.push(Work::Store {
                to: ctx.asker(),
                op: crate::store::Op::Inbox {
                    user: user.clone(),
                    limit: ctx.env.cfg.inbox.max_per_user,
                },
                wait: StoreWait::Inbox,
            });
        }
        self.user = Some(user);
        self.identity = Some(Box::new(identity));
        Verdict::Authenticated
    }
}

/// The identity of a connection in auth mode `none` (development).
fn anonymous(user: String) -> Identity {
    Identity {
        user_id: user,
        channels: Vec::new(),
        role: None,
        tenant: None,
        token_id: None,
        expires_at: None,
        issued_at: None,
    }
}
