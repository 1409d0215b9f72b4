//! Frame primitives: header parse, masking, server frame encoding.

use std::io::Cursor;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode as TOpCode};

/// Close codes Switchboard sends (RFC 6455 section 7.4.1 plus the registered 1012-1014).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: normal closure (reply to a client close without a code, idle timeout).
    Normal = 1000,
    /// 1001: the server is going away (graceful shutdown).
    Away = 1001,
    /// 1002: the peer violated the protocol.
    Protocol = 1002,
    /// 1007: a text message or close reason was not valid UTF-8.
    InvalidPayload = 1007,
    /// 1008: policy violation (slow consumer past its outbound budget).
    Policy = 1008,
    /// 1009: a frame or message exceeded the configured maximum.
    TooBig = 1009,
    /// 1011: unexpected server condition (heartbeat: the pong never came).
    Error = 1011,
}

impl CloseCode {
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// The frame opcodes the server encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// A parsed client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub rsv: bool,
    pub opcode: RawOpCode,
    pub mask: Option<[u8; 4]>,
    /// Bytes taken by the header itself.
    pub header_len: usize,
    /// Declared payload length (untrusted: may be huge).
    pub payload_len: u64,
}

/// Opcode as it appeared on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawOpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl RawOpCode {
    pub fn is_control(self) -> bool {
        matches!(self, RawOpCode::Close | RawOpCode::Ping | RawOpCode::Pong)
    }
}

/// Why a header could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Opcode 3-7 or 11-15 (RFC 6455 5.2: "reserved for further frames").
    ReservedOpcode(u8),
}

/// Parse one frame header from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed. Uses tungstenite's header parser,
/// which never reads past `buf` and rejects reserved opcodes.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    let mut cursor = Cursor::new(buf);
    match FrameHeader::parse(&mut cursor) {
        Ok(Some((h, payload_len))) => {
            let opcode = match h.opcode {
                TOpCode::Data(Data::Continue) => RawOpCode::Continuation,
                TOpCode::Data(Data::Text) => RawOpCode::Text,
                TOpCode::Data(Data::Binary) => RawOpCode::Binary,
                TOpCode::Control(Control::Close) => RawOpCode::Close,
                TOpCode::Control(Control::Ping) => RawOpCode::Ping,
                TOpCode::Control(Control::Pong) => RawOpCode::Pong,
                TOpCode::Data(Data::Reserved(b)) | TOpCode::Control(Control::Reserved(b)) => {
                    return Err(HeaderError::ReservedOpcode(b));
                }
            };
            Ok(Some(Header {
                fin: h.is_final,
                rsv: h.rsv1 || h.rsv2 || h.rsv3,
                opcode,
                mask: h.mask,
                header_len: cursor.position() as usize,
                payload_len,
            }))
        }
        Ok(None) => Ok(None),
        // The only error tungstenite's header parser returns is the reserved opcode.
        Err(_) => Err(HeaderError::ReservedOpcode(
            buf.first().map_or(0, |b| b & 0x0F),
        )),
    }
}

/// XOR `buf` with the 4-byte client mask, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m = [
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ];
    let m64 = u64::from_ne_bytes(m);
    let (words, tail) = buf.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_ne_bytes(*w) ^ m64).to_ne_bytes();
    }
    // `words` covered a multiple of 8 bytes, so the tail starts at mask index 0.
    for (b, k) in tail.iter_mut().zip(mask.iter().cycle()) {
        *b ^= k;
    }
}

/// Largest header of a server (unmasked) frame.
pub const MAX_SERVER_HEADER: usize = 10;

/// Append an unmasked frame header for a final frame.
pub fn encode_header(out: &mut Vec<u8>, opcode: OpCode, len: usize) {
    let b0 = 0x80 | opcode as u8;
    if len < 126 {
        out.extend_from_slice(&[b0, len as u8]);
    } else if len <= u16::MAX as usize {
        let l = (len as u16).to_be_bytes();
        out.extend_from_slice(&[b0, 126, l[0], l[1]]);
    } else {
        out.push(b0);
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Append a whole unmasked, final frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    out.reserve(MAX_SERVER_HEADER + payload.len());
    encode_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// A whole frame in a fresh, exactly sized buffer (for frames shared by many connections).
pub fn frame_bytes(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(MAX_SERVER_HEADER + payload.len());
    encode_frame(&mut v, opcode, payload);
    v
}

/// Append a close frame with a status code and a reason (truncated to fit 125 bytes).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut r = reason;
    while r.len() > 123 {
        // Cut on a char boundary so the reason stays valid UTF-8.
        let mut cut = 123;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r = &r[..cut];
    }
    encode_header(out, OpCode::Close, 2 + r.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(r.as_bytes());
}

/// Is `code`, received in a close frame, one a peer may send? (RFC 6455 7.4.)
pub fn close_code_allowed(code: u16) -> bool {
    tungstenite::protocol::frame::coding::CloseCode::from(code).is_allowed()
}

/// Encode a client (masked) frame. Used by tests, the fuzz shims and the load generator.
pub fn encode_client_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: u8,
    payload: &[u8],
    mask: [u8; 4],
) {
    let b0 = if fin { 0x80 } else { 0 } | (opcode & 0x0F);
    let len = payload.len();
    if len < 126 {
        out.extend_from_slice(&[b0, 0x80 | len as u8]);
    } else if len <= u16::MAX as usize {
        let l = (len as u16).to_be_bytes();
        out.extend_from_slice(&[b0, 0x80 | 126, l[0], l[1]]);
    } else {
        out.extend_from_slice(&[b0, 0x80 | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(p) = out.get_mut(start..) {
        apply_mask(p, mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_matches_bytewise_for_all_lengths() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut fast = orig.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn header_lengths_round_trip() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            let payload = vec![7u8; len];
            let mut buf = Vec::new();
            encode_client_frame(&mut buf, true, 2, &payload, [1, 2, 3, 4]);
            let h = parse_header(&buf).unwrap().unwrap();
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.opcode, RawOpCode::Binary);
            assert!(h.fin);
            assert_eq!(h.header_len + len, buf.len());
            // Every strict prefix of the header is "need more".
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&buf[..cut]).unwrap(), None);
            }
        }
    }

    #[test]
    fn server_header_sizes() {
        for (len, hl) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let mut v = Vec::new();
            encode_header(&mut v, OpCode::Text, len);
            assert_eq!(v.len(), hl, "len {len}");
        }
    }

    #[test]
    fn reserved_opcodes_are_errors() {
        for op in [3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
            let buf = [0x80 | op, 0x80, 0, 0, 0, 0];
            assert_eq!(parse_header(&buf), Err(HeaderError::ReservedOpcode(op)));
        }
    }

    #[test]
    fn close_reason_truncated_on_char_boundary() {
        let reason = "é".repeat(100);
        let mut v = Vec::new();
        encode_close(&mut v, 1000, &reason);
        let payload = &v[2..];
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn close_code_validation() {
        for ok in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            assert!(close_code_allowed(ok), "{ok}");
        }
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
        ] {
            assert!(!close_code_allowed(bad), "{bad}");
        }
    }
}
