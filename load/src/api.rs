//! API mode: publishes through the HTTP API, delivered to WebSocket
//! subscribers.
//!
//! N subscribers on one channel (`{"type":"subscribe","channel":C}` ->
//! `subscribed`; the server's channel rules must allow it), and P HTTP/1.1
//! keep-alive connections to the same host and port issuing
//!
//! ```text
//! POST /api/publish   Content-Type: application/json   [Authorization: Bearer <key>]
//! {"channel":C,"data":{"seq":S,"t":T}}
//! ```
//!
//! with T the send time (µs since the run started), K requests in flight in
//! total, pipelined on the connections (each new one goes to the connection
//! with the fewest outstanding; responses come back in order per
//! connection). A 200 answer is `{"channel":C,"offset":O,"epoch":E,
//! "connections":n}`; subscribers get `{"type":"message","channel":C,
//! "data":{...},"offset":O,"epoch":E,...}`.
//!
//! A publish is complete when its response is in and every live subscriber
//! has passed it (received it, or received a later offset first: then it is
//! counted lost at once, so a loss does not stall the pipeline); each
//! completion lets one more request go. The first publish goes alone: its
//! offset is where the run's offsets start.
//!
//! Verified: every subscriber gets every published record exactly once, in
//! offset order, with the data that was sent; the offset a subscriber sees
//! is the one the HTTP response gave; one epoch throughout; responses on
//! one connection carry increasing offsets (its requests were published in
//! the order sent). Reported: API publishes/s, HTTP response latency, end
//! to end latency (send to subscriber), deliveries/s, errors by kind, HTTP
//! statuses other than 200.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use mio::{Events, Registry, Token};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::driver::{self, Driver, Mode, Plan, Ramp, Turn};
use crate::fanout::{json_str, with_user};
use crate::hist::Histogram;
use crate::net::{self, Fail, Gone, Link, Loss, Peer, Phase, Progress, ReadOutcome};
use crate::procfs::Delta;
use crate::report::{self, Ledger, Outcome, Summary, latency_json, latency_line, map_line};
use crate::url::WsUrl;
use crate::wire;

/// After the measured window, how long to wait for publishes in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the server's side of the closing handshakes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// One read lands here (shared by all connections).
const READ_BUF: usize = 256 << 10;
/// HTTP connections are tokens from here on; subscribers are 0..N.
const HTTP_BASE: usize = 1 << 40;
/// Offsets a subscriber remembers as skipped (counted lost, but forgiven
/// as reordered if they still arrive).
const MAX_SKIPPED: usize = 4096;
/// Longest HTTP response head accepted.
const MAX_HEAD: usize = 16 << 10;
/// Largest response body accepted.
const MAX_BODY: usize = 1 << 20;

/// The command line of api mode.
#[derive(Debug, Clone, Args)]
pub struct ApiOpts {
    /// Subscriber connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// HTTP/1.1 keep-alive connections issuing the publishes.
    #[arg(short = 'p', long, default_value_t = 4)]
    pub connections: usize,
    /// Publish requests in flight in total, pipelined on the connections
    /// (each completes when answered and delivered to every subscriber).
    #[arg(short = 'k', long, default_value_t = 8)]
    pub inflight: usize,
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
    /// The channel (the server's channel rules must let anyone subscribe).
    #[arg(long, default_value = "load")]
    pub channel: String,
    /// Sent as `Authorization: Bearer <KEY>`.
    #[arg(long, value_name = "KEY", env = "SWITCHBOARD_API_KEY")]
    pub api_key: Option<String>,
    /// The publish route.
    #[arg(long, default_value = "/api/publish")]
    pub api_path: String,
    /// Seconds allowed for one subscriber's connect, upgrade and subscribe.
    #[arg(long, default_value = "10", value_parser = driver::parse_secs)]
    pub handshake_timeout: Duration,
}

report::error_kinds! {
    /// Everything that went wrong, by kind.
    pub struct ApiErrors {
        /// A subscriber never received a published record (a later offset came
        /// first, or it was still missing when the drain ended).
        lost,
        /// A subscriber received an offset again.
        dup,
        /// An offset counted lost arrived after all, behind a later one.
        reorder,
        /// A `message` whose data, channel, offset or epoch is not what was
        /// published and answered (or names a publish never sent or refused).
        corrupt,
        /// Responses on one HTTP connection whose offsets do not increase.
        order,
        /// Requests answered with another status than 200 (see the statuses).
        rejected,
        /// A 200 whose body is not the documented JSON, or a response that
        /// breaks HTTP/1.1 framing as this client reads it.
        bad_response,
        /// Requests never answered by the end of the drain.
        unanswered,
        /// Connections (subscribers or HTTP) the server ended while they counted.
        closed,
        /// Subscribers that never got to `subscribed`, HTTP connections never made.
        connect,
        /// Server frames that break RFC 6455.
        protocol,
        /// `{"type":"error"}` after setup, or messages of a type that has no place.
        unexpected,
    }
}

/// Everything measured in one API run.
#[derive(Debug)]
pub struct ApiReport {
    pub opts: ApiOpts,
    pub sources: usize,
    pub fd_limit: u64,
    pub subscribed: usize,
    pub live_at_start: usize,
    pub http_open: usize,
    pub subscribe_time: Histogram,
    /// Publishes completed (answered and delivered) inside the window.
    pub publishes: u64,
    /// Intact deliveries inside the window.
    pub received_window: u64,
    /// Request to response, every response of the window (ns).
    pub http_latency: Histogram,
    /// Send to subscriber, every delivery of the window (ns).
    pub e2e_latency: Histogram,
    pub sent_total: u64,
    pub answered_total: u64,
    pub completed_total: u64,
    pub received_total: u64,
    pub first_offset: Option<u64>,
    pub last_offset: Option<u64>,
    pub epoch: Option<String>,
    /// `connections` of the last 200 answer.
    pub connections_reported: Option<u64>,
    /// HTTP connections the server closed while idle, opened again.
    pub reconnects: u64,
    /// Messages verified through serde_json instead of the fast path.
    pub slow_path: u64,
    /// Statuses other than 200, by code.
    pub statuses: BTreeMap<String, u64>,
    pub errors: ApiErrors,
    /// The window, the samples, connections never made (by kind), the close.
    pub run: Outcome,
}

impl ApiReport {
    pub fn publishes_per_sec(&self) -> f64 {
        self.run.per_sec(self.publishes)
    }

    pub fn deliveries_per_sec(&self) -> f64 {
        self.run.per_sec(self.received_window)
    }

    /// Server CPU microseconds per publish (fan-out included) in the window.
    pub fn server_us_per_publish(&self) -> Option<f64> {
        self.run.server_us_per(self.publishes)
    }

    /// Server CPU microseconds per delivery in the window.
    pub fn server_us_per_delivery(&self) -> Option<f64> {
        self.run.server_us_per(self.received_window)
    }
}

// ---------------------------------------------------------------------------
// Requests, responses and events (pure: no sockets, no clock).

