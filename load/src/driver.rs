//! The run loop every mode shares: one mio poll loop through the stages
//! setup, warmup, measure, drain and close.
//!
//! * setup: the mode dials and upgrades its connections ([`Mode::setup`]
//!   at the top of every turn says when it is done); then [`Mode::begin`]
//!   starts the traffic;
//! * warmup: traffic, not counted, for `Plan::warmup` (ends early when
//!   [`Mode::live`] says no traffic can flow any more);
//! * measure: counted, for `Plan::duration` (same early end); the server
//!   (`--pid`) and, if asked, this process are sampled from /proc at both
//!   ends;
//! * drain: nothing new is sent; until [`Mode::drained`] or
//!   `Plan::drain_timeout`;
//! * close: [`Mode::finish`] makes the verdicts final and sends close
//!   frames; until [`Mode::closed`] or `Plan::close_timeout`.
//!
//! Every turn polls once (never longer than `Plan::tick` once set up) and
//! hands the readiness events to [`Mode::serve`]. The mode owns its
//! connections and counters; the loop owns the poll, the shared read
//! buffer, the clock of the stages and the samples ([`Timing`]).

use std::io;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use mio::{Events, Poll, Registry, Token};

use crate::net::{self, Fail, Link, SourcePorts};

use crate::procfs::{self, Delta, Sample};

/// How often setup deadlines are checked (dialing modes).
pub const TIMEOUT_SCAN: Duration = Duration::from_millis(100);
/// Connections dialed per loop turn at most.
const DIAL_BATCH: usize = 64;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Setup,
    Warmup,
    Measure,
    Drain,
    Close,
}

/// How a run is timed and sized.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The server to sample at both ends of the measured window.
    pub pid: Option<u32>,
    pub warmup: Duration,
    pub duration: Duration,
    /// After the measured window, how long to wait for what is in flight.
    pub drain_timeout: Duration,
    /// How long to wait for the server's side of the closing handshakes.
    pub close_timeout: Duration,
    /// Longest poll wait after setup.
    pub tick: Duration,
    /// Readiness events taken per poll.
    pub events: usize,
    /// The read buffer every connection reads into.
    pub read_buf: usize,
    /// Also sample the server once before anything is dialed (a baseline).
    pub baseline: bool,
    /// Sample this process's CPU over the measured window too.
    pub client: bool,
}

/// One turn of the loop as the mode sees it.
pub struct Turn<'a> {
    pub stage: Stage,
    pub registry: &'a Registry,
    /// One read lands here (shared by all connections).
    pub rbuf: &'a mut [u8],
}

impl Turn<'_> {
    /// New traffic may be sent (warmup and measure).
    pub fn sending(&self) -> bool {
        matches!(self.stage, Stage::Warmup | Stage::Measure)
    }

    /// What completes now is counted.
    pub fn measuring(&self) -> bool {
        self.stage == Stage::Measure
    }

    /// Verdicts are not final yet (until the drain ends).
    pub fn verifying(&self) -> bool {
        self.stage <= Stage::Drain
    }
}

/// What a mode supplies to the loop.
pub trait Mode {
    /// One setup step at the top of a turn: dial what is due, expire what
    /// took too long. `Ok(true)` once setup is over; `Err` ends the run.
    fn setup(&mut self, now: Instant, registry: &Registry) -> Result<bool, String>;

    /// How long to wait for events during setup.
    fn setup_wait(&self, now: Instant) -> Duration;

    /// Setup ended at `at`: start the traffic (the turn's stage is
    /// warmup). False when there is nothing to measure: straight to the
    /// drain, the window empty.
    fn begin(&mut self, at: Instant, turn: &mut Turn<'_>) -> bool;

    /// Traffic can still flow; when not, warmup and measurement end early.
    fn live(&self) -> bool;

    /// Nothing is in flight any more: the drain may end.
    fn drained(&self) -> bool;

    /// The drain is over: make the verdicts final, send close frames.
    fn finish(&mut self, registry: &Registry);

    /// Every connection is gone: the run may end.
    fn closed(&self) -> bool;

    /// A shorter poll wait when something is due soon.
    fn wait_cap(&self) -> Option<Duration> {
        None
    }

    /// One turn's readiness events.
    fn serve(&mut self, events: &Events, turn: &mut Turn<'_>);
}

/// When the stages happened and what the samples read.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start: Instant,
    pub setup_end: Instant,
    /// The measured window.
    pub window: (Instant, Instant),
    /// The server before anything was dialed (with `Plan::baseline`).
    pub baseline: Option<Sample>,
    /// The server at both ends of the window.
    pub server: (Option<Sample>, Option<Sample>),
    /// This process at both ends of the window (with `Plan::client`).
    pub client: (Option<Sample>, Option<Sample>),
}

impl Timing {
    pub fn setup_s(&self) -> f64 {
        self.setup_end
            .saturating_duration_since(self.start)
            .as_secs_f64()
    }

