//! Fan-out mode: N subscribers on one channel of the Switchboard JSON
//! protocol (docs/PROTOCOL.md, the `ws_path`), and one publisher that keeps
//! K publishes in flight.
//!
//! Stages: setup (the publisher connects; subscribers are dialed at the ramp
//! rate, from several loopback source addresses if needed, and each sends
//! `subscribe` right behind its upgrade and waits for `subscribed`), warmup,
//! measure (server CPU/RSS sampled at both ends), drain (no new publishes;
//! wait for those in flight), close.
//!
//! A publish is complete when every live subscriber has passed it: received
//! it, or received a later one first (then it is counted lost at once, so a
//! loss does not stall the pipeline). Each completion lets the publisher send
//! the next one. The data of publish S is `{"seq":S,"ts":T,"pad":"..."}` with
//! T its send time (ns since the run started), padded to about `--size`
//! bytes with characters that depend on S.
//!
//! The subscriber side parses no JSON on its hot path: the run knows the
//! exact envelope the server writes (`{"type":"message","channel":C,
//! "from":U,"data":` with U the publisher's user id from its `connected`
//! welcome), so one prefix comparison checks type, channel and sender; the
//! sequence number is read right behind it and the data object is compared
//! byte for byte with what was published. Anything else (other event types,
//! or a `message` whose envelope is laid out differently) takes the slow
//! path through serde_json, and a `message` found there is still located
//! and compared in the raw text.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use mio::{Events, Registry, Token};
use serde_json::{Value, json};

use crate::driver::{self, Driver, Mode, Plan, Ramp, Turn};
use crate::hist::Histogram;
use crate::net::{self, Fail, Gone, Link, Loss, Peer, Phase, Progress, ReadOutcome};
use crate::procfs::Delta;
use crate::report::{self, Ledger, Outcome, Summary, latency_json, latency_line};
use crate::url::WsUrl;
use crate::wire::{self, Frame};

/// After the measured window, how long to wait for publishes in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the server's side of the closing handshakes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// One read lands here (shared by all connections).
const READ_BUF: usize = 256 << 10;
/// Subscribers are tokens 0..N; the publisher has its own.
const PUBLISHER: Token = Token(usize::MAX - 1);
/// Sequence numbers a subscriber remembers as skipped (counted lost, but
/// forgiven as reordered if they still arrive).
const MAX_SKIPPED: usize = 4096;
/// 64 characters that need no JSON escaping.
const PAD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const DATA_HEAD: &[u8] = b"{\"seq\":";
const TS_KEY: &[u8] = b",\"ts\":";
const PAD_KEY: &[u8] = b",\"pad\":\"";
const DATA_TAIL: &[u8] = b"\"}";
/// Every server message starts with its type (proto::Out writes it first).
const MESSAGE_START: &[u8] = b"{\"type\":\"message\"";
const PUBLISHED_START: &[u8] = b"{\"type\":\"published\"";

/// The command line of fanout mode.
#[derive(Debug, Clone, Args)]
pub struct FanoutOpts {
    /// Subscriber connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Publishes in flight (each completes when every subscriber has it).
    #[arg(short = 'k', long, default_value_t = 4)]
    pub inflight: usize,
    /// Approximate bytes of each publish's data object.
    #[arg(short = 's', long, default_value_t = 64)]
    pub size: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = driver::parse_secs)]
    pub duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = driver::parse_secs)]
    pub warmup: Duration,
    /// New subscriber connections per second during setup.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Source addresses 127.0.0.1..127.0.0.N to connect from (default:
    /// enough that none needs more than 25,000 ports).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: Option<u8>,
    /// The channel (`public:` channels may be used by anyone).
    #[arg(long, default_value = "public:bench")]
    pub channel: String,
    /// Seconds allowed for one subscriber's connect, upgrade and subscribe.
    #[arg(long, default_value = "10", value_parser = driver::parse_secs)]
    pub handshake_timeout: Duration,
}

report::error_kinds! {
    /// Everything that went wrong, by kind.
    pub struct FanoutErrors {
        /// A subscriber never received a publish (a later one came first, or it
        /// was still missing when the drain ended).
        lost,
        /// A subscriber received a publish again.
        dup,
        /// A publish counted lost arrived after all, behind a later one.
        reorder,
        /// A `message` whose data, channel or sender is not what was published
        /// (or names a publish never sent).
        corrupt,
        /// Connections (subscribers or the publisher) the server ended while they counted.
        closed,
        /// Subscribers that never got to `subscribed` (see the failures by kind).
        connect,
        /// Server frames that break RFC 6455.
        protocol,
        /// `{"type":"error"}` replies after setup.
        rejected,
        /// Messages of a type that has no place in the run.
        unexpected,
        /// Publishes the server never answered with `published`.
        unacked,
    }
}

/// Everything measured in one fan-out run.
#[derive(Debug)]
pub struct FanoutReport {
    pub opts: FanoutOpts,
    /// Source addresses bound (0: the kernel chose).
    pub sources: usize,
    pub fd_limit: u64,
    /// The publisher's user id (the `from` of every message).
    pub publisher: String,
    /// Subscribers that got their `subscribed` reply.
    pub subscribed: usize,
    /// Subscribers counted at the start of publishing.
    pub live_at_start: usize,
    /// Dial to `subscribed`, per subscriber (ns).
    pub subscribe_time: Histogram,
    /// Publishes completed inside the measured window.
    pub publishes: u64,
    /// Messages received (intact) inside the measured window.
    pub received_window: u64,
    /// Delivery latency (receive time minus the send time in the data), every
    /// delivery of the measured window (ns).
    pub latency: Histogram,
    pub sent_total: u64,
    pub completed_total: u64,
    /// Intact deliveries over the whole run.
    pub received_total: u64,
    pub acks: u64,
    /// Messages verified through serde_json instead of the fast path.
    pub slow_path: u64,
    pub errors: FanoutErrors,
    /// The window, the samples, subscribers that never subscribed (by
    /// kind), the close.
    pub run: Outcome,
}

impl FanoutReport {
    pub fn publishes_per_sec(&self) -> f64 {
        self.run.per_sec(self.publishes)
    }

    /// Completed publishes x subscribers, in the window.
    pub fn deliveries(&self) -> u64 {
        self.publishes * self.live_at_start as u64
    }

    pub fn deliveries_per_sec(&self) -> f64 {
        self.publishes_per_sec() * self.live_at_start as f64
    }

