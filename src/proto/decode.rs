//! Decoding a client text frame: simd-json in place, with the shard's
//! reused parse buffers. Untrusted input: every failure is an error value.

use simd_json::BorrowedValue;
use simd_json::prelude::*;

use super::{Dialect, ErrorCode};

/// The message types of the protocol, with the seeds' spellings folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    Ping,
    /// `authenticate`, or the seeds' `authentication`.
    Authenticate,
    Subscribe,
    Unsubscribe,
    Publish,
    /// A direct message: `send`, or seed 003's `chat` (`chat` is echoed in
    /// the delivered event's type).
    Direct {
        chat: bool,
    },
    Broadcast,
    Ack,
    /// `refresh`: a new token for the open connection.
    Refresh,
    /// `request`, or seed 004's `REQUEST` (then the dialect is upper).
    Request,
    /// Any other type: an ingestible record type if configured, else unknown.
    Other(&'a str),
}

impl<'a> Kind<'a> {
    fn of(t: &'a str) -> (Kind<'a>, Dialect) {
        let k = match t {
            "ping" => Kind::Ping,
            "authenticate" | "authentication" => Kind::Authenticate,
            "subscribe" => Kind::Subscribe,
            "unsubscribe" => Kind::Unsubscribe,
            "publish" => Kind::Publish,
            "send" => Kind::Direct { chat: false },
            "chat" => Kind::Direct { chat: true },
            "broadcast" => Kind::Broadcast,
            "ack" => Kind::Ack,
            "refresh" => Kind::Refresh,
            "request" => Kind::Request,
            "REQUEST" => return (Kind::Request, Dialect::Upper),
            other => Kind::Other(other),
        };
        (k, Dialect::Native)
    }

    /// A protocol message that needs an authenticated connection (the
    /// answer before authentication is `not_authenticated`, not `unknown_type`).
    pub fn needs_auth(self) -> bool {
        !matches!(self, Kind::Ping | Kind::Authenticate | Kind::Other(_))
    }
}

/// A decoded client message.
pub struct ClientMsg<'a> {
    /// The whole object.
    pub value: BorrowedValue<'a>,
    /// `requestId` re-encoded as JSON text (string or number), if present.
    pub request_id: Option<Vec<u8>>,
    pub dialect: Dialect,
}

impl<'a> ClientMsg<'a> {
    /// The message type, typed.
    pub fn kind(&self) -> Kind<'_> {
        Kind::of(self.type_name()).0
    }

    /// The `type` as the client wrote it.
    pub fn type_name(&self) -> &str {
        self.value.get_str("type").unwrap_or_default()
    }
}

/// Why a text frame is not a protocol message (the client's fault).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON at all (simd-json's reason).
    NotJson(String),
    /// JSON, but not an object.
    NotAnObject,
    /// An object whose `type` is not a string.
    TypeNotString { request_id: Option<Vec<u8>> },
    /// An object without `type`.
    NoType { request_id: Option<Vec<u8>> },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::NotJson(_) | DecodeError::NotAnObject => ErrorCode::BadJson,
            DecodeError::TypeNotString { .. } | DecodeError::NoType { .. } => {
                ErrorCode::MissingType
            }
        }
    }

    /// The `requestId` the client sent, so the error can carry it.
    pub fn request_id(&self) -> Option<&[u8]> {
        match self {
            DecodeError::TypeNotString { request_id } | DecodeError::NoType { request_id } => {
                request_id.as_deref()
            }
            DecodeError::NotJson(_) | DecodeError::NotAnObject => None,
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NotJson(e) => write!(f, "invalid JSON: {e}"),
            DecodeError::NotAnObject => f.write_str("a message must be a JSON object"),
            DecodeError::TypeNotString { .. } => f.write_str("\"type\" must be a string"),
            DecodeError::NoType { .. } => f.write_str("every message needs a string \"type\""),
        }
    }
}

/// Parse `text` (modified in place) into an object with a string `type`.
pub fn decode<'a>(
    text: &'a mut [u8],
    buffers: &mut simd_json::Buffers,
) -> Result<ClientMsg<'a>, DecodeError> {
    let value = simd_json::to_borrowed_value_with_buffers(text, buffers)
        .map_err(|e| DecodeError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(DecodeError::NotAnObject);
    }
    let request_id = match value.get("requestId") {
        Some(v) if v.is_str() || v.is_number() => Some(v.encode().into_bytes()),
        _ => None,
    };
    let dialect = match value.get("type") {
        Some(t) => match t.as_str() {
            Some(t) => Kind::of(t).1,
            None => return Err(DecodeError::TypeNotString { request_id }),
        },
        None => return Err(DecodeError::NoType { request_id }),
    };
    Ok(ClientMsg {
        value,
        request_id,
        dialect,
    })
}

