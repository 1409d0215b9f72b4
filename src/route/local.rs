//! A shard's own index of its connections: user -> connections, channel ->
//! subscribers, and the authenticated set (broadcast). Keeps the shared
//! [`Router`] exact: a shard's bit for a key is set when its local set for
//! that key becomes non-empty and cleared when it becomes empty.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;

use super::table::Router;

/// The connections (slab keys) of one user or one channel on this shard.
/// Most users hold one connection: that case needs no allocation of its
/// own (an `IndexSet` of one key costs ~120 bytes of table).
#[derive(Debug, Clone)]
pub enum Members {
    One(usize),
    Many(IndexSet<usize>),
}

impl Members {
    /// Returns false if `key` was already there.
    fn insert(&mut self, key: usize) -> bool {
        match self {
            Members::One(k) if *k == key => false,
            Members::One(k) => {
                let set: IndexSet<usize> = [*k, key].into_iter().collect();
                *self = Members::Many(set);
                true
            }
            Members::Many(set) => set.insert(key),
        }
    }

    /// Remove `key`; returns (was present, now empty).
    fn remove(&mut self, key: usize) -> (bool, bool) {
        match self {
            Members::One(k) => {
                let was = *k == key;
                (was, was)
            }
            Members::Many(set) => {
                let was = set.swap_remove(&key);
                if set.len() == 1
                    && let Some(&last) = set.first()
                {
                    *self = Members::One(last);
                }
                (was, matches!(self, Members::Many(s) if s.is_empty()))
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Members::One(_) => 1,
            Members::Many(set) => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let (one, many) = match self {
            Members::One(k) => (Some(*k), None),
            Members::Many(set) => (None, Some(set.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[derive(Default)]
pub struct LocalIndex {
    users: HashMap<Arc<str>, Members>,
    channels: HashMap<Arc<str>, Members>,
    authed: IndexSet<usize>,
    /// Recoveries in flight per channel on this shard, so a delivery looks
    /// at each subscriber's recovery state only when one is in flight.
    recovering: HashMap<Arc<str>, u32>,
}

impl LocalIndex {
    pub fn recovery_started(&mut self, channel: &Arc<str>) {
        *self.recovering.entry(channel.clone()).or_insert(0) += 1;
    }

    pub fn recovery_ended(&mut self, channel: &str, n: u32) {
        if let Some(c) = self.recovering.get_mut(channel) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.recovering.remove(channel);
            }
        }
    }

    /// Is any connection of this shard recovering `channel`?
    pub fn any_recovering(&self, channel: &str) -> bool {
        !self.recovering.is_empty() && self.recovering.contains_key(channel)
    }
    pub fn add_user(&mut self, router: &Router, shard: usize, user: &Arc<str>, key: usize) {
        self.authed.insert(key);
        add(
            &mut self.users,
            router,
            shard,
            user,
            key,
            Router::user_joined,
        );
    }

    pub fn remove_user(&mut self, router: &Router, shard: usize, user: &Arc<str>, key: usize) {
        self.authed.swap_remove(&key);
        remove(&mut self.users, router, shard, user, key, Router::user_left);
    }

    /// Returns false if `key` was already subscribed.
    pub fn subscribe(
        &mut self,
        router: &Router,
        shard: usize,
        channel: &Arc<str>,
        key: usize,
    ) -> bool {
        add(
            &mut self.channels,
            router,
            shard,
            channel,
            key,
            Router::channel_joined,
        )
    }

    /// Returns false if `key` was not subscribed.
    pub fn unsubscribe(
        &mut self,
        router: &Router,
        shard: usize,
        channel: &str,
        key: usize,
    ) -> bool {
        remove(
            &mut self.channels,
            router,
            shard,
            channel,
            key,
            Router::channel_left,
        )
    }

    pub fn user_conns(&self, user: &str) -> Option<&Members> {
        self.users.get(user)
    }

    pub fn subscribers(&self, channel: &str) -> Option<&Members> {
        self.channels.get(channel)
    }

    pub fn authed(&self) -> &IndexSet<usize> {
        &self.authed
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
            && self.channels.is_empty()
            && self.authed.is_empty()
            && self.recovering.is_empty()
    }
}

/// Add `key` under `name`; the router learns when this shard's set appears.
fn add(
    map: &mut HashMap<Arc<str>, Members>,
    router: &Router,
    shard: usize,
    name: &Arc<str>,
    key: usize,
    joined: fn(&Router, &Arc<str>, usize),
) -> bool {
    match map.get_mut(&**name) {
        Some(m) => m.insert(key),
        None => {
            map.insert(name.clone(), Members::One(key));
            joined(router, name, shard);
            true
        }
    }
}

/// Remove `key` from `name`; the router learns when this shard's set empties.
fn remove(
    map: &mut HashMap<Arc<str>, Members>,
    router: &Router,
    shard: usize,
    name: &str,
    key: usize,
    left: fn(&Router, &Arc<str>, usize),
) -> bool {
    let Some(m) = map.get_mut(name) else {
        return false;
    };
    let (was, empty) = m.remove(key);
    if empty && let Some((name, _)) = map.remove_entry(name) {
        left(router, &name, shard);
    }
    was
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_one_many_and_back() {
        let mut m = Members::One(3);
        assert!(!m.insert(3));
        assert!(m.insert(5));
        assert!(m.insert(7));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![3, 5, 7]);
        assert_eq!(m.remove(5), (true, false));
        assert_eq!(m.remove(9), (false, false));
        assert_eq!(m.remove(3), (true, false));
        assert!(matches!(m, Members::One(7)));
        assert_eq!(m.remove(7), (true, true));
    }

    #[test]
    fn index_keeps_router_exact() {
        let router = Router::new(4);
        let mut idx = LocalIndex::default();
        let u: Arc<str> = Arc::from("u");
        let c: Arc<str> = Arc::from("c");
        idx.add_user(&router, 2, &u, 1);
        idx.add_user(&router, 2, &u, 4);
        assert!(idx.subscribe(&router, 2, &c, 1));
        assert!(!idx.subscribe(&router, 2, &c, 1));
        assert_eq!(router.user_shards("u"), 0b100);
        assert_eq!(router.channel_shards("c"), 0b100);
        idx.remove_user(&router, 2, &u, 1);
        assert_eq!(router.user_shards("u"), 0b100, "one connection left");
        idx.remove_user(&router, 2, &u, 4);
        assert!(idx.unsubscribe(&router, 2, "c", 1));
        assert!(!idx.unsubscribe(&router, 2, "c", 1));
        assert!(idx.is_empty());
        assert_eq!(router.user_count() + router.channel_count(), 0);
    }
}