    /// Server CPU microseconds per delivery in the window.
    pub fn server_us_per_delivery(&self) -> Option<f64> {
        self.run.server_us_per(self.deliveries())
    }
}

impl Summary for FanoutReport {
    fn print(&self, url: &str, pid: Option<u32>) {
        let (r, o) = (self, &self.opts);
        println!("switchboard-load fanout  {url}");
        println!(
            "  subscribers   {} subscribed of {} to {:?} from {} (open-file limit {}); publisher {:?}",
            r.subscribed,
            o.subscribers,
            o.channel,
            report::sources_text(r.sources),
            r.fd_limit,
            r.publisher
        );
        println!(
            "  setup         {:.2} s at {:.0}/s; dial to subscribed {}",
            r.run.setup_s,
            o.ramp,
            latency_line(&r.subscribe_time)
        );
        println!(
            "  load          {} publishes in flight, ~{} B data each",
            o.inflight, o.size
        );
        println!("{}", report::window_line(r.run.window_s, o.warmup));
        println!(
            "  throughput    {:.0} publishes/s, {:.0} deliveries/s ({} publishes x {} subscribers in the window)",
            r.publishes_per_sec(),
            r.deliveries_per_sec(),
            r.publishes,
            r.live_at_start
        );
        println!(
            "  totals        {} published, {} completed, {} acknowledged; {} deliveries received",
            r.sent_total, r.completed_total, r.acks, r.received_total
        );
        println!("  latency       {}", latency_line(&r.latency));
        if r.slow_path > 0 {
            println!(
                "  note          {} message events did not match the expected envelope byte for byte and were parsed as JSON (slow path)",
                r.slow_path
            );
        }
        report::print_verification(
            &r.errors.kinds(),
            "every subscriber got every publish once, in order, intact; no errors",
        );
        let per = |_: &Delta| {
            r.server_us_per_delivery()
                .map_or("- µs/delivery".into(), |u| format!("{u:.3} µs/delivery"))
        };
        r.run.print_tail(pid, "not subscribed  ", "", per, true);
    }

    fn to_json(&self, url: &str, pid: Option<u32>) -> Value {
        let (r, o) = (self, &self.opts);
        let own = json!({
            "subscribers": o.subscribers,
            "subscribed": r.subscribed,
            "live_at_start": r.live_at_start,
            "channel": o.channel,
            "publisher": r.publisher,
            "inflight": o.inflight,
            "size": o.size,
            "ramp_per_s": o.ramp,
            "sources": r.sources,
            "fd_limit": r.fd_limit,
            "publishes": r.publishes,
            "publishes_per_sec": report::round(r.publishes_per_sec(), 10.0),
            "deliveries": r.deliveries(),
            "deliveries_per_sec": r.deliveries_per_sec().round(),
            "received_in_window": r.received_window,
            "sent_total": r.sent_total,
            "completed_total": r.completed_total,
            "received_total": r.received_total,
            "published_acks": r.acks,
            "slow_path_messages": r.slow_path,
            "latency_us": latency_json(&r.latency),
            "subscribe_us": latency_json(&r.subscribe_time),
        });
        let per = [("cpu_us_per_delivery", r.server_us_per_delivery())];
        r.run.json("fanout", url, pid, &r.errors.kinds(), &per, own)
    }

    fn problems(&self) -> u64 {
        self.errors.total()
    }
}

// ---------------------------------------------------------------------------
// Payloads and their verification (pure: no sockets, no clock).

/// Append the data object of publish `seq` sent at `ts`, about `size` bytes:
/// `{"seq":S,"ts":T,"pad":"..."}`.
pub fn write_data(out: &mut Vec<u8>, seq: u64, ts: u64, size: usize) {
    let start = out.len();
    out.extend_from_slice(DATA_HEAD);
    let _ = write!(out, "{seq}");
    out.extend_from_slice(TS_KEY);
    let _ = write!(out, "{ts}");
    out.extend_from_slice(PAD_KEY);
    let used = out.len() - start + DATA_TAIL.len();
    let off = (seq % 64) as usize;
    out.extend((0..size.saturating_sub(used)).map(|i| PAD[(off + i * 37) % 64]));
    out.extend_from_slice(DATA_TAIL);
}

/// A decimal u64 at the front of `b`: the value and the digits it took.
fn parse_u64(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b.iter().take(20) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

/// `seq` and `ts` from a data object at the front of `d`.
fn read_stamp(d: &[u8]) -> Option<(u64, u64)> {
    let rest = d.strip_prefix(DATA_HEAD)?;
    let (seq, n) = parse_u64(rest)?;
    let rest = rest.get(n..)?.strip_prefix(TS_KEY)?;
    let (ts, _) = parse_u64(rest)?;
    Some((seq, ts))
}

/// Does `d` start with exactly `data`, followed by the rest of the envelope?
fn carries(d: &[u8], data: &[u8]) -> bool {
    d.starts_with(data) && matches!(d.get(data.len()), Some(b',' | b'}'))
}

/// Where `needle` first occurs in `hay` (slow path only).
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// What every `message` event of the run must look like.
#[derive(Debug, Clone)]
pub struct Expect {
    /// `{"type":"message","channel":C,"from":U,"data":`, as the server writes it.
    prefix: Vec<u8>,
    channel: String,
    from: String,
    size: usize,
}

impl Expect {
    pub fn new(channel: &str, from: &str, size: usize) -> Expect {
        let prefix = format!(
            "{{\"type\":\"message\",\"channel\":{},\"from\":{},\"data\":",
            json_str(channel),
            json_str(from)
        )
        .into_bytes();
        Expect {
            prefix,
            channel: channel.to_owned(),
            from: from.to_owned(),
            size,
        }
    }
}

/// One publish in flight.
#[derive(Debug)]
struct Pending {
    ts: u64,
    /// Live subscribers that have not passed it yet.
    remaining: usize,
    data: Vec<u8>,
}

/// The publishes in flight, `base .. base + pending.len()`. They complete in
/// order: a subscriber that passed S + 1 has passed S.
#[derive(Debug, Default)]
struct Table {
    base: u64,
    pending: VecDeque<Pending>,
    spare: Vec<Vec<u8>>,
    /// Subscribers every publish waits for.
    live: usize,
    /// Publishes that may be sent now.
    credits: usize,
    completed: u64,
    completed_window: u64,
}

impl Table {
    fn next_seq(&self) -> u64 {
        self.base + self.pending.len() as u64
    }

    fn get(&self, seq: u64) -> Option<&Pending> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.pending.get(i)
    }

    /// Record the next publish, sent at `ts`; returns its data.
    fn publish(&mut self, ts: u64, size: usize) -> &[u8] {
        let seq = self.next_seq();
        let mut data = self.spare.pop().unwrap_or_default();
        data.clear();
        write_data(&mut data, seq, ts, size);
        self.pending.push_back(Pending {
            ts,
            remaining: self.live,
            data,
        });
        self.pending.back().map_or(&[][..], |p| &p.data)
    }

    /// One subscriber is done with `seq`; complete what everyone is done with.
    fn pass(&mut self, seq: u64, measuring: bool) {
        let Some(i) = seq
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if let Some(p) = self.pending.get_mut(i) {
            p.remaining = p.remaining.saturating_sub(1);
        }
        while self.pending.front().is_some_and(|p| p.remaining == 0) {
            if let Some(p) = self.pending.pop_front() {
                self.spare.push(p.data);
            }
            self.base += 1;
            self.completed += 1;
            if measuring {
                self.completed_window += 1;
            }
            self.credits += 1;
        }
    }
}