/// The request of publish `seq` sent at `t_us`.
pub fn write_request(out: &mut Vec<u8>, head: &[u8], channel_json: &str, seq: u64, t_us: u64) {
    let mut body = Vec::with_capacity(64 + channel_json.len());
    let _ = write!(
        body,
        "{{\"channel\":{channel_json},\"data\":{{\"seq\":{seq},\"t\":{t_us}}}}}"
    );
    out.extend_from_slice(head);
    let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
    out.extend_from_slice(&body);
}

/// Request head lines up to (not including) Content-Length.
fn request_head(path: &str, authority: &str, key: Option<&str>) -> Vec<u8> {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n{auth}User-Agent: switchboard-load\r\n"
    )
    .into_bytes()
}

/// One HTTP response framed by Content-Length.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
    /// `Connection: close`: nothing more comes on this connection.
    pub close: bool,
}

/// Parse the response at the front of `buf`: `Ok(None)` when it is not all
/// there yet, else the response and the bytes it took.
pub fn parse_response(buf: &[u8]) -> Result<Option<(HttpResponse, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response head too long".into()),
        Err(e) => return Err(format!("malformed HTTP response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut len: Option<usize> = None;
    let mut close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or("bad Content-Length")?;
            if len.is_some_and(|l| l != v) {
                return Err("conflicting Content-Length headers".into());
            }
            len = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding (only Content-Length bodies are read)".into());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let len = match len {
        Some(l) => l,
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err(format!("HTTP {status} without Content-Length")),
    };
    if len > MAX_BODY {
        return Err(format!("response body of {len} bytes"));
    }
    let Some(body) = buf.get(head..head + len) else {
        return Ok(None);
    };
    Ok(Some((
        HttpResponse {
            status,
            body: body.to_vec(),
            close,
        },
        head + len,
    )))
}

/// The 200 body of `POST /api/publish`.
#[derive(Deserialize)]
struct Published<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    #[serde(default)]
    connections: Option<u64>,
}

/// A server event on a subscriber, as serde sees it (the slow path).
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
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

/// `{"seq":S,"t":T}` exactly: (S, T, bytes taken).
fn read_data(d: &[u8]) -> Option<(u64, u64, usize)> {
    let rest = d.strip_prefix(b"{\"seq\":")?;
    let (seq, a) = parse_u64(rest)?;
    let rest = rest.get(a..)?.strip_prefix(b",\"t\":")?;
    let (t, b) = parse_u64(rest)?;
    rest.get(b..)?.strip_prefix(b"}")?;
    Some((seq, t, 7 + a + 5 + b + 1))
}

/// What a `message` event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delivery<'a> {
    seq: u64,
    t_us: u64,
    offset: u64,
    epoch: &'a [u8],
}

/// The server's own layout, `<prefix>{"seq":S,"t":T},"offset":O,"epoch":"E"`
/// (`prefix` is `{"type":"message","channel":C,"data":`): no JSON parser.
fn fast_delivery<'a>(p: &'a [u8], prefix: &[u8]) -> Option<Delivery<'a>> {
    let rest = p.strip_prefix(prefix)?;
    let (seq, t_us, used) = read_data(rest)?;
    let rest = rest.get(used..)?.strip_prefix(b",\"offset\":")?;
    let (offset, n) = parse_u64(rest)?;
    let rest = rest.get(n..)?.strip_prefix(b",\"epoch\":\"")?;
    let end = rest.iter().position(|&c| c == b'"' || c == b'\\')?;
    if rest.get(end) != Some(&b'"') {
        return None;
    }
    Some(Delivery {
        seq,
        t_us,
        offset,
        epoch: rest.get(..end)?,
    })
}

// ---------------------------------------------------------------------------
// The publishes in flight.

#[derive(Debug)]
struct Pending {
    sent_ns: u64,
    t_us: u64,
    /// From the 200 answer.
    offset: Option<u64>,
    answered: bool,
    /// The offset the first subscriber saw, before the answer came.
    seen_offset: Option<u64>,
    /// Live subscribers that have not passed it yet.
    remaining: usize,
    /// Subscribers that passed it (one bit each).
    passed: Vec<u64>,
}

#[derive(Debug, Default)]
struct Table {
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    /// Offset -> seq of the answered publishes in flight.
    by_offset: HashMap<u64, u64>,
    /// Offsets skipped by subscribers before their publish was answered.
    orphans: HashMap<u64, Vec<usize>>,
    /// Publishes whose fate is unknown (their connection was lost): a
    /// delivery of one is accepted, its absence is not counted.
    unknown: HashSet<u64>,
    /// Offset of the first publish.
    base: Option<u64>,
    last_offset: Option<u64>,
    epoch: Option<String>,
    live: usize,
    subscribers: usize,
    credits: usize,
    completed: u64,
    completed_window: u64,
    answered: u64,
    spare: Vec<Vec<u64>>,
}

impl Table {
    fn publish(&mut self, sent_ns: u64, t_us: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let words = self.subscribers.div_ceil(64).max(1);
        let mut passed = self.spare.pop().unwrap_or_default();
        passed.clear();
        passed.resize(words, 0);
        self.pending.insert(
            seq,
            Pending {
                sent_ns,
                t_us,
                offset: None,
                answered: false,
                seen_offset: None,
                remaining: self.live,
                passed,
            },
        );
        seq
    }

    /// Subscriber `sub` is done with `seq`; false if it was already.
    fn pass(&mut self, seq: u64, sub: usize, measuring: bool) -> bool {
        let Some(p) = self.pending.get_mut(&seq) else {
            return true;
        };
        let (w, bit) = (sub / 64, 1u64 << (sub % 64));
        let Some(word) = p.passed.get_mut(w) else {
            return true;
        };
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        p.remaining = p.remaining.saturating_sub(1);
        self.try_complete(seq, measuring);
        true
    }

    /// Subscriber `sub` skipped `offset`.
    fn pass_offset(&mut self, offset: u64, sub: usize, measuring: bool) {
        match self.by_offset.get(&offset) {
            Some(&seq) => {
                self.pass(seq, sub, measuring);
            }
            None => self.orphans.entry(offset).or_default().push(sub),
        }
    }

    fn try_complete(&mut self, seq: u64, measuring: bool) {
        if !self
            .pending
            .get(&seq)
            .is_some_and(|p| p.answered && p.remaining == 0)
        {
            return;
        }
        if let Some(p) = self.pending.remove(&seq) {
            if let Some(o) = p.offset {
                self.by_offset.remove(&o);
            }
            self.spare.push(p.passed);
        }
        self.completed += 1;
        if measuring {
            self.completed_window += 1;
        }
        self.credits += 1;
    }

    /// A publish that will not be delivered (refused) or may not be (its
    /// connection was lost): out of the pipeline.
    fn drop_publish(&mut self, seq: u64, unknown: bool) {
        if let Some(p) = self.pending.remove(&seq) {
            self.spare.push(p.passed);
            self.credits += 1;
        }
        if unknown {
            self.unknown.insert(seq);
        }
    }
}

/// One subscriber's view.
#[derive(Debug)]
struct Track {
    started: Instant,
    /// The next offset expected.
    next: Option<u64>,
    skipped: VecDeque<u64>,
    connected: bool,
    ready: bool,
    live: bool,
    settled: bool,
    dropped: bool,
    abandon: bool,
    close_acked: bool,
}

