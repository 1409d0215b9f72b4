//! Who may do what, and which names are valid: the rules shared by the
//! client protocol (session) and the HTTP API, so both refuse the same
//! things for the same reasons (docs/PROTOCOL.md, channel rules).

use crate::auth::Identity;
use crate::config::{Config, Rule};

/// Longest user id, tenant or artifact id (bytes).
pub const MAX_ID_LEN: usize = 128;

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

/// A valid user id (1-128 printable bytes, no spaces).
pub fn valid_user(s: &str) -> bool {
    valid_name(s, MAX_ID_LEN)
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
    let owner =
        |who: &str| rest == who || rest.strip_prefix(who).is_some_and(|r| r.starts_with(':'));
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
