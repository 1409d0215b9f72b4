//! Connect mode: open K connections at a fixed rate (spread over loopback
//! source addresses so no source runs out of ports), upgrade each, hold them
//! idle while answering the server's pings, then close them cleanly.
//!
//! Stages: ramp (until every attempt has opened or failed), hold, close.
//! With a server pid: a baseline sample before the first connection, one
//! when the ramp completes, one at the end of the hold.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use mio::{Events, Registry};
use serde_json::{Value, json};

use crate::driver::{self, Driver, Mode, Plan, Ramp, Turn};
use crate::hist::Histogram;
use crate::net::{self, Fail, Link, Phase, Progress, ReadOutcome};
use crate::procfs::{Delta, human_bytes};
use crate::report::{self, Summary, latency_json, latency_line, map_line};
use crate::url::WsUrl;
use crate::wire::{self, Frame};

/// How long to wait for the server's side of the closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const READ_BUF: usize = 64 << 10;

/// The command line of connect mode.
#[derive(Debug, Clone, Args)]
pub struct ConnectOpts {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Seconds to hold the connections open after the ramp.
    #[arg(long, default_value = "10", value_parser = driver::parse_secs)]
    pub hold: Duration,
    /// Source addresses 127.0.0.1..127.0.0.N to connect from (default:
    /// enough that none needs more than 25,000 ports).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: Option<u8>,
    /// Seconds allowed for one connection's TCP connect and upgrade.
    #[arg(long, default_value = "10", value_parser = driver::parse_secs)]
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

impl Summary for ConnectReport {
    fn print(&self, url: &str, pid: Option<u32>) {
        let (r, o) = (self, &self.opts);
        println!("switchboard-load connect  {url}");
        println!(
            "  attempted     {} at {:.0}/s from {} (open-file limit {})",
            r.attempted,
            o.ramp,
            report::sources_text(r.sources),
            r.fd_limit
        );
        println!(
            "  ramp          {:.2} s ({:.0} upgrades/s); upgrade time {}",
            r.ramp_s,
            if r.ramp_s > 0.0 {
                r.opened as f64 / r.ramp_s
            } else {
                0.0
            },
            latency_line(&r.handshake)
        );
        println!(
            "  open          {} upgraded, {} still open after {:.2} s hold; {} pings answered",
            r.opened, r.open_at_end, r.hold_s, r.pings
        );
        if r.failures.is_empty() && r.dropped.is_empty() {
            println!("  failures      none");
        } else {
            if !r.failures.is_empty() {
                println!("  failures      {}", map_line(&r.failures));
            }
            if !r.dropped.is_empty() {
                println!("  lost while held  {}", map_line(&r.dropped));
            }
            if let Some(f) = &r.first_failure {
                println!("  first failure {f}");
            }
        }
        println!(
            "  close         {} of {} answered our close frame",
            r.closed_cleanly, r.close_sent
        );
        if let (Some(pid), Some(ramp), Some(hold)) =
            (pid, r.server_ramp.as_ref(), r.server_hold.as_ref())
        {
            println!(
                "  server {pid}  cpu {:.2} s during the ramp, {:.2} s during the hold ({:.1}% of one core)",
                ramp.cpu_s,
                hold.cpu_s,
                hold.cores() * 100.0
            );
            println!(
                "               user-space RSS {} before, {} after the ramp, {} at the end of the hold",
                human_bytes(ramp.rss_before as f64),
                human_bytes(ramp.rss_after as f64),
                human_bytes(hold.rss_after as f64)
            );
            if let Some(b) = r.rss_per_connection() {
                println!(
                    "               {} of user-space RSS per open connection (socket buffers are kernel memory, not included)",
                    human_bytes(b)
                );
            }
        }
    }

