//! Token revocation (A4, seed 001 `token_revoked`).
//!
//! Each shard keeps its own copy of the live revocations (the rules reach
//! every shard through its inbox and the store keeps them across restarts),
//! so checking a token at connect is a local hash lookup.

use std::collections::HashMap;

use crate::auth::Identity;
use crate::store::{Revocation, RevocationKind};

#[derive(Debug, Default)]
pub struct Revocations {
    /// user id -> (revoked at, kept until), ms since the epoch.
    users: HashMap<String, (i64, i64)>,
    /// token id (`jti`) -> kept until.
    tokens: HashMap<String, i64>,
}

impl Revocations {
    pub fn apply(&mut self, r: &Revocation) {
        match r.kind {
            RevocationKind::User => {
                let e = self
                    .users
                    .entry(r.value.clone())
                    .or_insert((r.revoked_at_ms, r.expires_at_ms));
                e.0 = e.0.max(r.revoked_at_ms);
                e.1 = e.1.max(r.expires_at_ms);
            }
            RevocationKind::Token => {
                let e = self
                    .tokens
                    .entry(r.value.clone())
                    .or_insert(r.expires_at_ms);
                *e = (*e).max(r.expires_at_ms);
            }
        }
    }

    /// Does a live revocation cover this identity? A user revocation covers
    /// every token of the user issued (`iat`, whole seconds) up to the
    /// revocation, and tokens without `iat`.
    pub fn covers(&self, id: &Identity, now_ms: i64) -> bool {
        if let Some(jti) = id.token_id.as_deref()
            && self.tokens.get(jti).is_some_and(|&until| until > now_ms)
        {
            return true;
        }
        match self.users.get(&id.user_id) {
            Some(&(at, until)) if until > now_ms => match id.issued_at {
                Some(iat) => (iat as i64).saturating_mul(1000) <= at,
                None => true,
            },
            _ => false,
        }
    }

    /// Does this revocation apply to a connection with this identity?
    pub fn matches(r: &Revocation, id: &Identity) -> bool {
        match r.kind {
            RevocationKind::Token => id.token_id.as_deref() == Some(r.value.as_str()),
            RevocationKind::User => {
                id.user_id == r.value
                    && id
                        .issued_at
                        .is_none_or(|iat| (iat as i64).saturating_mul(1000) <= r.revoked_at_ms)
            }
        }
    }

    pub fn sweep(&mut self, now_ms: i64) {
        self.users.retain(|_, (_, until)| *until > now_ms);
        self.tokens.retain(|_, until| *until > now_ms);
    }

    pub fn len(&self) -> usize {
        self.users.len() + self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(kind: RevocationKind, value: &str, at: i64, until: i64) -> Revocation {
        Revocation {
            kind,
            value: value.into(),
            revoked_at_ms: at,
            expires_at_ms: until,
            reason: String::new(),
        }
    }

    fn id(user: &str, jti: Option<&str>, iat: Option<u64>) -> Identity {
        let mut i = Identity::user(user);
        i.token_id = jti.map(str::to_owned);
        i.issued_at = iat;
        i
    }

    #[test]
    fn user_revocation_covers_older_tokens_only() {
        let mut r = Revocations::default();
        r.apply(&rev(RevocationKind::User, "u", 10_000, 100_000));
        assert!(r.covers(&id("u", None, Some(9)), 20_000));
        assert!(r.covers(&id("u", None, Some(10)), 20_000), "same second");
        assert!(!r.covers(&id("u", None, Some(11)), 20_000), "issued after");
        assert!(r.covers(&id("u", None, None), 20_000), "no iat");
        assert!(!r.covers(&id("v", None, None), 20_000));
        assert!(!r.covers(&id("u", None, Some(9)), 100_000), "expired");
    }

    #[test]
    fn token_revocation_and_sweep() {
        let mut r = Revocations::default();
        r.apply(&rev(RevocationKind::Token, "j1", 0, 50));
        assert!(r.covers(&id("u", Some("j1"), Some(99)), 10));
        assert!(!r.covers(&id("u", Some("j2"), Some(99)), 10));
        assert!(Revocations::matches(
            &rev(RevocationKind::Token, "j1", 0, 50),
            &id("x", Some("j1"), None)
        ));
        r.sweep(60);
        assert!(r.is_empty());
    }
}
