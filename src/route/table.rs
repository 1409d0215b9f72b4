//! The shared table itself: user -> shard bit set, channel -> shard bit
//! set, on lock-free maps (see the module docs of `route`).

use crate::id::MAX_SHARDS;
use std::sync::Arc;

pub struct Router {
    users: papaya::HashMap<Arc<str>, u64>,
    channels: papaya::HashMap<Arc<str>, u64>,
    shards: usize,
}

fn bit(shard: usize) -> u64 {
    1u64.checked_shl(shard as u32).unwrap_or(0)
}

impl Router {
    /// The table for a process of `shards` shards (at most [`MAX_SHARDS`]).
    pub fn new(shards: usize) -> Self {
        Router {
            users: table(),
            channels: table(),
            shards: shards.min(MAX_SHARDS),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards
    }

    /// The home shard of `channel`: it numbers the channel's publications
    /// and keeps its history (FNV-1a of the name, so it is stable across
    /// restarts with the same shard count).
    pub fn home(&self, channel: &str) -> usize {
        home_shard(channel, self.shard_count())
    }

    /// Every shard.
    pub fn all(&self) -> u64 {
        match self.shards {
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    pub fn user_shards(&self, user: &str) -> u64 {
        self.users.pin().get(user).copied().unwrap_or(0)
    }

    pub fn channel_shards(&self, channel: &str) -> u64 {
        self.channels.pin().get(channel).copied().unwrap_or(0)
    }

    /// Users with at least one connection somewhere.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Channels with at least one subscriber somewhere.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// All users currently routed (for status listings).
    pub fn users(&self) -> Vec<Arc<str>> {
        self.users.pin().keys().cloned().collect()
    }

    pub fn user_joined(&self, user: &Arc<str>, shard: usize) {
        set_bit(&self.users, user, shard);
    }

    pub fn user_left(&self, user: &Arc<str>, shard: usize) {
        clear_bit(&self.users, user, shard);
    }

    pub fn channel_joined(&self, channel: &Arc<str>, shard: usize) {
        set_bit(&self.channels, channel, shard);
    }

    pub fn channel_left(&self, channel: &Arc<str>, shard: usize) {
        clear_bit(&self.channels, channel, shard);
    }
}

/// Blocking resize: with papaya's default incremental resize, maps filled
/// through `compute` were measured at ~690 ns per lookup (an unfinished
/// migration every reader walks) against ~65 ns here (benches/protocol.rs).
fn table() -> papaya::HashMap<Arc<str>, u64> {
    papaya::HashMap::builder()
        .resize_mode(papaya::ResizeMode::Blocking)
        .build()
}

fn set_bit(map: &papaya::HashMap<Arc<str>, u64>, key: &Arc<str>, shard: usize) {
    let b = bit(shard);
    map.pin().compute(key.clone(), |entry| match entry {
        Some((_, v)) => papaya::Operation::Insert::<u64, ()>(v | b),
        None => papaya::Operation::Insert(b),
    });
}

fn clear_bit(map: &papaya::HashMap<Arc<str>, u64>, key: &Arc<str>, shard: usize) {
    let b = bit(shard);
    map.pin().compute(key.clone(), |entry| match entry {
        Some((_, v)) if v & !b == 0 => papaya::Operation::Remove,
        Some((_, v)) => papaya::Operation::Insert(v & !b),
        None => papaya::Operation::Abort(()),
    });
}

/// The home shard of `channel` among `shards` (see [`Router::home`]).
pub fn home_shard(channel: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in channel.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// Iterate the shard indexes in a bit set.
pub fn shards_in(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_clear_and_entries_vanish() {
        let r = Router::new(4);
        let alice: Arc<str> = Arc::from("alice");
        r.user_joined(&alice, 0);
        r.user_joined(&alice, 3);
        assert_eq!(r.user_shards("alice"), 0b1001);
        r.user_left(&alice, 0);
        assert_eq!(r.user_shards("alice"), 0b1000);
        r.user_left(&alice, 3);
        assert_eq!(r.user_shards("alice"), 0);
        assert_eq!(r.user_count(), 0, "empty entries are removed");
        r.user_left(&alice, 3); // leaving twice is harmless
        assert_eq!(r.user_count(), 0);
    }

    #[test]
    fn concurrent_updates_stay_exact() {
        let r = Arc::new(Router::new(4));
        let threads: Vec<_> = (0..4)
            .map(|shard| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let keys: Vec<Arc<str>> =
                        (0..200).map(|i| Arc::from(format!("u{i}"))).collect();
                    for _ in 0..50 {
                        for k in &keys {
                            r.channel_joined(k, shard);
                        }
                        for k in &keys {
                            r.channel_left(k, shard);
                        }
                    }
                    for k in keys.iter().take(10) {
                        r.channel_joined(k, shard);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.channel_count(), 10);
        for i in 0..10 {
            assert_eq!(r.channel_shards(&format!("u{i}")), 0b1111);
        }
    }

    #[test]
    fn shard_iteration() {
        assert_eq!(shards_in(0b1010_0001).collect::<Vec<_>>(), vec![0, 5, 7]);
        assert_eq!(shards_in(0).count(), 0);
        assert_eq!(shards_in(u64::MAX).count(), 64);
    }
}