    fn to_json(&self, url: &str, pid: Option<u32>) -> Value {
        let (r, o) = (self, &self.opts);
        let server = match (pid, r.server_ramp.as_ref(), r.server_hold.as_ref()) {
            (Some(pid), Some(ramp), Some(hold)) => json!({
                "pid": pid,
                "rss_baseline_bytes": ramp.rss_before,
                "rss_after_ramp_bytes": ramp.rss_after,
                "rss_end_of_hold_bytes": hold.rss_after,
                "rss_bytes_per_connection": r.rss_per_connection().map(f64::round),
                "cpu_ramp_s": report::round(ramp.cpu_s, 100.0),
                "cpu_hold_s": report::round(hold.cpu_s, 100.0),
                "cpu_hold_cores": report::round(hold.cores(), 1000.0),
            }),
            _ => Value::Null,
        };
        json!({
            "mode": "connect",
            "url": url,
            "connections": o.connections,
            "ramp_per_s": o.ramp,
            "hold_s": report::round(r.hold_s, 1000.0),
            "sources": r.sources,
            "fd_limit": r.fd_limit,
            "attempted": r.attempted,
            "opened": r.opened,
            "open_at_end": r.open_at_end,
            "failures": r.failures,
            "dropped": r.dropped,
            "problems": r.problems(),
            "first_failure": r.first_failure,
            "ramp_s": report::round(r.ramp_s, 1000.0),
            "upgrade_us": latency_json(&r.handshake),
            "pings_answered": r.pings,
            "close_sent": r.close_sent,
            "closed_cleanly": r.closed_cleanly,
            "server": server,
        })
    }

    fn problems(&self) -> u64 {
        self.problems()
    }
}

struct Slot {
    link: Link,
    started: Instant,
    close_acked: bool,
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

/// The connect mode's part of the run loop: setup is the ramp, the
/// measured window the hold (no warmup, no drain).
struct Connect<'a> {
    url: &'a WsUrl,
    addr: SocketAddr,
    nonce: u64,
    sources: net::SourcePorts,
    ramp: Ramp,
    connections: usize,
    handshake_timeout: Duration,
    slots: Vec<Slot>,
    counts: Counts,
    tally: Tally,
    open_at_end: usize,
    close_sent: usize,
}

pub fn run(
    url: &WsUrl,
    addr: SocketAddr,
    pid: Option<u32>,
    o: &ConnectOpts,
) -> Result<ConnectReport, String> {
    let k = o.connections;
    let fd_limit = driver::fd_limit(
        k as u64 + 16,
        &format!("{k} connections will not all fit (expect fd_limit failures)"),
    )
    .map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    let sources = net::SourcePorts::new(net::source_addresses(addr, k, o.sources));
    let driver = Driver::new(Plan {
        pid,
        warmup: Duration::ZERO,
        duration: o.hold,
        drain_timeout: Duration::ZERO,
        close_timeout: CLOSE_TIMEOUT,
        tick: Duration::from_secs(1),
        events: 4096,
        read_buf: READ_BUF,
        baseline: true,
        client: false,
    })?;
    let mut mode = Connect {
        url,
        addr,
        nonce: driver::run_nonce(),
        sources,
        ramp: Ramp::new(driver.start(), o.ramp, k),
        connections: k,
        handshake_timeout: o.handshake_timeout,
        slots: Vec::with_capacity(k),
        counts: Counts::default(),
        tally: Tally::default(),
        open_at_end: 0,
        close_sent: 0,
    };
    let t = driver.run(&mut mode)?;
    let closed_cleanly = mode.slots.iter().filter(|s| s.close_acked).count();
    let tally = mode.tally;
    Ok(ConnectReport {
        opts: o.clone(),
        sources: mode.sources.len(),
        fd_limit,
        attempted: mode.slots.len(),
        opened: tally.opened,
        open_at_end: mode.open_at_end,
        failures: tally.failures,
        dropped: tally.dropped,
        first_failure: tally.first_failure,
        handshake: tally.handshake,
        ramp_s: t.setup_s(),
        hold_s: t
            .window
            .1
            .saturating_duration_since(t.setup_end)
            .as_secs_f64(),
        pings: tally.pings,
        close_sent: mode.close_sent,
        closed_cleanly,
        server_ramp: driver::delta(t.baseline, t.server.0),
        server_hold: driver::delta(t.server.0, t.server.1),
    })
}

impl Mode for Connect<'_> {
    /// The ramp: dial what is due, until every attempt has opened or failed.
    fn setup(&mut self, now: Instant, registry: &Registry) -> Result<bool, String> {
        let (tally, counts) = (&mut self.tally, &mut self.counts);
        let (slots, sources) = (&mut self.slots, &mut self.sources);
        self.ramp
            .dial_due(now, slots, sources, self.addr, registry, |_, link| {
                let link = link.unwrap_or_else(|f| {
                    tally.fail(&f);
                    Link::dead()
                });
                counts.moved(Phase::Done, link.phase);
                // Timed from the end of the dial.
                Slot {
                    link,
                    started: Instant::now(),
                    close_acked: false,
                }
            });
        if self.ramp.scan_due(now) {
            let (counts, tally) = (&mut self.counts, &mut self.tally);
            self.ramp.expire(
                &mut self.slots,
                now,
                self.handshake_timeout,
                |s| {
                    matches!(s.link.phase, Phase::Connecting | Phase::Upgrading)
                        .then_some(s.started)
                },
                |s| {
                    tally.fail(&Fail::Timeout);
                    counts.moved(s.link.phase, Phase::Done);
                    s.link.shut(registry);
                },
            );
        }
        Ok(self.slots.len() == self.connections && self.counts.handshaking == 0)
    }

