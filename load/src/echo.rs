//! Echo mode: C connections on one mio poll loop, D messages in flight on
//! each; every echo is verified (sequence and bytes) and timed.
//!
//! Stages: upgrade all connections, then warmup (traffic, not counted),
//! measure (counted; server CPU/RSS sampled at both ends), drain (no new
//! messages; wait for those in flight), close (close frames, wait for the
//! server's close and EOF).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry, Token};

use crate::hist::Histogram;
use crate::net::{self, Link, Phase, Progress, ReadOutcome};
use crate::procfs::{self, Delta, Sample};
use crate::url::WsUrl;
use crate::verify::{Errors, Layout, Tracker};
use crate::wire::{self, Frame};

/// Time allowed for every connection to upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the measured window, how long to wait for messages in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the server's side of the closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// One read lands here (shared by all connections).
const READ_BUF: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct EchoOpts {
    pub connections: usize,
    pub size: usize,
    pub depth: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub binary: bool,
}

/// Everything measured in one echo run.
#[derive(Debug)]
pub struct EchoReport {
    pub opts: EchoOpts,
    pub opened: usize,
    /// Intact round trips completed inside the measured window.
    pub measured: u64,
    pub window_s: f64,
    /// Round-trip times (ns) of the measured window.
    pub latency: Histogram,
    pub sent_total: u64,
    pub completed_total: u64,
    pub errors: Errors,
    /// The first connection failure, as text.
    pub connect_failure: Option<String>,
    /// The first protocol or I/O failure on an open connection.
    pub first_problem: Option<String>,
    pub closed_cleanly: usize,
    pub pings: u64,
    pub server: Option<Delta>,
    pub client: Option<Delta>,
}

impl EchoReport {
    pub fn msgs_per_sec(&self) -> f64 {
        if self.window_s > 0.0 {
            self.measured as f64 / self.window_s
        } else {
            0.0
        }
    }
}

struct Frag {
    text: bool,
    buf: Vec<u8>,
}

struct Conn {
    link: Link,
    tracker: Tracker,
    frag: Option<Frag>,
    /// Messages that may be sent now (depth minus those in flight).
    credits: usize,
    /// The server closed or broke the connection before we began closing.
    dropped: bool,
    /// The server answered our close frame.
    close_acked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Warmup,
    Measure,
    Drain,
    Close,
}

/// Counters every frame handler updates.
#[derive(Default)]
struct Tally {
    errors: Errors,
    latency: Histogram,
    measured: u64,
    completed: u64,
    sent: u64,
    pings: u64,
    first_problem: Option<String>,
}

impl Tally {
    fn problem(&mut self, what: String) {
        self.first_problem.get_or_insert(what);
    }
}

/// Per-wake-up context for the frame handlers.
struct Cx<'a> {
    layout: &'a Layout,
    opcode: u8,
    now_ns: u64,
    sending: bool,
    measuring: bool,
    verifying: bool,
    tally: &'a mut Tally,
}

