//! What an echo payload carries and how an echoed message is judged.
//!
//! Pure: no sockets, no clock. The event loop hands in each echoed payload
//! and gets back a verdict; the counts of everything that went wrong
//! accumulate in [`Errors`].
//!
//! Payload layout (`size` bytes in all):
//!
//! ```text
//! binary: conn u32 LE | seq u32 LE | send time u64 LE (ns since run start) | padding
//! text:   the same three numbers as 8 + 8 + 16 lowercase hex digits (big-endian) | padding
//! ```
//!
//! The padding is a slice of a fixed pattern starting at an offset that
//! depends on the connection and the sequence number, so two different
//! messages never carry the same bytes. Text padding is ASCII, so a text
//! payload is always valid UTF-8. A message is correct only if it is
//! byte-identical to what was sent for the next expected sequence number.

use std::collections::{BTreeMap, VecDeque};

use crate::report;

/// Header bytes of a binary payload.
pub const BINARY_HEADER: usize = 16;
/// Header bytes of a text payload (the binary header in hex).
pub const TEXT_HEADER: usize = 32;
/// The padding pattern is read from one of this many offsets.
const PAD_OFFSETS: usize = 64;
/// 64 distinct ASCII characters for text padding.
const TEXT_PAD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Every byte as two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xF]];
        i += 1;
    }
    t
};
/// Messages overtaken by this many later ones are declared lost early, so a
/// connection that loses messages keeps a bounded window.
const MAX_WINDOW: usize = 4096;

/// The identifying fields at the front of every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub conn: u32,
    pub seq: u32,
    /// Send time, nanoseconds since the run started.
    pub ts: u64,
}

/// How payloads of one run are built and compared.
#[derive(Debug, Clone)]
pub struct Layout {
    size: usize,
    text: bool,
    /// Padding pattern: `size - header + PAD_OFFSETS` bytes.
    pad: Vec<u8>,
}

impl Layout {
    /// Smallest payload for the message type.
    pub fn min_size(text: bool) -> usize {
        if text { TEXT_HEADER } else { BINARY_HEADER }
    }

