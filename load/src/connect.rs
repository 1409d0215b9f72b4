//! Connect mode: open K connections at a fixed rate (spread over loopback
//! source addresses so no source runs out of ports), upgrade each, hold them
//! idle while answering the server's pings, then close them cleanly.
//!
//! Stages: ramp (until every attempt has opened or failed), hold, close.
//! With a server pid: a baseline sample before the first connection, one
//! when the ramp completes, one at the end of the hold.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry, Token};

use crate::hist::Histogram;
use crate::net::{self, Fail, Link, Phase, Progress, ReadOutcome};
use crate::procfs::{self, Delta, Sample};
use crate::url::WsUrl;
use crate::wire::{self, Frame};

/// Ports one source address is asked for at most (the ephemeral range is
/// usually 28,232 wide).
const PORTS_PER_SOURCE: usize = 25_000;
/// How long to wait for the server's side of the closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often handshake deadlines are checked.
const TIMEOUT_SCAN: Duration = Duration::from_millis(100);
const READ_BUF: usize = 64 << 10;
/// Connections dialed per loop turn at most.
const DIAL_BATCH: usize = 64;

#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub connections: usize,
    pub ramp: f64,
    pub hold: Duration,
    pub sources: Option<u8>,
    pub handshake_timeout: Duration,
}

/// Everything measured in one connect run.
#[derive(Debug)]
pub struct ConnectReport {
    pub opts: ConnectOpts,
    /// Source addresses bound (0: the kernel chose).
    pub sources: usize,
    pub fd_limit: u64,
    pub attempted: usize,
    /// Upgrades that got their 101.
    pub opened: usize,
    /// Still open when the hold ended.
    pub open_at_end: usize,
    /// Attempts that never opened, by kind.
    pub failures: BTreeMap<String, u64>,
    /// Open connections the server ended before we did, by kind.
    pub dropped: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    /// Connect + upgrade time of each opened connection (ns).
    pub handshake: Histogram,
    pub ramp_s: f64,
    pub hold_s: f64,
    pub pings: u64,
    pub close_sent: usize,
    /// Connections whose close the server answered.
    pub closed_cleanly: usize,
    pub server_ramp: Option<Delta>,
    pub server_hold: Option<Delta>,
}

impl ConnectReport {
    /// Failures plus connections lost while held: 0 for a clean run.
    pub fn problems(&self) -> u64 {
        self.failures.values().sum::<u64>() + self.dropped.values().sum::<u64>()
    }

    /// Server user-space RSS growth per connection held (baseline to end of hold).
    pub fn rss_per_connection(&self) -> Option<f64> {
        let (r, h) = (self.server_ramp?, self.server_hold?);
        (self.open_at_end > 0)
            .then(|| (h.rss_after as f64 - r.rss_before as f64) / self.open_at_end as f64)
    }
}

struct Slot {
    link: Link,
    started: Instant,
    close_acked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Ramp,
    Hold,
    Close,
}

/// Connections per phase, kept up to date on every transition.
#[derive(Default)]
struct Counts {
    handshaking: usize,
    open: usize,
    closing: usize,
}

impl Counts {
    fn slot(&mut self, p: Phase) -> Option<&mut usize> {
        match p {
            Phase::Connecting | Phase::Upgrading => Some(&mut self.handshaking),
            Phase::Open => Some(&mut self.open),
            Phase::Closing => Some(&mut self.closing),
            Phase::Done => None,
        }
    }

    fn moved(&mut self, from: Phase, to: Phase) {
        let same = matches!(
            (from, to),
            (
                Phase::Connecting | Phase::Upgrading,
                Phase::Connecting | Phase::Upgrading
            )
        );
        if from == to || same {
            return;
        }
        if let Some(n) = self.slot(from) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.slot(to) {
            *n += 1;
        }
    }
}

/// Counters the event handlers update.
#[derive(Default)]
struct Tally {
    opened: usize,
    failures: BTreeMap<String, u64>,
    dropped: BTreeMap<String, u64>,
    first_failure: Option<String>,
    handshake: Histogram,
    pings: u64,
}