impl Track {
    fn new(started: Instant) -> Track {
        Track {
            started,
            next: None,
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

#[derive(Default)]
struct Tally {
    errors: ApiErrors,
    http_latency: Histogram,
    e2e_latency: Histogram,
    subscribe_time: Histogram,
    received: u64,
    received_window: u64,
    slow_path: u64,
    statuses: BTreeMap<String, u64>,
    connections_reported: Option<u64>,
    /// Setup, the first problem, pings.
    ledger: Ledger,
}

struct Cx<'a> {
    table: &'a mut Table,
    tally: &'a mut Tally,
    /// `{"type":"message","channel":C,"data":`
    prefix: &'a [u8],
    channel: &'a str,
    now_ns: u64,
    measuring: bool,
    verifying: bool,
}

fn snippet(p: &[u8]) -> String {
    String::from_utf8_lossy(p.get(..p.len().min(200)).unwrap_or_default()).into_owned()
}

fn setup_failed(t: &mut Track, tally: &mut Tally, kind: String, what: impl FnOnce() -> String) {
    let connect = &mut tally.errors.connect;
    tally
        .ledger
        .setup_failed(&mut t.settled, connect, kind, what);
}

/// The subscriber stops counting: nothing waits for it any more.
fn retire(t: &mut Track, sub: usize, table: &mut Table, measuring: bool) {
    if !t.live {
        return;
    }
    t.live = false;
    table.live = table.live.saturating_sub(1);
    let seqs: Vec<u64> = table.pending.keys().copied().collect();
    for seq in seqs {
        table.pass(seq, sub, measuring);
    }
    for subs in table.orphans.values_mut() {
        subs.retain(|&s| s != sub);
    }
}

fn sub_gone(
    t: &mut Track,
    sub: usize,
    cx: &mut Cx<'_>,
    how: Gone,
    kind: &str,
    what: impl FnOnce() -> String,
) {
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
        retire(t, sub, cx.table, cx.measuring);
    }
}

fn unexpected(tally: &mut Tally, p: &[u8]) {
    tally.errors.unexpected += 1;
    tally
        .ledger
        .problem(|| format!("unexpected message: {:?}", snippet(p)));
}

fn corrupt(tally: &mut Tally, what: impl FnOnce() -> String) {
    tally.errors.corrupt += 1;
    tally.ledger.problem(what);
}

fn delivered(t_us: u64, cx: &mut Cx<'_>) {
    cx.tally.received += 1;
    if cx.measuring {
        cx.tally.received_window += 1;
        cx.tally
            .e2e_latency
            .record(cx.now_ns.saturating_sub(t_us.saturating_mul(1000)));
    }
}

/// Judge one delivery to subscriber `sub`.
fn on_delivery(t: &mut Track, sub: usize, d: Delivery<'_>, cx: &mut Cx<'_>) {
    if !t.live {
        return unexpected(cx.tally, b"(a message on a subscriber not counting)");
    }
    if cx
        .table
        .epoch
        .as_deref()
        .is_some_and(|e| e.as_bytes() != d.epoch)
    {
        return corrupt(cx.tally, || {
            format!(
                "offset {} with epoch {:?}, not the run's",
                d.offset,
                String::from_utf8_lossy(d.epoch)
            )
        });
    }
    if cx.table.epoch.is_none() {
        cx.table.epoch = Some(String::from_utf8_lossy(d.epoch).into_owned());
    }
    let next = t.next.or(cx.table.base).unwrap_or(d.offset);
    if d.offset < next {
        if let Some(i) = t.skipped.iter().position(|&o| o == d.offset) {
            t.skipped.remove(i);
            cx.tally.errors.lost = cx.tally.errors.lost.saturating_sub(1);
            cx.tally.errors.reorder += 1;
            delivered(d.t_us, cx);
        } else {
            cx.tally.errors.dup += 1;
            cx.tally
                .ledger
                .problem(|| format!("a subscriber got offset {} again", d.offset));
        }
        return;
    }
    // Nothing was published beyond what was sent: a gap wider than that is
    // a wrong offset, not a loss.
    if d.offset - next > cx.table.next_seq {
        return corrupt(cx.tally, || {
            format!("offset {} far beyond anything published", d.offset)
        });
    }
    let Some(p) = cx.table.pending.get_mut(&d.seq) else {
        if cx.table.unknown.contains(&d.seq) {
            t.next = Some(d.offset + 1);
            delivered(d.t_us, cx);
            return;
        }
        return corrupt(cx.tally, || {
            format!(
                "a subscriber got publish {} at offset {}: not in flight (never sent, refused, or delivered before)",
                d.seq, d.offset
            )
        });
    };
    let mut bad = None;
    if p.t_us != d.t_us {
        bad = Some(format!(
            "publish {} with t {} (sent {})",
            d.seq, d.t_us, p.t_us
        ));
    } else if let Some(o) = p.offset.or(p.seen_offset)
        && o != d.offset
    {
        bad = Some(format!(
            "publish {} at offset {}, answered or seen at {o}",
            d.seq, d.offset
        ));
    } else {
        p.seen_offset = Some(d.offset);
    }
    if let Some(b) = bad {
        return corrupt(cx.tally, || b);
    }
    // Everything skipped over is lost (unless it turns up later).
    for off in next..d.offset {
        cx.tally.errors.lost += 1;
        cx.tally
            .ledger
            .problem(|| format!("a subscriber got offset {} without {off}", d.offset));
        if t.skipped.len() == MAX_SKIPPED {
            t.skipped.pop_front();
        }
        t.skipped.push_back(off);
        cx.table.pass_offset(off, sub, cx.measuring);
    }
    t.next = Some(d.offset + 1);
    if cx.table.pass(d.seq, sub, cx.measuring) {
        delivered(d.t_us, cx);
    } else {
        cx.tally.errors.dup += 1;
        cx.tally
            .ledger
            .problem(|| format!("a subscriber got publish {} twice", d.seq));
    }
}

/// A whole text message on subscriber `sub`.
fn on_sub_text(t: &mut Track, sub: usize, p: &[u8], cx: &mut Cx<'_>) {
    if let Some(d) = fast_delivery(p, cx.prefix) {
        if cx.verifying {
            on_delivery(t, sub, d, cx);
        }
        return;
    }
    let Ok(v) = serde_json::from_slice::<Event<'_>>(p) else {
        return unexpected(cx.tally, p);
    };
    match v.kind.as_ref() {
        "message" => {
            cx.tally.slow_path += 1;
            if !cx.verifying {
                return;
            }
            let stamp = v.data.and_then(|d| {
                read_data(d.get().as_bytes())
                    .map(|(s, t, _)| (s, t))
                    .or_else(|| {
                        let x: Value = serde_json::from_str(d.get()).ok()?;
                        Some((x.get("seq")?.as_u64()?, x.get("t")?.as_u64()?))
                    })
            });
            match (stamp, v.offset, v.epoch.as_deref()) {
                (Some((seq, t_us)), Some(offset), Some(epoch))
                    if v.channel.as_deref() == Some(cx.channel) =>
                {
                    let d = Delivery {
                        seq,
                        t_us,
                        offset,
                        epoch: epoch.as_bytes(),
                    };
                    on_delivery(t, sub, d, cx);
                }
                _ => corrupt(cx.tally, || {
                    format!("a message that is not one of ours: {}", snippet(p))
                }),
            }
        }
        "connected" if !t.connected => t.connected = true,
        "subscribed" if !t.ready && v.channel.as_deref() == Some(cx.channel) => {
            t.ready = true;
            if !t.settled && !t.dropped {
                cx.tally.ledger.setup_done(&mut t.settled);
                t.live = true;
                cx.table.live += 1;
                cx.tally
                    .subscribe_time
                    .record(t.started.elapsed().as_nanos() as u64);
            }
        }
        "error" if !t.settled => {
            let code = v.code.as_deref().unwrap_or("?");
            setup_failed(t, cx.tally, format!("rejected_{code}"), || {
                format!("subscribe refused: {}", snippet(p))
            });
            t.abandon = true;
        }
        _ => unexpected(cx.tally, p),
    }
}

