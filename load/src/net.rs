//! Client connection plumbing shared by every mode: dialing (optionally from
//! a chosen source address), the TCP connect and HTTP upgrade steps, the
//! output buffer written once per wake-up, and frame decoding that copies
//! only a trailing partial frame out of the shared read buffer.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::{self, Frame, FrameError, UpgradeError};

/// Partial-frame buffers larger than this are freed once empty.
const KEEP_INBUF: usize = 64 << 10;

/// Why a connection never opened.
#[derive(Debug)]
pub enum Fail {
    /// socket() failed (EMFILE: out of descriptors).
    Socket(io::Error),
    /// bind() to the source address failed (ports exhausted).
    Bind(io::Error),
    /// The TCP connect failed.
    Connect(io::Error),
    /// The upgrade was answered with another HTTP status.
    Status(u16),
    /// 101 with a wrong Sec-WebSocket-Accept.
    BadAccept,
    /// The answer was not HTTP.
    Malformed,
    /// The server closed before answering.
    Eof,
    /// Read or write failed during the upgrade.
    Io(io::Error),
    /// No answer in time.
    Timeout,
}

impl Fail {
    /// A short name to count failures by.
    pub fn kind(&self) -> String {
        let os = |e: &io::Error| e.raw_os_error();
        match self {
            Fail::Socket(e) if matches!(os(e), Some(libc::EMFILE | libc::ENFILE)) => {
                "fd_limit".into()
            }
            Fail::Socket(_) => "socket".into(),
            Fail::Bind(_) => "bind".into(),
            Fail::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused".into(),
            Fail::Connect(e) if os(e) == Some(libc::EADDRNOTAVAIL) => "no_ports".into(),
            Fail::Connect(_) => "connect".into(),
            Fail::Status(code) => format!("http_{code}"),
            Fail::BadAccept => "bad_accept".into(),
            Fail::Malformed => "bad_response".into(),
            Fail::Eof => "eof".into(),
            Fail::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset".into(),
            Fail::Io(_) => "io".into(),
            Fail::Timeout => "timeout".into(),
        }
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Socket(e) => write!(f, "socket: {e}"),
            Fail::Bind(e) => write!(f, "bind: {e}"),
            Fail::Connect(e) => write!(f, "connect: {e}"),
            Fail::Status(c) => write!(f, "upgrade answered with HTTP {c}"),
            Fail::BadAccept => write!(f, "wrong Sec-WebSocket-Accept"),
            Fail::Malformed => write!(f, "malformed HTTP response"),
            Fail::Eof => write!(f, "server closed during the upgrade"),
            Fail::Io(e) => write!(f, "during the upgrade: {e}"),
            Fail::Timeout => write!(f, "upgrade timed out"),
        }
    }
}

/// Start a non-blocking connect to `dst`, bound first to `src` if given
/// (port 0: the kernel picks).
pub fn dial(src: Option<SocketAddr>, dst: SocketAddr) -> Result<TcpStream, Fail> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
        .map_err(Fail::Socket)?;
    sock.set_nonblocking(true).map_err(Fail::Socket)?;
    if let Some(a) = src {
        // Ports left in TIME_WAIT by earlier runs (tests run back to back)
        // would refuse a plain bind; the 4-tuple still has to be free, which
        // connect checks (EADDRNOTAVAIL, retried on the next port).
        sock.set_reuse_address(true).map_err(Fail::Socket)?;
        sock.bind(&a.into()).map_err(Fail::Bind)?;
    }
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(Fail::Connect(e)),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock));
    // Frames are batched per wake-up already; do not let Nagle hold them.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Ports one source address is asked for at most (the ephemeral range is
/// usually 28,232 wide).
const PORTS_PER_SOURCE: usize = 25_000;