/// One subscriber's view of the run.
#[derive(Debug)]
struct Track {
    started: Instant,
    /// The next sequence number expected.
    next: u64,
    /// Counted lost, but may still arrive late (then: reordered).
    skipped: VecDeque<u64>,
    connected: bool,
    /// Got `subscribed`.
    ready: bool,
    /// Counts towards every publish's completion.
    live: bool,
    /// Setup is over (ready, or failed and counted).
    settled: bool,
    /// The server ended the connection (or broke the protocol) first.
    dropped: bool,
    /// Give up on the connection (setup refused).
    abandon: bool,
    close_acked: bool,
}

impl Track {
    fn new(started: Instant) -> Track {
        Track {
            started,
            next: 0,
            skipped: VecDeque::new(),
            connected: false,
            ready: false,
            live: false,
            settled: false,
            dropped: false,
            abandon: false,
            close_acked: false,
        }
    }
}

/// Counters the handlers update.
#[derive(Default)]
struct Tally {
    errors: FanoutErrors,
    latency: Histogram,
    subscribe_time: Histogram,
    received: u64,
    received_window: u64,
    /// `message` events that did not match the expected envelope byte for
    /// byte and went through serde_json.
    slow_path: u64,
    /// Setup, the first problem, pings.
    ledger: Ledger,
}

/// Per-wake-up context for the subscriber handlers.
struct Cx<'a> {
    table: &'a mut Table,
    tally: &'a mut Tally,
    /// Known once the publisher's welcome names its user.
    expect: Option<&'a Expect>,
    channel: &'a str,
    now_ns: u64,
    measuring: bool,
    /// False once the verdicts are final (after the drain).
    verifying: bool,
}

/// A subscriber's setup ended without `subscribed`.
fn setup_failed(t: &mut Track, tally: &mut Tally, kind: String, what: impl FnOnce() -> String) {
    let connect = &mut tally.errors.connect;
    tally
        .ledger
        .setup_failed(&mut t.settled, connect, kind, what);
}

/// The subscriber stops counting: nothing it has not passed waits for it.
fn retire(t: &mut Track, table: &mut Table, measuring: bool) {
    if !t.live {
        return;
    }
    t.live = false;
    table.live = table.live.saturating_sub(1);
    let end = table.next_seq();
    while t.next < end {
        table.pass(t.next, measuring);
        t.next += 1;
    }
}

/// The server ended (or broke) a subscriber's connection before we closed it.
fn sub_gone(t: &mut Track, cx: &mut Cx<'_>, how: Gone, kind: &str, what: impl FnOnce() -> String) {
    if t.dropped {
        return;
    }
    t.dropped = true;
    if !t.settled {
        setup_failed(t, cx.tally, kind.to_owned(), what);
        return;
    }
    if t.live {
        match how {
            Gone::Closed => cx.tally.errors.closed += 1,
            Gone::Protocol => cx.tally.errors.protocol += 1,
        }
        cx.tally.ledger.problem(what);
        retire(t, cx.table, cx.measuring);
    }
}

fn delivered(ts: u64, cx: &mut Cx<'_>) {
    cx.tally.received += 1;
    if cx.measuring {
        cx.tally.received_window += 1;
        cx.tally.latency.record(cx.now_ns.saturating_sub(ts));
    }
}

/// Not what was published: it stands for the publish expected next.
fn corrupt(t: &mut Track, cx: &mut Cx<'_>, p: &[u8]) {
    cx.tally.errors.corrupt += 1;
    cx.tally.ledger.problem(|| {
        format!(
            "a subscriber expecting publish {} got {:?}",
            t.next,
            String::from_utf8_lossy(p.get(..p.len().min(200)).unwrap_or_default())
        )
    });
    if t.next < cx.table.next_seq() {
        cx.table.pass(t.next, cx.measuring);
        t.next += 1;
    }
}

/// Judge the data object starting at `off` of a `message` event `p`.
fn on_data(t: &mut Track, p: &[u8], off: usize, size: usize, cx: &mut Cx<'_>) {
    let d = p.get(off..).unwrap_or_default();
    let Some((seq, ts)) = read_stamp(d) else {
        return corrupt(t, cx, p);
    };
    if seq >= t.next && seq < cx.table.next_seq() {
        let sent = match cx.table.get(seq) {
            Some(pend) if carries(d, &pend.data) => pend.ts,
            _ => return corrupt(t, cx, p),
        };
        // Everything skipped over is lost (unless it turns up later).
        while t.next < seq {
            cx.tally.errors.lost += 1;
            cx.tally
                .ledger
                .problem(|| format!("a subscriber got publish {seq} without {}", t.next));
            if t.skipped.len() == MAX_SKIPPED {
                t.skipped.pop_front();
            }
            t.skipped.push_back(t.next);
            cx.table.pass(t.next, cx.measuring);
            t.next += 1;
        }
        t.next = seq + 1;
        cx.table.pass(seq, cx.measuring);
        delivered(sent, cx);
    } else if seq < t.next {
        // Received before, or skipped: intact either way?
        let mut want = Vec::with_capacity(size + 32);
        write_data(&mut want, seq, ts, size);
        if !carries(d, &want) {
            return corrupt(t, cx, p);
        }
        if let Some(i) = t.skipped.iter().position(|&s| s == seq) {
            t.skipped.remove(i);
            cx.tally.errors.lost = cx.tally.errors.lost.saturating_sub(1);
            cx.tally.errors.reorder += 1;
            delivered(ts, cx);
        } else {
            cx.tally.errors.dup += 1;
            cx.tally
                .ledger
                .problem(|| format!("a subscriber got publish {seq} twice"));
        }
    } else {
        // A sequence number never published.
        corrupt(t, cx, p);
    }
}

