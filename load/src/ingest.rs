//! Ingest mode: durable sensor-data ingestion through the JSON protocol.
//!
//! C connections on `/ws?userId=<prefix>-<i>` (the server in auth mode
//! `none`), each keeping W records in flight:
//!
//! ```text
//! {"type":"sensor_data","id":"<conn>-<seq>","requestId":<seq>,
//!  "data":{"timestamp":<ms>,"sensorId":"s-<conn>","value":<f64>,"seq":<seq>}}
//! ```
//!
//! `<conn>` is `<run>.<i>`, a tag of this run and the connection's number,
//! so runs against the same database never reuse a client id (the server
//! stores a client id once per user and answers a retry `duplicate`). The
//! server answers each record with `{"type":"ack","id":<record id>,
//! "clientId":"<conn>-<seq>",...}` after the record is committed, or with an
//! error (`requestId` names the record). `overloaded` is backpressure: the
//! record is sent again after a short wait (5 ms, doubling up to 200 ms)
//! and is still in flight meanwhile; it is an error only if it never gets
//! through. Other errors end the record (counted by code).
//!
//! Verified: every record gets exactly one ack, with its own client id and
//! request id, never marked `duplicate`, and no record id is given to two
//! records. Reported: durable records/s (acks in the measured window), ack
//! latency from the record's first send to its ack, errors by kind, replies
//! by error code, and with `--pid` the server's CPU per record.
//!
//! Stages: setup (every connection upgraded and welcomed with `connected`),
//! warmup, measure, drain (no new records; retries go on until every record
//! is answered or `--drain-timeout` passes, 5 s by default), close.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use mio::{Events, Registry, Token};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::driver::{self, Driver, Mode, Plan, Turn};
use crate::fanout::with_user;
use crate::hist::Histogram;
use crate::net::{self, Fail, Gone, Link, Loss, Peer, Phase, Progress};
use crate::procfs::Delta;
use crate::report::{self, Ledger, Outcome, Summary, latency_json, latency_line, map_line};
use crate::url::WsUrl;
use crate::wire;

/// How long to wait for the server's side of the closing handshakes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// One read lands here (shared by all connections).
const READ_BUF: usize = 256 << 10;
/// First wait before a record answered `overloaded` is sent again.
const RETRY_FIRST_NS: u64 = 5_000_000;
/// Longest wait between two sends of one record.
const RETRY_MAX_NS: u64 = 200_000_000;

/// The command line of ingest mode.
#[derive(Debug, Clone, Args)]
pub struct IngestOpts {
    /// Connections (users `<user-prefix>-<i>`).
    #[arg(short = 'c', long, default_value_t = 50)]
    pub connections: usize,
    /// Records in flight per connection (each completes with its ack).
    #[arg(short = 'w', long, default_value_t = 8)]
    pub inflight: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = driver::parse_secs)]
    pub duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = driver::parse_secs)]
    pub warmup: Duration,
    /// Connection i is the user `<prefix>-<i>` (`?userId=`; auth mode none).
    #[arg(long, default_value = "load")]
    pub user_prefix: String,
    /// Seconds allowed for one connection's connect, upgrade and welcome.
    #[arg(long, default_value = "10", value_parser = driver::parse_secs)]
    pub handshake_timeout: Duration,
    /// Seconds to wait for the records in flight after the measured window
    /// (what is still unanswered then is counted unacked).
    #[arg(long, default_value = "5", value_parser = driver::parse_secs)]
    pub drain_timeout: Duration,
}

report::error_kinds! {
    /// Everything that went wrong, by kind.
    pub struct IngestErrors {
        /// Records sent and never answered (no ack, no error) by the end of the drain.
        unacked,
        /// Records answered `overloaded` that were never acknowledged after all.
        never_stored,
        /// A second ack for a record already acknowledged.
        dup_ack,
        /// An ack marked `"duplicate":true` (each client id is sent once per run).
        duplicate,
        /// A record id already given to another record.
        id_reused,
        /// An ack whose client id is not one of ours, names a record never
        /// sent, disagrees with its request id, or carries no integer record id.
        mismatch,
        /// Error replies other than `overloaded` (see the codes), or any error
        /// that names no record in flight.
        rejected,
        /// Connections the server ended while they counted.
        closed,
        /// Connections that never got to `connected`.
        connect,
        /// Server frames that break RFC 6455.
        protocol,
        /// Messages of a type that has no place in the run.
        unexpected,
    }
}