/// 127.0.0.1..=127.0.0.N when the server is on IPv4 loopback, enough that
/// none needs more than 25,000 ports for `k` connections (or `want`);
/// none otherwise.
pub fn source_addresses(dst: SocketAddr, k: usize, want: Option<u8>) -> Vec<IpAddr> {
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

/// Source ports for connections bound to chosen source addresses.
///
/// `bind(ip:0)` makes the kernel search for a free port, preferring half of
/// the ephemeral range (the other parity is left to `connect`); once about
/// 14,000 ports of one address are taken every bind becomes a scan costing
/// milliseconds. So ports are walked here instead: a cursor per source
/// address through the ephemeral range, skipping ports in use.
pub struct SourcePorts {
    ips: Vec<IpAddr>,
    lo: u16,
    hi: u16,
    next: Vec<u16>,
}

/// Ports tried for one connection before giving up.
const PORT_TRIES: usize = 4096;

impl SourcePorts {
    pub fn new(ips: Vec<IpAddr>) -> SourcePorts {
        let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_ascii_whitespace().map(|v| v.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            })
            .filter(|(lo, hi)| lo < hi)
            .unwrap_or((32768, 60999));
        // Start somewhere different in each process, so concurrent runs (and
        // the ports an earlier run left in TIME_WAIT) are not walked in step.
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
        let span = u64::from(hi - lo) + 1;
        let start = lo + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) % span) as u16;
        let next = vec![start; ips.len()];
        SourcePorts { ips, lo, hi, next }
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// Dial `dst` from source address number `n % len`, on the next free
    /// port (with no source addresses: from a kernel-chosen one).
    pub fn dial(&mut self, n: usize, dst: SocketAddr) -> Result<TcpStream, Fail> {
        let i = n % self.ips.len().max(1);
        let (Some(&ip), Some(cursor)) = (self.ips.get(i), self.next.get_mut(i)) else {
            return dial(None, dst);
        };
        let mut last = None;
        for _ in 0..PORT_TRIES {
            let port = *cursor;
            *cursor = if port >= self.hi { self.lo } else { port + 1 };
            match dial(Some(SocketAddr::new(ip, port)), dst) {
                Err(Fail::Bind(e) | Fail::Connect(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                    ) =>
                {
                    last = Some(e)
                }
                other => return other,
            }
        }
        Err(Fail::Bind(
            last.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()),
        ))
    }
}

/// A connection just dialed, registered as `token`; or why it failed.
pub fn open(
    dialed: Result<TcpStream, Fail>,
    registry: &Registry,
    token: Token,
) -> Result<Link, Fail> {
    let mut link = Link::new(dialed?);
    if let Err(e) = link.register(registry, token) {
        link.shut(registry);
        return Err(Fail::Socket(e));
    }
    Ok(link)
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for 101.
    Upgrading,
    Open,
    /// Our close frame is sent; waiting for the server's close and EOF.
    Closing,
    /// Socket gone.
    Done,
}

/// Outcome of one read.
pub enum ReadOutcome {
    Data(usize),
    WouldBlock,
    Eof,
    Error(io::Error),
}

/// What a handshake step achieved.
pub enum Progress {
    Waiting,
    /// 101 received; `inbuf` may already hold the first frames.
    Opened,
    Failed(Fail),
}

/// One client connection's socket and buffers.
pub struct Link {
    pub stream: Option<TcpStream>,
    pub phase: Phase,
    /// Bytes to send; appended to during a wake-up, written once at its end.
    pub out: Vec<u8>,
    /// A partial frame (or the partial upgrade response).
    pub inbuf: Vec<u8>,
    /// The last write hit WouldBlock: wait for a writable event.
    pub write_blocked: bool,
}

impl Link {
    pub fn new(stream: TcpStream) -> Link {
        Link {
            stream: Some(stream),
            phase: Phase::Connecting,
            out: Vec::new(),
            inbuf: Vec::new(),
            write_blocked: false,
        }
    }

