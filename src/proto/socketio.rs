//! Engine.IO v4 and Socket.IO v5 packets (docs/SOCKETIO.md), sans-IO.
//!
//! Over the WebSocket transport one text frame is one Engine.IO packet: a
//! type digit, then its data. A `4` (message) packet carries one Socket.IO
//! packet: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`.
//! Decoding borrows from the frame; nothing is copied. Every malformed
//! packet is a [`SioDecodeError`]: the client is to blame for all of them.

use std::fmt;

use super::encode::write_str;

/// The longest ack id accepted: socket.io-client counts from 0 upwards in a
/// JavaScript number, so anything past 2^53 is not a client's id.
const MAX_ACK_ID: u64 = (1 << 53) - 1;

/// The longest namespace name accepted (a name is configuration, not data).
pub const MAX_NAMESPACE_LEN: usize = 128;

/// Most binary attachments one BINARY_EVENT/BINARY_ACK may announce (each
/// is one WebSocket binary frame that follows; their bytes together are
/// bounded by `maxPayload` too).
pub const MAX_ATTACHMENTS: u32 = 64;

/// One Engine.IO v4 packet, borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EioPacket<'a> {
    /// `0`: only the server sends it.
    Open,
    /// `1`: the client closes the transport.
    Close,
    /// `2` with optional data (`2probe` during an upgrade).
    Ping(&'a [u8]),
    /// `3`: the answer to our ping.
    Pong(&'a [u8]),
    /// `4`: one Socket.IO packet.
    Message(&'a [u8]),
    /// `5`: completes a transport upgrade.
    Upgrade,
    /// `6`: a no-op (polling).
    Noop,
}

/// Socket.IO v5 packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SioKind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// One Socket.IO packet, borrowed from its Engine.IO message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SioPacket<'a> {
    pub kind: SioKind,
    /// `/` when the packet names none.
    pub nsp: &'a str,
    pub id: Option<u64>,
    /// The JSON payload, checked to be well-formed JSON of the kind's shape.
    pub data: Option<&'a [u8]>,
    /// Binary attachments that follow (BINARY_EVENT/BINARY_ACK), at least 1.
    pub attachments: u32,
}

/// Why a packet was refused; the client sent it, so the client is to blame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SioDecodeError {
    /// An empty frame.
    Empty,
    /// The first character is not an Engine.IO packet type.
    UnknownEioType(u8),
    /// The Socket.IO packet type is not 0-6.
    UnknownSioType(u8),
    /// The attachment count of a binary packet is missing, 0, or over
    /// [`MAX_ATTACHMENTS`].
    BadAttachments,
    /// The namespace is not UTF-8, too long, or not ended by `,`.
    BadNamespace,
    /// The ack id is not a number below 2^53.
    BadAckId,
    /// The payload is not JSON.
    BadJson,
    /// The payload is JSON of the wrong shape for the packet type.
    BadPayload(&'static str),
}

impl fmt::Display for SioDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SioDecodeError::Empty => f.write_str("empty packet"),
            SioDecodeError::UnknownEioType(t) => {
                write!(f, "unknown Engine.IO packet type {:?}", char::from(*t))
            }
            SioDecodeError::UnknownSioType(t) => {
                write!(f, "unknown Socket.IO packet type {:?}", char::from(*t))
            }
            SioDecodeError::BadAttachments => {
                write!(
                    f,
                    "a binary packet announces 1 to {MAX_ATTACHMENTS} attachments"
                )
            }
            SioDecodeError::BadNamespace => f.write_str("malformed namespace"),
            SioDecodeError::BadAckId => f.write_str("malformed ack id"),
            SioDecodeError::BadJson => f.write_str("the payload is not JSON"),
            SioDecodeError::BadPayload(why) => f.write_str(why),
        }
    }
}

/// Split an Engine.IO packet (one WebSocket text frame) into its type and data.
pub fn decode_eio(frame: &[u8]) -> Result<EioPacket<'_>, SioDecodeError> {
    let (&t, rest) = frame.split_first().ok_or(SioDecodeError::Empty)?;
    Ok(match t {
        b'0' => EioPacket::Open,
        b'1' => EioPacket::Close,
        b'2' => EioPacket::Ping(rest),
        b'3' => EioPacket::Pong(rest),
        b'4' => EioPacket::Message(rest),
        b'5' => EioPacket::Upgrade,
        b'6' => EioPacket::Noop,
        other => return Err(SioDecodeError::UnknownEioType(other)),
    })
}