impl Tally {
    fn fail(&mut self, f: &Fail) {
        *self.failures.entry(f.kind()).or_default() += 1;
        self.first_failure.get_or_insert_with(|| f.to_string());
    }

    fn drop_(&mut self, kind: String) {
        *self.dropped.entry(kind).or_default() += 1;
    }
}

pub fn run(
    url: &WsUrl,
    addr: SocketAddr,
    pid: Option<u32>,
    o: &ConnectOpts,
) -> Result<ConnectReport, String> {
    let k = o.connections;
    let fd_limit = match net::raise_fd_limit() {
        Ok((_, now, _)) => now,
        Err(e) => return Err(format!("cannot read the open-file limit: {e}")),
    };
    if (k as u64) + 16 > fd_limit {
        eprintln!(
            "switchboard-load: warning: the open-file limit is {fd_limit}; {k} connections will not all fit (expect fd_limit failures)"
        );
    }
    let mut sources = net::SourcePorts::new(source_addresses(addr, k, o.sources));
    let pid_s = pid.map(|p| p.to_string());
    let sample = |what: &Option<String>| -> Result<Option<Sample>, String> {
        what.as_deref().map(procfs::sample).transpose()
    };
    let baseline = sample(&pid_s)?;

    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut events = Events::with_capacity(4096);
    let mut rbuf = vec![0u8; READ_BUF];
    let mut slots: Vec<Slot> = Vec::with_capacity(k);
    let mut counts = Counts::default();
    let mut tally = Tally::default();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());

    let start = Instant::now();
    let mut stage = Stage::Ramp;
    let mut ramp_end = start;
    let mut hold_end = start;
    let mut deadline = start;
    let mut after_ramp: Option<Sample> = None;
    let mut end_hold: Option<Sample> = None;
    let mut open_at_end = 0;
    let mut close_sent = 0;
    let mut next_scan = start + TIMEOUT_SCAN;
    let mut scan_from = 0usize;
    loop {
        let now = Instant::now();
        if stage == Stage::Ramp {
            let due = due_now(start, now, o.ramp);
            // A bounded batch per turn: events are served between batches
            // even when dialing falls behind the schedule.
            let batch_end = due.min(k).min(slots.len() + DIAL_BATCH);
            while slots.len() < batch_end {
                let i = slots.len();
                let dialed = if sources.is_empty() {
                    net::dial(None, addr)
                } else {
                    sources.dial(i, addr)
                };
                let mut link = match dialed {
                    Ok(s) => Link::new(s),
                    Err(f) => {
                        tally.fail(&f);
                        Link::dead()
                    }
                };
                if let Err(e) = link.register(poll.registry(), Token(i)) {
                    tally.fail(&Fail::Socket(e));
                    link.shut(poll.registry());
                }
                counts.moved(Phase::Done, link.phase);
                slots.push(Slot {
                    link,
                    started: Instant::now(),
                    close_acked: false,
                });
            }
            if now >= next_scan {
                next_scan = now + TIMEOUT_SCAN;
                scan_from = expire_handshakes(
                    &mut slots,
                    scan_from,
                    now,
                    o.handshake_timeout,
                    &mut counts,
                    &mut tally,
                    poll.registry(),
                );
            }
            if slots.len() == k && counts.handshaking == 0 {
                ramp_end = Instant::now();
                after_ramp = sample(&pid_s)?;
                stage = Stage::Hold;
                deadline = ramp_end + o.hold;
            }
        }
        if stage == Stage::Hold && now >= deadline {
            end_hold = sample(&pid_s)?;
            hold_end = Instant::now();
            open_at_end = counts.open;
            for s in slots.iter_mut().filter(|s| s.link.phase == Phase::Open) {
                wire::close_frame(&mut s.link.out, 1000);
                s.link.phase = Phase::Closing;
                counts.moved(Phase::Open, Phase::Closing);
                close_sent += 1;
                if s.link.flush_if_ready().is_err() {
                    s.link.shut(poll.registry());
                    counts.moved(Phase::Closing, Phase::Done);
                }
            }
            stage = Stage::Close;
            deadline = Instant::now() + CLOSE_TIMEOUT;
        }
        if stage == Stage::Close && (counts.closing == 0 || now >= deadline) {
            break;
        }
        let wait = match stage {
            Stage::Ramp if slots.len() < k && slots.len() >= due_now(start, now, o.ramp) => {
                let next = start + Duration::from_secs_f64(slots.len() as f64 / o.ramp);
                next.saturating_duration_since(now)
                    .min(Duration::from_millis(10))
            }
            // Behind schedule: just collect what is ready.
            Stage::Ramp if slots.len() < k => Duration::ZERO,
            Stage::Ramp => TIMEOUT_SCAN,
            Stage::Hold | Stage::Close => deadline
                .saturating_duration_since(now)
                .min(Duration::from_secs(1)),
        };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = slots.get_mut(i) else { continue };
            let before = s.link.phase;
            if ev.is_writable() {
                s.link.write_blocked = false;
            }
            match before {
                Phase::Connecting | Phase::Upgrading => {
                    let key = wire::ws_key(nonce, i as u64);
                    let req = || wire::upgrade_request(&url.authority, &url.path, &key);
                    match s.link.handshake(&mut rbuf, req, &key) {
                        Progress::Waiting => {}
                        Progress::Opened => {
                            tally.opened += 1;
                            tally
                                .handshake
                                .record(s.started.elapsed().as_nanos() as u64);
                            // Frames right behind the 101 (a ping, say).
                            if !s.link.inbuf.is_empty()
                                && serve_open(s, &[], &mut tally, poll.registry())
                                && s.link.flush_if_ready().is_err()
                            {
                                tally.drop_("write".into());
                                s.link.shut(poll.registry());
                            }
                        }
                        Progress::Failed(f) => {
                            tally.fail(&f);
                            s.link.shut(poll.registry());
                        }
                    }
                }
                Phase::Open | Phase::Closing => {
                    serve_io(s, &mut rbuf, &mut tally, poll.registry());
                }
                Phase::Done => {}
            }
            counts.moved(before, s.link.phase);
        }
    }
    let closed_cleanly = slots.iter().filter(|s| s.close_acked).count();
    for s in &mut slots {
        s.link.shut(poll.registry());
    }
    Ok(ConnectReport {
        opts: o.clone(),
        sources: sources.len(),
        fd_limit,
        attempted: slots.len(),
        opened: tally.opened,
        open_at_end,
        failures: tally.failures,
        dropped: tally.dropped,
        first_failure: tally.first_failure,
        handshake: tally.handshake,
        ramp_s: ramp_end.saturating_duration_since(start).as_secs_f64(),
        hold_s: hold_end.saturating_duration_since(ramp_end).as_secs_f64(),
        pings: tally.pings,
        close_sent,
        closed_cleanly,
        server_ramp: baseline
            .zip(after_ramp)
            .map(|(a, b)| Delta::between(&a, &b)),
        server_hold: after_ramp
            .zip(end_hold)
            .map(|(a, b)| Delta::between(&a, &b)),
    })
}