pub fn run(
    url: &WsUrl,
    addr: SocketAddr,
    pid: Option<u32>,
    o: &EchoOpts,
) -> Result<EchoReport, String> {
    let layout = Layout::new(o.size, !o.binary)?;
    if o.connections == 0 || o.depth == 0 {
        return Err("--connections and --depth must be at least 1".into());
    }
    // Each connection is a descriptor: take whatever the hard limit allows.
    if let Ok((_, limit, _)) = net::raise_fd_limit()
        && (o.connections as u64) + 16 > limit
    {
        eprintln!(
            "switchboard-load: warning: the open-file limit is {limit}; {} connections will not all fit",
            o.connections
        );
    }
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut rbuf = vec![0u8; READ_BUF];
    let mut tally = Tally::default();
    let mut connect_failure: Option<String> = None;
    let nonce = run_nonce();

    // Stage 0: connect and upgrade every connection.
    let mut conns: Vec<Conn> = Vec::with_capacity(o.connections);
    let mut waiting = 0usize;
    for i in 0..o.connections {
        let link = match net::dial(None, addr) {
            Ok(s) => {
                let mut l = Link::new(s);
                match l.register(poll.registry(), Token(i)) {
                    Ok(()) => {
                        waiting += 1;
                        l
                    }
                    Err(e) => {
                        tally.errors.connect += 1;
                        connect_failure.get_or_insert(format!("register: {e}"));
                        Link::dead()
                    }
                }
            }
            Err(f) => {
                tally.errors.connect += 1;
                connect_failure.get_or_insert(f.to_string());
                Link::dead()
            }
        };
        conns.push(Conn {
            link,
            tracker: Tracker::new(i as u32),
            frag: None,
            credits: o.depth,
            dropped: false,
            close_acked: false,
        });
    }
    let hs_deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while waiting > 0 {
        let now = Instant::now();
        if now >= hs_deadline {
            break;
        }
        poll_once(&mut poll, &mut events, hs_deadline - now)?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = conns.get_mut(i) else { continue };
            if !matches!(c.link.phase, Phase::Connecting | Phase::Upgrading) {
                continue;
            }
            let key = wire::ws_key(nonce, i as u64);
            match c.link.handshake(
                &mut rbuf,
                || wire::upgrade_request(&url.authority, &url.path, &key),
                &key,
            ) {
                Progress::Waiting => {}
                Progress::Opened => waiting -= 1,
                Progress::Failed(f) => {
                    waiting -= 1;
                    tally.errors.connect += 1;
                    connect_failure.get_or_insert(f.to_string());
                    c.link.shut(poll.registry());
                }
            }
        }
    }
    for c in &mut conns {
        if matches!(c.link.phase, Phase::Connecting | Phase::Upgrading) {
            tally.errors.connect += 1;
            connect_failure.get_or_insert(net::Fail::Timeout.to_string());
            c.link.shut(poll.registry());
        }
    }
    let opened = conns.iter().filter(|c| c.link.phase == Phase::Open).count();

    // Prime every pipeline at t0; timestamps count from here.
    let t0 = Instant::now();
    let t_warm = t0 + o.warmup;
    let t_end = t_warm + o.duration;
    let opcode = if o.binary {
        wire::OP_BINARY
    } else {
        wire::OP_TEXT
    };
    let mut open = opened;
    {
        let mut cx = Cx {
            layout: &layout,
            opcode,
            now_ns: 0,
            sending: true,
            measuring: false,
            verifying: true,
            tally: &mut tally,
        };
        for c in conns.iter_mut().filter(|c| c.link.phase == Phase::Open) {
            top_up(c, &mut cx);
            // Whatever arrived while the others upgraded: frames right
            // behind the 101 are in `inbuf`, later ones (whose readiness
            // edge was passed over) in the socket. Then the first write.
            if !c.link.inbuf.is_empty() && !on_bytes(c, &[], &mut cx) {
                c.link.shut(poll.registry());
            } else {
                serve_io(c, false, &mut rbuf, t0, &mut cx, poll.registry());
            }
            if c.link.phase != Phase::Open {
                open -= 1;
            }
        }
    }

    let mut stage = Stage::Warmup;
    let mut server_a: Option<Sample> = None;
    let mut server_b: Option<Sample> = None;
    let mut client_a: Option<Sample> = None;
    let mut client_b: Option<Sample> = None;
    let mut window = (t0, t0);
    let mut deadline = t_warm;
    let pid_s = pid.map(|p| p.to_string());
    loop {
        let now = Instant::now();
        if stage == Stage::Warmup && (now >= t_warm || open == 0) {
            stage = Stage::Measure;
            deadline = t_end;
            server_a = pid_s.as_deref().map(procfs::sample).transpose()?;
            client_a = procfs::sample("self").ok();
            window.0 = Instant::now();
        }
        if stage == Stage::Measure && (now >= t_end || open == 0) {
            server_b = pid_s.as_deref().map(procfs::sample).transpose()?;
            client_b = procfs::sample("self").ok();
            window.1 = Instant::now();
            stage = Stage::Drain;
            deadline = now + DRAIN_TIMEOUT;
        }
        if stage == Stage::Drain
            && (now >= deadline
                || conns
                    .iter()
                    .all(|c| c.link.phase != Phase::Open || c.tracker.awaited() == 0))
        {
            // Verdicts are final: what is still missing is lost.
            for c in &mut conns {
                c.tracker.finish(c.dropped, &mut tally.errors);
            }
            for c in conns.iter_mut().filter(|c| c.link.phase == Phase::Open) {
                wire::close_frame(&mut c.link.out, 1000);
                c.link.phase = Phase::Closing;
                open -= 1;
                if c.link.flush_if_ready().is_err() {
                    c.link.shut(poll.registry());
                }
            }
            stage = Stage::Close;
            deadline = now + CLOSE_TIMEOUT;
        }
        if stage == Stage::Close && (now >= deadline || conns.iter().all(|c| c.link.is_done())) {
            break;
        }
        let wait = deadline
            .saturating_duration_since(now)
            .min(Duration::from_millis(100));
        poll_once(&mut poll, &mut events, wait)?;
        let mut cx = Cx {
            layout: &layout,
            opcode,
            now_ns: 0,
            sending: stage <= Stage::Measure,
            measuring: stage == Stage::Measure,
            verifying: stage <= Stage::Drain,
            tally: &mut tally,
        };
        for ev in events.iter() {
            let Some(c) = conns.get_mut(ev.token().0) else {
                continue;
            };
            serve(
                c,
                ev.is_writable(),
                &mut rbuf,
                t0,
                &mut cx,
                poll.registry(),
                &mut open,
            );
        }
    }
    let closed_cleanly = conns.iter().filter(|c| c.close_acked).count();
    for c in &mut conns {
        c.link.shut(poll.registry());
    }
    let window_s = window.1.saturating_duration_since(window.0).as_secs_f64();
    Ok(EchoReport {
        opts: o.clone(),
        opened,
        measured: tally.measured,
        window_s,
        latency: tally.latency,
        sent_total: tally.sent,
        completed_total: tally.completed,
        errors: tally.errors,
        connect_failure,
        first_problem: tally.first_problem,
        closed_cleanly,
        pings: tally.pings,
        server: server_a.zip(server_b).map(|(a, b)| Delta::between(&a, &b)),
        client: client_a.zip(client_b).map(|(a, b)| Delta::between(&a, &b)),
    })
}