/// One HTTP connection.
struct Http {
    link: Link,
    started: Instant,
    /// Publishes sent on it, oldest first: responses come in this order.
    outstanding: VecDeque<u64>,
    last_offset: Option<u64>,
    /// Lost, or said `Connection: close`: no new requests.
    done: bool,
    /// Connected at least once (a failed reconnect is an error, not a setup failure).
    ever_open: bool,
    failure: Option<String>,
}

/// One response on HTTP connection `h`.
fn on_response(h: &mut Http, r: HttpResponse, cx: &mut Cx<'_>) {
    let Some(seq) = h.outstanding.pop_front() else {
        cx.tally.errors.bad_response += 1;
        cx.tally
            .ledger
            .problem(|| format!("HTTP {} answering no request", r.status));
        return;
    };
    let Some(p) = cx.table.pending.get_mut(&seq) else {
        return;
    };
    if cx.measuring {
        cx.tally
            .http_latency
            .record(cx.now_ns.saturating_sub(p.sent_ns));
    }
    if r.status != 200 {
        *cx.tally.statuses.entry(r.status.to_string()).or_default() += 1;
        cx.tally.errors.rejected += 1;
        cx.tally.ledger.problem(|| {
            format!(
                "publish {seq} answered HTTP {}: {}",
                r.status,
                snippet(&r.body)
            )
        });
        cx.table.drop_publish(seq, false);
        return;
    }
    let body = serde_json::from_slice::<Published<'_>>(&r.body)
        .ok()
        .filter(|b| b.channel == cx.channel);
    let Some(b) = body else {
        cx.tally.errors.bad_response += 1;
        cx.tally
            .ledger
            .problem(|| format!("publish {seq} answered 200 with {}", snippet(&r.body)));
        // Delivered or not, it cannot be matched to an offset.
        cx.table.drop_publish(seq, true);
        return;
    };
    let mut bad = None;
    if cx.table.epoch.as_deref().is_some_and(|e| e != b.epoch) {
        bad = Some(format!(
            "publish {seq} answered with epoch {:?}",
            b.epoch.as_ref()
        ));
    } else if p.seen_offset.is_some_and(|o| o != b.offset) {
        bad = Some(format!(
            "publish {seq} answered offset {}, delivered at {:?}",
            b.offset, p.seen_offset
        ));
    } else if cx.table.by_offset.contains_key(&b.offset) {
        bad = Some(format!(
            "offset {} answered for two publishes in flight",
            b.offset
        ));
    }
    if let Some(w) = bad {
        corrupt(cx.tally, || w);
    }
    if h.last_offset.is_some_and(|o| o >= b.offset) {
        cx.tally.errors.order += 1;
        cx.tally.ledger.problem(|| {
            format!(
                "offset {} answered after {:?} on the same connection",
                b.offset, h.last_offset
            )
        });
    }
    h.last_offset = Some(b.offset);
    p.offset = Some(b.offset);
    p.answered = true;
    cx.table.answered += 1;
    cx.tally.connections_reported = b.connections;
    if cx.table.epoch.is_none() {
        cx.table.epoch = Some(b.epoch.into_owned());
    }
    if cx.table.base.is_none() {
        // Until a publish completes only one is in flight: the first
        // answer is the run's first offset (even if an earlier request
        // was refused).
        cx.table.base = Some(b.offset);
    }
    cx.table.last_offset = Some(cx.table.last_offset.map_or(b.offset, |l| l.max(b.offset)));
    cx.table.by_offset.insert(b.offset, seq);
    if let Some(subs) = cx.table.orphans.remove(&b.offset) {
        for sub in subs {
            cx.table.pass(seq, sub, cx.measuring);
        }
    }
    cx.table.try_complete(seq, cx.measuring);
}

/// The HTTP connection is lost: what it had outstanding may or may not
/// have been published.
fn http_gone(h: &mut Http, cx: &mut Cx<'_>, what: String) {
    if h.done && h.outstanding.is_empty() {
        return;
    }
    if !h.done {
        cx.tally.errors.closed += 1;
        cx.tally.ledger.problem(|| what);
    }
    h.done = true;
    for seq in h.outstanding.drain(..) {
        cx.table.drop_publish(seq, true);
    }
}

/// What became of an HTTP connection after a readiness event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpEnd {
    Keep,
    /// Lost with requests outstanding, or broken (counted).
    Gone,
    /// The server ended it with nothing outstanding: a keep-alive
    /// connection may be closed when idle (HTTP/1.1), so open another.
    Idle,
}

/// Read and answer an HTTP connection.
fn serve_http(h: &mut Http, rbuf: &mut [u8], start: Instant, cx: &mut Cx<'_>) -> HttpEnd {
    if h.link.phase == Phase::Connecting {
        match h.link.tcp_connect() {
            Ok(false) => return HttpEnd::Keep,
            Ok(true) => h.ever_open = true,
            Err(f) => {
                h.failure = Some(f.to_string());
                if h.ever_open {
                    // A reconnect that failed (setup counts its own failures).
                    http_gone(h, cx, format!("HTTP connection: {f}"));
                }
                return HttpEnd::Gone;
            }
        }
    }
    // The server's end of the connection, quietly if nothing was outstanding.
    let ended = |h: &mut Http, cx: &mut Cx<'_>, what: String| {
        if h.outstanding.is_empty() && !h.done {
            HttpEnd::Idle
        } else {
            http_gone(h, cx, what);
            HttpEnd::Gone
        }
    };
    loop {
        match h.link.read(rbuf) {
            ReadOutcome::Data(n) => {
                cx.now_ns = start.elapsed().as_nanos() as u64;
                h.link
                    .inbuf
                    .extend_from_slice(rbuf.get(..n).unwrap_or_default());
                loop {
                    match parse_response(&h.link.inbuf) {
                        Ok(None) => break,
                        Ok(Some((r, used))) => {
                            h.link.inbuf.drain(..used);
                            let close = r.close;
                            on_response(h, r, cx);
                            if close {
                                return ended(
                                    h,
                                    cx,
                                    "the server closed an HTTP connection with requests outstanding (Connection: close)".into(),
                                );
                            }
                        }
                        Err(e) => {
                            cx.tally.errors.bad_response += 1;
                            http_gone(h, cx, e);
                            return HttpEnd::Gone;
                        }
                    }
                }
            }
            ReadOutcome::WouldBlock => break,
            ReadOutcome::Eof => {
                return ended(
                    h,
                    cx,
                    "the server closed an HTTP connection with requests outstanding (EOF)".into(),
                );
            }
            ReadOutcome::Error(e) => {
                return ended(h, cx, format!("HTTP connection: {e}"));
            }
        }
    }
    HttpEnd::Keep
}

