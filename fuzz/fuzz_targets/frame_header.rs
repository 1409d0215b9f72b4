//! Invariant: `switchboard::ws::frame::parse_header` never panics on any bytes,
//! and when it returns `Ok(Some(h))`:
//! * `h.header_len <= input.len()`;
//! * `h.header_len` is in {2, 4, 6, 8, 10, 12, 14} and is exactly
//!   2 + (0, 2 or 8 extended-length bytes) + (4 if masked);
//! * the header describes the bytes it came from (FIN, RSV, mask, 7-bit length);
//! * parsing only `input[..h.header_len]` gives the same header, and every
//!   strict prefix of the header is `Ok(None)` ("need more").
//!
//! `Err(ReservedOpcode(op))` must name the input's own opcode, one of 3-7 or
//! 11-15; `Ok(None)` only happens while fewer bytes than a full header exist.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::ws::frame::{HeaderError, parse_header};

fuzz_target!(|data: &[u8]| {
    match parse_header(data) {
        Ok(Some(h)) => {
            assert!(
                h.header_len <= data.len(),
                "header_len {} > input {}",
                h.header_len,
                data.len()
            );
            assert!(
                matches!(h.header_len, 2 | 4 | 6 | 8 | 10 | 12 | 14),
                "header_len {}",
                h.header_len
            );
            assert_eq!(h.header_len, expected_len(data[1]));
            assert_eq!(h.fin, data[0] & 0x80 != 0);
            assert_eq!(h.rsv, data[0] & 0x70 != 0);
            assert_eq!(h.mask.is_some(), data[1] & 0x80 != 0);
            if let Some(m) = h.mask {
                assert_eq!(m[..], data[h.header_len - 4..h.header_len]);
            }
            if data[1] & 0x7F < 126 {
                assert_eq!(h.payload_len, u64::from(data[1] & 0x7F));
            }
            assert_eq!(parse_header(&data[..h.header_len]), Ok(Some(h)));
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&data[..cut]), Ok(None), "prefix {cut}");
            }
        }
        Ok(None) => {
            if let [_, b1, ..] = data {
                assert!(data.len() < expected_len(*b1), "Ok(None) on a full header");
            }
        }
        Err(HeaderError::ReservedOpcode(op)) => {
            assert_eq!(op, data[0] & 0x0F);
            assert!(matches!(op, 3..=7 | 11..=15), "opcode {op} is not reserved");
            assert!(data.len() >= expected_len(data[1]));
        }
    }
});

/// Header length implied by the second byte (mask bit and 7-bit length).
fn expected_len(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}