    /// A connection that never got a socket.
    pub fn dead() -> Link {
        Link {
            stream: None,
            phase: Phase::Done,
            out: Vec::new(),
            inbuf: Vec::new(),
            write_blocked: false,
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self.stream.as_mut() {
            Some(s) => registry.register(s, token, Interest::READABLE | Interest::WRITABLE),
            None => Ok(()),
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        let Some(s) = self.stream.as_mut() else {
            return ReadOutcome::Eof;
        };
        loop {
            return match s.read(buf) {
                Ok(0) => ReadOutcome::Eof,
                Ok(n) => ReadOutcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => ReadOutcome::Error(e),
            };
        }
    }

    /// Write `out` until it is empty or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(s) = self.stream.as_mut() else {
            self.out.clear();
            return Ok(());
        };
        let mut written = 0;
        let result = loop {
            let Some(rest) = self.out.get(written..).filter(|r| !r.is_empty()) else {
                break Ok(());
            };
            match s.write(rest) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    break Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if written >= self.out.len() {
            self.out.clear();
        } else {
            self.out.drain(..written);
        }
        result
    }

    /// Flush unless a write is known to be blocked.
    pub fn flush_if_ready(&mut self) -> io::Result<()> {
        if self.out.is_empty() || self.write_blocked {
            return Ok(());
        }
        self.flush()
    }

    /// Begin the closing handshake of an open connection: a close frame
    /// (1000) is queued and written. False if the connection was not open.
    pub fn begin_close(&mut self, registry: &Registry) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        wire::close_frame(&mut self.out, 1000);
        self.phase = Phase::Closing;
        if self.flush_if_ready().is_err() {
            self.shut(registry);
        }
        true
    }

    /// Drop the socket (the kernel closes it).
    pub fn shut(&mut self, registry: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = registry.deregister(&mut s);
        }
        self.phase = Phase::Done;
        self.out = Vec::new();
        self.inbuf = Vec::new();
    }

    /// Move the TCP connect and the upgrade along after a readiness event.
    /// `request` builds the upgrade request; `key` is its Sec-WebSocket-Key.
    pub fn handshake(
        &mut self,
        rbuf: &mut [u8],
        request: impl FnOnce() -> Vec<u8>,
        key: &str,
    ) -> Progress {
        if self.phase == Phase::Connecting {
            let Some(s) = self.stream.as_ref() else {
                return Progress::Failed(Fail::Eof);
            };
            match connect_result(s) {
                Ok(false) => return Progress::Waiting,
                Ok(true) => {
                    self.out = request();
                    self.phase = Phase::Upgrading;
                    if let Err(e) = self.flush() {
                        return Progress::Failed(Fail::Io(e));
                    }
                }
                Err(e) => return Progress::Failed(Fail::Connect(e)),
            }
        }
        if self.phase != Phase::Upgrading {
            return Progress::Waiting;
        }
        if self.write_blocked {
            self.write_blocked = false;
            if let Err(e) = self.flush() {
                return Progress::Failed(Fail::Io(e));
            }
        }
        loop {
            match self.read(rbuf) {
                ReadOutcome::Data(n) => {
                    self.inbuf
                        .extend_from_slice(rbuf.get(..n).unwrap_or_default());
                    match wire::parse_upgrade(&self.inbuf, key) {
                        Ok(None) => {}
                        Ok(Some(used)) => {
                            self.inbuf.drain(..used);
                            // Frames right behind the head are read on: the
                            // socket must be drained before waiting for an edge.
                            self.phase = Phase::Open;
                            return match self.drain_into_inbuf(rbuf) {
                                Ok(()) => Progress::Opened,
                                Err(f) => Progress::Failed(f),
                            };
                        }
                        Err(UpgradeError::Status(c)) => return Progress::Failed(Fail::Status(c)),
                        Err(UpgradeError::BadAccept) => return Progress::Failed(Fail::BadAccept),
                        Err(UpgradeError::Malformed) => return Progress::Failed(Fail::Malformed),
                    }
                }
                ReadOutcome::WouldBlock => return Progress::Waiting,
                ReadOutcome::Eof => return Progress::Failed(Fail::Eof),
                ReadOutcome::Error(e) => return Progress::Failed(Fail::Io(e)),
            }
        }
    }

    /// Read everything available into `inbuf` (only right after the upgrade).
    fn drain_into_inbuf(&mut self, rbuf: &mut [u8]) -> Result<(), Fail> {
        loop {
            match self.read(rbuf) {
                ReadOutcome::Data(n) => self
                    .inbuf
                    .extend_from_slice(rbuf.get(..n).unwrap_or_default()),
                ReadOutcome::WouldBlock => return Ok(()),
                // The caller sees EOF on its next read.
                ReadOutcome::Eof => return Ok(()),
                ReadOutcome::Error(e) => return Err(Fail::Io(e)),
            }
        }
    }
}