/// Everything measured in one ingest run.
#[derive(Debug)]
pub struct IngestReport {
    pub opts: IngestOpts,
    /// The run's tag in every client id.
    pub run_tag: String,
    /// Connections welcomed with `connected`.
    pub opened: usize,
    /// Records acknowledged inside the measured window.
    pub acked_window: u64,
    /// Send to ack (from the record's first send), every ack of the window (ns).
    pub latency: Histogram,
    /// Distinct records sent.
    pub records: u64,
    /// Sends, resends included.
    pub sends: u64,
    pub resends: u64,
    pub acked_total: u64,
    /// Records ended by an error other than `overloaded`.
    pub failed: u64,
    /// Records still in flight on connections the server ended (their fate is unknown).
    pub unanswered_on_close: u64,
    /// Error replies by code (`overloaded` included).
    pub codes: BTreeMap<String, u64>,
    pub errors: IngestErrors,
    /// The window, the samples, setup failures, the close.
    pub run: Outcome,
}

impl IngestReport {
    pub fn records_per_sec(&self) -> f64 {
        self.run.per_sec(self.acked_window)
    }

    /// Server CPU microseconds per acknowledged record in the window.
    pub fn server_us_per_record(&self) -> Option<f64> {
        self.run.server_us_per(self.acked_window)
    }

    pub fn overloaded(&self) -> u64 {
        self.codes.get("overloaded").copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// Records and replies (pure: no sockets, no clock).

/// Append record `seq` of connection `label` (the JSON message, unframed).
pub fn write_record(out: &mut Vec<u8>, label: &str, seq: u64, wall_ms: u64) {
    // A value that changes with the record, always with a fraction.
    let value = (seq % 4000) as f64 * 0.25 + 0.5;
    let _ = write!(
        out,
        "{{\"type\":\"sensor_data\",\"id\":\"{label}-{seq}\",\"requestId\":{seq},\"data\":{{\"timestamp\":{wall_ms},\"sensorId\":\"s-{label}\",\"value\":{value:.2},\"seq\":{seq}}}}}"
    );
}

/// The fields of a server message this mode looks at.
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, rename = "clientId", borrow)]
    client_id: Option<Cow<'a, str>>,
    #[serde(default, rename = "requestId", borrow)]
    request_id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    duplicate: Option<&'a RawValue>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