// ---------------------------------------------------------------------------
// The run.

struct Sub {
    link: Link,
    track: Track,
    frag: Option<(u8, Vec<u8>)>,
}

/// The API mode's part of the run loop.
struct Api<'a> {
    url: &'a WsUrl,
    o: &'a ApiOpts,
    addr: SocketAddr,
    nonce: u64,
    tag: u32,
    start: Instant,
    sources: net::SourcePorts,
    ramp: Ramp,
    channel_json: String,
    subscribe_msg: String,
    /// `{"type":"message","channel":C,"data":`
    prefix: Vec<u8>,
    /// The request head up to Content-Length.
    head: Vec<u8>,
    https: Vec<Http>,
    subs: Vec<Sub>,
    table: Table,
    tally: Tally,
    live_at_start: usize,
    http_open: usize,
    /// The first publish completed: the others may go.
    primed: bool,
    sent_total: u64,
    /// The HTTP connection next in turn.
    rr: usize,
    reconnects: u64,
    close_sent: usize,
}

pub fn run(
    url: &WsUrl,
    addr: SocketAddr,
    pid: Option<u32>,
    o: &ApiOpts,
) -> Result<ApiReport, String> {
    let n = o.subscribers;
    if n == 0 || o.inflight == 0 || o.connections == 0 {
        return Err("--subscribers, --connections and --inflight must be at least 1".into());
    }
    let fd_limit = driver::fd_limit(
        (n + o.connections) as u64 + 16,
        &format!("{n} subscribers will not all fit (expect fd_limit failures)"),
    )
    .map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    let mut sources =
        net::SourcePorts::new(net::source_addresses(addr, n + o.connections, o.sources));
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
    let channel_json = json_str(&o.channel);
    let start = driver.start();

    // The HTTP connections first.
    let mut https: Vec<Http> = Vec::with_capacity(o.connections);
    for j in 0..o.connections {
        let mut link = match sources.dial(n + j, addr).or_else(|_| net::dial(None, addr)) {
            Ok(s) => Link::new(s),
            Err(f) => return Err(format!("HTTP connection: {f}")),
        };
        link.register(driver.registry(), Token(HTTP_BASE + j))
            .map_err(|e| format!("HTTP connection: register: {e}"))?;
        https.push(Http {
            link,
            started: start,
            outstanding: VecDeque::new(),
            last_offset: None,
            done: false,
            ever_open: false,
            failure: None,
        });
    }
    let mut mode = Api {
        url,
        o,
        addr,
        nonce,
        tag: std::process::id(),
        start,
        sources,
        ramp: Ramp::new(start, o.ramp, n),
        subscribe_msg: format!("{{\"type\":\"subscribe\",\"channel\":{channel_json}}}"),
        prefix: format!("{{\"type\":\"message\",\"channel\":{channel_json},\"data\":").into_bytes(),
        head: request_head(&o.api_path, &url.authority, o.api_key.as_deref()),
        channel_json,
        https,
        subs: Vec::with_capacity(n),
        table: Table {
            subscribers: n,
            ..Default::default()
        },
        tally: Tally::default(),
        live_at_start: 0,
        http_open: 0,
        primed: false,
        sent_total: 0,
        rr: 0,
        reconnects: 0,
        close_sent: 0,
    };
    let t = driver.run(&mut mode)?;
    let Api {
        subs,
        table,
        tally,
        sources,
        live_at_start,
        http_open,
        sent_total,
        reconnects,
        close_sent,
        ..
    } = mode;
    let closed_cleanly = subs.iter().filter(|s| s.track.close_acked).count();
    Ok(ApiReport {
        opts: o.clone(),
        sources: sources.len(),
        fd_limit,
        subscribed: tally.ledger.ready,
        live_at_start,
        http_open,
        subscribe_time: tally.subscribe_time,
        publishes: table.completed_window,
        received_window: tally.received_window,
        http_latency: tally.http_latency,
        e2e_latency: tally.e2e_latency,
        sent_total,
        answered_total: table.answered,
        completed_total: table.completed,
        received_total: tally.received,
        first_offset: table.base,
        last_offset: table.last_offset,
        epoch: table.epoch,
        connections_reported: tally.connections_reported,
        reconnects,
        slow_path: tally.slow_path,
        statuses: tally.statuses,
        errors: tally.errors,
        run: tally
            .ledger
            .outcome(&t, (o.warmup, o.duration), close_sent, closed_cleanly),
    })
}