impl Link {
    /// Move a plain TCP connect along (no upgrade: the HTTP API's
    /// connections): true once connected, when the phase becomes `Open`.
    pub fn tcp_connect(&mut self) -> Result<bool, Fail> {
        if self.phase != Phase::Connecting {
            return Ok(self.phase == Phase::Open);
        }
        let Some(s) = self.stream.as_ref() else {
            return Err(Fail::Eof);
        };
        match connect_result(s) {
            Ok(false) => Ok(false),
            Ok(true) => {
                self.phase = Phase::Open;
                Ok(true)
            }
            Err(e) => Err(Fail::Connect(e)),
        }
    }
}

/// How the frames of one read ended (see [`ws_feed`]).
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEnd {
    /// Every whole frame was handled; go on reading.
    More,
    /// The server sent a close frame while the connection was open: code
    /// and reason. It was answered; the phase is now `Closing`.
    ServerClose(u16, String),
    /// The server answered our close frame.
    CloseAcked,
    /// A frame or a fragment sequence that breaks RFC 6455.
    Protocol(String),
}

/// Decode the WebSocket frames of `fresh` (after what `inbuf` kept) on a
/// JSON-protocol connection: every whole message goes to `on_message`
/// (`true` for text), fragmented ones reassembled in `frag`; pings are
/// answered into `out` (counted in `pings`); a close frame ends the feed.
pub fn ws_feed(
    link: &mut Link,
    frag: &mut Option<(u8, Vec<u8>)>,
    fresh: &[u8],
    pings: &mut u64,
    on_message: &mut dyn FnMut(bool, &[u8]),
) -> FeedEnd {
    let Link {
        inbuf, out, phase, ..
    } = link;
    let mut end = FeedEnd::More;
    let r = feed(inbuf, fresh, &mut |f: Frame<'_>| {
        match (f.opcode, frag.is_some()) {
            (wire::OP_TEXT | wire::OP_BINARY, false) if f.fin => {
                on_message(f.opcode == wire::OP_TEXT, f.payload);
            }
            (wire::OP_TEXT | wire::OP_BINARY, false) => {
                *frag = Some((f.opcode, f.payload.to_vec()));
            }
            (wire::OP_CONTINUATION, true) => {
                if let Some((_, buf)) = frag.as_mut() {
                    buf.extend_from_slice(f.payload);
                }
                if f.fin
                    && let Some((op, buf)) = frag.take()
                {
                    on_message(op == wire::OP_TEXT, &buf);
                }
            }
            (wire::OP_TEXT | wire::OP_BINARY | wire::OP_CONTINUATION, _) => {
                end = FeedEnd::Protocol("bad fragmentation in a server message".into());
                return false;
            }
            (wire::OP_PING, _) => {
                *pings += 1;
                wire::frame(out, wire::OP_PONG, f.payload);
            }
            (wire::OP_PONG, _) => {}
            _ => {
                if *phase == Phase::Open {
                    let code = f
                        .payload
                        .get(..2)
                        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default())
                        .into_owned();
                    // Answer with the same code (RFC 6455 5.5.1), then wait for EOF.
                    wire::frame(out, wire::OP_CLOSE, f.payload.get(..2).unwrap_or_default());
                    *phase = Phase::Closing;
                    end = FeedEnd::ServerClose(code, reason);
                } else {
                    end = FeedEnd::CloseAcked;
                }
                return false;
            }
        }
        true
    });
    match r {
        Err(e) => FeedEnd::Protocol(format!("bad server frame: {e:?}")),
        Ok(()) => end,
    }
}

/// How the server ended a connection before we closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Close frame, EOF, reset or write failure.
    Closed,
    /// A frame that breaks RFC 6455.
    Protocol,
}