    pub fn window_s(&self) -> f64 {
        self.window
            .1
            .saturating_duration_since(self.window.0)
            .as_secs_f64()
    }

    /// The server over the measured window.
    pub fn server(&self) -> Option<Delta> {
        delta(self.server.0, self.server.1)
    }

    /// This process over the measured window.
    pub fn client(&self) -> Option<Delta> {
        delta(self.client.0, self.client.1)
    }
}

pub fn delta(a: Option<Sample>, b: Option<Sample>) -> Option<Delta> {
    a.zip(b).map(|(a, b)| Delta::between(&a, &b))
}

/// The poll, the read buffer and the clock of one run.
pub struct Driver {
    plan: Plan,
    pid: Option<String>,
    poll: Poll,
    events: Events,
    rbuf: Vec<u8>,
    baseline: Option<Sample>,
    start: Instant,
}

impl Driver {
    pub fn new(plan: Plan) -> Result<Driver, String> {
        let pid = plan.pid.map(|p| p.to_string());
        let baseline = if plan.baseline {
            sample(pid.as_deref())?
        } else {
            None
        };
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let events = Events::with_capacity(plan.events);
        let rbuf = vec![0u8; plan.read_buf];
        Ok(Driver {
            plan,
            pid,
            poll,
            events,
            rbuf,
            baseline,
            start: Instant::now(),
        })
    }

    /// Where connections are registered.
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// When the run started (setup is timed from here).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Run `mode` through every stage.
    pub fn run(self, mode: &mut impl Mode) -> Result<Timing, String> {
        let Driver {
            plan,
            pid,
            mut poll,
            mut events,
            mut rbuf,
            baseline,
            start,
        } = self;
        let pid = pid.as_deref();
        let mut t = Timing {
            start,
            setup_end: start,
            window: (start, start),
            baseline,
            server: (None, None),
            client: (None, None),
        };
        let mut stage = Stage::Setup;
        let mut t_warm = start;
        let mut t_end = start;
        let mut deadline = start;
        loop {
            let mut now = Instant::now();
            if stage == Stage::Setup && mode.setup(now, poll.registry())? {
                t.setup_end = Instant::now();
                t_warm = t.setup_end + plan.warmup;
                t_end = t_warm + plan.duration;
                deadline = t_warm;
                stage = Stage::Warmup;
                let mut turn = Turn {
                    stage,
                    registry: poll.registry(),
                    rbuf: &mut rbuf,
                };
                if !mode.begin(t.setup_end, &mut turn) {
                    stage = Stage::Drain;
                    t.server.0 = sample(pid)?;
                    t.server.1 = t.server.0;
                    t.window = (t.setup_end, t.setup_end);
                }
                now = Instant::now();
            }
            if stage == Stage::Warmup && (now >= t_warm || !mode.live()) {
                stage = Stage::Measure;
                deadline = t_end;
                t.server.0 = sample(pid)?;
                if plan.client {
                    t.client.0 = procfs::sample("self").ok();
                }
                t.window.0 = Instant::now();
            }
            if stage == Stage::Measure && (now >= t_end || !mode.live()) {
                t.server.1 = sample(pid)?;
                if plan.client {
                    t.client.1 = procfs::sample("self").ok();
                }
                t.window.1 = Instant::now();
                stage = Stage::Drain;
                deadline = now + plan.drain_timeout;
            }
            if stage == Stage::Drain && (now >= deadline || mode.drained()) {
                mode.finish(poll.registry());
                stage = Stage::Close;
                deadline = now + plan.close_timeout;
            }
            if stage == Stage::Close && (now >= deadline || mode.closed()) {
                break;
            }
            let mut wait = if stage == Stage::Setup {
                mode.setup_wait(now)
            } else {
                deadline.saturating_duration_since(now).min(plan.tick)
            };
            if let Some(cap) = mode.wait_cap() {
                wait = wait.min(cap);
            }
            match poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let mut turn = Turn {
                stage,
                registry: poll.registry(),
                rbuf: &mut rbuf,
            };
            mode.serve(&events, &mut turn);
        }
        Ok(t)
    }
}

fn sample(pid: Option<&str>) -> Result<Option<Sample>, String> {
    pid.map(procfs::sample).transpose()
}

/// Connections dialed at a fixed rate during setup, and the scan that
/// gives up on those whose setup took too long.
pub struct Ramp {
    start: Instant,
    /// Connections per second.
    rate: f64,
    /// Connections to dial in all.
    total: usize,
    next_scan: Instant,
    /// Connections before this one are settled (they were started in
    /// order, so only a prefix can have expired).
    scan_from: usize,
}

impl Ramp {
    pub fn new(start: Instant, rate: f64, total: usize) -> Ramp {
        Ramp {
            start,
            rate,
            total,
            next_scan: start + TIMEOUT_SCAN,
            scan_from: 0,
        }
    }

