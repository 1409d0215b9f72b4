//! Identifiers that cross threads: a connection's id names its shard and
//! its place in that shard's sequence; and the one rule every user id,
//! tenant and artifact id follows, wherever it enters (a JWT `sub` or
//! `tenant`, `?userId=`, a `to`, an HTTP API path or body). A leaf.

use std::fmt;

/// Most shards a process runs: the routing table names shards in a 64-bit set.
pub const MAX_SHARDS: usize = 64;

/// Unique connection id: shard index in the top 16 bits, a per-shard sequence below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

impl ConnId {
    pub fn new(shard: usize, seq: u64) -> Self {
        ConnId(((shard as u64) << 48) | (seq & ((1 << 48) - 1)))
    }
    pub fn shard(self) -> usize {
        (self.0 >> 48) as usize
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.shard(), self.0 & ((1 << 48) - 1))
    }
}

/// Longest user id, tenant or artifact id (bytes).
pub const MAX_ID_LEN: usize = 128;

/// The namespace separator of channel names (`user:alice`).
pub const SEPARATOR: char = ':';

/// A valid user id, tenant or artifact id: 1-128 bytes, no whitespace, no
/// control character, and no `:`. Channel rules read the id from the
/// segment after the namespace (`user:<id>`, `tenant:<id>:...`); if an id
/// could contain the separator, `user:alice:bob` would be both the channel
/// of the user `alice:bob` and a channel below `alice`'s, and `alice`
/// would read it (issue 12).
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && c != SEPARATOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_rule() {
        for ok in ["alice", "user123", "a.b-c_d@e", "é", &"x".repeat(128)] {
            assert!(valid_id(ok), "{ok:?}");
        }
        for bad in [
            "",
            "alice:bob",
            ":",
            "a b",
            "tab\there",
            "nl\n",
            "\u{0}",
            &"x".repeat(129),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn shard_and_sequence() {
        let id = ConnId::new(3, 42);
        assert_eq!(id.shard(), 3);
        assert_eq!(id.to_string(), "3.42");
    }
}