/// The fields whose value is forwarded to other clients, as raw JSON text.
#[derive(serde::Deserialize)]
struct Forwarded<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a serde_json::value::RawValue>,
}

/// `Some` for every present value, `null` included (plain `Option` would
/// turn `null` into "absent").
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de serde_json::value::RawValue>, D::Error> {
    <&serde_json::value::RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// The raw JSON text of `data` or `message` (top level first, then inside
/// `payload`) in the original message bytes, so a client's data reaches
/// recipients byte for byte: key order, number spelling and escapes kept.
/// `None` if absent, or if the message has a duplicated key among these
/// (the caller then re-encodes the parsed value).
pub fn raw_field<'r>(raw: &'r [u8], name: &str) -> Option<&'r [u8]> {
    let pick = |f: &Forwarded<'r>| match name {
        "data" => f.data,
        "message" => f.message,
        _ => None,
    };
    let top: Forwarded<'r> = serde_json::from_slice(raw).ok()?;
    if let Some(v) = pick(&top) {
        return Some(v.get().as_bytes());
    }
    let payload = top.payload?.get().as_bytes();
    if payload.first() != Some(&b'{') {
        return None;
    }
    let inner: Forwarded<'r> = serde_json::from_slice(payload).ok()?;
    pick(&inner).map(|v| v.get().as_bytes())
}

/// A field from the top level, or from a nested `payload` object (the
/// seeds' `{"type":..., "payload":{...}}` style).
pub fn field<'v, 'a>(msg: &'v BorrowedValue<'a>, name: &str) -> Option<&'v BorrowedValue<'a>> {
    msg.get(name)
        .or_else(|| msg.get("payload").and_then(|p| p.get(name)))
}

/// A string field (top level or under `payload`).
pub fn field_str<'v>(msg: &'v BorrowedValue<'_>, name: &str) -> Option<&'v str> {
    field(msg, name).and_then(|v| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Result<(String, Option<String>), ErrorCode> {
        let mut b = s.as_bytes().to_vec();
        let mut bufs = simd_json::Buffers::default();
        decode(&mut b, &mut bufs)
            .map(|d| {
                (
                    d.type_name().to_owned(),
                    d.request_id.map(|r| String::from_utf8(r).unwrap()),
                )
            })
            .map_err(|e| e.code())
    }

    #[test]
    fn decodes_and_refuses() {
        assert_eq!(
            dec(r#"{"type":"ping","requestId":"a\"b"}"#),
            Ok(("ping".into(), Some(r#""a\"b""#.into())))
        );
        assert_eq!(
            dec(r#"{"type":"ping","requestId":7}"#)
                .unwrap()
                .1
                .as_deref(),
            Some("7")
        );
        assert_eq!(dec(r#"{"type":"ping","requestId":{}}"#).unwrap().1, None);
        assert_eq!(dec("nope"), Err(ErrorCode::BadJson));
        assert_eq!(dec("[1,2]"), Err(ErrorCode::BadJson));
        assert_eq!(dec("{}"), Err(ErrorCode::MissingType));
        assert_eq!(dec(r#"{"type":1}"#), Err(ErrorCode::MissingType));
        let deep = "[".repeat(10_000);
        assert_eq!(dec(&deep), Err(ErrorCode::BadJson));
    }

    #[test]
    fn raw_fields_are_verbatim() {
        let raw = br#"{"type":"publish","data":{"b":1,"a":12345678901234567890123,"e":1e3,"s":"\u00e9\/"},"x":[1]}"#;
        assert_eq!(
            raw_field(raw, "data"),
            Some(&br#"{"b":1,"a":12345678901234567890123,"e":1e3,"s":"\u00e9\/"}"#[..])
        );
        assert_eq!(raw_field(br#"{"data":null}"#, "data"), Some(&b"null"[..]));
        assert_eq!(
            raw_field(br#"{"payload":{"message":"hi"}}"#, "message"),
            Some(&br#""hi""#[..])
        );
        assert_eq!(raw_field(br#"{"payload":"str"}"#, "data"), None);
        assert_eq!(raw_field(br#"{"data":1,"data":2}"#, "data"), None);
        assert_eq!(raw_field(br#"{"type":"x"}"#, "data"), None);
    }

    #[test]
    fn payload_fields() {
        let mut b = br#"{"type":"subscribe","payload":{"channel":"c1"}}"#.to_vec();
        let mut bufs = simd_json::Buffers::default();
        let d = decode(&mut b, &mut bufs).ok().unwrap();
        assert_eq!(field_str(&d.value, "channel"), Some("c1"));
        let mut b = br#"{"type":"subscribe","channel":"top","payload":{"channel":"c1"}}"#.to_vec();
        let d = decode(&mut b, &mut bufs).ok().unwrap();
        assert_eq!(field_str(&d.value, "channel"), Some("top"));
    }
}