fn poll_once(poll: &mut Poll, events: &mut Events, wait: Duration) -> Result<(), String> {
    match poll.poll(events, Some(wait)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        Err(e) => Err(format!("poll: {e}")),
    }
}

/// A per-run value that makes every run's WebSocket keys different.
fn run_nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}

/// One readiness event: read until WouldBlock, verify and answer every
/// frame, then write everything queued with one write.
fn serve(
    c: &mut Conn,
    writable: bool,
    rbuf: &mut [u8],
    t0: Instant,
    cx: &mut Cx<'_>,
    registry: &Registry,
    open: &mut usize,
) {
    let was_open = c.link.phase == Phase::Open;
    serve_io(c, writable, rbuf, t0, cx, registry);
    if was_open && c.link.phase != Phase::Open {
        *open -= 1;
    }
}

fn serve_io(
    c: &mut Conn,
    writable: bool,
    rbuf: &mut [u8],
    t0: Instant,
    cx: &mut Cx<'_>,
    registry: &Registry,
) {
    if c.link.is_done() {
        return;
    }
    if writable {
        c.link.write_blocked = false;
    }
    loop {
        match c.link.read(rbuf) {
            ReadOutcome::Data(n) => {
                cx.now_ns = t0.elapsed().as_nanos() as u64;
                let fresh = rbuf.get(..n).unwrap_or_default();
                if !on_bytes(c, fresh, cx) {
                    c.link.shut(registry);
                    return;
                }
            }
            ReadOutcome::WouldBlock => break,
            ReadOutcome::Eof => {
                lost_connection(c, cx.tally, None);
                c.link.shut(registry);
                return;
            }
            ReadOutcome::Error(e) => {
                lost_connection(c, cx.tally, Some(format!("read: {e}")));
                c.link.shut(registry);
                return;
            }
        }
    }
    if let Err(e) = c.link.flush_if_ready() {
        lost_connection(c, cx.tally, Some(format!("write: {e}")));
        c.link.shut(registry);
    }
}

/// The connection broke: an error unless we were closing it anyway.
fn lost_connection(c: &mut Conn, tally: &mut Tally, what: Option<String>) {
    if c.link.phase == Phase::Open {
        tally.errors.closed += 1;
        c.dropped = true;
        if let Some(w) = what {
            tally.problem(w);
        }
    }
}

