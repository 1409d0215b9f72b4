//! Echo mode: C connections on one mio poll loop, D messages in flight on
//! each; every echo is verified (sequence and bytes) and timed.
//!
//! Stages: upgrade all connections, then warmup (traffic, not counted),
//! measure (counted; server CPU/RSS sampled at both ends), drain (no new
//! messages; wait for those in flight), close (close frames, wait for the
//! server's close and EOF).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use mio::{Events, Registry, Token};
use serde_json::{Value, json};

use crate::driver::{self, Driver, Mode, Plan, Stage, Turn};
use crate::hist::Histogram;
use crate::net::{self, Link, Phase, Progress, ReadOutcome};
use crate::procfs::Delta;
use crate::report::{self, Summary};
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

/// The command line of echo mode.
#[derive(Debug, Clone, Args)]
pub struct EchoOpts {
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: usize,
    /// Payload bytes per message (at least 16 with --binary; 32 for text,
    /// whose header is written in hex).
    #[arg(short = 's', long, default_value_t = 32)]
    pub size: usize,
    /// Messages in flight per connection.
    #[arg(short = 'd', long, default_value_t = 8)]
    pub depth: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = driver::parse_secs)]
    pub duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = driver::parse_secs)]
    pub warmup: Duration,
    /// Binary messages instead of text.
    #[arg(long)]
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
        report::per_sec(self.measured, self.window_s)
    }

    /// Server CPU microseconds per round trip in the window.
    fn server_us_per_msg(&self) -> Option<f64> {
        let d = self.server.as_ref()?;
        (self.measured > 0).then(|| d.cpu_s * 1e6 / self.measured as f64)
    }
}

impl Summary for EchoReport {
    fn print(&self, url: &str, pid: Option<u32>) {
        let (r, o) = (self, &self.opts);
        println!("switchboard-load echo  {url}");
        println!(
            "  connections   {} opened of {}; {} B {} payloads, {} in flight each",
            r.opened,
            o.connections,
            o.size,
            if o.binary { "binary" } else { "text" },
            o.depth
        );
        println!("{}", report::window_line(r.window_s, o.warmup));
        println!(
            "  throughput    {:.0} msg/s  ({} round trips in the window; {} sent, {} echoed in all)",
            r.msgs_per_sec(),
            r.measured,
            r.sent_total,
            r.completed_total
        );
        println!("  round trip    {}", report::latency_line(&r.latency));
        report::print_verification(
            &r.errors.kinds(),
            "every echo in order and byte-identical; no errors",
        );
        if let Some(f) = &r.connect_failure {
            println!("  first connect failure: {f}");
        }
        if let Some(p) = &r.first_problem {
            println!("  first problem: {p}");
        }
        println!(
            "  close         {} of {} answered our close frame; {} pings answered",
            r.closed_cleanly, r.opened, r.pings
        );
        let per = |_: &Delta| {
            r.server_us_per_msg()
                .map_or("- µs/msg".into(), |u| format!("{u:.2} µs/msg"))
        };
        report::print_server(pid, r.server.as_ref(), per, true);
        report::print_client(r.client.as_ref());
    }

    fn to_json(&self, url: &str, pid: Option<u32>) -> Value {
        let (r, o) = (self, &self.opts);
        json!({
            "mode": "echo",
            "url": url,
            "connections": o.connections,
            "opened": r.opened,
            "size": o.size,
            "depth": o.depth,
            "binary": o.binary,
            "warmup_s": o.warmup.as_secs_f64(),
            "duration_s": o.duration.as_secs_f64(),
            "window_s": report::round(r.window_s, 1000.0),
            "messages": r.measured,
            "msgs_per_sec": r.msgs_per_sec().round(),
            "sent_total": r.sent_total,
            "echoed_total": r.completed_total,
            "latency_us": report::latency_json(&r.latency),
            "errors": report::errors_json(&r.errors.kinds()),
            "connect_failure": r.connect_failure,
            "first_problem": r.first_problem,
            "closed_cleanly": r.closed_cleanly,
            "pings_answered": r.pings,
            "server": report::server_json_per(
                pid,
                r.server.as_ref(),
                &[("cpu_us_per_msg", r.server_us_per_msg())],
            ),
            "client": report::client_json(r.client.as_ref()),
        })
    }

