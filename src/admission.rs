//! Admission control shared by every shard and the acceptor: the count of
//! open WebSocket connections against `max_connections`, and the per-IP
//! connection rate limit. A leaf: atomics and one small locked map.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Limits on open WebSocket connections, shared by all shards.
#[derive(Debug)]
pub struct Admission {
    open: AtomicUsize,
    max: usize,
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Admission {
            open: AtomicUsize::new(0),
            max,
        }
    }
    /// Take a slot; false at the limit.
    pub fn try_acquire(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }
    pub fn release(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// New connections per client IP in a fixed one-minute window (seed 001:
/// 10 per minute). Touched once per accepted connection, never per message;
/// with the acceptor thread only that thread takes the lock.
pub struct IpLimiter {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl IpLimiter {
    pub fn new(per_minute: u32) -> Self {
        IpLimiter {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Count a connection from `ip`; true if it is over the limit.
    pub fn is_limited(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let mut seen = self.seen.lock();
        if seen.len() >= 65_536 {
            // Bound the map: forget windows that have ended.
            seen.retain(|_, (start, _)| now.saturating_duration_since(*start) < RATE_WINDOW);
        }
        let entry = seen.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= RATE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 > self.per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_window() {
        let l = IpLimiter::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.is_limited(ip, t0));
        assert!(!l.is_limited(ip, t0));
        assert!(!l.is_limited(ip, t0));
        assert!(l.is_limited(ip, t0));
        assert!(!l.is_limited(other, t0));
        assert!(!l.is_limited(ip, t0 + RATE_WINDOW));
        assert!(!IpLimiter::new(0).is_limited(ip, t0));
    }
}