    pub fn new(size: usize, text: bool) -> Result<Layout, String> {
        let header = Self::min_size(text);
        if size < header {
            return Err(format!(
                "--size {size} is too small: {} payloads need at least {header} bytes for connection, sequence and timestamp{}",
                if text { "text" } else { "binary" },
                if text {
                    " in hex (use --binary for 16)"
                } else {
                    ""
                }
            ));
        }
        let pad = (0..size - header + PAD_OFFSETS)
            .map(|i| {
                if text {
                    // 37 is odd, so the first 64 positions are all different.
                    TEXT_PAD.get((i * 37) % 64).copied().unwrap_or(b'x')
                } else {
                    (i.wrapping_mul(167).wrapping_add(13) & 0xFF) as u8
                }
            })
            .collect();
        Ok(Layout { size, text, pad })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn is_text(&self) -> bool {
        self.text
    }

    fn header_len(&self) -> usize {
        Self::min_size(self.text)
    }

    fn padding(&self, s: Stamp) -> &[u8] {
        let off = (s.conn as usize)
            .wrapping_mul(31)
            .wrapping_add(s.seq as usize)
            % PAD_OFFSETS;
        self.pad
            .get(off..off + self.size - self.header_len())
            .unwrap_or_default()
    }

    /// Encode the header into `buf`; returns the used prefix.
    fn header<'b>(&self, s: Stamp, buf: &'b mut [u8; TEXT_HEADER]) -> &'b [u8] {
        let mut raw = [0u8; BINARY_HEADER];
        if self.text {
            raw[..4].copy_from_slice(&s.conn.to_be_bytes());
            raw[4..8].copy_from_slice(&s.seq.to_be_bytes());
            raw[8..].copy_from_slice(&s.ts.to_be_bytes());
            let (pairs, _) = buf.as_chunks_mut::<2>();
            for (pair, b) in pairs.iter_mut().zip(raw) {
                *pair = HEX_PAIRS[usize::from(b)];
            }
            &buf[..]
        } else {
            buf[..4].copy_from_slice(&s.conn.to_le_bytes());
            buf[4..8].copy_from_slice(&s.seq.to_le_bytes());
            buf[8..16].copy_from_slice(&s.ts.to_le_bytes());
            &buf[..BINARY_HEADER]
        }
    }

    /// Append the payload for `s`.
    pub fn write(&self, out: &mut Vec<u8>, s: Stamp) {
        let mut hb = [0u8; TEXT_HEADER];
        out.extend_from_slice(self.header(s, &mut hb));
        out.extend_from_slice(self.padding(s));
    }

    /// The payload for `s`, in a new buffer.
    #[cfg(test)]
    pub fn payload(&self, s: Stamp) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.size);
        self.write(&mut v, s);
        v
    }

    /// Is `payload` exactly what was sent for `s`?
    pub fn matches(&self, payload: &[u8], s: Stamp) -> bool {
        if payload.len() != self.size {
            return false;
        }
        let mut hb = [0u8; TEXT_HEADER];
        let header = self.header(s, &mut hb);
        let (head, pad) = payload.split_at(header.len());
        head == header && pad == self.padding(s)
    }

    /// Read the header fields back (`None` if they do not decode).
    pub fn read_stamp(&self, payload: &[u8]) -> Option<Stamp> {
        let mut raw = [0u8; BINARY_HEADER];
        if self.text {
            let hex = payload.get(..TEXT_HEADER)?;
            for (b, pair) in raw.iter_mut().zip(hex.chunks_exact(2)) {
                let hi = hex_digit(*pair.first()?)?;
                let lo = hex_digit(*pair.get(1)?)?;
                *b = (hi << 4) | lo;
            }
            Some(Stamp {
                conn: u32::from_be_bytes(raw[..4].try_into().ok()?),
                seq: u32::from_be_bytes(raw[4..8].try_into().ok()?),
                ts: u64::from_be_bytes(raw[8..].try_into().ok()?),
            })
        } else {
            raw.copy_from_slice(payload.get(..BINARY_HEADER)?);
            Some(Stamp {
                conn: u32::from_le_bytes(raw[..4].try_into().ok()?),
                seq: u32::from_le_bytes(raw[4..8].try_into().ok()?),
                ts: u64::from_le_bytes(raw[8..].try_into().ok()?),
            })
        }
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

report::error_kinds! {
    /// Everything that went wrong, by kind.
    pub struct Errors {
        /// Sent, never echoed (skipped over by later messages, or missing at the end).
        lost,
        /// Echoed more than once.
        dup,
        /// Echoed after a message sent later than it.
        reorder,
        /// Echoed with different bytes (or the wrong frame type).
        corrupt,
        /// Connections the server closed (close frame, EOF or reset) before we did.
        closed,
        /// Connections that could not be opened (TCP or upgrade failed).
        connect,
        /// Server frames that break RFC 6455 (masked, reserved opcode or bits).
        protocol,
    }
}

/// The verdict on one echoed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next expected message, byte-identical. `sent` is its send time.
    Ok { sent: u64 },
    /// Intact, but a later message came back before it (counted as reorder).
    Late { sent: u64 },
    /// Already echoed (counted as dup).
    Duplicate,
    /// Bytes differ from every message in flight (counted as corrupt).
    /// `consumed`: it was taken as the message expected next.
    Corrupt { consumed: bool },
}

impl Verdict {
    /// Does this echo complete a round trip (and free a slot in the pipeline)?
    pub fn completes(self) -> bool {
        !matches!(
            self,
            Verdict::Duplicate | Verdict::Corrupt { consumed: false }
        )
    }

