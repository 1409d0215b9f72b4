//! Per-connection inbound state: turns client bytes into whole messages.
//!
//! Invariants (what keeps idle connections small):
//! * `pending` holds only the bytes of an incomplete frame; it is empty, with
//!   no allocation, whenever the last read ended on a frame boundary.
//! * `frag` exists only while a fragmented message is being received.
//!
//! Bytes are normally decoded straight out of the shard's scratch buffer; they
//! are copied into `pending` only when a read ends mid-frame.

use super::frame::{self, HeaderError, RawOpCode};

/// Size limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload of a single frame.
    pub max_frame: usize,
    /// Largest reassembled message.
    pub max_message: usize,
}

/// A whole message, borrowed from the decode buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message. The bytes are valid UTF-8 (checked); they are
    /// mutable so a JSON parser can work in place.
    Text(&'a mut [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A close frame; `None` when it carried no status code.
    Close(Option<(u16, &'a str)>),
}

/// What the message handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop decoding; the rest of the input is discarded (after a close).
    Stop,
}

/// Why the peer's input was refused. Each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// A protocol violation (close 1002).
    Protocol(Violation),
    /// Text or close reason that is not UTF-8 (close 1007).
    InvalidUtf8,
    /// A frame or message over the configured limit (close 1009).
    TooBig { limit: usize },
}

/// The RFC 6455 rule that was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// RSV1-3 set without a negotiated extension (5.2).
    ReservedBits,
    /// Opcode 3-7 or 11-15 (5.2).
    ReservedOpcode(u8),
    /// Client frames must be masked (5.1).
    UnmaskedFrame,
    /// Control frames carry at most 125 bytes (5.5).
    ControlTooLong,
    /// Control frames must not be fragmented (5.5).
    FragmentedControl,
    /// A continuation frame with no message in progress (5.4).
    UnexpectedContinuation,
    /// A new data frame while a fragmented message is in progress (5.4).
    ExpectedContinuation,
    /// A close frame with a one-byte payload (5.5.1).
    ClosePayloadLength,
    /// A close status code that may not be sent (7.4).
    InvalidCloseCode(u16),
}

impl WsError {
    /// The close code this error is answered with.
    pub fn close_code(self) -> frame::CloseCode {
        match self {
            WsError::Protocol(_) => frame::CloseCode::Protocol,
            WsError::InvalidUtf8 => frame::CloseCode::InvalidPayload,
            WsError::TooBig { .. } => frame::CloseCode::TooBig,
        }
    }

    /// A short reason for the close frame and the logs.
    pub fn reason(self) -> &'static str {
        match self {
            WsError::Protocol(v) => match v {
                Violation::ReservedBits => "reserved bits set",
                Violation::ReservedOpcode(_) => "reserved opcode",
                Violation::UnmaskedFrame => "client frame not masked",
                Violation::ControlTooLong => "control frame over 125 bytes",
                Violation::FragmentedControl => "fragmented control frame",
                Violation::UnexpectedContinuation => "continuation without a message",
                Violation::ExpectedContinuation => "data frame inside a fragmented message",
                Violation::ClosePayloadLength => "close payload of one byte",
                Violation::InvalidCloseCode(_) => "invalid close code",
            },
            WsError::InvalidUtf8 => "invalid UTF-8",
            WsError::TooBig { .. } => "message too big",
        }
    }
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Fragmented {
    text: bool,
    buf: Vec<u8>,
    /// For text: `buf[..utf8_valid]` is known to be valid UTF-8.
    utf8_valid: usize,
}

/// Inbound decode state of one connection.
#[derive(Debug, Default)]
pub struct Inbound {
    pending: Vec<u8>,
    frag: Option<Box<Fragmented>>,
    probe: TextProbe,
}

/// UTF-8 checked so far in the text frame still arriving at the head of
/// `pending`, so invalid text is refused as soon as its bytes arrive, not
/// when the frame completes (Autobahn 6.4.3/6.4.4 "fail fast"). Each byte is
/// checked once: only the newly arrived part is unmasked into a scratch copy.
#[derive(Debug, Default, Clone, Copy)]
struct TextProbe {
    /// Payload bytes of the pending frame already checked.
    checked: usize,
    /// An incomplete code point at the end of the checked bytes.
    carry: [u8; 3],
    carry_len: u8,
}