/// The sequence number in client id `cid` of connection `label`.
fn seq_of(cid: &str, label: &str) -> Option<u64> {
    let s = cid.strip_prefix(label)?.strip_prefix('-')?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn raw_u64(r: Option<&RawValue>) -> Option<u64> {
    r?.get().parse().ok()
}

/// One record in flight.
#[derive(Debug, Clone, Copy)]
struct Rec {
    /// First send (ns since the run started).
    first_ns: u64,
    /// Answered `overloaded`; waiting to be sent again.
    waiting: bool,
    /// `overloaded` answers so far.
    attempts: u32,
}

/// One connection's records.
#[derive(Debug)]
struct Track {
    /// `<run>.<i>`.
    label: String,
    next_seq: u64,
    inflight: HashMap<u64, Rec>,
    /// (due ns, seq) of records to send again.
    retries: VecDeque<(u64, u64)>,
    /// Records ended by an error (an ack for one is a mismatch).
    failed: HashSet<u64>,
    /// New records that may be sent now.
    credits: usize,
    welcomed: bool,
    /// Setup is over (welcomed, or failed and counted).
    settled: bool,
    /// The server ended (or broke) the connection while it counted.
    dropped: bool,
    close_acked: bool,
}

impl Track {
    fn new(label: String, credits: usize) -> Track {
        Track {
            label,
            next_seq: 0,
            inflight: HashMap::new(),
            retries: VecDeque::new(),
            failed: HashSet::new(),
            credits,
            welcomed: false,
            settled: false,
            dropped: false,
            close_acked: false,
        }
    }
}

/// Counters the handlers update.
#[derive(Default)]
struct Tally {
    errors: IngestErrors,
    latency: Histogram,
    acked_window: u64,
    acked_total: u64,
    records: u64,
    sends: u64,
    resends: u64,
    failed: u64,
    unanswered_on_close: u64,
    codes: BTreeMap<String, u64>,
    /// Record ids acknowledged so far.
    ids: HashSet<i64>,
    /// Records waiting to be sent again, over all connections.
    retries_pending: usize,
    /// Setup, the first problem, pings.
    ledger: Ledger,
}

/// Per-wake-up context for the handlers.
struct Cx<'a> {
    tally: &'a mut Tally,
    now_ns: u64,
    wall_ms: u64,
    /// New records may be sent.
    sending: bool,
    measuring: bool,
    /// False once the verdicts are final (after the drain).
    verifying: bool,
    scratch: Vec<u8>,
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

/// The server ended (or broke) the connection before we closed it.
fn gone(t: &mut Track, tally: &mut Tally, how: Gone, kind: &str, what: impl FnOnce() -> String) {
    if t.dropped {
        return;
    }
    t.dropped = true;
    if !t.settled {
        setup_failed(t, tally, kind.to_owned(), what);
        return;
    }
    match how {
        Gone::Closed => tally.errors.closed += 1,
        Gone::Protocol => tally.errors.protocol += 1,
    }
    tally.ledger.problem(what);
    tally.retries_pending = tally.retries_pending.saturating_sub(t.retries.len());
    t.retries.clear();
}

fn unexpected(tally: &mut Tally, p: &[u8]) {
    tally.errors.unexpected += 1;
    tally
        .ledger
        .problem(|| format!("unexpected message: {:?}", snippet(p)));
}

/// A whole text message from the server.
fn on_text(t: &mut Track, p: &[u8], cx: &mut Cx<'_>) {
    let Ok(r) = serde_json::from_slice::<Reply<'_>>(p) else {
        return unexpected(cx.tally, p);
    };
    match r.kind.as_ref() {
        "connected" if !t.welcomed => {
            t.welcomed = true;
            if !t.settled && !t.dropped {
                cx.tally.ledger.setup_done(&mut t.settled);
            }
        }
        "error" if !t.settled => {
            let code = r.code.as_deref().unwrap_or("?");
            setup_failed(t, cx.tally, format!("rejected_{code}"), || {
                format!("refused: {}", snippet(p))
            });
        }
        "ack" if cx.verifying => on_ack(t, &r, p, cx),
        "error" if cx.verifying => on_error(t, &r, p, cx),
        "ack" | "error" => {}
        _ => unexpected(cx.tally, p),
    }
}

fn on_ack(t: &mut Track, r: &Reply<'_>, p: &[u8], cx: &mut Cx<'_>) {
    let tally = &mut *cx.tally;
    let seq = r.client_id.as_deref().and_then(|c| seq_of(c, &t.label));
    let id = r.id.and_then(|i| i.get().parse::<i64>().ok());
    let (Some(seq), Some(id)) = (seq, id) else {
        tally.errors.mismatch += 1;
        tally
            .ledger
            .problem(|| format!("an ack for no record of this connection: {}", snippet(p)));
        return;
    };
    if r.request_id.is_some() && raw_u64(r.request_id) != Some(seq) {
        tally.errors.mismatch += 1;
        tally
            .ledger
            .problem(|| format!("an ack whose requestId is not its record's: {}", snippet(p)));
        return;
    }
    let Some(rec) = t.inflight.remove(&seq) else {
        if seq >= t.next_seq || t.failed.contains(&seq) {
            tally.errors.mismatch += 1;
            tally
                .ledger
                .problem(|| format!("an ack for a record not in flight: {}", snippet(p)));
        } else {
            tally.errors.dup_ack += 1;
            tally
                .ledger
                .problem(|| format!("a second ack for record {}-{seq}", t.label));
        }
        return;
    };
    if rec.waiting {
        // Acknowledged although it was refused: stored after all, so it
        // need not be sent again (its queue entry is skipped).
        tally.retries_pending = tally.retries_pending.saturating_sub(1);
    }
    if r.duplicate.is_some_and(|d| d.get() == "true") {
        tally.errors.duplicate += 1;
        tally
            .ledger
            .problem(|| format!("an ack marked duplicate: {}", snippet(p)));
    }
    if !tally.ids.insert(id) {
        tally.errors.id_reused += 1;
        tally.ledger.problem(|| {
            format!(
                "record id {id} acknowledged for a second record: {}",
                snippet(p)
            )
        });
    }
    tally.acked_total += 1;
    t.credits += 1;
    if cx.measuring {
        tally.acked_window += 1;
        tally.latency.record(cx.now_ns.saturating_sub(rec.first_ns));
    }
}