    /// Send time of an intact message.
    pub fn sent(self) -> Option<u64> {
        match self {
            Verdict::Ok { sent } | Verdict::Late { sent } => Some(sent),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Sent, not yet echoed, nothing later echoed either.
    Awaited,
    /// Not echoed, but a later message was: lost or reordered.
    Overtaken,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    ts: u64,
    state: SlotState,
}

/// Sequence state of one connection.
///
/// Messages `base .. base + slots.len()` are tracked; `cursor` is the next
/// sequence number expected in order (one past the latest echoed), so
/// everything from `cursor` up is [`SlotState::Awaited`] and nothing below
/// `cursor` is.
#[derive(Debug)]
pub struct Tracker {
    conn: u32,
    base: u32,
    cursor: u32,
    slots: VecDeque<Slot>,
    /// Overtaken messages dropped from the window (already counted lost), with their send time.
    given_up: BTreeMap<u32, u64>,
}

impl Tracker {
    pub fn new(conn: u32) -> Tracker {
        Tracker {
            conn,
            base: 0,
            cursor: 0,
            slots: VecDeque::new(),
            given_up: BTreeMap::new(),
        }
    }

    /// Record a message sent at `ts`; returns its stamp.
    pub fn send(&mut self, ts: u64) -> Stamp {
        let seq = self.base.wrapping_add(self.slots.len() as u32);
        self.slots.push_back(Slot {
            ts,
            state: SlotState::Awaited,
        });
        Stamp {
            conn: self.conn,
            seq,
            ts,
        }
    }

    /// Messages sent and not echoed, with nothing later echoed either: the
    /// ones still worth waiting for.
    pub fn awaited(&self) -> usize {
        let next = self.base.wrapping_add(self.slots.len() as u32);
        next.wrapping_sub(self.cursor) as usize
    }

    /// Judge one echoed data message. `text` is the frame type it came in.
    pub fn on_echo(
        &mut self,
        layout: &Layout,
        text: bool,
        payload: &[u8],
        errors: &mut Errors,
    ) -> Verdict {
        let type_ok = text == layout.is_text();
        // Fast path: the next message, intact.
        if type_ok && let Some(slot) = self.slot(self.cursor) {
            let s = Stamp {
                conn: self.conn,
                seq: self.cursor,
                ts: slot.ts,
            };
            if layout.matches(payload, s) {
                return self.accept(self.cursor, errors);
            }
        }
        // Some other message of ours, intact? Then it is a sequence problem.
        if type_ok
            && let Some(st) = layout.read_stamp(payload)
            && st.conn == self.conn
        {
            if let Some(slot) = self.slot(st.seq) {
                let s = Stamp { ts: slot.ts, ..st };
                if layout.matches(payload, s) {
                    return self.accept(st.seq, errors);
                }
            } else if let Some(&ts) = self.given_up.get(&st.seq) {
                if layout.matches(payload, Stamp { ts, ..st }) {
                    // Declared lost too early: it was only late.
                    self.given_up.remove(&st.seq);
                    errors.lost = errors.lost.saturating_sub(1);
                    errors.reorder += 1;
                    return Verdict::Late { sent: ts };
                }
            } else if self.seq_before_window(st.seq) && layout.matches(payload, st) {
                // Echoed long ago; its send time is gone, so trust the one it carries.
                errors.dup += 1;
                return Verdict::Duplicate;
            }
        }
        // Not byte-identical to anything in flight: corrupt. It most likely
        // stands for the message expected next, so that one is consumed.
        errors.corrupt += 1;
        if self.slot(self.cursor).is_some() {
            self.mark_done(self.cursor);
            self.cursor = self.cursor.wrapping_add(1);
            self.trim(errors);
            Verdict::Corrupt { consumed: true }
        } else {
            Verdict::Corrupt { consumed: false }
        }
    }

    /// An intact echo of message `seq` (which is in the window).
    fn accept(&mut self, seq: u32, errors: &mut Errors) -> Verdict {
        let Some(slot) = self.slot(seq) else {
            errors.corrupt += 1;
            return Verdict::Corrupt { consumed: false };
        };
        let sent = slot.ts;
        let verdict = match slot.state {
            SlotState::Done => {
                errors.dup += 1;
                return Verdict::Duplicate;
            }
            SlotState::Overtaken => {
                errors.reorder += 1;
                Verdict::Late { sent }
            }
            SlotState::Awaited => {
                // Everything between the cursor and `seq` was skipped over.
                let mut s = self.cursor;
                while s != seq {
                    if let Some(i) = self.index(s)
                        && let Some(sl) = self.slots.get_mut(i)
                    {
                        sl.state = SlotState::Overtaken;
                    }
                    s = s.wrapping_add(1);
                }
                self.cursor = seq.wrapping_add(1);
                Verdict::Ok { sent }
            }
        };
        self.mark_done(seq);
        self.trim(errors);
        verdict
    }

    fn index(&self, seq: u32) -> Option<usize> {
        let i = seq.wrapping_sub(self.base) as usize;
        (i < self.slots.len()).then_some(i)
    }

    fn slot(&self, seq: u32) -> Option<Slot> {
        self.index(seq).and_then(|i| self.slots.get(i).copied())
    }

    fn mark_done(&mut self, seq: u32) {
        if let Some(i) = self.index(seq)
            && let Some(sl) = self.slots.get_mut(i)
        {
            sl.state = SlotState::Done;
        }
    }

    /// Was `seq` sent and already dropped from the window?
    fn seq_before_window(&self, seq: u32) -> bool {
        let behind = self.base.wrapping_sub(seq);
        behind != 0 && behind <= self.base
    }

    /// Drop finished messages from the front; give up on overtaken ones
    /// once the window is too long.
    fn trim(&mut self, errors: &mut Errors) {
        while let Some(front) = self.slots.front().copied() {
            match front.state {
                SlotState::Done => {}
                SlotState::Overtaken if self.slots.len() > MAX_WINDOW => {
                    errors.lost += 1;
                    self.given_up.insert(self.base, front.ts);
                }
                _ => break,
            }
            self.slots.pop_front();
            self.base = self.base.wrapping_add(1);
        }
    }

    /// The run is over: messages skipped over are lost; so are the ones
    /// still awaited, unless the connection was closed under them (that is
    /// counted once as `closed`). Returns how many were counted lost.
    pub fn finish(&mut self, connection_closed: bool, errors: &mut Errors) -> u64 {
        let mut lost = 0;
        for sl in &mut self.slots {
            let counts = match sl.state {
                SlotState::Overtaken => true,
                SlotState::Awaited => !connection_closed,
                SlotState::Done => false,
            };
            if counts {
                lost += 1;
                sl.state = SlotState::Done;
            }
        }
        errors.lost += lost;
        self.cursor = self.base.wrapping_add(self.slots.len() as u32);
        self.trim(errors);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts() -> Vec<Layout> {
        vec![
            Layout::new(32, true).unwrap(),
            Layout::new(200, true).unwrap(),
            Layout::new(16, false).unwrap(),
            Layout::new(100, false).unwrap(),
        ]
    }

    /// Send `n` messages on connection 3 and return the tracker and payloads.
    fn sent(layout: &Layout, n: u32) -> (Tracker, Vec<Vec<u8>>) {
        let mut t = Tracker::new(3);
        let p = (0..n)
            .map(|i| {
                let s = t.send(1000 + u64::from(i) * 7);
                layout.payload(s)
            })
            .collect();
        (t, p)
    }

    /// Echo payloads in the given order, then finish; returns the errors.
    fn run(layout: &Layout, n: u32, echoed: &[Vec<u8>]) -> (Errors, Vec<Verdict>) {
        let (mut t, _) = sent(layout, n);
        let mut e = Errors::default();
        let v = echoed
            .iter()
            .map(|p| t.on_echo(layout, layout.is_text(), p, &mut e))
            .collect();
        t.finish(false, &mut e);
        (e, v)
    }

    #[test]
    fn layout_round_trips_and_text_is_utf8() {
        for l in layouts() {
            let s = Stamp {
                conn: 0xdead_beef,
                seq: 42,
                ts: 123_456_789_012,
            };
            let p = l.payload(s);
            assert_eq!(p.len(), l.size());
            assert_eq!(l.read_stamp(&p), Some(s));
            assert!(l.matches(&p, s));
            if l.is_text() {
                assert!(p.is_ascii());
            }
            // Every other message differs from this one.
            for other in [
                Stamp { seq: 43, ..s },
                Stamp { conn: 1, ..s },
                Stamp { ts: 1, ..s },
            ] {
                assert!(!l.matches(&p, other));
                assert_ne!(l.payload(other), p);
            }
        }
    }

    #[test]
    fn size_minimums() {
        assert!(Layout::new(15, false).is_err());
        assert!(Layout::new(16, false).is_ok());
        assert!(Layout::new(31, true).is_err());
        assert!(Layout::new(32, true).is_ok());
    }

    #[test]
    fn in_order_is_clean() {
        for l in layouts() {
            let (_, p) = sent(&l, 10);
            let (e, v) = run(&l, 10, &p);
            assert_eq!(e, Errors::default());
            assert!(v.iter().all(|v| matches!(v, Verdict::Ok { .. })));
            assert_eq!(v[3], Verdict::Ok { sent: 1021 });
        }
    }

    #[test]
    fn flipped_byte_anywhere_is_corrupt() {
        for l in layouts() {
            for at in 0..l.size() {
                let (_, mut p) = sent(&l, 5);
                p[2][at] ^= 0x01;
                let (e, v) = run(&l, 5, &p);
                assert_eq!(
                    e,
                    Errors {
                        corrupt: 1,
                        ..Errors::default()
                    },
                    "byte {at} of {} text={}",
                    l.size(),
                    l.is_text()
                );
                assert_eq!(v[2], Verdict::Corrupt { consumed: true });
                assert!(matches!(v[3], Verdict::Ok { .. }), "{:?}", v[3]);
            }
        }
    }

    #[test]
    fn wrong_frame_type_or_length_is_corrupt() {
        let l = Layout::new(40, true).unwrap();
        let (mut t, p) = sent(&l, 3);
        let mut e = Errors::default();
        assert_eq!(
            t.on_echo(&l, false, &p[0], &mut e),
            Verdict::Corrupt { consumed: true }
        );
        let mut short = p[1].clone();
        short.pop();
        assert_eq!(
            t.on_echo(&l, true, &short, &mut e),
            Verdict::Corrupt { consumed: true }
        );
        assert!(matches!(
            t.on_echo(&l, true, &p[2], &mut e),
            Verdict::Ok { .. }
        ));
        // Junk when nothing is awaited consumes nothing.
        assert_eq!(
            t.on_echo(&l, true, b"junk", &mut e),
            Verdict::Corrupt { consumed: false }
        );
        assert_eq!(e.corrupt, 3);
        assert_eq!(e.total(), 3);
    }

    #[test]
    fn dropped_message_is_lost() {
        for l in layouts() {
            let (_, p) = sent(&l, 6);
            let echoed: Vec<_> = p
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, p)| p.clone())
                .collect();
            let (e, _) = run(&l, 6, &echoed);
            assert_eq!(
                e,
                Errors {
                    lost: 1,
                    ..Errors::default()
                }
            );
        }
    }

    #[test]
    fn missing_tail_is_lost_unless_the_connection_closed() {
        let l = Layout::new(32, true).unwrap();
        let (mut t, p) = sent(&l, 4);
        let mut e = Errors::default();
        t.on_echo(&l, true, &p[0], &mut e);
        assert_eq!(t.awaited(), 3);
        assert_eq!(t.finish(false, &mut e), 3);
        assert_eq!(e.lost, 3);

        let (mut t, p) = sent(&l, 4);
        let mut e = Errors::default();
        t.on_echo(&l, true, &p[1], &mut e); // 0 overtaken
        assert_eq!(t.finish(true, &mut e), 1, "only the overtaken one");
        assert_eq!(e.lost, 1);
    }

    #[test]
    fn duplicate_is_dup() {
        for l in layouts() {
            let (_, p) = sent(&l, 5);
            let mut echoed = p.clone();
            echoed.insert(3, p[2].clone());
            let (e, v) = run(&l, 5, &echoed);
            assert_eq!(
                e,
                Errors {
                    dup: 1,
                    ..Errors::default()
                }
            );
            assert_eq!(v[3], Verdict::Duplicate);
            assert!(!v[3].completes());
            // A much later repeat of the first message is a dup too.
            let mut late = p.clone();
            late.push(p[0].clone());
            let (e, _) = run(&l, 5, &late);
            assert_eq!(e.dup, 1);
            assert_eq!(e.total(), 1);
        }
    }

    #[test]
    fn swapped_pair_is_one_reorder() {
        for l in layouts() {
            let (_, mut p) = sent(&l, 6);
            p.swap(2, 3);
            let (e, v) = run(&l, 6, &p);
            assert_eq!(
                e,
                Errors {
                    reorder: 1,
                    ..Errors::default()
                }
            );
            assert!(matches!(v[2], Verdict::Ok { .. }));
            assert!(matches!(v[3], Verdict::Late { .. }));
            assert!(v.iter().all(|v| v.completes()));
        }
    }

    #[test]
    fn message_of_another_connection_is_corrupt() {
        let l = Layout::new(32, false).unwrap();
        let (mut t, _) = sent(&l, 2);
        let foreign = l.payload(Stamp {
            conn: 4,
            seq: 0,
            ts: 1000,
        });
        let mut e = Errors::default();
        assert_eq!(
            t.on_echo(&l, false, &foreign, &mut e),
            Verdict::Corrupt { consumed: true }
        );
        assert_eq!(e.corrupt, 1);
    }

    #[test]
    fn long_gap_is_given_up_then_forgiven_if_it_arrives() {
        let l = Layout::new(16, false).unwrap();
        let n = MAX_WINDOW as u32 + 10;
        let (mut t, p) = sent(&l, n);
        let mut e = Errors::default();
        for msg in &p[1..] {
            t.on_echo(&l, false, msg, &mut e);
        }
        assert_eq!(e.lost, 1, "window overflow gives up on message 0");
        assert_eq!(t.slots.len(), 0);
        assert_eq!(
            t.on_echo(&l, false, &p[0], &mut e),
            Verdict::Late { sent: 1000 }
        );
        assert_eq!(
            e,
            Errors {
                reorder: 1,
                ..Errors::default()
            }
        );
        assert_eq!(t.on_echo(&l, false, &p[0], &mut e), Verdict::Duplicate);
    }

    #[test]
    fn awaited_counts_the_pipeline() {
        let l = Layout::new(32, true).unwrap();
        let mut t = Tracker::new(0);
        let mut e = Errors::default();
        let a = l.payload(t.send(1));
        let b = l.payload(t.send(2));
        assert_eq!(t.awaited(), 2);
        t.on_echo(&l, true, &b, &mut e);
        assert_eq!(t.awaited(), 0, "0 was overtaken: no longer awaited");
        t.on_echo(&l, true, &a, &mut e);
        assert_eq!(e.reorder, 1);
        let c = l.payload(t.send(3));
        assert_eq!(t.awaited(), 1);
        assert!(matches!(
            t.on_echo(&l, true, &c, &mut e),
            Verdict::Ok { sent: 3 }
        ));
        assert_eq!(t.slots.len(), 0);
    }
}