impl Inbound {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held for an incomplete frame or message (for memory accounting and tests).
    pub fn buffered(&self) -> usize {
        self.pending.len() + self.frag.as_ref().map_or(0, |f| f.buf.len())
    }

    /// Heap bytes held right now.
    pub fn heap_bytes(&self) -> usize {
        self.pending.capacity() + self.frag.as_ref().map_or(0, |f| f.buf.capacity() + 48)
    }

    /// Decode `fresh` (just read; it is unmasked in place) and hand every whole
    /// message to `on_msg`. Incomplete trailing bytes are kept for the next call.
    pub fn feed(
        &mut self,
        fresh: &mut [u8],
        limits: &Limits,
        on_msg: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<Flow, WsError> {
        self.feed_pooled(fresh, limits, &mut BufPool::default(), on_msg)
    }

    /// As [`Inbound::feed`], taking the buffer for a partial frame from the
    /// shard's `pool` and giving it back once drained: a stream of large
    /// frames reuses warm memory instead of growing a fresh buffer each time.
    pub fn feed_pooled(
        &mut self,
        fresh: &mut [u8],
        limits: &Limits,
        pool: &mut BufPool,
        on_msg: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<Flow, WsError> {
        if self.pending.is_empty() {
            self.probe = TextProbe::default(); // no frame in progress
            let (used, flow) = decode(&mut self.frag, &mut self.probe, fresh, limits, on_msg)?;
            if flow == Flow::Continue
                && let Some(rest) = fresh.get(used..)
                && !rest.is_empty()
            {
                if rest.len() >= BufPool::MIN {
                    self.pending = pool.take();
                }
                self.pending.extend_from_slice(rest);
            }
            return Ok(flow);
        }
        self.pending.extend_from_slice(fresh);
        let mut buf = std::mem::take(&mut self.pending);
        let result = decode(&mut self.frag, &mut self.probe, &mut buf, limits, on_msg);
        if let Ok((used, Flow::Continue)) = result
            && used < buf.len()
        {
            buf.drain(..used);
            self.pending = buf;
        } else {
            // Fully consumed, stopped, or failed: the buffer is free.
            pool.give(buf);
        }
        result.map(|(_, flow)| flow)
    }
}

/// A shard's spare buffers for large partial frames. Bounded in count and
/// size, so it cannot hold more than a few megabytes however clients behave;
/// only buffers that carried real bytes enter it (no allocation is made on
/// the strength of a frame header alone).
#[derive(Debug, Default)]
pub struct BufPool {
    spare: Vec<Vec<u8>>,
}

impl BufPool {
    /// Partial frames smaller than this use a fresh, exactly grown buffer.
    pub const MIN: usize = 16 << 10;
    /// Buffers kept at most.
    const KEEP: usize = 2;
    /// Largest buffer kept (bigger ones are freed).
    const MAX_CAP: usize = 4 << 20;

    fn take(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    fn give(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if (Self::MIN..=Self::MAX_CAP).contains(&cap) && self.spare.len() < Self::KEEP {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Bytes held by spare buffers.
    pub fn held(&self) -> usize {
        self.spare.iter().map(Vec::capacity).sum()
    }

    /// Free the spare buffers (the shard does so once a second: a stream of
    /// large frames reuses them within the second, a flood that ended does
    /// not keep them).
    pub fn clear(&mut self) {
        self.spare = Vec::new();
    }
}

/// Decode whole frames from the front of `buf`; returns bytes consumed.
fn decode(
    frag: &mut Option<Box<Fragmented>>,
    probe: &mut TextProbe,
    buf: &mut [u8],
    limits: &Limits,
    on_msg: &mut dyn FnMut(Message<'_>) -> Flow,
) -> Result<(usize, Flow), WsError> {
    let mut pos = 0usize;
    loop {
        let Some(rest) = buf.get(pos..) else {
            return Ok((pos, Flow::Continue));
        };
        let header = match frame::parse_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok((pos, Flow::Continue)),
            Err(HeaderError::ReservedOpcode(op)) => {
                return Err(WsError::Protocol(Violation::ReservedOpcode(op)));
            }
        };
        // Checks that need only the header come first, so a bad frame is
        // refused before its payload is buffered.
        if header.rsv {
            return Err(WsError::Protocol(Violation::ReservedBits));
        }
        let Some(mask) = header.mask else {
            return Err(WsError::Protocol(Violation::UnmaskedFrame));
        };
        if header.opcode.is_control() {
            if header.payload_len > 125 {
                return Err(WsError::Protocol(Violation::ControlTooLong));
            }
            if !header.fin {
                return Err(WsError::Protocol(Violation::FragmentedControl));
            }
        } else {
            match (header.opcode, frag.is_some()) {
                (RawOpCode::Continuation, false) => {
                    return Err(WsError::Protocol(Violation::UnexpectedContinuation));
                }
                (RawOpCode::Text | RawOpCode::Binary, true) => {
                    return Err(WsError::Protocol(Violation::ExpectedContinuation));
                }
                _ => {}
            }
            let so_far = frag.as_ref().map_or(0, |f| f.buf.len() as u64);
            if header.payload_len > limits.max_frame as u64 {
                return Err(WsError::TooBig {
                    limit: limits.max_frame,
                });
            }
            if so_far + header.payload_len > limits.max_message as u64 {
                return Err(WsError::TooBig {
                    limit: limits.max_message,
                });
            }
        }
        // payload_len <= max_frame (a usize) or <= 125 here, so the cast is exact.
        let len = header.payload_len as usize;
        let start = pos + header.header_len;
        let Some(payload) = start
            .checked_add(len)
            .and_then(|end| buf.get_mut(start..end))
        else {
            // Payload not all here yet. For text, check what has arrived.
            let text = match header.opcode {
                RawOpCode::Text => Some(&[][..]),
                RawOpCode::Continuation => frag
                    .as_ref()
                    .filter(|f| f.text)
                    .map(|f| f.buf.get(f.utf8_valid..).unwrap_or_default()),
                _ => None,
            };
            if let (Some(before), Some(arrived)) = (text, buf.get(start..)) {
                probe_text(probe, before, arrived, mask)?;
            }
            return Ok((pos, Flow::Continue));
        };
        *probe = TextProbe::default(); // this frame is complete
        frame::apply_mask(payload, mask);
        pos = start + len;

        let flow = match header.opcode {
            RawOpCode::Ping => on_msg(Message::Ping(payload)),
            RawOpCode::Pong => on_msg(Message::Pong(payload)),
            RawOpCode::Close => {
                let close = parse_close(payload)?;
                on_msg(Message::Close(close));
                return Ok((pos, Flow::Stop));
            }
            RawOpCode::Text | RawOpCode::Binary if header.fin => {
                if header.opcode == RawOpCode::Text {
                    std::str::from_utf8(payload).map_err(|_| WsError::InvalidUtf8)?;
                    on_msg(Message::Text(payload))
                } else {
                    on_msg(Message::Binary(payload))
                }
            }
            RawOpCode::Text | RawOpCode::Binary => {
                let text = header.opcode == RawOpCode::Text;
                let mut f = Box::new(Fragmented {
                    text,
                    buf: payload.to_vec(),
                    utf8_valid: 0,
                });
                if text {
                    f.utf8_valid = check_utf8_prefix(&f.buf, 0)?;
                }
                *frag = Some(f);
                Flow::Continue
            }
            RawOpCode::Continuation => {
                let Some(f) = frag.as_mut() else {
                    return Err(WsError::Protocol(Violation::UnexpectedContinuation));
                };
                f.buf.extend_from_slice(payload);
                if f.text {
                    // Fail fast: invalid UTF-8 is refused at the fragment that
                    // contains it, not at the end of the message.
                    f.utf8_valid = check_utf8_prefix(&f.buf, f.utf8_valid)?;
                }
                if header.fin {
                    let Some(mut done) = frag.take() else {
                        return Err(WsError::Protocol(Violation::UnexpectedContinuation));
                    };
                    if done.text {
                        std::str::from_utf8(&done.buf).map_err(|_| WsError::InvalidUtf8)?;
                        on_msg(Message::Text(&mut done.buf))
                    } else {
                        on_msg(Message::Binary(&done.buf))
                    }
                } else {
                    Flow::Continue
                }
            }
        };
        if flow == Flow::Stop {
            return Ok((pos, Flow::Stop));
        }
    }
}

/// Check the newly arrived (still masked) bytes of an incomplete text frame.
/// `before`: an incomplete code point left by earlier fragments.
fn probe_text(
    probe: &mut TextProbe,
    before: &[u8],
    arrived: &[u8],
    mask: [u8; 4],
) -> Result<(), WsError> {
    let Some(new) = arrived.get(probe.checked..).filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    let carry: &[u8] = if probe.checked == 0 {
        before
    } else {
        probe
            .carry
            .get(..probe.carry_len as usize)
            .unwrap_or_default()
    };
    let mut tmp = Vec::with_capacity(carry.len() + new.len());
    tmp.extend_from_slice(carry);
    tmp.extend_from_slice(new);
    if let Some(t) = tmp.get_mut(carry.len()..) {
        let o = probe.checked;
        frame::apply_mask(
            t,
            [
                mask[o % 4],
                mask[(o + 1) % 4],
                mask[(o + 2) % 4],
                mask[(o + 3) % 4],
            ],
        );
    }
    let valid = check_utf8_prefix(&tmp, 0)?;
    let rest = tmp.get(valid..).unwrap_or_default();
    probe.carry_len = rest.len().min(3) as u8;
    for (dst, src) in probe.carry.iter_mut().zip(rest) {
        *dst = *src;
    }
    probe.checked = arrived.len();
    Ok(())
}

/// Validate `buf[from..]` as UTF-8 that may end inside a code point.
/// Returns the new length of the known-valid prefix.
fn check_utf8_prefix(buf: &[u8], from: usize) -> Result<usize, WsError> {
    let Some(tail) = buf.get(from..) else {
        return Ok(from);
    };
    match std::str::from_utf8(tail) {
        Ok(_) => Ok(buf.len()),
        // error_len() == None: the input ends in the middle of a code point,
        // which a later fragment may complete.
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol(Violation::ClosePayloadLength)),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !frame::close_code_allowed(code) {
                return Err(WsError::Protocol(Violation::InvalidCloseCode(code)));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// What a test or fuzz run observed, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl From<Message<'_>> for Owned {
    fn from(m: Message<'_>) -> Self {
        match m {
            Message::Text(s) => Owned::Text(String::from_utf8_lossy(s).into_owned()),
            Message::Binary(b) => Owned::Binary(b.to_vec()),
            Message::Ping(b) => Owned::Ping(b.to_vec()),
            Message::Pong(b) => Owned::Pong(b.to_vec()),
            Message::Close(c) => Owned::Close(c.map(|(c, r)| (c, r.to_owned()))),
        }
    }
}

/// Decode `input` fed in the pieces given by `cuts` (offsets, any order, any
/// values). Used by tests and the fuzz target: the outcome must not depend on
/// how the bytes were split.
pub fn decode_split(
    input: &[u8],
    cuts: &[usize],
    limits: &Limits,
) -> (Vec<Owned>, Result<Flow, WsError>) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let mut inbound = Inbound::new();
    let mut out = Vec::new();
    let mut result = Ok(Flow::Continue);
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        let mut chunk = input.get(a..b).unwrap_or_default().to_vec();
        result = inbound.feed(&mut chunk, limits, &mut |m| {
            out.push(Owned::from(m));
            Flow::Continue
        });
        if !matches!(result, Ok(Flow::Continue)) {
            break;
        }
    }
    (out, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode_client_frame;

    const LIM: Limits = Limits {
        max_frame: 1 << 20,
        max_message: 1 << 20,
    };

    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_client_frame(&mut v, fin, op, payload, [0xA1, 0xB2, 0xC3, 0xD4]);
        v
    }

    fn run(input: &[u8]) -> (Vec<Owned>, Result<Flow, WsError>) {
        decode_split(input, &[], &LIM)
    }

    #[test]
    fn single_text_and_binary() {
        let mut input = frame(true, 1, b"hello");
        input.extend(frame(true, 2, &[0, 1, 2]));
        let (msgs, r) = run(&input);
        assert_eq!(r, Ok(Flow::Continue));
        assert_eq!(
            msgs,
            vec![Owned::Text("hello".into()), Owned::Binary(vec![0, 1, 2])]
        );
    }

    #[test]
    fn fragmented_with_interleaved_ping() {
        let mut input = frame(false, 1, b"hel");
        input.extend(frame(true, 9, b"p"));
        input.extend(frame(false, 0, b"lo "));
        input.extend(frame(true, 0, b"world"));
        let (msgs, r) = run(&input);
        assert_eq!(r, Ok(Flow::Continue));
        assert_eq!(
            msgs,
            vec![
                Owned::Ping(b"p".to_vec()),
                Owned::Text("hello world".into())
            ]
        );
    }

    #[test]
    fn every_split_gives_the_same_messages() {
        let mut input = frame(false, 1, "κόσ".as_bytes());
        input.extend(frame(true, 0, "με".as_bytes()));
        input.extend(frame(true, 2, &[9u8; 300]));
        input.extend(frame(true, 8, &[0x03, 0xE8, b'b', b'y', b'e']));
        let (whole, r) = run(&input);
        assert_eq!(r, Ok(Flow::Stop));
        assert_eq!(whole.len(), 3);
        for a in 0..input.len() {
            for b in [a, a + 1, a + 7, input.len() - 1] {
                let (msgs, r2) = decode_split(&input, &[a, b], &LIM);
                assert_eq!(msgs, whole, "cuts {a},{b}");
                assert_eq!(r2, r);
            }
        }
    }

    #[test]
    fn pending_released_after_frame_completes() {
        let input = frame(true, 2, &[1u8; 1000]);
        let mut inb = Inbound::new();
        let mut a = input[..500].to_vec();
        let mut b = input[500..].to_vec();
        let mut n = 0;
        inb.feed(&mut a, &LIM, &mut |_| {
            n += 1;
            Flow::Continue
        })
        .unwrap();
        assert_eq!(inb.buffered(), 500);
        inb.feed(&mut b, &LIM, &mut |_| {
            n += 1;
            Flow::Continue
        })
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(inb.heap_bytes(), 0, "idle connection keeps no buffer");
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(Vec<u8>, WsError)> = vec![
            (
                {
                    let mut f = frame(true, 1, b"x");
                    f[0] |= 0x40;
                    f
                },
                WsError::Protocol(Violation::ReservedBits),
            ),
            (
                vec![0x81, 0x01, b'x'],
                WsError::Protocol(Violation::UnmaskedFrame),
            ),
            (
                frame(true, 9, &[0u8; 126]),
                WsError::Protocol(Violation::ControlTooLong),
            ),
            (
                frame(false, 9, b""),
                WsError::Protocol(Violation::FragmentedControl),
            ),
            (
                frame(true, 0, b"x"),
                WsError::Protocol(Violation::UnexpectedContinuation),
            ),
            (
                [frame(false, 1, b"a"), frame(true, 1, b"b")].concat(),
                WsError::Protocol(Violation::ExpectedContinuation),
            ),
            (
                frame(true, 3, b""),
                WsError::Protocol(Violation::ReservedOpcode(3)),
            ),
            (
                frame(true, 0xB, b""),
                WsError::Protocol(Violation::ReservedOpcode(0xB)),
            ),
            (
                frame(true, 8, &[3]),
                WsError::Protocol(Violation::ClosePayloadLength),
            ),
            (
                frame(true, 8, &[0x03, 0xED]),
                WsError::Protocol(Violation::InvalidCloseCode(1005)),
            ),
            (frame(true, 8, &[0x03, 0xE8, 0xFF]), WsError::InvalidUtf8),
            (frame(true, 1, &[0xC0, 0x80]), WsError::InvalidUtf8),
        ];
        for (input, want) in cases {
            let (_, r) = run(&input);
            assert_eq!(r, Err(want), "input {input:02x?}");
        }
    }

    #[test]
    fn invalid_utf8_fails_at_the_bad_fragment() {
        // First fragment ends mid code point: fine. Second fragment is invalid: fail
        // before the final fragment arrives.
        let mut input = frame(false, 1, &[0xCE]);
        input.extend(frame(false, 0, &[0xBA, 0xFF]));
        let (msgs, r) = run(&input);
        assert!(msgs.is_empty());
        assert_eq!(r, Err(WsError::InvalidUtf8));
        // A code point split across fragments is valid.
        let mut ok = frame(false, 1, &[0xCE]);
        ok.extend(frame(true, 0, &[0xBA]));
        assert_eq!(run(&ok).0, vec![Owned::Text("κ".into())]);
        // A message that ends mid code point is invalid.
        let (_, r) = run(&frame(true, 1, &[0xCE]));
        assert_eq!(r, Err(WsError::InvalidUtf8));
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_completes() {
        // Autobahn 6.4.3: one text frame arriving in three chops; the second
        // chop holds the invalid sequence.
        let payload: Vec<u8> = [
            &[
                0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5,
            ][..],
            &[0xf4, 0x90, 0x80, 0x80],
            b"edited",
        ]
        .concat();
        let f = frame(true, 1, &payload);
        let mut inb = Inbound::new();
        let mut n = 0;
        let mut feed = |inb: &mut Inbound, bytes: &[u8]| {
            let mut b = bytes.to_vec();
            inb.feed(&mut b, &LIM, &mut |_| {
                n += 1;
                Flow::Continue
            })
        };
        assert_eq!(feed(&mut inb, &f[..6 + 11]), Ok(Flow::Continue));
        assert_eq!(feed(&mut inb, &f[17..21]), Err(WsError::InvalidUtf8));
        // 6.4.4: the code point is cut inside the invalid sequence.
        let mut inb = Inbound::new();
        let cut = 6 + 12;
        assert_eq!(feed(&mut inb, &f[..cut]), Ok(Flow::Continue));
        assert_eq!(feed(&mut inb, &f[cut..cut + 1]), Err(WsError::InvalidUtf8));
        // Valid text split anywhere still arrives whole.
        let good = frame(true, 1, "κόσμε κόσμε".as_bytes());
        for cut in 0..good.len() {
            let (msgs, r) = decode_split(&good, &[cut, cut + 3], &LIM);
            assert_eq!(r, Ok(Flow::Continue), "cut {cut}");
            assert_eq!(msgs, vec![Owned::Text("κόσμε κόσμε".into())]);
        }
        // Continuation frames: a code point split across frames and reads.
        let mut two = frame(false, 1, &[0xCE]);
        two.extend(frame(true, 0, &[0xBA, b'x', b'y']));
        for cut in 0..two.len() {
            let (msgs, r) = decode_split(&two, &[cut], &LIM);
            assert_eq!(r, Ok(Flow::Continue), "cut {cut}");
            assert_eq!(msgs, vec![Owned::Text("κxy".into())]);
        }
    }

    #[test]
    fn large_frames_reuse_pooled_buffers() {
        let mut pool = BufPool::default();
        let mut inb = Inbound::new();
        let f = frame(true, 2, &[7u8; 200_000]);
        for _ in 0..3 {
            let mut got = 0;
            for chunk in f.chunks(65_536) {
                let mut c = chunk.to_vec();
                inb.feed_pooled(&mut c, &LIM, &mut pool, &mut |m| {
                    if let Message::Binary(b) = m {
                        got += b.len();
                    }
                    Flow::Continue
                })
                .unwrap();
            }
            assert_eq!(got, 200_000);
            assert_eq!(
                inb.heap_bytes(),
                0,
                "the connection holds nothing afterwards"
            );
            assert!(pool.held() >= 200_000, "the buffer went back to the pool");
        }
        assert!(pool.held() <= 2 * (4 << 20));
    }

    #[test]
    fn size_limits() {
        let lim = Limits {
            max_frame: 100,
            max_message: 150,
        };
        let (_, r) = decode_split(&frame(true, 2, &[0u8; 101]), &[], &lim);
        assert_eq!(r, Err(WsError::TooBig { limit: 100 }));
        // Refused from the header alone, before the payload arrives.
        let big = frame(true, 2, &[0u8; 101]);
        let (_, r) = decode_split(&big[..8], &[], &lim);
        assert_eq!(r, Err(WsError::TooBig { limit: 100 }));
        let mut frags = frame(false, 2, &[0u8; 100]);
        frags.extend(frame(true, 0, &[0u8; 51]));
        let (_, r) = decode_split(&frags, &[], &lim);
        assert_eq!(r, Err(WsError::TooBig { limit: 150 }));
        // 64-bit length with the top bit set is just "too big", never a panic.
        let huge = [
            0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0,
        ];
        let (_, r) = decode_split(&huge, &[], &lim);
        assert_eq!(r, Err(WsError::TooBig { limit: 100 }));
    }

    #[test]
    fn close_stops_decoding() {
        let mut input = frame(true, 8, &[0x03, 0xE8]);
        input.extend(frame(true, 1, b"after"));
        let (msgs, r) = run(&input);
        assert_eq!(r, Ok(Flow::Stop));
        assert_eq!(msgs, vec![Owned::Close(Some((1000, String::new())))]);
    }
}