/// Parse one Socket.IO packet (the data of an Engine.IO message).
pub fn decode_sio(b: &[u8]) -> Result<SioPacket<'_>, SioDecodeError> {
    let (&t, mut rest) = b.split_first().ok_or(SioDecodeError::Empty)?;
    let kind = match t {
        b'0' => SioKind::Connect,
        b'1' => SioKind::Disconnect,
        b'2' => SioKind::Event,
        b'3' => SioKind::Ack,
        b'4' => SioKind::ConnectError,
        b'5' => SioKind::BinaryEvent,
        b'6' => SioKind::BinaryAck,
        other => return Err(SioDecodeError::UnknownSioType(other)),
    };
    let mut attachments = 0;
    if matches!(kind, SioKind::BinaryEvent | SioKind::BinaryAck) {
        // `<count>-` before everything else.
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        attachments = std::str::from_utf8(rest.get(..digits).unwrap_or_default())
            .ok()
            .and_then(|t| t.parse::<u32>().ok())
            .filter(|n| (1..=MAX_ATTACHMENTS).contains(n))
            .ok_or(SioDecodeError::BadAttachments)?;
        if rest.get(digits) != Some(&b'-') {
            return Err(SioDecodeError::BadAttachments);
        }
        rest = rest.get(digits + 1..).unwrap_or_default();
    }
    let mut nsp = "/";
    if rest.first() == Some(&b'/') {
        // The namespace runs to the first `,` (or to the end: `1/admin`).
        let end = rest.iter().position(|&c| c == b',');
        let name = rest.get(..end.unwrap_or(rest.len())).unwrap_or_default();
        if name.len() > MAX_NAMESPACE_LEN {
            return Err(SioDecodeError::BadNamespace);
        }
        nsp = std::str::from_utf8(name).map_err(|_| SioDecodeError::BadNamespace)?;
        rest = match end {
            Some(i) => rest.get(i + 1..).unwrap_or_default(),
            None => &[],
        };
    }
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut id = None;
    if digits > 0 {
        let text = rest.get(..digits).unwrap_or_default();
        let n = std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|n| *n <= MAX_ACK_ID)
            .ok_or(SioDecodeError::BadAckId)?;
        id = Some(n);
        rest = rest.get(digits..).unwrap_or_default();
    }
    let data = if rest.is_empty() { None } else { Some(rest) };
    let value = match data {
        Some(d) => Some(
            serde_json::from_slice::<serde_json::Value>(d).map_err(|_| SioDecodeError::BadJson)?,
        ),
        None => None,
    };
    // The shapes socket.io's own parser accepts (isPayloadValid).
    let ok = match (kind, &value) {
        (SioKind::Connect, None) => true,
        (SioKind::Connect, Some(v)) => v.is_object(),
        (SioKind::Disconnect, v) => v.is_none(),
        (SioKind::ConnectError, Some(v)) => v.is_object() || v.is_string(),
        (SioKind::Event | SioKind::BinaryEvent, Some(serde_json::Value::Array(a))) => {
            a.first().is_some_and(|n| n.is_string() || n.is_number())
        }
        (SioKind::Ack | SioKind::BinaryAck, Some(serde_json::Value::Array(_))) => id.is_some(),
        _ => false,
    };
    if !ok {
        return Err(SioDecodeError::BadPayload(match kind {
            SioKind::Connect => "a CONNECT payload is an object",
            SioKind::Disconnect => "a DISCONNECT has no payload",
            SioKind::Event | SioKind::BinaryEvent => {
                "an EVENT payload is an array starting with the event name"
            }
            SioKind::Ack | SioKind::BinaryAck => "an ACK has an id and an array payload",
            _ => "a client does not send this packet type",
        }));
    }
    Ok(SioPacket {
        kind,
        nsp,
        id,
        data,
        attachments,
    })
}

/// `nsp,` for a namespace other than `/` (the main one is implied).
fn nsp_prefix(b: &mut Vec<u8>, nsp: &str) {
    if nsp != "/" {
        b.extend_from_slice(nsp.as_bytes());
        b.push(b',');
    }
}

/// The Engine.IO open packet: `0{"sid",...}`; no upgrades offered on the
/// WebSocket transport (it is the best one).
pub fn eio_open(
    b: &mut Vec<u8>,
    sid: &str,
    ping_interval_ms: u128,
    ping_timeout_ms: u128,
    max_payload: usize,
) {
    b.extend_from_slice(b"0{\"sid\":");
    write_str(b, sid);
    b.extend_from_slice(
        format!(
            ",\"upgrades\":[],\"pingInterval\":{ping_interval_ms},\"pingTimeout\":{ping_timeout_ms},\"maxPayload\":{max_payload}}}"
        )
        .as_bytes(),
    );
}