/// How a JSON-protocol connection was lost before we closed it.
#[derive(Debug)]
pub enum Loss {
    /// The server closed the TCP connection.
    Eof,
    Read(Fail),
    /// Writing failed (right after the upgrade, or later).
    Write {
        after_upgrade: bool,
    },
    /// The server sent a close frame: code and reason.
    Close(u16, String),
    /// A frame or a fragment sequence that breaks RFC 6455.
    Protocol(String),
}

impl Loss {
    /// A short name to count losses by.
    pub fn kind(&self) -> String {
        match self {
            Loss::Eof => "eof".into(),
            Loss::Read(f) => f.kind(),
            Loss::Write { .. } => "write".into(),
            Loss::Close(code, _) => format!("close_{code}"),
            Loss::Protocol(_) => "protocol".into(),
        }
    }

    /// Closed, or broke the protocol?
    pub fn gone(&self) -> Gone {
        match self {
            Loss::Protocol(_) => Gone::Protocol,
            _ => Gone::Closed,
        }
    }

    /// What happened, said of a channel subscriber or of a connection.
    pub fn describe(&self, subscriber: bool) -> String {
        match (self, subscriber) {
            (Loss::Eof, true) => "the server closed a subscriber's connection (EOF)".into(),
            (Loss::Eof, false) => "the server closed a connection (EOF)".into(),
            (Loss::Read(f), true) => format!("subscriber read: {f}"),
            (Loss::Read(f), false) => format!("read: {f}"),
            (
                Loss::Write {
                    after_upgrade: true,
                },
                _,
            ) => "write failed after the upgrade".into(),
            (Loss::Write { .. }, true) => "subscriber write failed".into(),
            (Loss::Write { .. }, false) => "write failed".into(),
            (Loss::Close(code, reason), true) => {
                format!("the server closed a subscriber with {code} {reason:?}")
            }
            (Loss::Close(code, reason), false) => {
                format!("the server closed a connection with {code} {reason:?}")
            }
            (Loss::Protocol(what), _) => what.clone(),
        }
    }
}

/// What a mode does with the traffic of one JSON-protocol connection
/// (fanout and api subscribers, ingest connections).
pub trait Peer {
    /// After a close frame (the server's, or its answer to ours) read on
    /// to the server's EOF, the answer to a server's close written when the
    /// read ends (fanout); else answer at once and drop the socket as soon
    /// as the closing handshake is done.
    const READ_TO_EOF: bool = false;
    /// A read that did not fill the buffer ends the wake-up (see
    /// [`ws_serve`]).
    const SHORT_READS: bool = true;

    /// Fresh bytes arrived (before they are decoded).
    fn arrived(&mut self);
    /// A whole text message.
    fn text(&mut self, p: &[u8]);
    /// A whole binary message.
    fn binary(&mut self);
    /// Pings answered.
    fn pinged(&mut self, n: u64);
    /// The server ended (or broke) the connection before we closed it.
    fn lost(&mut self, loss: Loss);
    /// The server answered our close frame.
    fn close_acked(&mut self);
    /// The read is over and the connection still open: queue what is due.
    fn refill(&mut self, _out: &mut Vec<u8>) {}
}

/// Decode and hand over the fresh bytes of a JSON-protocol connection;
/// false when it must go.
pub fn ws_bytes<P: Peer>(
    link: &mut Link,
    frag: &mut Option<(u8, Vec<u8>)>,
    fresh: &[u8],
    peer: &mut P,
) -> bool {
    let mut pings = 0;
    let end = ws_feed(link, frag, fresh, &mut pings, &mut |text, p| {
        if text {
            peer.text(p);
        } else {
            peer.binary();
        }
    });
    peer.pinged(pings);
    match end {
        FeedEnd::More => true,
        FeedEnd::CloseAcked => {
            peer.close_acked();
            P::READ_TO_EOF
        }
        FeedEnd::ServerClose(code, reason) => {
            peer.lost(Loss::Close(code, reason));
            if !P::READ_TO_EOF {
                // Our answer is queued; wait for the server's EOF.
                let _ = link.flush_if_ready();
            }
            true
        }
        FeedEnd::Protocol(what) => {
            peer.lost(Loss::Protocol(what));
            false
        }
    }
}