/// Connections that should have been started by `now` (also used by fanout mode).
pub(crate) fn due_now(start: Instant, now: Instant, ramp: f64) -> usize {
    (now.saturating_duration_since(start).as_secs_f64() * ramp).floor() as usize + 1
}

/// 127.0.0.1..=127.0.0.N when the server is on IPv4 loopback; none otherwise
/// (also used by fanout mode).
pub(crate) fn source_addresses(dst: SocketAddr, k: usize, want: Option<u8>) -> Vec<IpAddr> {
    let loopback_v4 = matches!(dst.ip(), IpAddr::V4(v4) if v4.is_loopback());
    if !loopback_v4 {
        if want.is_some() {
            eprintln!(
                "switchboard-load: warning: --sources needs an IPv4 loopback server; ignored"
            );
        }
        return Vec::new();
    }
    let n = want.map_or_else(|| k.div_ceil(PORTS_PER_SOURCE).clamp(1, 254), usize::from);
    (1..=n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8)))
        .collect()
}

/// Fail handshakes older than the timeout. Slots were started in order, so
/// only a prefix can have expired; returns where the next scan may start.
fn expire_handshakes(
    slots: &mut [Slot],
    mut from: usize,
    now: Instant,
    timeout: Duration,
    counts: &mut Counts,
    tally: &mut Tally,
    registry: &Registry,
) -> usize {
    while let Some(s) = slots.get_mut(from) {
        if matches!(s.link.phase, Phase::Connecting | Phase::Upgrading) {
            if now.saturating_duration_since(s.started) < timeout {
                break;
            }
            tally.fail(&Fail::Timeout);
            counts.moved(s.link.phase, Phase::Done);
            s.link.shut(registry);
        }
        from += 1;
    }
    from
}

