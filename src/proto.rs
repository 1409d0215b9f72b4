//! The Switchboard client protocol on `ws_path`: JSON text frames, each an
//! object with a `type`. This is the transport-level core (T3): app-level
//! `ping` is answered with `pong`, and every other input gets a documented
//! error while the connection stays open (docs/PROTOCOL.md).

use serde::Deserialize;

use crate::logging::rfc3339_now;

/// Error codes sent in `{"type":"error","code":...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame was not a JSON object.
    BadJson,
    /// The object had no string `type`.
    MissingType,
    /// The `type` is not one this server handles.
    UnknownType,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::MissingType => "missing_type",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "requestId", default)]
    request_id: Option<serde_json::Value>,
}

/// An error message as JSON text.
pub fn error_json(
    code: ErrorCode,
    message: &str,
    request_id: Option<&serde_json::Value>,
) -> String {
    let mut v = serde_json::json!({
        "type": "error",
        "code": code.as_str(),
        "message": message,
        "timestamp": rfc3339_now(),
    });
    if let (Some(id), Some(obj)) = (request_id, v.as_object_mut()) {
        obj.insert("requestId".into(), id.clone());
    }
    v.to_string()
}

/// Handle one text message; returns the reply text.
pub fn handle_text(text: &str) -> String {
    let env: Envelope<'_> = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) => return error_json(ErrorCode::BadJson, &format!("not a JSON object: {e}"), None),
    };
    let rid = env.request_id.as_ref();
    match env.kind.as_deref() {
        None => error_json(
            ErrorCode::MissingType,
            "every message needs a string \"type\"",
            rid,
        ),
        Some("ping") => {
            let mut v = serde_json::json!({"type": "pong", "timestamp": rfc3339_now()});
            if let (Some(id), Some(obj)) = (rid, v.as_object_mut()) {
                obj.insert("requestId".into(), id.clone());
            }
            v.to_string()
        }
        Some(other) => {
            let shown: String = other.chars().take(64).collect();
            error_json(
                ErrorCode::UnknownType,
                &format!("unknown message type {shown:?}"),
                rid,
            )
        }
    }
}

/// Reply to a binary frame on the protocol endpoint.
pub fn binary_reply() -> String {
    error_json(
        ErrorCode::BinaryNotSupported,
        "the protocol uses JSON text frames",
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn ping_and_errors() {
        let r = parse(&handle_text(r#"{"type":"ping","requestId":7}"#));
        assert_eq!(r["type"], "pong");
        assert_eq!(r["requestId"], 7);
        assert!(r["timestamp"].is_string());
        assert_eq!(parse(&handle_text("nope"))["code"], "bad_json");
        assert_eq!(parse(&handle_text("[1]"))["code"], "bad_json");
        assert_eq!(parse(&handle_text("{}"))["code"], "missing_type");
        assert_eq!(parse(&handle_text(r#"{"type":5}"#))["code"], "bad_json");
        let u = parse(&handle_text(r#"{"type":"zzz","requestId":"a"}"#));
        assert_eq!(u["code"], "unknown_type");
        assert_eq!(u["requestId"], "a");
    }
}
