//! Channel history and recovery (M8, seed 001 "event history").
//!
//! Every channel has a home shard (`Router::home`); all publications to a
//! channel pass through it, so one thread assigns its offsets and keeps its
//! recent publications. A channel's epoch names one unbroken offset
//! sequence: it changes whenever the history behind the offsets is lost
//! (the channel's state was dropped after a quiet TTL, or the store was
//! wiped), and a client that recovers with another epoch learns that it
//! cannot trust its offset. Persisted copies (through the storage writer)
//! let the sequence and its publications survive a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};

use crate::store::LoadedChannel;

/// A new random epoch (12 hex digits).
pub fn fresh_epoch() -> String {
    epoch_with(&SystemRandom::new())
}

fn epoch_with(rng: &SystemRandom) -> String {
    let mut b = [0u8; 6];
    // An epoch only has to differ from the previous one; if the system RNG
    // fails, the clock still makes it unique enough.
    if rng.fill(&mut b).is_err() {
        let t = crate::clock::now_ms().to_le_bytes();
        for (d, s) in b.iter_mut().zip(t) {
            *d = s;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One kept publication: the JSON text of the `message` event as sent.
#[derive(Debug, Clone)]
struct Entry {
    offset: u64,
    json: Arc<[u8]>,
    expires_ms: i64,
}

#[derive(Debug)]
struct ChannelState {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<Entry>,
    /// Last publication or query (wall clock ms): idle state is dropped.
    touched_ms: i64,
}

/// The answer to a recovery or a history page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub epoch: Arc<str>,
    /// The channel's latest offset.
    pub top: u64,
    /// Publications (JSON texts), ascending offset.
    pub publications: Vec<Arc<[u8]>>,
    /// Recovery: every publication after the client's position is here.
    /// History paging: more publications follow the last one returned.
    pub complete: bool,
}

/// The histories of the channels whose home is this shard.
pub struct History {
    channels: HashMap<Arc<str>, ChannelState>,
    rng: SystemRandom,
}

impl Default for History {
    fn default() -> Self {
        History {
            channels: HashMap::new(),
            rng: SystemRandom::new(),
        }
    }
}

impl History {
    /// Restore what the store kept (channels whose home is this shard).
    pub fn restore(&mut self, loaded: Vec<LoadedChannel>, now_ms: i64) {
        for ch in loaded {
            let entries = ch
                .publications
                .into_iter()
                .filter(|p| p.expires_at_ms > now_ms && p.offset <= ch.top_offset)
                .map(|p| Entry {
                    offset: p.offset,
                    json: p.payload,
                    expires_ms: p.expires_at_ms,
                })
                .collect();
            self.channels.insert(
                Arc::from(ch.channel),
                ChannelState {
                    epoch: Arc::from(ch.epoch),
                    top: ch.top_offset,
                    entries,
                    touched_ms: now_ms,
                },
            );
        }
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    fn new_epoch(&self) -> Arc<str> {
        Arc::from(epoch_with(&self.rng))
    }

    fn state(&mut self, channel: &str, now_ms: i64) -> &mut ChannelState {
        if !self.channels.contains_key(channel) {
            let epoch = self.new_epoch();
            self.channels.insert(
                Arc::from(channel),
                ChannelState {
                    epoch,
                    top: 0,
                    entries: VecDeque::new(),
                    touched_ms: now_ms,
                },
            );
        }
        let st = self
            .channels
            .get_mut(channel)
            .expect("inserted above when missing");
        st.touched_ms = now_ms;
        st
    }

    /// The next offset of `channel` and its epoch.
    pub fn next_offset(&mut self, channel: &str, now_ms: i64) -> (u64, Arc<str>) {
        let st = self.state(channel, now_ms);
        st.top += 1;
        (st.top, st.epoch.clone())
    }

    /// Keep publication `offset` (already assigned) for `ttl_ms`, at most `size` per channel.
    pub fn keep(
        &mut self,
        channel: &str,
        offset: u64,
        json: Arc<[u8]>,
        now_ms: i64,
        ttl_ms: i64,
        size: usize,
    ) {
        if size == 0 {
            return;
        }
        let st = self.state(channel, now_ms);
        st.entries.push_back(Entry {
            offset,
            json,
            expires_ms: now_ms.saturating_add(ttl_ms),
        });
        while st.entries.len() > size {
            st.entries.pop_front();
        }
    }

    /// Recovery from `(since, epoch)`: everything published after `since`,
    /// or `complete: false` when that is no longer possible (other epoch,
    /// publications expired or trimmed, more than `max` missed, or a
    /// position from the future).
    pub fn recover(
        &mut self,
        channel: &str,
        since: u64,
        epoch: &str,
        max: usize,
        max_bytes: usize,
        now_ms: i64,
    ) -> Page {
        // A read creates no state: a channel never published has no epoch.
        let Some(st) = self.channels.get(channel) else {
            return Page {
                epoch: Arc::from(""),
                top: 0,
                publications: Vec::new(),
                complete: false,
            };
        };
        let mut page = Page {
            epoch: st.epoch.clone(),
            top: st.top,
            publications: Vec::new(),
            complete: false,
        };
        if &*st.epoch != epoch || since > st.top {
            return page;
        }
        if since == st.top {
            page.complete = true;
            return page;
        }
        let live: Vec<&Entry> = st
            .entries
            .iter()
            .filter(|e| e.offset > since && e.expires_ms > now_ms)
            .collect();
        // Complete only if the kept publications are exactly since+1..=top.
        let first = live.first().map(|e| e.offset);
        let gapless = first == Some(since + 1) && live.len() as u64 == st.top - since;
        let bytes: usize = live.iter().map(|e| e.json.len()).sum();
        if gapless && live.len() <= max && bytes <= max_bytes {
            page.publications = live.into_iter().map(|e| e.json.clone()).collect();
            page.complete = true;
        }
        page
    }

    /// A page of history: after `since` (ascending), or the latest `limit`.
    /// `complete` is false when more publications follow this page.
    /// At most `limit` publications and about `max_bytes` of them (at
    /// least one); `complete: false` says more follow.
    pub fn page(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        max_bytes: usize,
        now_ms: i64,
    ) -> Page {
        let Some(st) = self.channels.get(channel) else {
            return Page {
                epoch: Arc::from(""),
                top: 0,
                publications: Vec::new(),
                complete: true,
            };
        };
        let live = st.entries.iter().filter(|e| e.expires_ms > now_ms);
        let chosen: Vec<&Entry> = match since {
            Some(s) => live.filter(|e| e.offset > s).collect(),
            None => {
                let all: Vec<&Entry> = live.collect();
                let skip = all.len().saturating_sub(limit);
                all.into_iter().skip(skip).collect()
            }
        };
        let mut publications = Vec::new();
        let mut bytes = 0usize;
        for e in chosen.iter().take(limit) {
            if !publications.is_empty() && bytes + e.json.len() > max_bytes {
                break;
            }
            bytes += e.json.len();
            publications.push(e.json.clone());
        }
        Page {
            epoch: st.epoch.clone(),
            top: st.top,
            complete: publications.len() == chosen.len(),
            publications,
        }
    }

    /// Drop expired publications, and channels quiet for `idle_ms` with
    /// nothing kept (their epoch goes with them: offsets restart).
    pub fn sweep(&mut self, now_ms: i64, idle_ms: i64) {
        self.channels.retain(|_, st| {
            while st.entries.front().is_some_and(|e| e.expires_ms <= now_ms) {
                st.entries.pop_front();
            }
            !st.entries.is_empty() || now_ms.saturating_sub(st.touched_ms) < idle_ms
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    fn publish(h: &mut History, ch: &str, now: i64, size: usize) -> (u64, Arc<str>) {
        let (off, epoch) = h.next_offset(ch, now);
        h.keep(ch, off, j(&format!("{{\"o\":{off}}}")), now, 1000, size);
        (off, epoch)
    }

    #[test]
    fn offsets_ascend_and_recovery_returns_the_gap() {
        let mut h = History::default();
        let (o1, e) = publish(&mut h, "c", 0, 10);
        assert_eq!(o1, 1);
        for _ in 0..4 {
            publish(&mut h, "c", 0, 10);
        }
        let p = h.recover("c", 2, &e, 100, usize::MAX, 1);
        assert!(p.complete);
        assert_eq!(p.top, 5);
        assert_eq!(
            p.publications,
            vec![j("{\"o\":3}"), j("{\"o\":4}"), j("{\"o\":5}")]
        );
        let p = h.recover("c", 5, &e, 100, usize::MAX, 1);
        assert!(p.complete && p.publications.is_empty());
    }

    #[test]
    fn recovery_fails_honestly() {
        let mut h = History::default();
        let (_, e) = publish(&mut h, "c", 0, 3);
        for _ in 0..5 {
            publish(&mut h, "c", 0, 3);
        }
        // Kept: 4, 5, 6. From 1, publications 2 and 3 are gone.
        assert!(!h.recover("c", 1, &e, 100, usize::MAX, 1).complete);
        assert!(h.recover("c", 3, &e, 100, usize::MAX, 1).complete);
        assert!(
            !h.recover("c", 3, "other", 100, usize::MAX, 1).complete,
            "epoch"
        );
        assert!(
            !h.recover("c", 9, &e, 100, usize::MAX, 1).complete,
            "future"
        );
        assert!(
            !h.recover("c", 3, &e, 2, usize::MAX, 1).complete,
            "over max"
        );
        // Expired (ttl 1000 ms).
        assert!(!h.recover("c", 3, &e, 100, usize::MAX, 5000).complete);
    }

    #[test]
    fn unkept_channels_still_have_offsets() {
        let mut h = History::default();
        let (_, e) = publish(&mut h, "c", 0, 0);
        publish(&mut h, "c", 0, 0);
        let p = h.recover("c", 1, &e, 100, usize::MAX, 1);
        assert!(!p.complete);
        assert_eq!(p.top, 2);
    }

    #[test]
    fn pages_and_sweep() {
        let mut h = History::default();
        for _ in 0..10 {
            publish(&mut h, "c", 0, 100);
        }
        let e = h.page("c", None, 1, usize::MAX, 1).epoch;
        assert!(h.recover("c", 8, &e, 100, 100, 1).complete);
        assert!(
            !h.recover("c", 3, &e, 100, 10, 1).complete,
            "over the byte cap"
        );
        assert_eq!(
            h.recover("nope", 0, "", 100, usize::MAX, 1).epoch.as_ref(),
            ""
        );
        assert_eq!(h.channel_count(), 1, "reads create no state");
        let p = h.page("c", Some(2), 3, usize::MAX, 1);
        assert_eq!(p.publications.len(), 3);
        assert_eq!(p.publications[0], j("{\"o\":3}"));
        assert!(!p.complete);
        let p = h.page("c", Some(7), 3, usize::MAX, 1);
        assert_eq!(p.publications.len(), 3);
        assert!(p.complete);
        let p = h.page("c", None, 2, usize::MAX, 1);
        assert_eq!(p.publications, vec![j("{\"o\":9}"), j("{\"o\":10}")]);
        let small = h.page("c", Some(0), 10, 16, 1);
        assert_eq!(
            small.publications.len(),
            2,
            "about 16 bytes: two 7-byte entries"
        );
        assert!(!small.complete);
        let epoch = p.epoch.clone();
        h.sweep(500, 10_000);
        assert_eq!(h.channel_count(), 1);
        h.sweep(5000, 10_000);
        assert_eq!(h.channel_count(), 1, "quiet less than idle");
        h.sweep(20_000, 10_000);
        assert_eq!(h.channel_count(), 0);
        let (o, e2) = h.next_offset("c", 20_001);
        assert_eq!(o, 1);
        assert_ne!(e2, epoch, "lost history means a new epoch");
    }
}
