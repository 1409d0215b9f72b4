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
//!
//! Kept publications have a byte budget per shard (its share of
//! `history.max_bytes`): past it the shard's oldest kept publication goes
//! first, whatever its channel. The channel keeps its epoch and offsets, so
//! a recovery from before the first publication still kept answers
//! `recovered: false`, as after a trim to `history.size`.

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
    /// Which incarnation of the channel's state this is (a channel dropped
    /// and published again is a new one): tells stale `order` records apart.
    generation: u64,
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

/// One kept publication in the order publications were kept.
#[derive(Debug)]
struct Kept {
    channel: Arc<str>,
    generation: u64,
    offset: u64,
}

/// The histories of the channels whose home is this shard.
pub struct History {
    channels: HashMap<Arc<str>, ChannelState>,
    rng: SystemRandom,
    /// Bytes of kept publications (their JSON text).
    bytes: usize,
    /// Publications kept, over all channels.
    kept: usize,
    /// Most `bytes` this shard keeps (its share of `history.max_bytes`).
    budget: usize,
    /// Kept publications, oldest first. A channel loses publications only
    /// from its front (trim, expiry, budget), so a record is stale when its
    /// channel's state is another generation or its first kept offset is
    /// past the record's; stale records are skipped at the front and
    /// dropped when they outnumber the live ones.
    order: VecDeque<Kept>,
    next_generation: u64,
    /// Publications dropped by the byte budget (a counter).
    evicted: u64,
}

impl Default for History {
    fn default() -> Self {
        History::new(usize::MAX)
    }
}

impl History {
    /// A shard's histories, keeping at most `budget` bytes of publications.
    pub fn new(budget: usize) -> History {
        History {
            channels: HashMap::new(),
            rng: SystemRandom::new(),
            bytes: 0,
            kept: 0,
            budget,
            order: VecDeque::new(),
            next_generation: 0,
            evicted: 0,
        }
    }