/// A whole text message on a subscriber connection.
fn on_sub_text(t: &mut Track, p: &[u8], cx: &mut Cx<'_>) {
    if let Some(e) = cx.expect
        && p.starts_with(&e.prefix)
    {
        // The hot path.
        if cx.verifying {
            if t.live {
                on_data(t, p, e.prefix.len(), e.size, cx);
            } else {
                unexpected(cx, p);
            }
        }
        return;
    }
    let v: Value = match serde_json::from_slice(p) {
        Ok(v) => v,
        Err(_) => {
            if t.live && cx.verifying && p.starts_with(MESSAGE_START) {
                corrupt(t, cx, p);
            } else {
                unexpected(cx, p);
            }
            return;
        }
    };
    match v.get("type").and_then(Value::as_str) {
        Some("message") => {
            cx.tally.slow_path += 1;
            if !cx.verifying {
                return;
            }
            let Some(e) = cx.expect.filter(|_| t.live) else {
                return unexpected(cx, p);
            };
            let ours = v.get("channel").and_then(Value::as_str) == Some(e.channel.as_str())
                && v.get("from").and_then(Value::as_str) == Some(e.from.as_str());
            let data_at = find(p, b"\"data\":{\"seq\":").map(|i| i + b"\"data\":".len());
            match data_at {
                Some(off) if ours => on_data(t, p, off, e.size, cx),
                _ => corrupt(t, cx, p),
            }
        }
        Some("connected") if !t.connected => t.connected = true,
        Some("subscribed")
            if !t.ready && v.get("channel").and_then(Value::as_str) == Some(cx.channel) =>
        {
            t.ready = true;
            if !t.settled && !t.dropped {
                cx.tally.ledger.setup_done(&mut t.settled);
                t.live = true;
                t.next = cx.table.next_seq();
                cx.table.live += 1;
                cx.tally
                    .subscribe_time
                    .record(t.started.elapsed().as_nanos() as u64);
            }
        }
        Some("error") if !t.settled => {
            let code = v.get("code").and_then(Value::as_str).unwrap_or("?");
            setup_failed(t, cx.tally, format!("rejected_{code}"), || {
                format!("subscribe refused: {}", String::from_utf8_lossy(p))
            });
            t.abandon = true;
        }
        Some("error") => {
            cx.tally.errors.rejected += 1;
            cx.tally
                .ledger
                .problem(|| format!("server error: {}", String::from_utf8_lossy(p)));
        }
        _ => unexpected(cx, p),
    }
}

fn unexpected(cx: &mut Cx<'_>, p: &[u8]) {
    cx.tally.errors.unexpected += 1;
    cx.tally.ledger.problem(|| {
        format!(
            "unexpected message: {:?}",
            String::from_utf8_lossy(p.get(..p.len().min(200)).unwrap_or_default())
        )
    });
}

// ---------------------------------------------------------------------------
// Connections.

struct Sub {
    link: Link,
    track: Track,
    /// A fragmented message being reassembled: (opcode, bytes).
    frag: Option<(u8, Vec<u8>)>,
}

struct Publisher {
    link: Link,
    started: Instant,
    /// Its user id, from the `connected` welcome.
    user: Option<String>,
    acks: u64,
    sent: u64,
    /// `{"type":"publish","channel":C,"data":`
    head: Vec<u8>,
    dropped: bool,
    close_acked: bool,
    failure: Option<String>,
    frag: Option<Vec<u8>>,
}

/// `path` with `userId=<user>` added to its query.
pub(crate) fn with_user(path: &str, user: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}userId={user}")
}

/// The fan-out mode's part of the run loop.
struct Fanout<'a> {
    url: &'a WsUrl,
    o: &'a FanoutOpts,
    addr: SocketAddr,
    nonce: u64,
    tag: u32,
    start: Instant,
    sources: net::SourcePorts,
    ramp: Ramp,
    subscribe_msg: String,
    pub_key: String,
    pub_path: String,
    publ: Publisher,
    subs: Vec<Sub>,
    table: Table,
    tally: Tally,
    expect: Option<Expect>,
    live_at_start: usize,
    close_sent: usize,
}

pub fn run(
    url: &WsUrl,
    addr: SocketAddr,
    pid: Option<u32>,
    o: &FanoutOpts,
) -> Result<FanoutReport, String> {
    let n = o.subscribers;
    if n == 0 || o.inflight == 0 {
        return Err("--subscribers and --inflight must be at least 1".into());
    }
    let fd_limit = driver::fd_limit(
        n as u64 + 17,
        &format!("{n} subscribers will not all fit (expect fd_limit failures)"),
    )
    .map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    let mut sources = net::SourcePorts::new(net::source_addresses(addr, n + 1, o.sources));
    let driver = Driver::new(Plan {
        pid,
        warmup: o.warmup,
        duration: o.duration,
        drain_timeout: DRAIN_TIMEOUT,
        close_timeout: CLOSE_TIMEOUT,
        tick: Duration::from_millis(100),
        events: 4096,
        read_buf: READ_BUF,
        baseline: false,
        client: true,
    })?;
    let nonce = driver::run_nonce();
    let tag = std::process::id();
    let channel_json = json_str(&o.channel);
    let start = driver.start();

    // The publisher first: its welcome names the sender every message carries.
    let link = match sources.dial(n, addr).or_else(|_| net::dial(None, addr)) {
        Ok(s) => Link::new(s),
        Err(f) => return Err(format!("publisher: {f}")),
    };
    let mut publ = Publisher {
        link,
        started: start,
        user: None,
        acks: 0,
        sent: 0,
        head: format!("{{\"type\":\"publish\",\"channel\":{channel_json},\"data\":").into_bytes(),
        dropped: false,
        close_acked: false,
        failure: None,
        frag: None,
    };
    publ.link
        .register(driver.registry(), PUBLISHER)
        .map_err(|e| format!("publisher: register: {e}"))?;
    let mut mode = Fanout {
        url,
        o,
        addr,
        nonce,
        tag,
        start,
        sources,
        ramp: Ramp::new(start, o.ramp, n),
        subscribe_msg: format!("{{\"type\":\"subscribe\",\"channel\":{channel_json}}}"),
        pub_key: wire::ws_key(nonce, u64::MAX),
        pub_path: with_user(&url.path, &format!("load-pub-{tag}")),
        publ,
        subs: Vec::with_capacity(n),
        table: Table::default(),
        tally: Tally::default(),
        expect: None,
        live_at_start: 0,
        close_sent: 0,
    };
    let t = driver.run(&mut mode)?;
    let Fanout {
        subs,
        publ,
        table,
        tally,
        sources,
        live_at_start,
        close_sent,
        ..
    } = mode;
    let closed_cleanly =
        subs.iter().filter(|s| s.track.close_acked).count() + usize::from(publ.close_acked);
    Ok(FanoutReport {
        opts: o.clone(),
        sources: sources.len(),
        fd_limit,
        publisher: publ.user.unwrap_or_default(),
        subscribed: tally.ledger.ready,
        live_at_start,
        subscribe_time: tally.subscribe_time,
        publishes: table.completed_window,
        received_window: tally.received_window,
        latency: tally.latency,
        sent_total: publ.sent,
        completed_total: table.completed,
        received_total: tally.received,
        acks: publ.acks,
        slow_path: tally.slow_path,
        errors: tally.errors,
        run: tally
            .ledger
            .outcome(&t, (o.warmup, o.duration), close_sent, closed_cleanly),
    })
}

