//! Invariant: the inbound WebSocket decoder is split-invariant. Feeding the
//! same byte stream to `Inbound` in any pieces (as TCP reads may deliver it)
//! yields exactly the same messages, in the same order, and the same final
//! result (`Ok(Continue)`, `Ok(Stop)` after a close, or the same `WsError`) as
//! feeding it in one piece. Nothing may panic. Small limits make the
//! `TooBig` paths (per frame and per reassembled message) reachable.
//!
//! Input layout: `ctl, cut_0 .. cut_{n-1}, stream..` where
//! * `n = ctl & 0x07` cuts follow, each a little-endian u16 offset into the
//!   stream (`decode_split` reduces them modulo `stream.len() + 1`);
//! * if `ctl & 0x80` is set (and the stream is at most 4096 bytes), the stream
//!   is additionally cut after every byte: the one-byte-per-read extreme.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::ws::inbound::{Limits, decode_split};

const LIMITS: Limits = Limits {
    max_frame: 4096,
    max_message: 8192,
};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(ctl & 0x07);
    let Some(cut_bytes) = rest.get(..2 * n) else {
        return;
    };
    let stream = &rest[2 * n..];
    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    if ctl & 0x80 != 0 && stream.len() <= 4096 {
        cuts.extend(1..stream.len());
    }

    let (whole_msgs, whole_result) = decode_split(stream, &[], &LIMITS);
    let (split_msgs, split_result) = decode_split(stream, &cuts, &LIMITS);
    assert_eq!(split_msgs, whole_msgs, "messages differ for cuts {cuts:?}");
    assert_eq!(
        split_result, whole_result,
        "result differs for cuts {cuts:?}"
    );
});