/// Decode and handle fresh bytes; false when the connection must go.
fn on_bytes(c: &mut Conn, fresh: &[u8], cx: &mut Cx<'_>) -> bool {
    let Conn {
        link,
        tracker,
        frag,
        credits,
        dropped,
        close_acked,
    } = c;
    let Link {
        inbuf, out, phase, ..
    } = link;
    let mut keep = true;
    let r = net::feed(inbuf, fresh, &mut |f: Frame<'_>| match f.opcode {
        wire::OP_TEXT | wire::OP_BINARY | wire::OP_CONTINUATION => {
            match assemble(frag, f) {
                Ok(Some(done)) => on_message(done.0, done.1, tracker, credits, out, cx),
                Ok(None) => {}
                Err(what) => {
                    cx.tally.errors.protocol += 1;
                    cx.tally.problem(what.into());
                    *dropped = true;
                    keep = false;
                    return false;
                }
            }
            // A fragmented message just completed: its buffer is no longer needed.
            if f.fin && f.opcode == wire::OP_CONTINUATION {
                *frag = None;
            }
            true
        }
        wire::OP_PING => {
            cx.tally.pings += 1;
            wire::frame(out, wire::OP_PONG, f.payload);
            true
        }
        wire::OP_PONG => true,
        _ => {
            // Close.
            if *phase == Phase::Open {
                cx.tally.errors.closed += 1;
                let code = f.payload.get(..2).map_or(String::new(), |b| {
                    format!(" {}", u16::from_be_bytes([b[0], b[1]]))
                });
                cx.tally.problem(format!(
                    "server closed a connection{code} {:?}",
                    String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default())
                ));
                *dropped = true;
                // Answer with the same code (RFC 6455 5.5.1), then wait for EOF.
                wire::frame(out, wire::OP_CLOSE, f.payload.get(..2).unwrap_or_default());
                *phase = Phase::Closing;
            } else {
                *close_acked = true;
            }
            false
        }
    });
    if let Err(e) = r {
        cx.tally.errors.protocol += 1;
        cx.tally.problem(format!("bad server frame: {e:?}"));
        *dropped = true;
        return false;
    }
    keep
}

/// Reassemble fragmented messages. Returns a whole message (text?, payload).
fn assemble<'a>(
    frag: &'a mut Option<Frag>,
    f: Frame<'a>,
) -> Result<Option<(bool, &'a [u8])>, &'static str> {
    match (f.opcode, frag.is_some()) {
        (wire::OP_CONTINUATION, false) => Err("continuation frame without a message"),
        (wire::OP_TEXT | wire::OP_BINARY, true) => Err("new message inside a fragmented one"),
        (op, false) if f.fin => Ok(Some((op == wire::OP_TEXT, f.payload))),
        (op, false) => {
            *frag = Some(Frag {
                text: op == wire::OP_TEXT,
                buf: f.payload.to_vec(),
            });
            Ok(None)
        }
        (_, true) => {
            let Some(m) = frag.as_mut() else {
                return Err("continuation frame without a message");
            };
            m.buf.extend_from_slice(f.payload);
            if f.fin {
                Ok(Some((m.text, &m.buf)))
            } else {
                Ok(None)
            }
        }
    }
}

/// Verify one echoed message, time it, and send the next ones.
fn on_message(
    text: bool,
    payload: &[u8],
    tracker: &mut Tracker,
    credits: &mut usize,
    out: &mut Vec<u8>,
    cx: &mut Cx<'_>,
) {
    if !cx.verifying {
        return; // after the final verdicts: already counted lost
    }
    let v = tracker.on_echo(cx.layout, text, payload, &mut cx.tally.errors);
    if v.completes() {
        *credits += 1;
        cx.tally.completed += 1;
        // Only intact echoes count as measured round trips.
        if cx.measuring
            && let Some(sent) = v.sent()
        {
            cx.tally.measured += 1;
            cx.tally.latency.record(cx.now_ns.saturating_sub(sent));
        }
    }
    if cx.sending {
        while *credits > 0 {
            *credits -= 1;
            send_one(tracker, out, cx);
        }
    }
}

fn top_up(c: &mut Conn, cx: &mut Cx<'_>) {
    while c.credits > 0 {
        c.credits -= 1;
        send_one(&mut c.tracker, &mut c.link.out, cx);
    }
}

/// Encode the next message straight into the output buffer and mask it in place.
fn send_one(tracker: &mut Tracker, out: &mut Vec<u8>, cx: &mut Cx<'_>) {
    let stamp = tracker.send(cx.now_ns);
    let start = wire::begin_frame(out, cx.opcode, cx.layout.size());
    cx.layout.write(out, stamp);
    wire::end_frame(out, start);
    cx.tally.sent += 1;
}