impl Mode for Fanout<'_> {
    /// Subscribers dialed at the ramp rate; setup is over when every one
    /// is subscribed or failed and the publisher is welcomed.
    fn setup(&mut self, now: Instant, registry: &Registry) -> Result<bool, String> {
        let o = self.o;
        let tally = &mut self.tally;
        let (subs, sources) = (&mut self.subs, &mut self.sources);
        self.ramp
            .dial_due(now, subs, sources, self.addr, registry, |began, link| {
                let mut track = Track::new(began);
                tally.ledger.pending_setup += 1;
                let link = link.unwrap_or_else(|f| {
                    setup_failed(&mut track, tally, f.kind(), || f.to_string());
                    Link::dead()
                });
                Sub {
                    link,
                    track,
                    frag: None,
                }
            });
        if self.ramp.scan_due(now) {
            let tally = &mut self.tally;
            self.ramp.expire(
                &mut self.subs,
                now,
                o.handshake_timeout,
                |s| (!s.track.settled).then_some(s.track.started),
                |s| {
                    setup_failed(&mut s.track, tally, Fail::Timeout.kind(), || {
                        "no subscribed reply in time".to_owned()
                    });
                    s.link.shut(registry);
                },
            );
            let publ = &mut self.publ;
            if publ.user.is_none()
                && publ.failure.is_none()
                && now.saturating_duration_since(publ.started) >= o.handshake_timeout
            {
                publ.failure = Some("no connected welcome in time".into());
            }
        }
        if let Some(f) = &self.publ.failure {
            return Err(format!("the publisher could not connect: {f}"));
        }
        if self.subs.len() == o.subscribers
            && self.tally.ledger.pending_setup == 0
            && self.publ.user.is_some()
        {
            if self.publ.link.phase != Phase::Open {
                return Err("the publisher's connection was lost during setup".into());
            }
            return Ok(true);
        }
        Ok(false)
    }

    fn setup_wait(&self, now: Instant) -> Duration {
        self.ramp.wait(now, self.subs.len())
    }

    /// The first publishes; with nobody to publish to, straight to the report.
    fn begin(&mut self, _at: Instant, turn: &mut Turn<'_>) -> bool {
        self.live_at_start = self.table.live;
        if self.live_at_start == 0 {
            return false;
        }
        self.table.credits = self.o.inflight;
        let now_ns = self.start.elapsed().as_nanos() as u64;
        if send_publishes(&mut self.publ, &mut self.table, self.o.size, now_ns).is_err() {
            pub_gone(
                &mut self.publ,
                &mut self.tally,
                "publisher write failed".into(),
            );
            self.publ.link.shut(turn.registry);
        }
        true
    }

    fn live(&self) -> bool {
        self.publ.link.phase == Phase::Open && self.table.live > 0
    }

    /// Drained when every publish was delivered and acknowledged: the
    /// server may send `published` after the deliveries (the channel's
    /// home shard numbers it, then answers the publisher's shard).
    fn drained(&self) -> bool {
        let acked = self.publ.dropped || self.publ.acks >= self.publ.sent;
        self.table.pending.is_empty() && acked
    }

    /// Verdicts are final: what a live subscriber still misses is lost. If
    /// the publisher's connection was lost, only what the server
    /// acknowledged (`published`, in order) had to arrive.
    fn finish(&mut self, registry: &Registry) {
        let (publ, table, tally) = (&mut self.publ, &mut self.table, &mut self.tally);
        let due_end = if publ.dropped {
            publ.acks.min(table.next_seq())
        } else {
            table.next_seq()
        };
        for s in self.subs.iter_mut().filter(|s| s.track.live) {
            let missing = due_end.saturating_sub(s.track.next);
            tally.errors.lost += missing;
            if missing > 0 {
                tally.ledger.problem(|| {
                    format!("{missing} publishes still missing at a subscriber after the drain")
                });
            }
            retire(&mut s.track, table, false);
        }
        if !publ.dropped {
            tally.errors.unacked += publ.sent.saturating_sub(publ.acks);
        }
        for link in self
            .subs
            .iter_mut()
            .map(|s| &mut s.link)
            .chain([&mut publ.link])
        {
            if link.begin_close(registry) {
                self.close_sent += 1;
            }
        }
    }

    fn closed(&self) -> bool {
        self.publ.link.is_done() && self.subs.iter().all(|s| s.link.is_done())
    }

    fn serve(&mut self, events: &Events, turn: &mut Turn<'_>) {
        let Fanout {
            url,
            o,
            nonce,
            tag,
            start,
            subscribe_msg,
            pub_key,
            pub_path,
            publ,
            subs,
            table,
            tally,
            expect,
            ..
        } = self;
        let (url, o, start, registry) = (*url, *o, *start, turn.registry);
        let sending = turn.sending();
        let mut cx = Cx {
            table,
            tally,
            expect: expect.as_ref(),
            channel: &o.channel,
            now_ns: 0,
            measuring: turn.measuring(),
            verifying: turn.verifying(),
        };
        for ev in events.iter() {
            if ev.token() == PUBLISHER {
                if ev.is_writable() {
                    publ.link.write_blocked = false;
                }
                serve_publisher(publ, turn.rbuf, pub_key, url, pub_path, &mut cx, registry);
                continue;
            }
            let i = ev.token().0;
            let Some(s) = subs.get_mut(i) else { continue };
            if ev.is_writable() {
                s.link.write_blocked = false;
            }
            match s.link.phase {
                Phase::Connecting | Phase::Upgrading => {
                    let key = wire::ws_key(*nonce, i as u64);
                    let req = || {
                        let path = with_user(&url.path, &format!("load-sub-{tag}-{i}"));
                        wire::upgrade_request(&url.authority, &path, &key)
                    };
                    match s.link.handshake(turn.rbuf, req, &key) {
                        Progress::Waiting => {}
                        Progress::Opened => {
                            let Sub { link, track, frag } = s;
                            let mut peer = SubPeer {
                                track,
                                cx: &mut cx,
                                start,
                            };
                            let first = Some(subscribe_msg.as_bytes());
                            net::ws_opened(link, frag, first, registry, &mut peer);
                        }
                        Progress::Failed(f) => {
                            setup_failed(&mut s.track, cx.tally, f.kind(), || f.to_string());
                            s.link.shut(registry);
                        }
                    }
                }
                Phase::Open | Phase::Closing => {
                    let Sub { link, track, frag } = s;
                    let mut peer = SubPeer {
                        track,
                        cx: &mut cx,
                        start,
                    };
                    let hangup = ev.is_read_closed();
                    net::ws_serve(link, frag, turn.rbuf, registry, hangup, &mut peer);
                }
                Phase::Done => {}
            }
            if s.track.abandon && !s.link.is_done() {
                s.link.shut(registry);
            }
            if sending && cx.table.credits > 0 && publ.link.phase == Phase::Open {
                let now_ns = start.elapsed().as_nanos() as u64;
                if send_publishes(publ, cx.table, o.size, now_ns).is_err() {
                    pub_gone(publ, cx.tally, "publisher write failed".into());
                    publ.link.shut(registry);
                }
            }
        }
        if !sending {
            table.credits = 0;
        }
        if expect.is_none()
            && let Some(u) = &publ.user
        {
            // No subscriber can have a message yet: the first publish is
            // sent at the end of setup, at the top of a later turn.
            *expect = Some(Expect::new(&o.channel, u, o.size));
        }
    }
}

