//! The client side of RFC 6455 on the wire: the upgrade request and its
//! answer, masked client frames encoded straight into an output buffer, and
//! server frames decoded in place from the read buffer.

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A fixed, non-trivial mask: every client frame is really masked, and the
/// cost of masking is part of what the client pays.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Frames above this are refused as a protocol error (the load generator
/// never sends more than its payload size).
pub const MAX_FRAME: u64 = 64 << 20;

/// Longest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// Append a final, masked frame header for a `len`-byte payload. Write the
/// payload after it, then call [`end_frame`] with the returned offset.
pub fn begin_frame(out: &mut Vec<u8>, opcode: u8, len: usize) -> usize {
    let b0 = 0x80 | (opcode & 0x0F);
    if len < 126 {
        out.extend_from_slice(&[b0, 0x80 | len as u8]);
    } else if len <= usize::from(u16::MAX) {
        out.extend_from_slice(&[b0, 0x80 | 126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[b0, 0x80 | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.len()
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

/// Mask the payload written since [`begin_frame`] in place.
pub fn end_frame(out: &mut [u8], payload_start: usize) {
    if let Some(p) = out.get_mut(payload_start..) {
        apply_mask(p, MASK);
    }
}

/// Append a whole masked frame.
pub fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let start = begin_frame(out, opcode, payload.len());
    out.extend_from_slice(payload);
    end_frame(out, start);
}

/// Append a masked close frame with a status code.
pub fn close_frame(out: &mut Vec<u8>, code: u16) {
    frame(out, OP_CLOSE, &code.to_be_bytes());
}

/// One server frame, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// A server frame that breaks RFC 6455.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Server frames must not be masked (5.1).
    Masked,
    /// RSV bits without an extension (5.2).
    ReservedBits,
    /// Opcodes 3-7, 11-15.
    ReservedOpcode(u8),
    /// Control frame over 125 bytes or fragmented (5.5).
    BadControl,
    /// Over [`MAX_FRAME`].
    TooLong(u64),
}

/// Decode one server frame from the front of `buf`: the frame and the bytes
/// it took, or `None` if it is not all there yet.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || b1 & 0x7F > 125 {
                return Err(FrameError::BadControl);
            }
        }
        op => return Err(FrameError::ReservedOpcode(op)),
    }
    let (len, header) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let end = header + len as usize;
    match buf.get(header..end) {
        Some(payload) => Ok(Some((
            Frame {
                fin,
                opcode,
                payload,
            },
            end,
        ))),
        None => Ok(None),
    }
}

/// A `Sec-WebSocket-Key` for connection `n`: 16 bytes derived from `n` and
/// the run's `nonce`, base64-encoded (24 characters ending in "==").
pub fn ws_key(nonce: u64, n: u64) -> String {
    let a = splitmix(nonce ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let b = splitmix(a);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&a.to_le_bytes());
    raw[8..].copy_from_slice(&b.to_le_bytes());
    base64(&raw)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let idx = ((n >> (18 - 6 * i)) & 0x3F) as usize;
                s.push(char::from(A.get(idx).copied().unwrap_or(b'A')));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The HTTP/1.1 upgrade request.
pub fn upgrade_request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: switchboard-load\r\n\r\n"
    )
    .into_bytes()
}

/// Why an upgrade failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeError {
    /// The server answered with another status (503 at capacity, 429, 404...).
    Status(u16),
    /// 101, but `Sec-WebSocket-Accept` is missing or wrong.
    BadAccept,
    /// Not an HTTP response, or a head too long.
    Malformed,
}

/// Parse the upgrade response at the front of `buf`: `Ok(Some(n))` when it
/// is a valid 101 for `key` whose head took `n` bytes (frames may follow).
pub fn parse_upgrade(buf: &[u8], key: &str) -> Result<Option<usize>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) | Err(_) => return Err(UpgradeError::Malformed),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(UpgradeError::Status(code));
    }
    let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let ok = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("sec-websocket-accept")
            && h.value.trim_ascii() == want.as_bytes()
    });
    if ok {
        Ok(Some(used))
    } else {
        Err(UpgradeError::BadAccept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard::ws::frame::{OpCode, encode_client_frame, encode_frame, parse_header};

    #[test]
    fn client_frames_match_the_library_encoder() {
        for len in [0usize, 1, 7, 125, 126, 127, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut ours = Vec::new();
            frame(&mut ours, OP_BINARY, &payload);
            let mut theirs = Vec::new();
            encode_client_frame(&mut theirs, true, OP_BINARY, &payload, MASK);
            assert_eq!(ours, theirs, "len {len}");
            let h = parse_header(&ours).unwrap().unwrap();
            assert_eq!(h.mask, Some(MASK));
            assert_eq!(h.payload_len, len as u64);
        }
    }

    #[test]
    fn server_frames_parse_whole_and_partial() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 100_000] {
            let payload = vec![0xAB; len];
            let mut buf = Vec::new();
            encode_frame(&mut buf, OpCode::Binary, &payload);
            encode_frame(&mut buf, OpCode::Ping, b"hi");
            let (f, used) = parse_frame(&buf).unwrap().unwrap();
            assert!(f.fin);
            assert_eq!(f.opcode, OP_BINARY);
            assert_eq!(f.payload, &payload[..]);
            let (p, used2) = parse_frame(&buf[used..]).unwrap().unwrap();
            assert_eq!((p.opcode, p.payload), (OP_PING, &b"hi"[..]));
            assert_eq!(used + used2, buf.len());
            for cut in [0, 1, 2, 3, used - 1] {
                if cut < used {
                    assert_eq!(
                        parse_frame(&buf[..cut]).unwrap(),
                        None,
                        "len {len} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_server_frames() {
        assert_eq!(
            parse_frame(&[0x82, 0x80, 0, 0, 0, 0]),
            Err(FrameError::Masked)
        );
        assert_eq!(parse_frame(&[0xC2, 0x00]), Err(FrameError::ReservedBits));
        assert_eq!(
            parse_frame(&[0x83, 0x00]),
            Err(FrameError::ReservedOpcode(3))
        );
        assert_eq!(parse_frame(&[0x09, 0x00]), Err(FrameError::BadControl));
        assert_eq!(
            parse_frame(&[0x89, 126, 0, 200]),
            Err(FrameError::BadControl)
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse_frame(&huge), Err(FrameError::TooLong(1 << 40)));
    }

    #[test]
    fn keys_are_valid_and_distinct() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        let a = ws_key(1, 0);
        let b = ws_key(1, 1);
        assert_ne!(a, b);
        for k in [a, b] {
            assert_eq!(k.len(), 24);
            assert!(k.ends_with("=="));
        }
    }

    #[test]
    fn upgrade_responses() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_upgrade(ok, key), Ok(Some(ok.len() - 2)));
        assert_eq!(parse_upgrade(&ok[..40], key), Ok(None));
        assert_eq!(
            parse_upgrade(ok, "AAAAAAAAAAAAAAAAAAAAAA=="),
            Err(UpgradeError::BadAccept)
        );
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n";
        assert_eq!(parse_upgrade(busy, key), Err(UpgradeError::Status(503)));
        assert_eq!(
            parse_upgrade(b"SSH-2.0-x\r\n\r\n", key),
            Err(UpgradeError::Malformed)
        );
        let req = upgrade_request("127.0.0.1:1", "/echo", key);
        assert!(req.starts_with(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"));
    }
}
