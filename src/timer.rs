//! Hashed timer wheel: O(1) insert and cancel, expiry cost proportional to the
//! timers that are due (plus those sharing their slot).
//!
//! Each shard owns one wheel for every per-connection deadline (handshake,
//! heartbeat ping, pong, close linger). Entries live in a slab and form a
//! doubly linked list per slot, so cancelling is an unlink, never a search.
//! Time is counted in ticks of a fixed length since the wheel was created;
//! a deadline is rounded up to the next tick, never fires early, and fires at
//! most one tick late (plus however long the loop was busy).

use std::time::{Duration, Instant};

use slab::Slab;

const NIL: usize = usize::MAX;

/// Handle returned by [`TimerWheel::insert`]; pass it to `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerKey(usize);

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    slot: usize,
    value: T,
    prev: usize,
    next: usize,
}

#[derive(Debug)]
pub struct TimerWheel<T> {
    slots: Box<[usize]>,
    mask: u64,
    entries: Slab<Entry<T>>,
    /// Every tick `< next_tick` has been processed.
    next_tick: u64,
    /// A timer was inserted for a tick already processed; it sits in slot
    /// `next_tick` and fires on the next `expire`, even within the same tick.
    overdue: bool,
    tick: Duration,
    origin: Instant,
}

impl<T> TimerWheel<T> {
    /// `slots` is rounded up to a power of two. 512 slots of 100 ms span 51 s:
    /// a 30 s heartbeat lands in one lap, so expiry rarely steps over entries
    /// that belong to a later lap.
    pub fn new(tick: Duration, slots: usize) -> Self {
        let n = slots.max(2).next_power_of_two();
        TimerWheel {
            slots: vec![NIL; n].into_boxed_slice(),
            mask: n as u64 - 1,
            entries: Slab::new(),
            next_tick: 0,
            overdue: false,
            tick: tick.max(Duration::from_millis(1)),
            origin: Instant::now(),
        }
    }

    /// Length of one tick.
    pub fn tick_len(&self) -> Duration {
        self.tick
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tick that contains `at` (ticks elapsed since the wheel's origin).
    pub fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        (d.as_nanos() / self.tick.as_nanos()) as u64
    }

    /// Schedule `value` to fire once `after` has passed from `now`.
    pub fn insert(&mut self, now: Instant, after: Duration, value: T) -> TimerKey {
        let d = now
            .saturating_duration_since(self.origin)
            .saturating_add(after);
        // Round up: a timer never fires before its deadline. A deadline past
        // u64::MAX ticks saturates (it never fires) instead of wrapping.
        let tick = u64::try_from(d.as_nanos().div_ceil(self.tick.as_nanos())).unwrap_or(u64::MAX);
        self.insert_at_tick(tick, value)
    }

    /// Schedule at an absolute tick. A tick already processed fires on the next `expire`.
    pub fn insert_at_tick(&mut self, tick: u64, value: T) -> TimerKey {
        let deadline = tick;
        if tick < self.next_tick {
            self.overdue = true;
        }
        let slot = (tick.max(self.next_tick) & self.mask) as usize;
        let head = self.slots.get(slot).copied().unwrap_or(NIL);
        let key = self.entries.insert(Entry {
            deadline,
            slot,
            value,
            prev: NIL,
            next: head,
        });
        if let Some(h) = self.entries.get_mut(head) {
            h.prev = key;
        }
        if let Some(s) = self.slots.get_mut(slot) {
            *s = key;
        }
        TimerKey(key)
    }

    /// Remove a pending timer; returns its value, or `None` if it already fired.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let e = self.entries.try_remove(key.0)?;
        self.unlink(e.prev, e.next, e.slot);
        Some(e.value)
    }

    fn unlink(&mut self, prev: usize, next: usize, slot: usize) {
        if let Some(p) = self.entries.get_mut(prev) {
            p.next = next;
        } else if let Some(s) = self.slots.get_mut(slot) {
            *s = next;
        }
        if let Some(n) = self.entries.get_mut(next) {
            n.prev = prev;
        }
    }