/// Send as many publishes as there are credits, stamped now; one write.
fn send_publishes(
    p: &mut Publisher,
    table: &mut Table,
    size: usize,
    now_ns: u64,
) -> std::io::Result<()> {
    let mut any = false;
    while table.credits > 0 && table.live > 0 {
        table.credits -= 1;
        let data = table.publish(now_ns, size);
        let out = &mut p.link.out;
        let start = wire::begin_frame(out, wire::OP_TEXT, p.head.len() + data.len() + 1);
        out.extend_from_slice(&p.head);
        out.extend_from_slice(data);
        out.push(b'}');
        wire::end_frame(out, start);
        p.sent += 1;
        any = true;
    }
    if any { p.link.flush_if_ready() } else { Ok(()) }
}

/// One subscriber's traffic as `net` hands it over.
struct SubPeer<'t, 'c, 'a> {
    track: &'t mut Track,
    cx: &'c mut Cx<'a>,
    start: Instant,
}

impl Peer for SubPeer<'_, '_, '_> {
    /// A closing subscriber is left to the server's EOF.
    const READ_TO_EOF: bool = true;

    fn arrived(&mut self) {
        self.cx.now_ns = self.start.elapsed().as_nanos() as u64;
    }

    fn text(&mut self, p: &[u8]) {
        on_sub_text(self.track, p, self.cx);
    }

    fn binary(&mut self) {
        unexpected(self.cx, b"(a binary message)");
    }

    fn pinged(&mut self, n: u64) {
        self.cx.tally.ledger.pings += n;
    }

    fn lost(&mut self, loss: Loss) {
        let how = loss.gone();
        sub_gone(self.track, self.cx, how, &loss.kind(), || {
            loss.describe(true)
        });
    }

    fn close_acked(&mut self) {
        self.track.close_acked = true;
    }
}

/// A readiness event on the publisher.
fn serve_publisher(
    p: &mut Publisher,
    rbuf: &mut [u8],
    key: &str,
    url: &WsUrl,
    path: &str,
    cx: &mut Cx<'_>,
    registry: &Registry,
) {
    match p.link.phase {
        Phase::Connecting | Phase::Upgrading => {
            match p.link.handshake(
                rbuf,
                || wire::upgrade_request(&url.authority, path, key),
                key,
            ) {
                Progress::Waiting => return,
                Progress::Opened => {
                    if !p.link.inbuf.is_empty() && !pub_bytes(p, &[], cx) {
                        p.link.shut(registry);
                        return;
                    }
                }
                Progress::Failed(f) => {
                    p.failure = Some(f.to_string());
                    p.link.shut(registry);
                    return;
                }
            }
        }
        Phase::Open | Phase::Closing => loop {
            match p.link.read(rbuf) {
                ReadOutcome::Data(n) => {
                    if !pub_bytes(p, rbuf.get(..n).unwrap_or_default(), cx) {
                        p.link.shut(registry);
                        return;
                    }
                }
                ReadOutcome::WouldBlock => break,
                ReadOutcome::Eof | ReadOutcome::Error(_) => {
                    pub_gone(
                        p,
                        cx.tally,
                        "the server closed the publisher's connection".into(),
                    );
                    p.link.shut(registry);
                    return;
                }
            }
        },
        Phase::Done => return,
    }
    if p.link.flush_if_ready().is_err() {
        pub_gone(p, cx.tally, "publisher write failed".into());
        p.link.shut(registry);
    }
}

fn pub_gone(p: &mut Publisher, tally: &mut Tally, what: String) {
    if p.link.phase != Phase::Open || p.dropped {
        return;
    }
    p.dropped = true;
    if p.user.is_none() {
        p.failure.get_or_insert(what);
        return;
    }
    tally.errors.closed += 1;
    tally.ledger.problem(|| what);
}