fn on_error(t: &mut Track, r: &Reply<'_>, p: &[u8], cx: &mut Cx<'_>) {
    let tally = &mut *cx.tally;
    let code = r.code.as_deref().unwrap_or("?");
    *tally.codes.entry(code.to_owned()).or_default() += 1;
    let rec = raw_u64(r.request_id).and_then(|s| Some(s).zip(t.inflight.get_mut(&s)));
    let Some((seq, rec)) = rec.filter(|(_, rec)| !rec.waiting) else {
        tally.errors.rejected += 1;
        tally
            .ledger
            .problem(|| format!("an error for no record in flight: {}", snippet(p)));
        return;
    };
    if code == "overloaded" {
        rec.waiting = true;
        rec.attempts += 1;
        let wait = (RETRY_FIRST_NS << (rec.attempts - 1).min(8)).min(RETRY_MAX_NS);
        t.retries.push_back((cx.now_ns + wait, seq));
        tally.retries_pending += 1;
    } else {
        t.inflight.remove(&seq);
        t.failed.insert(seq);
        t.credits += 1;
        tally.failed += 1;
        tally.errors.rejected += 1;
        tally
            .ledger
            .problem(|| format!("record {}-{seq} refused: {}", t.label, snippet(p)));
    }
}

/// Frame record `seq` into `out`.
fn send_record(t: &Track, seq: u64, out: &mut Vec<u8>, cx: &mut Cx<'_>) {
    cx.scratch.clear();
    write_record(&mut cx.scratch, &t.label, seq, cx.wall_ms);
    wire::frame(out, wire::OP_TEXT, &cx.scratch);
    cx.tally.sends += 1;
}

/// Send new records for every credit (while sending).
fn top_up(t: &mut Track, out: &mut Vec<u8>, cx: &mut Cx<'_>) {
    if !cx.sending || !t.welcomed || t.dropped {
        return;
    }
    while t.credits > 0 {
        t.credits -= 1;
        let seq = t.next_seq;
        t.next_seq += 1;
        t.inflight.insert(
            seq,
            Rec {
                first_ns: cx.now_ns,
                waiting: false,
                attempts: 0,
            },
        );
        cx.tally.records += 1;
        send_record(t, seq, out, cx);
    }
}

/// Send again the refused records whose wait is over.
fn resend_due(t: &mut Track, out: &mut Vec<u8>, cx: &mut Cx<'_>) {
    let mut i = 0;
    while let Some(&(due, seq)) = t.retries.get(i) {
        if due > cx.now_ns {
            i += 1;
            continue;
        }
        t.retries.remove(i);
        let Some(rec) = t.inflight.get_mut(&seq).filter(|r| r.waiting) else {
            continue; // acknowledged meanwhile
        };
        rec.waiting = false;
        cx.tally.retries_pending = cx.tally.retries_pending.saturating_sub(1);
        cx.tally.resends += 1;
        send_record(t, seq, out, cx);
    }
}

// ---------------------------------------------------------------------------
// Connections.

struct Conn {
    link: Link,
    track: Track,
    frag: Option<(u8, Vec<u8>)>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The ingest mode's part of the run loop.
struct Ingest<'a> {
    url: &'a WsUrl,
    user_prefix: &'a str,
    nonce: u64,
    start: Instant,
    /// Every connection must be welcomed by then.
    setup_deadline: Instant,
    conns: Vec<Conn>,
    tally: Tally,
    close_sent: usize,
    scratch: Vec<u8>,
}

