//! Who may do what, and which names are valid: the rules shared by the
//! client protocol (session) and the HTTP API, so both refuse the same
//! things for the same reasons (docs/PROTOCOL.md, channel rules).

use crate::auth::Identity;
use crate::config::{Config, Rule};

pub use crate::id::{MAX_ID_LEN, valid_id};

/// What an identity wants to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

/// A name a user id, tenant or artifact may have: printable, no spaces.
pub fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

/// A valid user id: the id rule ([`valid_id`]: 1-128 printable bytes, no
/// whitespace, no `:`), the same at login, in messages and in the API.
pub fn valid_user(s: &str) -> bool {
    valid_id(s)
}

pub fn valid_channel(s: &str, cfg: &Config) -> bool {
    valid_name(s, cfg.channels.max_channel_length)
}

pub fn is_admin(id: &Identity) -> bool {
    id.role.as_deref() == Some("admin")
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
}

/// May `id` subscribe to (or publish on) `channel`?
///
/// Admins may do anything. Otherwise the channel's namespace (the part before
/// the first `:`) picks the rule from `[channels.namespaces]`, or the default
/// rule; a `channels` claim pattern that matches also allows, unless the
/// rule is `none`.
///
/// `owner` and `tenant` compare the id segment (between the first and the
/// second `:`) with the whole id, exactly: `user:alice` and `user:alice:x`
/// are `alice`'s, `user:alicex` is not. An id that breaks the id rule (it
/// could contain `:`) owns nothing: login refuses such ids, and this check
/// does not rely on it.
pub fn allowed(cfg: &Config, action: Action, channel: &str, id: &Identity) -> bool {
    if is_admin(id) {
        return true;
    }
    let (ns, rest) = channel.split_once(':').unwrap_or(("", channel));
    let rules = cfg.channels.namespaces.get(ns);
    let rule = match (action, rules) {
        (Action::Subscribe, Some(r)) => r.subscribe,
        (Action::Publish, Some(r)) => r.publish,
        (Action::Subscribe, None) => cfg.channels.subscribe,
        (Action::Publish, None) => cfg.channels.publish,
    };
    if rule == Rule::None {
        return false;
    }
    if id.channels.iter().any(|p| glob(p, channel)) {
        return true;
    }
    let segment = rest.split(crate::id::SEPARATOR).next().unwrap_or_default();
    let owner = |who: &str| valid_id(who) && segment == who;
    match rule {
        Rule::Any => true,
        Rule::Owner => owner(&id.user_id),
        Rule::Tenant => id.tenant.as_deref().is_some_and(owner),
        Rule::Claims | Rule::Admin | Rule::None => false,
    }
}

/// Does a rule that names no channel (`channels.broadcast`, `channels.direct`)
/// let `id` act?
pub fn rule_allows(rule: Rule, id: &Identity) -> bool {
    match rule {
        Rule::Any => true,
        Rule::Admin | Rule::Claims | Rule::Owner | Rule::Tenant | Rule::None => is_admin(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, tenant: Option<&str>) -> Identity {
        Identity {
            tenant: tenant.map(str::to_owned),
            ..Identity::user(user)
        }
    }

    /// A tiny deterministic generator (no RNG crate, reproducible failures).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as usize
        }
        /// 1-6 characters, rich in separators and look-alikes.
        fn id(&mut self) -> String {
            const ALPHABET: [&str; 8] = ["a", "b", ":", ":", "*", "-", "é", "A"];
            let n = 1 + self.next() % 6;
            (0..n)
                .map(|_| ALPHABET[self.next() % ALPHABET.len()])
                .collect()
        }
    }

    /// Property: under the `owner` and `tenant` rules, two different ids
    /// never get the same channel, and an id gets exactly the channels
    /// whose id segment is itself, with ids full of `:` (the attack of
    /// issue 12: `alice` reading `user:alice:bob`, the channel of the user
    /// `alice:bob`). Subscribe is what presence, history and recovery check too.
    #[test]
    fn owner_and_tenant_channels_belong_to_one_id() {
        let cfg = Config::default();
        let mut rng = Lcg(0x5eed);
        for _ in 0..20_000 {
            let (u, v) = (rng.id(), rng.id());
            let tail = rng.id();
            let mut channels = Vec::new();
            for ns in ["user", "tenant"] {
                for c in [
                    format!("{ns}:{u}"),
                    format!("{ns}:{v}"),
                    format!("{ns}:{u}:{tail}"),
                    format!("{ns}:{v}:{tail}"),
                    format!("{ns}:{u}{tail}"),
                    format!("{ns}:{tail}"),
                ] {
                    channels.push(c);
                }
            }
            for channel in &channels {
                let (ns, rest) = channel.split_once(':').unwrap();
                let segment = rest.split(':').next().unwrap();
                let ids = [u.as_str(), v.as_str()];
                let granted = |id: &str| {
                    let identity = if ns == "user" {
                        who(id, None)
                    } else {
                        who("someone", Some(id))
                    };
                    allowed(&cfg, Action::Subscribe, channel, &identity)
                };
                for id in ids {
                    // Exactly the channels whose segment is the whole id,
                    // and only for ids that follow the rule.
                    assert_eq!(
                        granted(id),
                        valid_id(id) && segment == id,
                        "{id:?} on {channel:?}"
                    );
                }
                if u != v {
                    assert!(
                        !(granted(&u) && granted(&v)),
                        "{u:?} and {v:?} both get {channel:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn owner_rule_examples() {
        let cfg = Config::default();
        let alice = who("alice", Some("acme"));
        let sub = |c: &str, id: &Identity| allowed(&cfg, Action::Subscribe, c, id);
        assert!(sub("user:alice", &alice));
        assert!(sub("user:alice:inbox", &alice));
        assert!(!sub("user:alicex", &alice));
        assert!(!sub("user:bob", &alice));
        assert!(sub("tenant:acme", &alice));
        assert!(sub("tenant:acme:artifact:7", &alice));
        assert!(!sub("tenant:acmecorp", &alice));
        // An id that would contain the separator owns nothing, even if it
        // got past login.
        let odd = who("alice:bob", Some("acme:corp"));
        assert!(!sub("user:alice:bob", &odd));
        assert!(!sub("user:alice", &odd));
        assert!(!sub("tenant:acme:corp", &odd));
    }

    #[test]
    fn glob_patterns() {
        assert!(glob("*", "anything"));
        assert!(glob("room:*", "room:1"));
        assert!(!glob("room:*", "rooms:1"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
    }
}
