//! Decoding a client text frame: simd-json in place, with the shard's
//! reused parse buffers. Untrusted input: every failure is an error value.

use simd_json::BorrowedValue;
use simd_json::prelude::*;

use super::ErrorCode;

/// A decoded client message.
pub struct Decoded<'a> {
    /// The whole object.
    pub value: BorrowedValue<'a>,
    /// `requestId` re-encoded as JSON text (string or number), if present.
    pub request_id: Option<Vec<u8>>,
}

impl<'a> Decoded<'a> {
    /// The message `type`.
    pub fn kind(&self) -> &str {
        self.value.get_str("type").unwrap_or_default()
    }
}

/// Parse `text` (modified in place) into an object with a string `type`.
pub fn decode<'a>(
    text: &'a mut [u8],
    buffers: &mut simd_json::Buffers,
) -> Result<Decoded<'a>, (ErrorCode, String, Option<Vec<u8>>)> {
    let value = simd_json::to_borrowed_value_with_buffers(text, buffers)
        .map_err(|e| (ErrorCode::BadJson, format!("invalid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err((
            ErrorCode::BadJson,
            "a message must be a JSON object".into(),
            None,
        ));
    }
    let request_id = match value.get("requestId") {
        Some(v) if v.is_str() || v.is_number() => Some(v.encode().into_bytes()),
        _ => None,
    };
    match value.get("type") {
        Some(t) if t.is_str() => Ok(Decoded { value, request_id }),
        Some(_) => Err((
            ErrorCode::MissingType,
            "\"type\" must be a string".into(),
            request_id,
        )),
        None => Err((
            ErrorCode::MissingType,
            "every message needs a string \"type\"".into(),
            request_id,
        )),
    }
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
                    d.kind().to_owned(),
                    d.request_id.map(|r| String::from_utf8(r).unwrap()),
                )
            })
            .map_err(|e| e.0)
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