impl Mode for Api<'_> {
    /// Subscribers dialed at the ramp rate; setup is over when every one
    /// is subscribed or failed and every HTTP connection is made or failed.
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
            for h in self
                .https
                .iter_mut()
                .filter(|h| h.link.phase == Phase::Connecting)
            {
                if now.saturating_duration_since(h.started) >= o.handshake_timeout {
                    h.failure = Some("TCP connect timed out".into());
                    h.link.shut(registry);
                }
            }
        }
        let http_settled = self.https.iter().all(|h| h.link.phase != Phase::Connecting);
        if !(self.subs.len() == o.subscribers
            && self.tally.ledger.pending_setup == 0
            && http_settled)
        {
            return Ok(false);
        }
        let tally = &mut self.tally;
        for h in self
            .https
            .iter_mut()
            .filter(|h| h.link.phase != Phase::Open)
        {
            tally.errors.connect += 1;
            *tally
                .ledger
                .failures
                .entry("http_connect".into())
                .or_default() += 1;
            h.done = true;
            if tally.ledger.first_failure.is_none() {
                tally.ledger.first_failure = h.failure.clone();
            }
        }
        self.http_open = self
            .https
            .iter()
            .filter(|h| h.link.phase == Phase::Open)
            .count();
        if self.http_open == 0 {
            return Err(format!(
                "no HTTP connection could be made: {}",
                tally.ledger.first_failure.clone().unwrap_or_default()
            ));
        }
        Ok(true)
    }

    fn setup_wait(&self, now: Instant) -> Duration {
        self.ramp.wait(now, self.subs.len())
    }

    /// The first publish alone: its offset is where the run starts.
    fn begin(&mut self, _at: Instant, _turn: &mut Turn<'_>) -> bool {
        self.live_at_start = self.table.live;
        self.table.credits = 1;
        true
    }

    fn live(&self) -> bool {
        let http_live = self.https.iter().any(|h| !h.done);
        http_live && (self.table.live > 0 || self.live_at_start == 0)
    }

    fn drained(&self) -> bool {
        self.table.pending.is_empty()
    }

    /// Verdicts are final.
    fn finish(&mut self, registry: &Registry) {
        let (table, tally) = (&self.table, &mut self.tally);
        let mut missing = 0u64;
        for (i, s) in self.subs.iter_mut().enumerate() {
            if !s.track.live {
                continue;
            }
            for p in table.pending.values().filter(|p| p.answered) {
                if p.passed
                    .get(i / 64)
                    .is_some_and(|w| w & (1 << (i % 64)) == 0)
                {
                    missing += 1;
                }
            }
            s.track.live = false;
        }
        if missing > 0 {
            tally.errors.lost += missing;
            tally.ledger.problem(|| {
                format!("{missing} deliveries still missing at subscribers after the drain")
            });
        }
        let unanswered: u64 = self.https.iter().map(|h| h.outstanding.len() as u64).sum();
        if unanswered > 0 {
            tally.errors.unanswered += unanswered;
            tally
                .ledger
                .problem(|| format!("{unanswered} publish requests never answered"));
        }
        for s in &mut self.subs {
            if s.link.begin_close(registry) {
                self.close_sent += 1;
            }
        }
        for h in &mut self.https {
            h.done = true;
            h.link.shut(registry);
        }
    }

    fn closed(&self) -> bool {
        self.subs.iter().all(|s| s.link.is_done())
    }

    fn serve(&mut self, events: &Events, turn: &mut Turn<'_>) {
        let Api {
            url,
            o,
            addr,
            nonce,
            tag,
            start,
            sources,
            channel_json,
            subscribe_msg,
            prefix,
            head,
            https,
            subs,
            table,
            tally,
            live_at_start,
            primed,
            sent_total,
            rr,
            reconnects,
            ..
        } = self;
        let (url, o, start, registry) = (*url, *o, *start, turn.registry);
        let mut cx = Cx {
            table,
            tally,
            prefix,
            channel: &o.channel,
            now_ns: 0,
            measuring: turn.measuring(),
            verifying: turn.verifying(),
        };
        for ev in events.iter() {
            let tok = ev.token().0;
            if tok >= HTTP_BASE {
                let Some(h) = https.get_mut(tok - HTTP_BASE) else {
                    continue;
                };
                if ev.is_writable() {
                    h.link.write_blocked = false;
                }
                if h.link.is_done() {
                    continue;
                }
                match serve_http(h, turn.rbuf, start, &mut cx) {
                    HttpEnd::Keep => {}
                    HttpEnd::Gone => {
                        h.done = true;
                        h.link.shut(registry);
                        continue;
                    }
                    HttpEnd::Idle => {
                        h.link.shut(registry);
                        match net::open(sources.dial(tok, *addr), registry, Token(tok)) {
                            Ok(l) => {
                                h.link = l;
                                h.last_offset = None;
                                *reconnects += 1;
                            }
                            Err(f) => {
                                http_gone(h, &mut cx, format!("HTTP reconnect: {f}"));
                                h.done = true;
                            }
                        }
                        continue;
                    }
                }
                if h.link.flush_if_ready().is_err() {
                    http_gone(h, &mut cx, "HTTP write failed".into());
                    h.link.shut(registry);
                }
                continue;
            }
            let Some(s) = subs.get_mut(tok) else { continue };
            if ev.is_writable() {
                s.link.write_blocked = false;
            }
            match s.link.phase {
                Phase::Connecting | Phase::Upgrading => {
                    let key = wire::ws_key(*nonce, tok as u64);
                    let req = || {
                        let path = with_user(&url.path, &format!("load-sub-{tag}-{tok}"));
                        wire::upgrade_request(&url.authority, &path, &key)
                    };
                    match s.link.handshake(turn.rbuf, req, &key) {
                        Progress::Waiting => {}
                        Progress::Opened => {
                            let Sub { link, track, frag } = s;
                            let mut peer = SubPeer {
                                track,
                                sub: tok,
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
                        sub: tok,
                        cx: &mut cx,
                        start,
                    };
                    // Hang-ups are not looked at here (as before the
                    // subscriber plumbing was shared with fanout).
                    net::ws_serve(link, frag, turn.rbuf, registry, false, &mut peer);
                }
                Phase::Done => {}
            }
            if s.track.abandon && !s.link.is_done() {
                s.link.shut(registry);
            }
        }
        if !*primed && cx.table.completed > 0 {
            *primed = true;
            cx.table.credits += o.inflight - 1;
        }
        if turn.sending() {
            let now_ns = start.elapsed().as_nanos() as u64;
            while cx.table.credits > 0 && (cx.table.live > 0 || *live_at_start == 0) {
                // The fewest outstanding; among those, the next in turn (all
                // connections stay busy, none is left to idle out).
                let count = https.len();
                let pick = (0..count)
                    .map(|d| (*rr + d) % count)
                    .filter_map(|j| https.get(j).map(|h| (j, h)))
                    .filter(|(_, h)| h.link.phase == Phase::Open && !h.done)
                    .min_by_key(|(_, h)| h.outstanding.len())
                    .map(|(j, _)| j);
                let Some((j, h)) = pick.and_then(|j| Some(j).zip(https.get_mut(j))) else {
                    break;
                };
                *rr = j + 1;
                cx.table.credits -= 1;
                let t_us = now_ns / 1000;
                let seq = cx.table.publish(now_ns, t_us);
                write_request(&mut h.link.out, head, channel_json, seq, t_us);
                h.outstanding.push_back(seq);
                *sent_total += 1;
            }
        } else {
            cx.table.credits = 0;
        }
        for h in https.iter_mut().filter(|h| !h.link.out.is_empty()) {
            if h.link.flush_if_ready().is_err() {
                http_gone(h, &mut cx, "HTTP write failed".into());
                h.link.shut(registry);
            }
        }
    }
}

/// One subscriber's traffic as `net` hands it over.
struct SubPeer<'t, 'c, 'a> {
    track: &'t mut Track,
    /// The subscriber's number.
    sub: usize,
    cx: &'c mut Cx<'a>,
    start: Instant,
}

impl Peer for SubPeer<'_, '_, '_> {
    fn arrived(&mut self) {
        self.cx.now_ns = self.start.elapsed().as_nanos() as u64;
    }

    fn text(&mut self, p: &[u8]) {
        on_sub_text(self.track, self.sub, p, self.cx);
    }

    fn binary(&mut self) {
        unexpected(self.cx.tally, b"(a binary message)");
    }

    fn pinged(&mut self, n: u64) {
        self.cx.tally.ledger.pings += n;
    }

    fn lost(&mut self, loss: Loss) {
        let how = loss.gone();
        sub_gone(self.track, self.sub, self.cx, how, &loss.kind(), || {
            loss.describe(true)
        });
    }

    fn close_acked(&mut self) {
        self.track.close_acked = true;
    }
}

// ---------------------------------------------------------------------------
// Report.