    /// Move every timer whose deadline tick is `<= tick_of(now)` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        let now_tick = self.tick_of(now);
        let start = self.next_tick;
        self.next_tick = start.max(now_tick + 1);
        let overdue = std::mem::take(&mut self.overdue);
        if self.entries.is_empty() {
            return;
        }
        let end = if now_tick >= start {
            // After a long stall, one lap visits every slot: no need to go further.
            now_tick.min(start + self.mask)
        } else if overdue {
            start // same tick as the last call: only the overdue slot
        } else {
            return;
        };
        for t in start..=end {
            let slot = (t & self.mask) as usize;
            let mut cur = self.slots.get(slot).copied().unwrap_or(NIL);
            while cur != NIL {
                let Some(e) = self.entries.get(cur) else {
                    break;
                };
                let (next, deadline) = (e.next, e.deadline);
                if deadline <= now_tick
                    && let Some(e) = self.entries.try_remove(cur)
                {
                    self.unlink(e.prev, e.next, e.slot);
                    out.push(e.value);
                }
                cur = next;
            }
        }
    }

    /// How long the loop may sleep before the next tick needs processing;
    /// `None` when no timer is pending.
    pub fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.entries.is_empty() {
            return None;
        }
        let next_at = self.origin + self.tick * (self.next_tick.min(u32::MAX as u64) as u32);
        Some(next_at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A tiny deterministic generator (tests must not depend on a clock or RNG crate).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn matches_a_simple_model() {
        let tick = Duration::from_millis(10);
        let mut wheel: TimerWheel<u32> = TimerWheel::new(tick, 16);
        let origin = wheel.origin;
        // Model: id -> deadline tick.
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut keys: BTreeMap<u32, TimerKey> = BTreeMap::new();
        let mut rng = Lcg(42);
        let mut now_tick = 0u64;
        let mut next_id = 0u32;
        let mut fired = Vec::new();
        for _ in 0..20_000 {
            match rng.next() % 10 {
                0..=4 => {
                    // Insert at up to 3 laps away (exercises entries from later laps).
                    let after = rng.next() % 50;
                    let now = origin + tick * now_tick as u32;
                    let key = wheel.insert(now, tick * after as u32, next_id);
                    model.insert(next_id, now_tick + after);
                    keys.insert(next_id, key);
                    next_id += 1;
                }
                5 | 6 => {
                    if let Some((&id, _)) = model.iter().nth((rng.next() % 8) as usize) {
                        let key = keys.remove(&id).unwrap();
                        assert_eq!(wheel.cancel(key), Some(id));
                        model.remove(&id);
                    }
                }
                _ => {
                    now_tick += rng.next() % 40;
                    let now = origin + tick * now_tick as u32;
                    fired.clear();
                    wheel.expire(now, &mut fired);
                    fired.sort_unstable();
                    let due: Vec<u32> = model
                        .iter()
                        .filter(|&(_, &d)| d <= now_tick)
                        .map(|(&id, _)| id)
                        .collect();
                    assert_eq!(fired, due, "at tick {now_tick}");
                    for id in &due {
                        model.remove(id);
                        let key = keys.remove(id).unwrap();
                        assert_eq!(wheel.cancel(key), None, "fired timer cannot be cancelled");
                    }
                }
            }
            assert_eq!(wheel.len(), model.len());
        }
    }

    #[test]
    fn never_fires_early() {
        let tick = Duration::from_millis(100);
        let mut wheel = TimerWheel::new(tick, 8);
        let t0 = wheel.origin;
        wheel.insert(t0, Duration::from_millis(250), ());
        let mut out = Vec::new();
        wheel.expire(t0 + Duration::from_millis(299), &mut out);
        assert!(out.is_empty());
        wheel.expire(t0 + Duration::from_millis(300), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn absurd_durations_never_fire_and_never_panic() {
        let tick = Duration::from_millis(100);
        let mut wheel = TimerWheel::new(tick, 8);
        let t0 = wheel.origin + Duration::from_secs(5);
        wheel.insert(t0, Duration::from_secs(1_844_674_407_370_955_162), 1);
        wheel.insert(t0, Duration::MAX, 2);
        let mut out = Vec::new();
        wheel.expire(t0 + Duration::from_millis(500), &mut out);
        wheel.expire(t0 + Duration::from_secs(86_400 * 365), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn stall_longer_than_a_lap_fires_everything_due() {
        let tick = Duration::from_millis(1);
        let mut wheel = TimerWheel::new(tick, 4);
        let t0 = wheel.origin;
        for i in 0..20u32 {
            wheel.insert(t0, Duration::from_millis(i as u64), i);
        }
        let mut out = Vec::new();
        wheel.expire(t0 + Duration::from_millis(1000), &mut out);
        assert_eq!(out.len(), 20);
        assert!(wheel.is_empty());
        assert_eq!(wheel.poll_timeout(t0), None);
    }

    #[test]
    fn cancel_head_middle_tail() {
        let mut wheel = TimerWheel::new(Duration::from_millis(1), 2);
        let t0 = wheel.origin;
        let k: Vec<TimerKey> = (0..5)
            .map(|i| wheel.insert(t0, Duration::ZERO, i))
            .collect();
        assert_eq!(wheel.cancel(k[4]), Some(4)); // head of the slot list
        assert_eq!(wheel.cancel(k[2]), Some(2));
        assert_eq!(wheel.cancel(k[0]), Some(0)); // tail
        let mut out = Vec::new();
        wheel.expire(t0 + Duration::from_millis(1), &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![1, 3]);
    }
}