fn pub_bytes(p: &mut Publisher, fresh: &[u8], cx: &mut Cx<'_>) -> bool {
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    let mut close: Option<Vec<u8>> = None;
    let mut pings: Vec<Vec<u8>> = Vec::new();
    let mut acks = 0u64;
    let mut bad = false;
    let frag = &mut p.frag;
    let r = net::feed(&mut p.link.inbuf, fresh, &mut |f: Frame<'_>| {
        match f.opcode {
            wire::OP_TEXT if f.fin && frag.is_none() => {
                if f.payload.starts_with(PUBLISHED_START) {
                    acks += 1;
                } else {
                    msgs.push(f.payload.to_vec());
                }
            }
            wire::OP_TEXT | wire::OP_BINARY if frag.is_none() && !f.fin => {
                *frag = Some(f.payload.to_vec());
            }
            wire::OP_CONTINUATION if frag.is_some() => {
                if let Some(b) = frag.as_mut() {
                    b.extend_from_slice(f.payload);
                }
                if f.fin
                    && let Some(b) = frag.take()
                {
                    msgs.push(b);
                }
            }
            wire::OP_BINARY if f.fin && frag.is_none() => msgs.push(Vec::new()),
            wire::OP_TEXT | wire::OP_BINARY | wire::OP_CONTINUATION => {
                bad = true;
                return false;
            }
            wire::OP_PING => pings.push(f.payload.to_vec()),
            wire::OP_PONG => {}
            _ => {
                close = Some(f.payload.to_vec());
                return false;
            }
        }
        true
    });
    p.acks += acks;
    for m in msgs {
        on_pub_text(p, &m, cx);
    }
    for ping in pings {
        cx.tally.ledger.pings += 1;
        wire::frame(&mut p.link.out, wire::OP_PONG, &ping);
    }
    if r.is_err() || bad {
        if p.link.phase == Phase::Open && !p.dropped {
            p.dropped = true;
            if p.user.is_none() {
                p.failure
                    .get_or_insert("bad server frame on the publisher".into());
            } else {
                cx.tally.errors.protocol += 1;
                cx.tally
                    .ledger
                    .problem(|| "bad server frame on the publisher".into());
            }
        }
        return false;
    }
    if let Some(c) = close {
        if p.link.phase == Phase::Open {
            let code = c.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            pub_gone(
                p,
                cx.tally,
                format!(
                    "the server closed the publisher with {code} {:?}",
                    String::from_utf8_lossy(c.get(2..).unwrap_or_default())
                ),
            );
            wire::frame(
                &mut p.link.out,
                wire::OP_CLOSE,
                c.get(..2).unwrap_or_default(),
            );
            p.link.phase = Phase::Closing;
        } else {
            p.close_acked = true;
        }
    }
    true
}