impl Summary for ApiReport {
    fn print(&self, url: &str, pid: Option<u32>) {
        let (r, o) = (self, &self.opts);
        println!("switchboard-load api  {url}");
        println!(
            "  subscribers   {} subscribed of {} to {:?} from {} (open-file limit {})",
            r.subscribed,
            o.subscribers,
            o.channel,
            report::sources_text(r.sources),
            r.fd_limit
        );
        println!(
            "  publishers    {} of {} HTTP keep-alive connections to POST {}, {} requests in flight in total",
            r.http_open, o.connections, o.api_path, o.inflight
        );
        println!(
            "  setup         {:.2} s; dial to subscribed {}",
            r.run.setup_s,
            latency_line(&r.subscribe_time)
        );
        println!("{}", report::window_line(r.run.window_s, o.warmup));
        println!(
            "  throughput    {:.0} API publishes/s, {:.0} deliveries/s ({} publishes, {} deliveries in the window)",
            r.publishes_per_sec(),
            r.deliveries_per_sec(),
            r.publishes,
            r.received_window
        );
        println!(
            "  totals        {} requests, {} answered 200, {} completed; {} deliveries; offsets {} to {} (epoch {})",
            r.sent_total,
            r.answered_total,
            r.completed_total,
            r.received_total,
            r.first_offset.map_or("-".into(), |v| v.to_string()),
            r.last_offset.map_or("-".into(), |v| v.to_string()),
            r.epoch.as_deref().unwrap_or("-")
        );
        println!("  HTTP response {}", latency_line(&r.http_latency));
        println!("  end to end    {}", latency_line(&r.e2e_latency));
        if r.reconnects > 0 {
            println!(
                "  note          {} idle HTTP connections closed by the server were opened again",
                r.reconnects
            );
        }
        if r.slow_path > 0 {
            println!(
                "  note          {} message events did not match the expected layout and were parsed as JSON (slow path)",
                r.slow_path
            );
        }
        if !r.statuses.is_empty() {
            println!("  HTTP statuses {}", map_line(&r.statuses));
        }
        report::print_verification(
            &r.errors.kinds(),
            "every publish answered and delivered to every subscriber once, in offset order, intact; no errors",
        );
        let per = |_: &Delta| {
            let per_pub = r
                .server_us_per_publish()
                .map_or("-".into(), |u| format!("{u:.1}"));
            let per_del = r
                .server_us_per_delivery()
                .map_or("-".into(), |u| format!("{u:.3}"));
            format!("{per_pub} µs/publish, {per_del} µs/delivery")
        };
        r.run
            .print_tail(pid, "not connected ", " subscribers", per, false);
    }

    fn to_json(&self, url: &str, pid: Option<u32>) -> Value {
        let (r, o) = (self, &self.opts);
        let own = json!({
            "api_path": o.api_path,
            "subscribers": o.subscribers,
            "subscribed": r.subscribed,
            "live_at_start": r.live_at_start,
            "channel": o.channel,
            "http_connections": o.connections,
            "http_open": r.http_open,
            "inflight": o.inflight,
            "ramp_per_s": o.ramp,
            "sources": r.sources,
            "fd_limit": r.fd_limit,
            "publishes": r.publishes,
            "publishes_per_sec": report::round(r.publishes_per_sec(), 10.0),
            "deliveries": r.received_window,
            "deliveries_per_sec": r.deliveries_per_sec().round(),
        });
        let more = json!({
            "sent_total": r.sent_total,
            "answered_total": r.answered_total,
            "completed_total": r.completed_total,
            "received_total": r.received_total,
            "first_offset": r.first_offset,
            "last_offset": r.last_offset,
            "epoch": r.epoch,
            "connections_reported": r.connections_reported,
            "http_reconnects": r.reconnects,
            "slow_path_messages": r.slow_path,
            "http_latency_us": latency_json(&r.http_latency),
            "e2e_latency_us": latency_json(&r.e2e_latency),
            "subscribe_us": latency_json(&r.subscribe_time),
            "http_statuses": r.statuses,
        });
        let per = [
            ("cpu_us_per_publish", r.server_us_per_publish()),
            ("cpu_us_per_delivery", r.server_us_per_delivery()),
        ];
        let own = report::extend(own, more);
        r.run.json("api", url, pid, &r.errors.kinds(), &per, own)
    }