/// A readiness event on an open (or closing) JSON-protocol connection:
/// read, hand every message to `peer`, then write once.
///
/// With `P::SHORT_READS`: edge-triggered readiness is re-armed by every
/// arrival, so a read that did not fill the buffer has taken everything
/// there was, and the extra read that would only return WouldBlock is
/// skipped (a syscall per wake-up, a large share of the client's cost at
/// 10,000 subscribers). A hang-up is not re-announced, so with one
/// pending (`hangup`) or while closing, reads go on to WouldBlock or EOF.
pub fn ws_serve<P: Peer>(
    link: &mut Link,
    frag: &mut Option<(u8, Vec<u8>)>,
    rbuf: &mut [u8],
    registry: &Registry,
    hangup: bool,
    peer: &mut P,
) {
    loop {
        match link.read(rbuf) {
            ReadOutcome::Data(n) => {
                peer.arrived();
                if !ws_bytes(link, frag, rbuf.get(..n).unwrap_or_default(), peer) {
                    link.shut(registry);
                    return;
                }
                if P::SHORT_READS && n < rbuf.len() && !hangup && link.phase == Phase::Open {
                    break;
                }
            }
            ReadOutcome::WouldBlock => break,
            ReadOutcome::Eof => {
                if link.phase == Phase::Open {
                    peer.lost(Loss::Eof);
                }
                link.shut(registry);
                return;
            }
            ReadOutcome::Error(e) => {
                if link.phase == Phase::Open {
                    peer.lost(Loss::Read(Fail::Io(e)));
                }
                link.shut(registry);
                return;
            }
        }
    }
    if link.phase == Phase::Open {
        peer.refill(&mut link.out);
    }
    if link.flush_if_ready().is_err() {
        if link.phase == Phase::Open {
            peer.lost(Loss::Write {
                after_upgrade: false,
            });
        }
        link.shut(registry);
    }
}

/// A JSON-protocol connection just upgraded: `first` (a subscribe) is sent
/// right behind the upgrade, and frames that came with the 101 are handled.
pub fn ws_opened<P: Peer>(
    link: &mut Link,
    frag: &mut Option<(u8, Vec<u8>)>,
    first: Option<&[u8]>,
    registry: &Registry,
    peer: &mut P,
) {
    if let Some(msg) = first {
        wire::frame(&mut link.out, wire::OP_TEXT, msg);
    }
    peer.arrived();
    if !link.inbuf.is_empty() && !ws_bytes(link, frag, &[], peer) {
        link.shut(registry);
    } else if first.is_some() && link.flush_if_ready().is_err() {
        peer.lost(Loss::Write {
            after_upgrade: true,
        });
        link.shut(registry);
    }
}