/// `40[nsp,]{"sid":..}`: the namespace CONNECT succeeded.
pub fn connect_ok(b: &mut Vec<u8>, nsp: &str, sid: &str) {
    b.extend_from_slice(b"40");
    nsp_prefix(b, nsp);
    b.extend_from_slice(b"{\"sid\":");
    write_str(b, sid);
    b.push(b'}');
}

/// `44[nsp,]{"message":..}`: the CONNECT was refused (`connect_error`).
pub fn connect_error(b: &mut Vec<u8>, nsp: &str, message: &str) {
    b.extend_from_slice(b"44");
    nsp_prefix(b, nsp);
    b.extend_from_slice(b"{\"message\":");
    write_str(b, message);
    b.push(b'}');
}

/// `41[nsp,]`: the server disconnects the socket (no reconnection).
pub fn disconnect(b: &mut Vec<u8>, nsp: &str) {
    b.extend_from_slice(b"41");
    if nsp != "/" {
        b.extend_from_slice(nsp.as_bytes());
        b.push(b',');
    }
}

/// `42[nsp,]["name",<arg>]`: an event with one JSON argument.
pub fn event(b: &mut Vec<u8>, nsp: &str, name: &str, arg: &[u8]) {
    event_acked(b, nsp, None, name, arg);
}

/// `42[nsp,][id]["name",<arg>]`: an event the client acknowledges with `id`.
pub fn event_acked(b: &mut Vec<u8>, nsp: &str, id: Option<u64>, name: &str, arg: &[u8]) {
    b.reserve(28 + nsp.len() + name.len() + arg.len());
    b.extend_from_slice(b"42");
    nsp_prefix(b, nsp);
    if let Some(id) = id {
        b.extend_from_slice(id.to_string().as_bytes());
    }
    b.push(b'[');
    write_str(b, name);
    b.push(b',');
    b.extend_from_slice(arg);
    b.push(b']');
}

/// `43[nsp,]<id>[<arg>]`: the answer to the client's ack id `id` (`arg`
/// may be several JSON values joined by commas).
pub fn ack(b: &mut Vec<u8>, nsp: &str, id: u64, arg: &[u8]) {
    b.extend_from_slice(b"43");
    nsp_prefix(b, nsp);
    b.extend_from_slice(id.to_string().as_bytes());
    b.push(b'[');
    b.extend_from_slice(arg);
    b.push(b']');
}

/// The `type` of a server message written by [`super::Out`] (it always
/// comes first, and type names need no escaping): the event name a
/// Socket.IO client receives it under. `None` for anything else.
pub fn native_type(json: &[u8]) -> Option<&str> {
    let rest = json.strip_prefix(b"{\"type\":\"")?;
    let end = rest.iter().position(|&c| c == b'"' || c == b'\\')?;
    if rest.get(end) != Some(&b'"') {
        return None;
    }
    std::str::from_utf8(rest.get(..end)?).ok()
}

/// The event name a Socket.IO client receives a server message under: its
/// native `type`, except the names socket.io-client keeps for itself
/// (`connect`, `disconnect`, ...: an event so named would fire the client's
/// own handlers), which arrive as `message` with the `type` inside.
pub fn event_name(json: &[u8]) -> &str {
    const RESERVED: [&str; 6] = [
        "connect",
        "connect_error",
        "disconnect",
        "disconnecting",
        "newListener",
        "removeListener",
    ];
    match native_type(json) {
        Some(t) if !RESERVED.contains(&t) => t,
        _ => "message",
    }
}

