//! A shard's own index of its connections: user -> connections, channel ->
//! subscribers, and the authenticated set (broadcast). Keeps the shared
//! [`Router`] exact: a shard's bit for a key is set when its local set for
//! that key becomes non-empty and cleared when it becomes empty.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;

use crate::route::Router;

#[derive(Default)]
pub struct LocalIndex {
    users: HashMap<Arc<str>, IndexSet<usize>>,
    channels: HashMap<Arc<str>, IndexSet<usize>>,
    authed: IndexSet<usize>,
}

impl LocalIndex {
    pub fn add_user(&mut self, router: &Router, shard: usize, user: &Arc<str>, key: usize) {
        self.authed.insert(key);
        let set = self.users.entry(user.clone()).or_default();
        if set.is_empty() {
            router.user_joined(user, shard);
        }
        set.insert(key);
    }

    pub fn remove_user(&mut self, router: &Router, shard: usize, user: &Arc<str>, key: usize) {
        self.authed.swap_remove(&key);
        if let Some(set) = self.users.get_mut(user) {
            set.swap_remove(&key);
            if set.is_empty() {
                self.users.remove(user);
                router.user_left(user, shard);
            }
        }
    }

    /// Returns false if `key` was already subscribed.
    pub fn subscribe(
        &mut self,
        router: &Router,
        shard: usize,
        channel: &Arc<str>,
        key: usize,
    ) -> bool {
        let set = self.channels.entry(channel.clone()).or_default();
        if set.is_empty() {
            router.channel_joined(channel, shard);
        }
        set.insert(key)
    }

    /// Returns false if `key` was not subscribed.
    pub fn unsubscribe(
        &mut self,
        router: &Router,
        shard: usize,
        channel: &str,
        key: usize,
    ) -> bool {
        let Some(set) = self.channels.get_mut(channel) else {
            return false;
        };
        let was = set.swap_remove(&key);
        if set.is_empty()
            && let Some((name, _)) = self.channels.remove_entry(channel)
        {
            router.channel_left(&name, shard);
        }
        was
    }

    pub fn user_conns(&self, user: &str) -> Option<&IndexSet<usize>> {
        self.users.get(user)
    }

    pub fn subscribers(&self, channel: &str) -> Option<&IndexSet<usize>> {
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
        self.users.is_empty() && self.channels.is_empty() && self.authed.is_empty()
    }
}