/// Read until WouldBlock, answer pings, notice closes; one write at the end.
fn serve_io(s: &mut Slot, rbuf: &mut [u8], tally: &mut Tally, registry: &Registry) {
    loop {
        match s.link.read(rbuf) {
            ReadOutcome::Data(n) => {
                if !serve_open(s, rbuf.get(..n).unwrap_or_default(), tally, registry) {
                    return;
                }
            }
            ReadOutcome::WouldBlock => break,
            ReadOutcome::Eof => {
                if s.link.phase == Phase::Open {
                    tally.drop_("eof".into());
                }
                s.link.shut(registry);
                return;
            }
            ReadOutcome::Error(e) => {
                if s.link.phase == Phase::Open {
                    tally.drop_(Fail::Io(e).kind());
                }
                s.link.shut(registry);
                return;
            }
        }
    }
    if s.link.flush_if_ready().is_err() {
        if s.link.phase == Phase::Open {
            tally.drop_("write".into());
        }
        s.link.shut(registry);
    }
}

/// Handle bytes on an open (or closing) connection; false if it was shut.
fn serve_open(s: &mut Slot, fresh: &[u8], tally: &mut Tally, registry: &Registry) -> bool {
    let Slot {
        link, close_acked, ..
    } = s;
    let Link {
        inbuf, out, phase, ..
    } = link;
    let r = net::feed(inbuf, fresh, &mut |f: Frame<'_>| match f.opcode {
        wire::OP_PING => {
            tally.pings += 1;
            wire::frame(out, wire::OP_PONG, f.payload);
            true
        }
        wire::OP_CLOSE => {
            if *phase == Phase::Open {
                let code = f
                    .payload
                    .get(..2)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                tally.drop_(format!("close_{code}"));
                wire::frame(out, wire::OP_CLOSE, f.payload.get(..2).unwrap_or_default());
                *phase = Phase::Closing;
            } else {
                *close_acked = true;
            }
            false
        }
        // Pongs and data are not expected on an idle connection; ignore them.
        _ => true,
    });
    if r.is_err() {
        if *phase == Phase::Open {
            tally.drop_("protocol".into());
        }
        link.shut(registry);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_cover_the_ports_needed() {
        let lo: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        assert_eq!(source_addresses(lo, 19_000, None).len(), 1);
        assert_eq!(source_addresses(lo, 25_001, None).len(), 2);
        assert_eq!(source_addresses(lo, 100_000, None).len(), 4);
        let three = source_addresses(lo, 10, Some(3));
        assert_eq!(three.last(), Some(&IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))));
        let v6: SocketAddr = "[::1]:9001".parse().unwrap();
        assert!(source_addresses(v6, 10, None).is_empty());
    }

    #[test]
    fn counts_follow_transitions() {
        let mut c = Counts::default();
        c.moved(Phase::Done, Phase::Connecting);
        c.moved(Phase::Connecting, Phase::Upgrading);
        assert_eq!(c.handshaking, 1);
        c.moved(Phase::Upgrading, Phase::Open);
        assert_eq!((c.handshaking, c.open), (0, 1));
        c.moved(Phase::Open, Phase::Closing);
        c.moved(Phase::Closing, Phase::Done);
        assert_eq!((c.open, c.closing), (0, 0));
    }
}