    fn setup_wait(&self, now: Instant) -> Duration {
        self.ramp.wait(now, self.slots.len())
    }

    fn begin(&mut self, _at: Instant, _turn: &mut Turn<'_>) -> bool {
        true
    }

    /// The hold is never cut short.
    fn live(&self) -> bool {
        true
    }

    fn drained(&self) -> bool {
        true
    }

    fn finish(&mut self, registry: &Registry) {
        self.open_at_end = self.counts.open;
        for s in &mut self.slots {
            let before = s.link.phase;
            if s.link.begin_close(registry) {
                self.close_sent += 1;
            }
            self.counts.moved(before, s.link.phase);
        }
    }

    fn closed(&self) -> bool {
        self.counts.closing == 0
    }

    fn serve(&mut self, events: &Events, turn: &mut Turn<'_>) {
        let registry = turn.registry;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = self.slots.get_mut(i) else {
                continue;
            };
            let before = s.link.phase;
            if ev.is_writable() {
                s.link.write_blocked = false;
            }
            match before {
                Phase::Connecting | Phase::Upgrading => {
                    let key = wire::ws_key(self.nonce, i as u64);
                    let url = self.url;
                    let req = || wire::upgrade_request(&url.authority, &url.path, &key);
                    match s.link.handshake(turn.rbuf, req, &key) {
                        Progress::Waiting => {}
                        Progress::Opened => {
                            self.tally.opened += 1;
                            self.tally
                                .handshake
                                .record(s.started.elapsed().as_nanos() as u64);
                            // Frames right behind the 101 (a ping, say).
                            if !s.link.inbuf.is_empty()
                                && serve_open(s, &[], &mut self.tally, registry)
                                && s.link.flush_if_ready().is_err()
                            {
                                self.tally.drop_("write".into());
                                s.link.shut(registry);
                            }
                        }
                        Progress::Failed(f) => {
                            self.tally.fail(&f);
                            s.link.shut(registry);
                        }
                    }
                }
                Phase::Open | Phase::Closing => {
                    serve_io(s, turn.rbuf, &mut self.tally, registry);
                }
                Phase::Done => {}
            }
            self.counts.moved(before, s.link.phase);
        }
    }
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