    /// Restore what the store kept (channels whose home is this shard),
    /// oldest publication first within the byte budget.
    pub fn restore(&mut self, loaded: Vec<LoadedChannel>, now_ms: i64) {
        let mut order: Vec<(i64, Kept)> = Vec::new();
        for ch in loaded {
            let channel: Arc<str> = Arc::from(ch.channel);
            let generation = self.generation();
            let entries: VecDeque<Entry> = ch
                .publications
                .into_iter()
                .filter(|p| p.expires_at_ms > now_ms && p.offset <= ch.top_offset)
                .map(|p| {
                    order.push((
                        p.at_ms,
                        Kept {
                            channel: channel.clone(),
                            generation,
                            offset: p.offset,
                        },
                    ));
                    Entry {
                        offset: p.offset,
                        json: p.payload,
                        expires_ms: p.expires_at_ms,
                    }
                })
                .collect();
            self.bytes += entries.iter().map(|e| e.json.len()).sum::<usize>();
            self.kept += entries.len();
            self.channels.insert(
                channel,
                ChannelState {
                    generation,
                    epoch: Arc::from(ch.epoch),
                    top: ch.top_offset,
                    entries,
                    touched_ms: now_ms,
                },
            );
        }
        // Oldest first by publication time. A channel loses publications
        // from its front only, so its own records must stay in offset order
        // even if the wall clock went back: the k-th record of a channel
        // names its k-th offset.
        order.sort_by_key(|(at, _)| *at);
        let mut offsets: HashMap<Arc<str>, VecDeque<u64>> = HashMap::new();
        for (_, k) in &order {
            offsets
                .entry(k.channel.clone())
                .or_default()
                .push_back(k.offset);
        }
        for v in offsets.values_mut() {
            v.make_contiguous().sort_unstable();
        }
        for (_, mut k) in order {
            if let Some(o) = offsets.get_mut(&k.channel).and_then(VecDeque::pop_front) {
                k.offset = o;
            }
            self.order.push_back(k);
        }
        self.enforce_budget();
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Bytes of publications kept on this shard.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Publications dropped so far because the byte budget was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Whether `k` still names a kept publication.
    fn live(&self, k: &Kept) -> bool {
        self.channels.get(&k.channel).is_some_and(|st| {
            st.generation == k.generation
                && st.entries.front().is_some_and(|e| e.offset <= k.offset)
        })
    }

    /// Drop the oldest kept publications until the budget holds.
    fn enforce_budget(&mut self) {
        while self.bytes > self.budget {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if !self.live(&k) {
                continue;
            }
            if let Some(st) = self.channels.get_mut(&k.channel)
                && let Some(e) = st.entries.pop_front()
            {
                self.bytes -= e.json.len();
                self.kept -= 1;
                self.evicted += 1;
            }
        }
        // Records of publications trimmed or expired meanwhile: once they
        // outnumber the live ones, keep only the live ones (amortised O(1)).
        if self.order.len() > 2 * self.kept + 64 {
            let order = std::mem::take(&mut self.order);
            self.order = order.into_iter().filter(|k| self.live(k)).collect();
        }
    }

    fn new_epoch(&self) -> Arc<str> {
        Arc::from(epoch_with(&self.rng))
    }

    fn state(&mut self, channel: &str, now_ms: i64) -> &mut ChannelState {
        if !self.channels.contains_key(channel) {
            let epoch = self.new_epoch();
            let generation = self.generation();
            self.channels.insert(
                Arc::from(channel),
                ChannelState {
                    generation,
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
        let len = json.len();
        let st = self.state(channel, now_ms);
        let generation = st.generation;
        st.entries.push_back(Entry {
            offset,
            json,
            expires_ms: now_ms.saturating_add(ttl_ms),
        });
        let (mut freed, mut dropped) = (0, 0);
        while st.entries.len() > size {
            if let Some(e) = st.entries.pop_front() {
                freed += e.json.len();
                dropped += 1;
            }
        }
        self.bytes = self.bytes + len - freed;
        self.kept = self.kept + 1 - dropped;
        // The key is shared with the channel map's (no copy of the name).
        if let Some((name, _)) = self.channels.get_key_value(channel) {
            self.order.push_back(Kept {
                channel: name.clone(),
                generation,
                offset,
            });
        }
        self.enforce_budget();
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
        let (mut freed, mut dropped) = (0, 0);
        self.channels.retain(|_, st| {
            while st.entries.front().is_some_and(|e| e.expires_ms <= now_ms) {
                if let Some(e) = st.entries.pop_front() {
                    freed += e.json.len();
                    dropped += 1;
                }
            }
            !st.entries.is_empty() || now_ms.saturating_sub(st.touched_ms) < idle_ms
        });
        self.bytes -= freed;
        self.kept -= dropped;
        self.enforce_budget(); // compacts `order`
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
    fn the_byte_budget_drops_the_oldest_publication_of_any_channel() {
        // Entries are `{"o":N}`: 7 bytes for N < 10.
        let mut h = History::new(70);
        let (_, ea) = publish(&mut h, "a", 0, 100);
        for _ in 0..4 {
            publish(&mut h, "a", 0, 100);
        }
        let (_, eb) = publish(&mut h, "b", 0, 100);
        for _ in 0..4 {
            publish(&mut h, "b", 0, 100);
        }
        assert_eq!((h.bytes(), h.evicted()), (70, 0), "exactly the budget");
        publish(&mut h, "b", 0, 100); // b@6: a@1, the oldest, goes
        assert_eq!((h.bytes(), h.evicted()), (70, 1));
        assert!(!h.recover("a", 0, &ea, 100, usize::MAX, 1).complete);
        let p = h.recover("a", 1, &ea, 100, usize::MAX, 1);
        assert!(p.complete && p.publications.len() == 4);
        assert!(h.recover("b", 0, &eb, 100, usize::MAX, 1).complete);
        // The epoch and the offsets go on: only history was dropped.
        for _ in 0..5 {
            publish(&mut h, "b", 0, 100);
        }
        // a@2..5, then b@1 and b@2 (from b@10 on an entry takes 8 bytes).
        assert_eq!(h.evicted(), 7);
        let p = h.recover("a", 5, &ea, 100, usize::MAX, 1);
        assert!(p.complete && p.publications.is_empty() && p.top == 5);
        assert_eq!(h.next_offset("a", 1), (6, ea));
        assert!(h.bytes() <= 70);
    }

    #[test]
    fn stale_order_records_stay_bounded_and_are_skipped() {
        let mut h = History::new(1000);
        // Trimmed to 2 per channel: nearly every record goes stale.
        for i in 0..10_000 {
            publish(&mut h, if i % 2 == 0 { "a" } else { "b" }, 0, 2);
        }
        assert_eq!(h.kept, 4);
        assert!(h.order.len() <= 2 * h.kept + 64 + 1, "{}", h.order.len());
        // A channel dropped and published again is a new generation: its
        // old records do not evict the new publications.
        h.sweep(5_000, 10); // expired (ttl 1000) and idle: both dropped
        assert_eq!((h.channel_count(), h.bytes(), h.kept), (0, 0, 0));
        let mut h2 = History::new(14);
        publish(&mut h2, "a", 0, 100);
        h2.sweep(5_000, 10);
        let (o, e) = publish(&mut h2, "a", 5_000, 100);
        assert_eq!(o, 1);
        publish(&mut h2, "a", 5_000, 100);
        assert_eq!((h2.bytes(), h2.evicted()), (14, 0));
        publish(&mut h2, "a", 5_000, 100);
        assert_eq!((h2.bytes(), h2.evicted()), (14, 1));
        assert!(h2.recover("a", 1, &e, 100, usize::MAX, 5_001).complete);
    }

    #[test]
    fn restore_keeps_the_newest_within_the_budget() {
        use crate::store::StoredPublication;
        let ch = |name: &str, at: &[i64]| LoadedChannel {
            channel: name.into(),
            epoch: "e".into(),
            top_offset: at.len() as u64,
            publications: at
                .iter()
                .enumerate()
                .map(|(i, &at_ms)| StoredPublication {
                    offset: i as u64 + 1,
                    payload: j("0123456789"),
                    at_ms,
                    expires_at_ms: i64::MAX,
                })
                .collect(),
        };
        let mut h = History::new(40);
        h.restore(vec![ch("a", &[1, 2, 5]), ch("b", &[3, 4, 6])], 0);
        // 60 bytes stored, 40 kept: a@1 (t=1) and a@2 (t=2) go.
        assert_eq!((h.bytes(), h.evicted()), (40, 2));
        assert!(!h.recover("a", 0, "e", 100, usize::MAX, 1).complete);
        assert!(h.recover("a", 2, "e", 100, usize::MAX, 1).complete);
        assert!(h.recover("b", 0, "e", 100, usize::MAX, 1).complete);
        // Stored times that go back (the wall clock did): a channel still
        // loses its oldest offset first, and every publication stays
        // evictable.
        let mut h = History::new(20);
        h.restore(vec![ch("c", &[9, 8, 7])], 0);
        assert_eq!((h.bytes(), h.evicted()), (20, 1));
        assert!(h.recover("c", 1, "e", 100, usize::MAX, 1).complete);
        publish(&mut h, "c", 10, 100); // c@4, 7 bytes: c@2 goes
        assert_eq!((h.bytes(), h.evicted()), (17, 2));
        assert!(h.recover("c", 2, "e", 100, usize::MAX, 11).complete);
        for _ in 0..3 {
            publish(&mut h, "c", 10, 100);
        }
        assert!(h.bytes() <= 20 && h.kept == 2, "{} {}", h.bytes(), h.kept);
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