    fn problems(&self) -> u64 {
        self.errors.total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &[u8] = b"{\"type\":\"message\",\"channel\":\"load\",\"data\":";

    struct Rig {
        table: Table,
        tally: Tally,
        subs: Vec<Track>,
        http: Http,
    }

    impl Rig {
        /// `n` subscribed subscribers; publishes 0..k sent on one connection.
        fn new(n: usize, k: u64) -> Rig {
            let mut r = Rig {
                table: Table {
                    subscribers: n,
                    ..Default::default()
                },
                tally: Tally::default(),
                subs: (0..n).map(|_| Track::new(Instant::now())).collect(),
                http: Http {
                    link: Link::dead(),
                    started: Instant::now(),
                    outstanding: VecDeque::new(),
                    last_offset: None,
                    done: false,
                    ever_open: true,
                    failure: None,
                },
            };
            for i in 0..n {
                r.text(i, br#"{"type":"connected","userId":"x"}"#);
                r.text(
                    i,
                    br#"{"type":"subscribed","channel":"load","timestamp":"t"}"#,
                );
            }
            assert_eq!(r.table.live, n);
            for _ in 0..k {
                let seq = r.table.publish(100, 7 + r.table.next_seq);
                r.http.outstanding.push_back(seq);
            }
            r
        }

        fn cx(&mut self) -> Cx<'_> {
            Cx {
                table: &mut self.table,
                tally: &mut self.tally,
                prefix: PREFIX,
                channel: "load",
                now_ns: 50_000,
                measuring: true,
                verifying: true,
            }
        }

        fn text(&mut self, sub: usize, p: &[u8]) {
            let mut t = std::mem::replace(&mut self.subs[sub], Track::new(Instant::now()));
            on_sub_text(&mut t, sub, p, &mut self.cx());
            self.subs[sub] = t;
        }

        /// Offsets are 1000 + seq.
        fn respond(&mut self, seq: u64) {
            let body = format!(
                r#"{{"success":true,"channel":"load","offset":{},"epoch":"ep","connections":2}}"#,
                1000 + seq
            );
            self.respond_with(200, &body);
        }

        fn respond_with(&mut self, status: u16, body: &str) {
            let r = HttpResponse {
                status,
                body: body.as_bytes().to_vec(),
                close: false,
            };
            let mut h = std::mem::replace(
                &mut self.http,
                Http {
                    link: Link::dead(),
                    started: Instant::now(),
                    outstanding: VecDeque::new(),
                    last_offset: None,
                    done: false,
                    ever_open: true,
                    failure: None,
                },
            );
            on_response(&mut h, r, &mut self.cx());
            self.http = h;
        }

        fn deliver_at(&mut self, sub: usize, seq: u64, offset: u64) {
            let m = format!(
                r#"{{"type":"message","channel":"load","data":{{"seq":{seq},"t":{}}},"offset":{offset},"epoch":"ep","timestamp":"t"}}"#,
                7 + seq
            );
            self.text(sub, m.as_bytes());
        }

        fn deliver(&mut self, sub: usize, seq: u64) {
            self.deliver_at(sub, seq, 1000 + seq);
        }
    }

    #[test]
    fn requests_and_responses() {
        let head = request_head("/api/publish", "127.0.0.1:9", Some("k"));
        let mut req = Vec::new();
        write_request(&mut req, &head, "\"load\"", 3, 77);
        let text = String::from_utf8(req.clone()).unwrap();
        assert!(text.starts_with("POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"));
        assert!(text.contains("Authorization: Bearer k\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        let body = r#"{"channel":"load","data":{"seq":3,"t":77}}"#;
        assert!(text.ends_with(&format!("Content-Length: {}\r\n\r\n{body}", body.len())));

        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 503 Busy\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx";
        let (a, used) = parse_response(two).unwrap().unwrap();
        assert_eq!((a.status, &a.body[..], a.close), (200, &b"{}"[..], false));
        let (b, used2) = parse_response(&two[used..]).unwrap().unwrap();
        assert_eq!((b.status, &b.body[..], b.close), (503, &b"x"[..], true));
        assert_eq!(used + used2, two.len());
        for cut in [0, 10, used - 1] {
            assert_eq!(parse_response(&two[..cut]).unwrap(), None, "cut {cut}");
        }
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn the_fast_path_reads_the_server_layout() {
        let m = br#"{"type":"message","channel":"load","data":{"seq":12,"t":345},"offset":1012,"epoch":"abc","timestamp":"t"}"#;
        assert_eq!(
            fast_delivery(m, PREFIX),
            Some(Delivery {
                seq: 12,
                t_us: 345,
                offset: 1012,
                epoch: b"abc"
            })
        );
        assert_eq!(fast_delivery(&m[..60], PREFIX), None);
        assert_eq!(read_data(br#"{"seq":1,"t":2,"x":3}"#), None);
    }

    #[test]
    fn clean_run_completes_every_publish() {
        let mut r = Rig::new(2, 3);
        for seq in 0..3 {
            r.deliver(0, seq);
        }
        // Responses before some deliveries, after others.
        r.respond(0);
        r.respond(1);
        assert_eq!(r.table.completed, 0, "subscriber 1 has none yet");
        for seq in 0..3 {
            r.deliver(1, seq);
        }
        assert_eq!(r.table.completed, 2);
        r.respond(2);
        assert_eq!(r.table.completed, 3);
        assert_eq!(r.table.credits, 3);
        assert_eq!(r.tally.received, 6);
        assert_eq!(r.tally.e2e_latency.count(), 6);
        assert_eq!(r.tally.http_latency.count(), 3);
        assert_eq!(r.tally.slow_path, 0);
        assert_eq!(r.tally.errors, ApiErrors::default());
        assert!(r.table.pending.is_empty() && r.table.by_offset.is_empty());
    }

    #[test]
    fn a_loss_is_counted_without_stalling_even_before_the_response() {
        let mut r = Rig::new(2, 3);
        r.respond(0);
        r.deliver(0, 0);
        r.deliver(1, 0);
        r.deliver(0, 1);
        r.deliver(0, 2);
        r.deliver(1, 2); // skips offset 1001, whose response is not in yet
        assert_eq!(r.tally.errors.lost, 1);
        r.respond(1);
        r.respond(2);
        assert_eq!(r.table.completed, 3, "the loss does not stall the pipeline");
        // It arrives late after all: reordered, not lost.
        r.deliver(1, 1);
        assert_eq!(r.tally.errors.lost, 0);
        assert_eq!(r.tally.errors.reorder, 1);
        assert_eq!(r.tally.errors.total(), 1);
    }

    #[test]
    fn duplicates_wrong_offsets_data_and_epochs_are_caught() {
        let mut r = Rig::new(1, 4);
        r.respond(0);
        r.deliver(0, 0);
        r.deliver(0, 0);
        assert_eq!(r.tally.errors.dup, 1);
        r.respond(1);
        r.deliver_at(0, 1, 1005); // answered 1001
        assert_eq!(r.tally.errors.corrupt, 1);
        let m = br#"{"type":"message","channel":"load","data":{"seq":2,"t":999},"offset":1002,"epoch":"ep"}"#;
        r.text(0, m);
        assert_eq!(r.tally.errors.corrupt, 2);
        let m = br#"{"type":"message","channel":"load","data":{"seq":3,"t":10},"offset":1003,"epoch":"other"}"#;
        r.text(0, m);
        assert_eq!(r.tally.errors.corrupt, 3);
        // A publish never sent.
        r.deliver(0, 77);
        assert_eq!(r.tally.errors.corrupt, 4);
        assert_eq!(r.tally.errors.total(), 5, "{:?}", r.tally.errors);
    }

    #[test]
    fn refused_publishes_and_bad_answers() {
        let mut r = Rig::new(1, 3);
        r.respond_with(429, r#"{"error":"rate_limited"}"#);
        assert_eq!(r.tally.errors.rejected, 1);
        assert_eq!(r.tally.statuses.get("429"), Some(&1));
        assert_eq!(r.table.credits, 1);
        // Delivered although refused: corrupt.
        r.deliver(0, 0);
        assert_eq!(r.tally.errors.corrupt, 1);
        r.respond_with(200, "{}");
        assert_eq!(r.tally.errors.bad_response, 1);
        // Offsets going backwards on one connection.
        r.http.last_offset = Some(5000);
        r.respond(2);
        assert_eq!(r.tally.errors.order, 1);
    }

    #[test]
    fn a_refused_first_publish_leaves_the_next_answer_as_the_base() {
        let mut r = Rig::new(1, 0);
        let seq = r.table.publish(100, 7);
        r.http.outstanding.push_back(seq);
        r.respond_with(503, "busy");
        assert_eq!(r.table.base, None);
        let seq = r.table.publish(100, 8);
        r.http.outstanding.push_back(seq);
        r.respond(1);
        assert_eq!(r.table.base, Some(1001));
        r.deliver(0, 1);
        assert_eq!(r.table.completed, 1);
        assert_eq!(r.tally.errors.rejected, 1);
        assert_eq!(r.tally.errors.total(), 1);
    }

    #[test]
    fn other_layouts_take_the_slow_path() {
        let mut r = Rig::new(1, 1);
        r.respond(0);
        let m = br#"{"timestamp":"t","offset":1000,"epoch":"ep","type":"message","data":{"t":7,"seq":0},"channel":"load"}"#;
        r.text(0, m);
        assert_eq!(r.tally.slow_path, 1);
        assert_eq!(r.tally.received, 1);
        assert_eq!(r.table.completed, 1);
        assert_eq!(r.tally.errors.total(), 0);
    }

    #[test]
    fn a_lost_subscriber_stops_counting() {
        let mut r = Rig::new(2, 2);
        r.respond(0);
        r.respond(1);
        r.deliver(0, 0);
        r.deliver(0, 1);
        let mut t = std::mem::replace(&mut r.subs[1], Track::new(Instant::now()));
        sub_gone(&mut t, 1, &mut r.cx(), Gone::Closed, "eof", || "eof".into());
        assert_eq!(r.table.completed, 2);
        assert_eq!(r.table.live, 1);
        assert_eq!(r.tally.errors.closed, 1);
        assert_eq!(r.tally.errors.total(), 1);
    }
}