pub fn run(
    url: &WsUrl,
    addr: SocketAddr,
    pid: Option<u32>,
    o: &IngestOpts,
) -> Result<IngestReport, String> {
    let n = o.connections;
    if n == 0 || o.inflight == 0 {
        return Err("--connections and --inflight must be at least 1".into());
    }
    let _ = driver::fd_limit(n as u64 + 16, &format!("{n} connections will not all fit"));
    let driver = Driver::new(Plan {
        pid,
        warmup: o.warmup,
        duration: o.duration,
        drain_timeout: o.drain_timeout,
        close_timeout: CLOSE_TIMEOUT,
        tick: Duration::from_millis(100),
        events: 1024,
        read_buf: READ_BUF,
        baseline: false,
        client: true,
    })?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Distinct per run: base 36 of the clock in ms and the process id.
    let run_tag = format!(
        "{}{}",
        base36(nanos / 1_000_000),
        base36(u64::from(std::process::id()))
    );
    let start = driver.start();
    let mut tally = Tally::default();
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    for i in 0..n {
        let mut track = Track::new(format!("{run_tag}.{i}"), o.inflight);
        tally.ledger.pending_setup += 1;
        let link =
            net::open(net::dial(None, addr), driver.registry(), Token(i)).unwrap_or_else(|f| {
                setup_failed(&mut track, &mut tally, f.kind(), || f.to_string());
                Link::dead()
            });
        conns.push(Conn {
            link,
            track,
            frag: None,
        });
    }
    let mut mode = Ingest {
        url,
        user_prefix: &o.user_prefix,
        nonce: nanos ^ u64::from(std::process::id()),
        start,
        setup_deadline: start + o.handshake_timeout,
        conns,
        tally,
        close_sent: 0,
        scratch: Vec::with_capacity(256),
    };
    let t = driver.run(&mut mode)?;
    let closed_cleanly = mode.conns.iter().filter(|c| c.track.close_acked).count();
    let tally = mode.tally;
    Ok(IngestReport {
        opts: o.clone(),
        run_tag,
        opened: tally.ledger.ready,
        acked_window: tally.acked_window,
        latency: tally.latency,
        records: tally.records,
        sends: tally.sends,
        resends: tally.resends,
        acked_total: tally.acked_total,
        failed: tally.failed,
        unanswered_on_close: tally.unanswered_on_close,
        codes: tally.codes,
        errors: tally.errors,
        run: tally
            .ledger
            .outcome(&t, (o.warmup, o.duration), mode.close_sent, closed_cleanly),
    })
}

/// The handlers' context for a turn; the scratch buffer is lent to it
/// (give it back after).
fn context<'a>(
    tally: &'a mut Tally,
    scratch: &mut Vec<u8>,
    turn: &Turn<'_>,
    now_ns: u64,
) -> Cx<'a> {
    Cx {
        tally,
        now_ns,
        wall_ms: wall_ms(),
        sending: turn.sending(),
        measuring: turn.measuring(),
        verifying: turn.verifying(),
        scratch: std::mem::take(scratch),
    }
}