    /// Connections that should have been started by `now`.
    pub fn due(&self, now: Instant) -> usize {
        (now.saturating_duration_since(self.start).as_secs_f64() * self.rate).floor() as usize + 1
    }

    /// Dial up to here this turn, `dialed` being dialed already: a bounded
    /// batch, so events are served between batches even when dialing falls
    /// behind the schedule.
    pub fn batch_end(&self, now: Instant, dialed: usize) -> usize {
        self.due(now).min(self.total).min(dialed + DIAL_BATCH)
    }

    /// Dial the connections due by `now` (a batch): number `i` from the
    /// source addresses, registered as `Token(i)`. `add` makes the item
    /// from the time its dial began and the link (or why it failed).
    pub fn dial_due<T>(
        &self,
        now: Instant,
        items: &mut Vec<T>,
        sources: &mut SourcePorts,
        addr: SocketAddr,
        registry: &Registry,
        mut add: impl FnMut(Instant, Result<Link, Fail>) -> T,
    ) {
        let end = self.batch_end(now, items.len());
        while items.len() < end {
            let i = items.len();
            let began = Instant::now();
            let link = net::open(sources.dial(i, addr), registry, Token(i));
            items.push(add(began, link));
        }
    }

    /// How long to wait for events while `dialed` are dialed.
    pub fn wait(&self, now: Instant, dialed: usize) -> Duration {
        if dialed < self.total && dialed >= self.due(now) {
            let next = self.start + Duration::from_secs_f64(dialed as f64 / self.rate);
            next.saturating_duration_since(now)
                .min(Duration::from_millis(10))
        } else if dialed < self.total {
            // Behind schedule: just collect what is ready.
            Duration::ZERO
        } else {
            TIMEOUT_SCAN
        }
    }

    /// Is it time to look for expired setups (every [`TIMEOUT_SCAN`])?
    pub fn scan_due(&mut self, now: Instant) -> bool {
        if now < self.next_scan {
            return false;
        }
        self.next_scan = now + TIMEOUT_SCAN;
        true
    }

    /// Expire the connections whose setup began more than `timeout` ago:
    /// `pending` gives the start of a connection still in setup,
    /// `expire` gives up on one.
    pub fn expire<T>(
        &mut self,
        items: &mut [T],
        now: Instant,
        timeout: Duration,
        pending: impl Fn(&T) -> Option<Instant>,
        mut expire: impl FnMut(&mut T),
    ) {
        while let Some(item) = items.get_mut(self.scan_from) {
            if let Some(started) = pending(item) {
                if now.saturating_duration_since(started) < timeout {
                    break;
                }
                expire(item);
            }
            self.scan_from += 1;
        }
    }
}

/// Raise the soft open-file limit to the hard limit (every connection is a
/// descriptor): the limits before, now and the hard one.
pub fn raise_fd_limit() -> io::Result<(u64, u64, u64)> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    let (now, _) = rlimit::Resource::NOFILE.get()?;
    Ok((soft, now, hard))
}

/// Raise the open-file limit and warn when `needed` descriptors will not
/// fit (`what`: "N connections", then the rest of the sentence). The limit
/// now in force.
pub fn fd_limit(needed: u64, what: &str) -> io::Result<u64> {
    let (_, limit, _) = raise_fd_limit()?;
    if needed > limit {
        eprintln!("switchboard-load: warning: the open-file limit is {limit}; {what}");
    }
    Ok(limit)
}

/// A number of seconds (fractions allowed, an "s" suffix too) on the command line.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=1e7).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A per-run value that makes every run's WebSocket keys different.
pub fn run_nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_schedule() {
        let start = Instant::now();
        let r = Ramp::new(start, 1000.0, 10);
        assert_eq!(r.due(start), 1);
        assert_eq!(r.due(start + Duration::from_millis(5)), 6);
        assert_eq!(r.batch_end(start + Duration::from_secs(1), 0), 10);
        assert_eq!(r.wait(start, 10), TIMEOUT_SCAN);
        assert_eq!(r.wait(start + Duration::from_millis(5), 2), Duration::ZERO);
        assert!(r.wait(start, 1) <= Duration::from_millis(10));
    }

    #[test]
    fn expiry_scans_a_prefix() {
        let start = Instant::now();
        let mut r = Ramp::new(start, 1000.0, 3);
        let t = Duration::from_secs(1);
        // (started, expired)
        let mut items = vec![(start, false), (start + t, false), (start, false)];
        r.expire(
            &mut items,
            start + t,
            t,
            |i| (!i.1).then_some(i.0),
            |i| i.1 = true,
        );
        assert_eq!(
            items.iter().map(|i| i.1).collect::<Vec<_>>(),
            [true, false, false],
            "stops at the first one still in time"
        );
        assert_eq!(r.scan_from, 1);
    }
}
