//! Identifiers that cross threads: a connection's id names its shard and
//! its place in that shard's sequence. A leaf.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_and_sequence() {
        let id = ConnId::new(3, 42);
        assert_eq!(id.shard(), 3);
        assert_eq!(id.to_string(), "3.42");
    }
}