impl Mode for Ingest<'_> {
    fn setup(&mut self, now: Instant, registry: &Registry) -> Result<bool, String> {
        if self.tally.ledger.pending_setup > 0 && now < self.setup_deadline {
            return Ok(false);
        }
        for c in self.conns.iter_mut().filter(|c| !c.track.settled) {
            setup_failed(&mut c.track, &mut self.tally, Fail::Timeout.kind(), || {
                "no connected welcome in time".into()
            });
            c.link.shut(registry);
        }
        Ok(true)
    }

    fn setup_wait(&self, now: Instant) -> Duration {
        self.setup_deadline
            .saturating_duration_since(now)
            .min(Duration::from_millis(100))
    }

    /// Prime every welcomed connection.
    fn begin(&mut self, _at: Instant, turn: &mut Turn<'_>) -> bool {
        let Ingest {
            conns,
            tally,
            scratch,
            start,
            ..
        } = self;
        let mut cx = context(tally, scratch, turn, start.elapsed().as_nanos() as u64);
        for c in conns.iter_mut().filter(|c| c.link.phase == Phase::Open) {
            top_up(&mut c.track, &mut c.link.out, &mut cx);
            if c.link.flush_if_ready().is_err() {
                gone(&mut c.track, cx.tally, Gone::Closed, "write", || {
                    "write failed".into()
                });
                c.link.shut(turn.registry);
            }
        }
        *scratch = cx.scratch;
        true
    }

    fn live(&self) -> bool {
        self.conns
            .iter()
            .any(|c| c.link.phase == Phase::Open && c.track.welcomed)
    }

    fn drained(&self) -> bool {
        self.conns
            .iter()
            .all(|c| c.link.phase != Phase::Open || c.track.inflight.is_empty())
    }

    /// Verdicts are final.
    fn finish(&mut self, registry: &Registry) {
        let tally = &mut self.tally;
        for c in &mut self.conns {
            let t = &mut c.track;
            if t.dropped {
                tally.unanswered_on_close += t.inflight.len() as u64;
            } else {
                for rec in t.inflight.values() {
                    if rec.attempts > 0 {
                        tally.errors.never_stored += 1;
                    } else {
                        tally.errors.unacked += 1;
                    }
                }
                if !t.inflight.is_empty() {
                    tally.ledger.problem(|| {
                        format!(
                            "{} records of {} still unanswered after the drain",
                            t.inflight.len(),
                            t.label
                        )
                    });
                }
            }
            t.inflight.clear();
            t.retries.clear();
        }
        tally.retries_pending = 0;
        for c in &mut self.conns {
            if c.link.begin_close(registry) {
                self.close_sent += 1;
            }
        }
    }

    fn closed(&self) -> bool {
        self.conns.iter().all(|c| c.link.is_done())
    }

    /// Refused records are due again within milliseconds.
    fn wait_cap(&self) -> Option<Duration> {
        (self.tally.retries_pending > 0).then_some(Duration::from_millis(1))
    }

    fn serve(&mut self, events: &Events, turn: &mut Turn<'_>) {
        let Ingest {
            url,
            user_prefix: prefix,
            nonce,
            start,
            conns,
            tally,
            scratch,
            ..
        } = self;
        let (nonce, start) = (*nonce, *start);
        let mut cx = context(tally, scratch, turn, 0);
        let registry = turn.registry;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = conns.get_mut(i) else { continue };
            if ev.is_writable() {
                c.link.write_blocked = false;
            }
            match c.link.phase {
                Phase::Connecting | Phase::Upgrading => {
                    let key = wire::ws_key(nonce, i as u64);
                    let req = || {
                        let path = with_user(&url.path, &format!("{prefix}-{i}"));
                        wire::upgrade_request(&url.authority, &path, &key)
                    };
                    match c.link.handshake(turn.rbuf, req, &key) {
                        Progress::Waiting => {}
                        Progress::Opened => {
                            let Conn { link, track, frag } = c;
                            let mut peer = ConnPeer {
                                track,
                                cx: &mut cx,
                                start,
                            };
                            net::ws_opened(link, frag, None, registry, &mut peer);
                        }
                        Progress::Failed(f) => {
                            setup_failed(&mut c.track, cx.tally, f.kind(), || f.to_string());
                            c.link.shut(registry);
                        }
                    }
                }
                Phase::Open | Phase::Closing => {
                    let Conn { link, track, frag } = c;
                    let mut peer = ConnPeer {
                        track,
                        cx: &mut cx,
                        start,
                    };
                    net::ws_serve(link, frag, turn.rbuf, registry, false, &mut peer);
                }
                Phase::Done => {}
            }
        }
        if cx.tally.retries_pending > 0 {
            cx.now_ns = start.elapsed().as_nanos() as u64;
            for c in conns.iter_mut().filter(|c| !c.track.retries.is_empty()) {
                if c.link.phase != Phase::Open {
                    continue;
                }
                resend_due(&mut c.track, &mut c.link.out, &mut cx);
                if c.link.flush_if_ready().is_err() {
                    gone(&mut c.track, cx.tally, Gone::Closed, "write", || {
                        "write failed".into()
                    });
                    c.link.shut(registry);
                }
            }
        }
        *scratch = cx.scratch;
    }
}