/// The payload of a server-to-client WebSocket frame (unmasked, as
/// `ws::frame` writes them), to re-encode a shared native frame.
pub fn frame_payload(frame: &[u8]) -> Option<&[u8]> {
    let len = frame.get(1)? & 0x7f;
    let start = match len {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.get(start..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_io_types() {
        assert_eq!(decode_eio(b"2probe"), Ok(EioPacket::Ping(b"probe")));
        assert_eq!(decode_eio(b"3"), Ok(EioPacket::Pong(b"")));
        assert_eq!(decode_eio(b"40"), Ok(EioPacket::Message(b"0")));
        assert_eq!(decode_eio(b""), Err(SioDecodeError::Empty));
        assert_eq!(decode_eio(b"9"), Err(SioDecodeError::UnknownEioType(b'9')));
    }

    #[test]
    fn socket_io_packets() {
        let p = decode_sio(b"0/admin,{\"token\":\"t\"}").unwrap();
        assert_eq!(p.kind, SioKind::Connect);
        assert_eq!(p.nsp, "/admin");
        assert_eq!(p.data, Some(&b"{\"token\":\"t\"}"[..]));
        let p = decode_sio(b"0").unwrap();
        assert_eq!((p.nsp, p.data), ("/", None));
        let p = decode_sio(b"2/chat,12[\"hi\",1]").unwrap();
        assert_eq!((p.kind, p.nsp, p.id), (SioKind::Event, "/chat", Some(12)));
        assert_eq!(p.data, Some(&b"[\"hi\",1]"[..]));
        let p = decode_sio(b"1/chat").unwrap();
        assert_eq!((p.kind, p.nsp), (SioKind::Disconnect, "/chat"));
        let p = decode_sio(b"33[1]").unwrap();
        assert_eq!((p.kind, p.id), (SioKind::Ack, Some(3)));
    }

    #[test]
    fn malformed_packets_are_refused() {
        for bad in [
            &b"2"[..],
            b"2[]",
            b"2{}",
            b"2[\"a\"",
            b"0[]",
            b"0\"x\"",
            b"1{}",
            b"3[1]",
            b"7",
            b"299999999999999999999[\"a\"]",
        ] {
            assert!(
                decode_sio(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &b"5[\"a\"]"[..],
            b"50-[\"a\"]",
            b"565-[\"a\"]",
            b"51[\"a\"]",
            b"61-[1]",
        ] {
            assert_eq!(
                decode_sio(bad).err().map(|e| matches!(
                    e,
                    SioDecodeError::BadAttachments | SioDecodeError::BadPayload(_)
                )),
                Some(true),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let p = decode_sio(b"52-/c,9[\"a\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!(
            (p.kind, p.attachments, p.nsp, p.id),
            (SioKind::BinaryEvent, 2, "/c", Some(9))
        );
        assert_eq!(decode_sio(b"0/\xff,{}"), Err(SioDecodeError::BadNamespace));
    }

    #[test]
    fn writers() {
        let mut b = Vec::new();
        eio_open(&mut b, "s1", 300, 200, 1_000_000);
        let v: serde_json::Value = serde_json::from_slice(b.get(1..).unwrap()).unwrap();
        assert_eq!(v["sid"], "s1");
        assert_eq!(v["pingInterval"], 300);
        assert_eq!(v["maxPayload"], 1_000_000);
        b.clear();
        connect_ok(&mut b, "/custom", "x");
        assert_eq!(b, b"40/custom,{\"sid\":\"x\"}");
        b.clear();
        connect_error(&mut b, "/", "no \"token\"");
        assert_eq!(b, b"44{\"message\":\"no \\\"token\\\"\"}");
        b.clear();
        event(&mut b, "/", "message", b"{\"a\":1}");
        assert_eq!(b, b"42[\"message\",{\"a\":1}]");
        b.clear();
        event_acked(&mut b, "/c", Some(4), "direct", b"{}");
        assert_eq!(b, b"42/c,4[\"direct\",{}]");
        assert_eq!(decode_sio(b.get(1..).unwrap()).map(|p| p.id), Ok(Some(4)));
        b.clear();
        ack(&mut b, "/c", 7, b"1");
        assert_eq!(b, b"43/c,7[1]");
        b.clear();
        disconnect(&mut b, "/");
        assert_eq!(b, b"41");
    }

    #[test]
    fn native_types_and_frames() {
        assert_eq!(native_type(b"{\"type\":\"pong\"}"), Some("pong"));
        assert_eq!(native_type(b"{\"a\":1}"), None);
        assert_eq!(native_type(b"{\"type\":\"x\\\"y\"}"), None);
        assert_eq!(event_name(b"{\"type\":\"area_updated\"}"), "area_updated");
        assert_eq!(event_name(b"{\"type\":\"disconnect\"}"), "message");
        assert_eq!(event_name(b"[1]"), "message");
        let f = crate::ws::frame::frame_bytes(crate::ws::frame::OpCode::Text, &[b'x'; 300]);
        assert_eq!(frame_payload(&f).map(<[u8]>::len), Some(300));
    }
}