/// After a readiness event on a connecting socket: connected, still
/// connecting, or failed.
fn connect_result(s: &TcpStream) -> io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Decode every whole frame of `inbuf` + `fresh`, handing each to `on_frame`
/// (which returns false to stop: the rest is discarded). A trailing partial
/// frame is kept in `inbuf`; when `inbuf` starts empty, whole frames are
/// decoded straight from `fresh` without copying.
pub fn feed(
    inbuf: &mut Vec<u8>,
    fresh: &[u8],
    on_frame: &mut dyn FnMut(Frame<'_>) -> bool,
) -> Result<(), FrameError> {
    if inbuf.is_empty() {
        let (used, go) = decode(fresh, on_frame)?;
        if go && let Some(rest) = fresh.get(used..) {
            inbuf.extend_from_slice(rest);
        }
        return Ok(());
    }
    inbuf.extend_from_slice(fresh);
    let buf = std::mem::take(inbuf);
    let (used, go) = decode(&buf, on_frame)?;
    if go && used < buf.len() {
        *inbuf = buf;
        inbuf.drain(..used);
    } else if buf.capacity() <= KEEP_INBUF {
        *inbuf = buf;
        inbuf.clear();
    }
    Ok(())
}

fn decode(
    buf: &[u8],
    on_frame: &mut dyn FnMut(Frame<'_>) -> bool,
) -> Result<(usize, bool), FrameError> {
    let mut pos = 0;
    while let Some(rest) = buf.get(pos..) {
        match wire::parse_frame(rest)? {
            None => break,
            Some((f, used)) => {
                pos += used;
                if !on_frame(f) {
                    return Ok((pos, false));
                }
            }
        }
    }
    Ok((pos, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard::ws::frame::{OpCode, encode_frame};

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
    fn feed_keeps_partial_frames_across_reads() {
        let mut stream = Vec::new();
        for i in 0..50u8 {
            encode_frame(&mut stream, OpCode::Binary, &vec![i; usize::from(i) * 13]);
        }
        for chunk in [1usize, 2, 3, 7, 64, 1000, stream.len()] {
            let mut inbuf = Vec::new();
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                feed(&mut inbuf, part, &mut |f| {
                    got.push(f.payload.to_vec());
                    true
                })
                .unwrap();
            }
            assert!(inbuf.is_empty(), "chunk {chunk}");
            assert_eq!(got.len(), 50, "chunk {chunk}");
            for (i, p) in got.iter().enumerate() {
                assert_eq!(p, &vec![i as u8; i * 13]);
            }
        }
    }

    #[test]
    fn feed_stops_when_asked() {
        let mut stream = Vec::new();
        encode_frame(&mut stream, OpCode::Close, &[3, 232]);
        encode_frame(&mut stream, OpCode::Text, b"after");
        let mut inbuf = Vec::new();
        let mut n = 0;
        feed(&mut inbuf, &stream, &mut |_| {
            n += 1;
            false
        })
        .unwrap();
        assert_eq!(n, 1);
        assert!(inbuf.is_empty());
    }

    #[test]
    fn source_ports_skip_ports_in_use() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let mut ports = SourcePorts::new(vec![[127, 0, 0, 3].into()]);
        // Hold the first port the cursor would take: it must be skipped.
        let first = ports.next[0];
        let _held = std::net::TcpListener::bind(("127.0.0.3", first));
        let a = ports.dial(0, dst).unwrap();
        let b = ports.dial(7, dst).unwrap();
        let pa = a.local_addr().unwrap();
        let pb = b.local_addr().unwrap();
        assert_eq!(pa.ip(), std::net::IpAddr::from([127, 0, 0, 3]));
        assert_ne!(pa.port(), first);
        assert_ne!(pa.port(), pb.port());
        assert!((ports.lo..=ports.hi).contains(&pa.port()));
    }

    #[test]
    fn failure_kinds() {
        assert_eq!(Fail::Status(503).kind(), "http_503");
        assert_eq!(
            Fail::Socket(io::Error::from_raw_os_error(libc::EMFILE)).kind(),
            "fd_limit"
        );
        assert_eq!(
            Fail::Connect(io::ErrorKind::ConnectionRefused.into()).kind(),
            "refused"
        );
    }

    #[test]
    fn dial_refused_port_fails_or_reports() {
        // Bind then drop a listener: nothing listens on that port now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dst: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut poll = mio::Poll::new().unwrap();
        let mut link = match dial(Some(([127, 0, 0, 2], 0).into()), dst) {
            Ok(s) => Link::new(s),
            Err(f) => {
                assert_eq!(f.kind(), "refused");
                return;
            }
        };
        link.register(poll.registry(), Token(0)).unwrap();
        let mut events = mio::Events::with_capacity(4);
        let mut rbuf = [0u8; 256];
        for _ in 0..100 {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(50)))
                .unwrap();
            match link.handshake(&mut rbuf, Vec::new, "k") {
                Progress::Waiting => continue,
                Progress::Opened => panic!("nothing listens there"),
                Progress::Failed(f) => {
                    assert_eq!(f.kind(), "refused", "{f}");
                    return;
                }
            }
        }
        panic!("no connect result");
    }
}