fn base36(mut v: u64) -> String {
    const D: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(D[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// One connection's traffic as `net` hands it over.
struct ConnPeer<'t, 'c, 'a> {
    track: &'t mut Track,
    cx: &'c mut Cx<'a>,
    start: Instant,
}

impl Peer for ConnPeer<'_, '_, '_> {
    /// Every read goes on to WouldBlock.
    const SHORT_READS: bool = false;

    fn arrived(&mut self) {
        self.cx.now_ns = self.start.elapsed().as_nanos() as u64;
    }

    fn text(&mut self, p: &[u8]) {
        on_text(self.track, p, self.cx);
    }

    fn binary(&mut self) {
        unexpected(self.cx.tally, b"(a binary message)");
    }

    fn pinged(&mut self, n: u64) {
        self.cx.tally.ledger.pings += n;
    }

    fn lost(&mut self, loss: Loss) {
        let how = loss.gone();
        gone(self.track, self.cx.tally, how, &loss.kind(), || {
            loss.describe(false)
        });
    }

    fn close_acked(&mut self) {
        self.track.close_acked = true;
    }

    /// Send the next records.
    fn refill(&mut self, out: &mut Vec<u8>) {
        top_up(self.track, out, self.cx);
    }
}

// ---------------------------------------------------------------------------
// Report.

impl Summary for IngestReport {
    fn print(&self, url: &str, pid: Option<u32>) {
        let (r, o) = (self, &self.opts);
        println!("switchboard-load ingest  {url}");
        println!(
            "  connections   {} welcomed of {} (users {}-0..{}), {} records in flight each; run tag {}",
            r.opened,
            o.connections,
            o.user_prefix,
            o.connections.saturating_sub(1),
            o.inflight,
            r.run_tag
        );
        println!(
            "{} (setup {:.2} s)",
            report::window_line(r.run.window_s, o.warmup),
            r.run.setup_s
        );
        println!(
            "  throughput    {:.0} durable records/s ({} acknowledged in the window)",
            r.records_per_sec(),
            r.acked_window
        );
        println!(
            "  totals        {} records sent ({} sends, {} resent after overloaded), {} acknowledged, {} refused",
            r.records, r.sends, r.resends, r.acked_total, r.failed
        );
        println!("  ack latency   {}", latency_line(&r.latency));
        if !r.codes.is_empty() {
            println!("  error replies {}", map_line(&r.codes));
        }
        report::print_verification(
            &r.errors.kinds(),
            "every record acknowledged once, own client id, distinct record ids; no errors",
        );
        if r.unanswered_on_close > 0 {
            println!(
                "  note          {} records were in flight on connections the server ended",
                r.unanswered_on_close
            );
        }
        let per = |_: &Delta| {
            r.server_us_per_record()
                .map_or("- µs/record".into(), |u| format!("{u:.2} µs/record"))
        };
        r.run.print_tail(pid, "not opened    ", "", per, false);
    }

    fn to_json(&self, url: &str, pid: Option<u32>) -> Value {
        let (r, o) = (self, &self.opts);
        let own = json!({
            "connections": o.connections,
            "opened": r.opened,
            "inflight": o.inflight,
            "run_tag": r.run_tag,
            "acked_in_window": r.acked_window,
            "records_per_sec": r.records_per_sec().round(),
            "records": r.records,
            "sends": r.sends,
            "resends": r.resends,
            "acked_total": r.acked_total,
            "refused": r.failed,
            "unanswered_on_close": r.unanswered_on_close,
            "overloaded": r.overloaded(),
            "error_codes": r.codes,
            "ack_latency_us": latency_json(&r.latency),
        });
        let per = [("cpu_us_per_record", r.server_us_per_record())];
        r.run.json("ingest", url, pid, &r.errors.kinds(), &per, own)
    }

    fn problems(&self) -> u64 {
        self.errors.total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rig {
        t: Track,
        tally: Tally,
        out: Vec<u8>,
    }

    impl Rig {
        /// A welcomed connection that sent `w` records.
        fn new(w: usize) -> Rig {
            let mut r = Rig {
                t: Track::new("run.3".into(), w),
                tally: Tally::default(),
                out: Vec::new(),
            };
            r.tally.ledger.pending_setup = 1;
            r.text(br#"{"type":"connected","userId":"load-3"}"#);
            assert!(r.t.welcomed && r.t.settled);
            r.with(top_up);
            r
        }

        fn with(&mut self, f: impl FnOnce(&mut Track, &mut Vec<u8>, &mut Cx<'_>)) {
            let mut cx = Cx {
                tally: &mut self.tally,
                now_ns: 9_000,
                wall_ms: 1_700_000_000_000,
                sending: true,
                measuring: true,
                verifying: true,
                scratch: Vec::new(),
            };
            f(&mut self.t, &mut self.out, &mut cx);
        }

        fn text(&mut self, p: &[u8]) {
            self.with(|t, _, cx| on_text(t, p, cx));
        }

        fn ack(&mut self, seq: u64, id: i64) {
            let m = format!(
                r#"{{"type":"ack","id":{id},"clientId":"run.3-{seq}","requestId":{seq},"timestamp":"t"}}"#
            );
            self.text(m.as_bytes());
        }

        fn error(&mut self, seq: u64, code: &str) {
            let m = format!(
                r#"{{"type":"error","code":"{code}","message":"m","requestId":{seq},"timestamp":"t"}}"#
            );
            self.text(m.as_bytes());
        }
    }

    #[test]
    fn records_are_the_documented_json() {
        let mut b = Vec::new();
        write_record(&mut b, "abc.7", 42, 1_700_000_000_123);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["type"], "sensor_data");
        assert_eq!(v["id"], "abc.7-42");
        assert_eq!(v["requestId"], 42);
        assert_eq!(v["data"]["timestamp"], 1_700_000_000_123u64);
        assert_eq!(v["data"]["sensorId"], "s-abc.7");
        assert_eq!(v["data"]["seq"], 42);
        assert!(v["data"]["value"].is_f64());
        assert_eq!(seq_of("abc.7-42", "abc.7"), Some(42));
        assert_eq!(seq_of("abc.71-42", "abc.7"), None);
        assert_eq!(seq_of("abc.7-", "abc.7"), None);
        assert_eq!(seq_of("abc.7-+4", "abc.7"), None);
    }

    #[test]
    fn acks_complete_records_and_return_credits() {
        let mut r = Rig::new(4);
        assert_eq!(r.t.inflight.len(), 4);
        assert_eq!(r.t.credits, 0);
        for seq in 0..4 {
            r.ack(seq, 100 + seq as i64);
        }
        assert_eq!(r.tally.acked_total, 4);
        assert_eq!(r.tally.acked_window, 4);
        assert_eq!(r.tally.latency.count(), 4);
        assert_eq!(r.t.credits, 4);
        assert!(r.t.inflight.is_empty());
        assert_eq!(r.tally.errors, IngestErrors::default());
    }

    #[test]
    fn a_second_ack_a_reused_id_and_a_duplicate_are_errors() {
        let mut r = Rig::new(4);
        r.ack(0, 10);
        r.ack(0, 10);
        assert_eq!(r.tally.errors.dup_ack, 1);
        r.ack(1, 10);
        assert_eq!(r.tally.errors.id_reused, 1);
        r.text(br#"{"type":"ack","id":12,"clientId":"run.3-2","duplicate":true}"#);
        assert_eq!(r.tally.errors.duplicate, 1);
        // Not ours, never sent, request id disagreeing, no record id.
        r.text(br#"{"type":"ack","id":13,"clientId":"other.3-3"}"#);
        r.text(br#"{"type":"ack","id":13,"clientId":"run.3-99"}"#);
        r.text(br#"{"type":"ack","id":13,"clientId":"run.3-3","requestId":2}"#);
        r.text(br#"{"type":"ack","clientId":"run.3-3"}"#);
        assert_eq!(r.tally.errors.mismatch, 4);
        assert_eq!(r.tally.errors.total(), 7, "{:?}", r.tally.errors);
        assert!(r.t.inflight.contains_key(&3));
    }

    #[test]
    fn overloaded_records_are_sent_again_and_count_only_if_never_stored() {
        let mut r = Rig::new(2);
        r.error(0, "overloaded");
        r.error(1, "overloaded");
        assert_eq!(r.tally.codes.get("overloaded"), Some(&2));
        assert_eq!(r.tally.retries_pending, 2);
        assert_eq!(r.tally.errors.total(), 0);
        let before = r.out.len();
        // Not due yet at 9 µs.
        r.with(resend_due);
        assert_eq!(r.out.len(), before);
        r.with(|t, out, cx| {
            cx.now_ns = 1_000_000_000;
            resend_due(t, out, cx)
        });
        assert!(r.out.len() > before);
        assert_eq!(r.tally.resends, 2);
        assert_eq!(r.tally.retries_pending, 0);
        r.ack(0, 1);
        assert_eq!(r.tally.acked_total, 1);
        // Record 1 is never acknowledged: the drain's verdict.
        assert_eq!(r.t.inflight.get(&1).map(|x| x.attempts), Some(1));
        assert_eq!(r.tally.errors.total(), 0);
    }

    #[test]
    fn other_errors_end_the_record() {
        let mut r = Rig::new(2);
        r.error(1, "storage_error");
        assert_eq!(r.tally.errors.rejected, 1);
        assert_eq!(r.tally.failed, 1);
        assert_eq!(r.t.credits, 1);
        assert_eq!(r.tally.codes.get("storage_error"), Some(&1));
        // An ack for it after all is a mismatch; an error naming nothing is rejected.
        r.ack(1, 5);
        assert_eq!(r.tally.errors.mismatch, 1);
        r.text(br#"{"type":"error","code":"bad_json","message":"m"}"#);
        assert_eq!(r.tally.errors.rejected, 2);
        r.text(br#"{"type":"published"}"#);
        r.text(b"not json");
        assert_eq!(r.tally.errors.unexpected, 2);
    }

    #[test]
    fn base36_tags() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }
}