fn on_pub_text(p: &mut Publisher, m: &[u8], cx: &mut Cx<'_>) {
    let v: Option<Value> = serde_json::from_slice(m).ok();
    let kind = v
        .as_ref()
        .and_then(|v| v.get("type"))
        .and_then(Value::as_str);
    match kind {
        Some("published") => p.acks += 1,
        Some("connected") if p.user.is_none() => {
            match v
                .as_ref()
                .and_then(|v| v.get("userId"))
                .and_then(Value::as_str)
            {
                Some(u) => p.user = Some(u.to_owned()),
                None => {
                    p.failure
                        .get_or_insert("the welcome names no userId".into());
                }
            }
        }
        Some("error") if p.user.is_none() => {
            p.failure
                .get_or_insert(format!("refused: {}", String::from_utf8_lossy(m)));
        }
        Some("error") => {
            cx.tally.errors.rejected += 1;
            cx.tally
                .ledger
                .problem(|| format!("publisher got: {}", String::from_utf8_lossy(m)));
        }
        _ => unexpected(cx, m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 64;

    struct Rig {
        table: Table,
        tally: Tally,
        expect: Expect,
        subs: Vec<Track>,
    }

    impl Rig {
        /// `n` subscribed subscribers, `k` publishes sent.
        fn new(n: usize, k: usize) -> Rig {
            let mut r = Rig {
                table: Table::default(),
                tally: Tally::default(),
                expect: Expect::new("public:bench", "load-pub-1", SIZE),
                subs: (0..n).map(|_| Track::new(Instant::now())).collect(),
            };
            for i in 0..n {
                r.text(i, b"{\"type\":\"connected\",\"userId\":\"x\"}");
                r.text(
                    i,
                    b"{\"type\":\"subscribed\",\"channel\":\"public:bench\",\"timestamp\":\"t\"}",
                );
            }
            assert_eq!(r.table.live, n);
            r.send(k);
            r
        }

        fn send(&mut self, k: usize) {
            for i in 0..k {
                self.table.publish(1000 + i as u64, SIZE);
            }
        }

        fn text(&mut self, sub: usize, p: &[u8]) {
            let mut cx = Cx {
                table: &mut self.table,
                tally: &mut self.tally,
                expect: Some(&self.expect),
                channel: "public:bench",
                now_ns: 5000,
                measuring: true,
                verifying: true,
            };
            on_sub_text(&mut self.subs[sub], p, &mut cx);
        }

        /// The message event the server writes for publish `seq`.
        fn message(&self, seq: u64) -> Vec<u8> {
            let data = self
                .table
                .get(seq)
                .map(|p| p.data.clone())
                .unwrap_or_else(|| {
                    let mut d = Vec::new();
                    write_data(&mut d, seq, 1000 + seq, SIZE);
                    d
                });
            let mut m = self.expect.prefix.clone();
            m.extend_from_slice(&data);
            m.extend_from_slice(b",\"timestamp\":\"2026-01-01T00:00:00.000Z\"}");
            m
        }

        fn deliver(&mut self, sub: usize, seq: u64) {
            let m = self.message(seq);
            self.text(sub, &m);
        }

        fn finish(&mut self) -> FanoutErrors {
            for t in &mut self.subs {
                if t.live {
                    self.tally.errors.lost += self.table.next_seq() - t.next;
                    retire(t, &mut self.table, false);
                }
            }
            self.tally.errors
        }
    }

    #[test]
    fn data_is_about_the_size_asked_and_reads_back() {
        for (seq, ts) in [(0u64, 0u64), (123, 456_789), (u64::MAX, u64::MAX)] {
            let mut d = Vec::new();
            write_data(&mut d, seq, ts, 64);
            let v: Value = serde_json::from_slice(&d).unwrap();
            assert_eq!(v["seq"], seq);
            assert_eq!(v["ts"], ts);
            assert!(d.len() == 64 || seq == u64::MAX, "{}", d.len());
            assert_eq!(read_stamp(&d), Some((seq, ts)));
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_data(&mut a, 10, 5, 64);
        write_data(&mut b, 11, 5, 64);
        assert_ne!(
            a[20..],
            b[20..],
            "the padding depends on the sequence number"
        );
        assert_eq!(parse_u64(b"18446744073709551616"), None, "overflow");
        assert_eq!(parse_u64(b"x"), None);
    }

    #[test]
    fn in_order_delivery_is_clean_and_completes() {
        let mut r = Rig::new(3, 4);
        for seq in 0..4 {
            for sub in 0..3 {
                r.deliver(sub, seq);
            }
        }
        assert_eq!(r.table.completed, 4);
        assert_eq!(r.table.credits, 4);
        assert_eq!(r.tally.received, 12);
        assert_eq!(r.tally.latency.count(), 12);
        assert_eq!(r.tally.latency.max(), 5000 - 1000);
        assert_eq!(
            r.tally.slow_path, 0,
            "the server's layout takes the fast path"
        );
        assert_eq!(r.finish(), FanoutErrors::default());
    }

    #[test]
    fn a_publish_completes_only_when_every_subscriber_has_it() {
        let mut r = Rig::new(2, 2);
        r.deliver(0, 0);
        r.deliver(0, 1);
        assert_eq!(r.table.completed, 0);
        r.deliver(1, 0);
        assert_eq!(r.table.completed, 1);
        r.deliver(1, 1);
        assert_eq!(r.table.completed, 2);
    }

    #[test]
    fn a_dropped_delivery_is_lost_without_stalling() {
        let mut r = Rig::new(2, 3);
        for seq in 0..3 {
            r.deliver(0, seq);
        }
        r.deliver(1, 0);
        r.deliver(1, 2); // 1 skipped
        assert_eq!(r.table.completed, 3, "the loss does not stall the pipeline");
        let e = r.finish();
        assert_eq!(
            e,
            FanoutErrors {
                lost: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn missing_at_the_end_is_lost() {
        let mut r = Rig::new(1, 3);
        r.deliver(0, 0);
        assert_eq!(r.finish().lost, 2);
    }

    #[test]
    fn duplicate_and_reorder() {
        let mut r = Rig::new(1, 4);
        r.deliver(0, 0);
        r.deliver(0, 0);
        assert_eq!(r.tally.errors.dup, 1);
        r.deliver(0, 2);
        assert_eq!(r.tally.errors.lost, 1);
        r.deliver(0, 1); // late after all
        r.deliver(0, 3);
        let e = r.finish();
        assert_eq!(
            e,
            FanoutErrors {
                dup: 1,
                reorder: 1,
                ..Default::default()
            }
        );
        assert_eq!(r.tally.received, 4);
    }

    #[test]
    fn corrupt_data_wrong_sender_and_unknown_seq() {
        let mut r = Rig::new(1, 4);
        let mut m = r.message(0);
        let at = r.expect.prefix.len() + 40; // inside the padding
        m[at] = if m[at] == b'A' { b'B' } else { b'A' };
        r.text(0, &m);
        assert_eq!(r.tally.errors.corrupt, 1);
        // A different sender, laid out the server's way: caught by the slow path.
        let other = Expect::new("public:bench", "mallory", SIZE);
        let mut m = other.prefix.clone();
        m.extend_from_slice(&r.table.get(1).unwrap().data.clone());
        m.extend_from_slice(b",\"timestamp\":\"t\"}");
        r.text(0, &m);
        assert_eq!(r.tally.errors.corrupt, 2);
        // A sequence number never published.
        r.deliver(0, 99);
        assert_eq!(r.tally.errors.corrupt, 3);
        r.deliver(0, 3);
        let e = r.finish();
        assert_eq!(e.corrupt, 3);
        assert_eq!(e.total(), 3, "{e:?}");
    }

    #[test]
    fn other_envelope_layouts_take_the_slow_path() {
        let mut r = Rig::new(1, 1);
        let data = String::from_utf8(r.table.get(0).unwrap().data.clone()).unwrap();
        let m = format!(
            "{{\"timestamp\":\"t\",\"from\":\"load-pub-1\",\"data\":{data},\"type\":\"message\",\"channel\":\"public:bench\"}}"
        );
        r.text(0, m.as_bytes());
        assert_eq!(r.tally.received, 1);
        assert_eq!(r.tally.slow_path, 1);
        assert_eq!(r.finish(), FanoutErrors::default());
    }

    #[test]
    fn setup_replies() {
        let mut r = Rig::new(0, 0);
        r.subs.push(Track::new(Instant::now()));
        r.tally.ledger.pending_setup = 1;
        r.text(
            0,
            b"{\"type\":\"error\",\"code\":\"forbidden\",\"message\":\"no\"}",
        );
        assert_eq!(r.tally.errors.connect, 1);
        assert_eq!(r.tally.ledger.failures.get("rejected_forbidden"), Some(&1));
        assert!(r.subs[0].abandon);
        assert_eq!(r.tally.ledger.pending_setup, 0);
        assert_eq!(r.table.live, 0);
    }

    #[test]
    fn a_subscriber_lost_midway_stops_counting() {
        let mut r = Rig::new(2, 2);
        r.deliver(0, 0);
        r.deliver(0, 1);
        let mut cx = Cx {
            table: &mut r.table,
            tally: &mut r.tally,
            expect: Some(&r.expect),
            channel: "public:bench",
            now_ns: 0,
            measuring: false,
            verifying: true,
        };
        sub_gone(&mut r.subs[1], &mut cx, Gone::Closed, "eof", || {
            "eof".into()
        });
        assert_eq!(
            r.table.completed, 2,
            "nothing waits for a closed subscriber"
        );
        assert_eq!(r.table.live, 1);
        let e = r.finish();
        assert_eq!(
            e,
            FanoutErrors {
                closed: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn user_query() {
        assert_eq!(with_user("/ws", "a"), "/ws?userId=a");
        assert_eq!(with_user("/ws?token=t", "a"), "/ws?token=t&userId=a");
    }
}