    fn problems(&self) -> u64 {
        self.errors.total()
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

/// The echo mode's part of the run loop.
struct Echo<'a> {
    url: &'a WsUrl,
    layout: Layout,
    opcode: u8,
    nonce: u64,
    conns: Vec<Conn>,
    tally: Tally,
    connect_failure: Option<String>,
    /// Connections still connecting or upgrading.
    waiting: usize,
    hs_deadline: Instant,
    opened: usize,
    /// Connections open now.
    open: usize,
    /// The end of setup: timestamps count from here.
    t0: Instant,
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
    let _ = driver::fd_limit(
        o.connections as u64 + 16,
        &format!("{} connections will not all fit", o.connections),
    );
    let driver = Driver::new(Plan {
        pid,
        warmup: o.warmup,
        duration: o.duration,
        drain_timeout: DRAIN_TIMEOUT,
        close_timeout: CLOSE_TIMEOUT,
        tick: Duration::from_millis(100),
        events: 1024,
        read_buf: READ_BUF,
        baseline: false,
        client: true,
    })?;
    let mut tally = Tally::default();
    let mut connect_failure: Option<String> = None;
    let nonce = driver::run_nonce();

    // Setup: connect and upgrade every connection.
    let mut conns: Vec<Conn> = Vec::with_capacity(o.connections);
    let mut waiting = 0usize;
    for i in 0..o.connections {
        let link = match net::dial(None, addr) {
            Ok(s) => {
                let mut l = Link::new(s);
                match l.register(driver.registry(), Token(i)) {
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
    let mut echo = Echo {
        url,
        layout,
        opcode: if o.binary {
            wire::OP_BINARY
        } else {
            wire::OP_TEXT
        },
        nonce,
        conns,
        tally,
        connect_failure,
        waiting,
        hs_deadline: Instant::now() + HANDSHAKE_TIMEOUT,
        opened: 0,
        open: 0,
        t0: driver.start(),
    };
    let timing = driver.run(&mut echo)?;
    let closed_cleanly = echo.conns.iter().filter(|c| c.close_acked).count();
    let tally = echo.tally;
    Ok(EchoReport {
        opts: o.clone(),
        opened: echo.opened,
        measured: tally.measured,
        window_s: timing.window_s(),
        latency: tally.latency,
        sent_total: tally.sent,
        completed_total: tally.completed,
        errors: tally.errors,
        connect_failure: echo.connect_failure,
        first_problem: tally.first_problem,
        closed_cleanly,
        pings: tally.pings,
        server: timing.server(),
        client: timing.client(),
    })
}

impl Echo<'_> {
    /// The frame handlers' context for a turn, beside the connections.
    fn cx(&mut self, turn: &Turn<'_>) -> (Cx<'_>, &mut [Conn], &mut usize) {
        let cx = Cx {
            layout: &self.layout,
            opcode: self.opcode,
            now_ns: 0,
            sending: turn.sending(),
            measuring: turn.measuring(),
            verifying: turn.verifying(),
            tally: &mut self.tally,
        };
        (cx, &mut self.conns, &mut self.open)
    }

    /// A readiness event while connecting and upgrading.
    fn handshake(&mut self, i: usize, turn: &mut Turn<'_>) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if !matches!(c.link.phase, Phase::Connecting | Phase::Upgrading) {
            return;
        }
        let key = wire::ws_key(self.nonce, i as u64);
        let url = self.url;
        match c.link.handshake(
            turn.rbuf,
            || wire::upgrade_request(&url.authority, &url.path, &key),
            &key,
        ) {
            Progress::Waiting => {}
            Progress::Opened => self.waiting -= 1,
            Progress::Failed(f) => {
                self.waiting -= 1;
                self.tally.errors.connect += 1;
                self.connect_failure.get_or_insert(f.to_string());
                c.link.shut(turn.registry);
            }
        }
    }
}

impl Mode for Echo<'_> {
    fn setup(&mut self, now: Instant, registry: &Registry) -> Result<bool, String> {
        if self.waiting > 0 && now < self.hs_deadline {
            return Ok(false);
        }
        for c in &mut self.conns {
            if matches!(c.link.phase, Phase::Connecting | Phase::Upgrading) {
                self.tally.errors.connect += 1;
                self.connect_failure
                    .get_or_insert(net::Fail::Timeout.to_string());
                c.link.shut(registry);
            }
        }
        self.opened = self
            .conns
            .iter()
            .filter(|c| c.link.phase == Phase::Open)
            .count();
        Ok(true)
    }

    fn setup_wait(&self, now: Instant) -> Duration {
        self.hs_deadline.saturating_duration_since(now)
    }

    /// Prime every pipeline at t0; timestamps count from here.
    fn begin(&mut self, at: Instant, turn: &mut Turn<'_>) -> bool {
        self.t0 = at;
        self.open = self.opened;
        let (mut cx, conns, open) = self.cx(turn);
        for c in conns.iter_mut().filter(|c| c.link.phase == Phase::Open) {
            top_up(c, &mut cx);
            // Whatever arrived while the others upgraded: frames right
            // behind the 101 are in `inbuf`, later ones (whose readiness
            // edge was passed over) in the socket. Then the first write.
            if !c.link.inbuf.is_empty() && !on_bytes(c, &[], &mut cx) {
                c.link.shut(turn.registry);
            } else {
                serve_io(c, false, turn.rbuf, at, &mut cx, turn.registry);
            }
            if c.link.phase != Phase::Open {
                *open -= 1;
            }
        }
        true
    }

    fn live(&self) -> bool {
        self.open > 0
    }

    fn drained(&self) -> bool {
        self.conns
            .iter()
            .all(|c| c.link.phase != Phase::Open || c.tracker.awaited() == 0)
    }

    /// Verdicts are final: what is still missing is lost.
    fn finish(&mut self, registry: &Registry) {
        for c in &mut self.conns {
            c.tracker.finish(c.dropped, &mut self.tally.errors);
        }
        for c in &mut self.conns {
            if c.link.begin_close(registry) {
                self.open -= 1;
            }
        }
    }

    fn closed(&self) -> bool {
        self.conns.iter().all(|c| c.link.is_done())
    }

    fn serve(&mut self, events: &Events, turn: &mut Turn<'_>) {
        if turn.stage == Stage::Setup {
            for ev in events.iter() {
                self.handshake(ev.token().0, turn);
            }
            return;
        }
        let t0 = self.t0;
        let (mut cx, conns, open) = self.cx(turn);
        for ev in events.iter() {
            let Some(c) = conns.get_mut(ev.token().0) else {
                continue;
            };
            serve(
                c,
                ev.is_writable(),
                turn.rbuf,
                t0,
                &mut cx,
                turn.registry,
                open,
            );
        }
    }
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
