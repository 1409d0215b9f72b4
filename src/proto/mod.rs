//! The Switchboard client protocol on `ws_path` (docs/PROTOCOL.md is the
//! contract): JSON text frames, each an object with a string `type`.
//!
//! * [`decode`]: simd-json parses a text frame in place (per-shard buffers)
//!   into a borrowed value; fields are read from the top level or, for the
//!   seeds' clients, from a nested `payload` object.
//! * [`Out`]: server messages are written straight into a byte buffer (no
//!   intermediate value); a fan-out message is written once and framed once.

pub mod decode;

use std::io::Write;

use simd_json::prelude::*;

use crate::clock::rfc3339_now;

pub use decode::{Decoded, field, field_str, raw_field};

/// Error codes sent in `{"type":"error","code":...}`. Each has one meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The text frame is not a JSON object.
    BadJson,
    /// The object has no string `type`.
    MissingType,
    /// The `type` is not part of the protocol.
    UnknownType,
    /// A required field is missing or has the wrong JSON type.
    MissingField,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// The message needs an authenticated connection.
    NotAuthenticated,
    /// Already authenticated.
    AlreadyAuthenticated,
    /// Not allowed for this identity (channel, broadcast, action).
    Forbidden,
    /// The channel name is empty, too long or has control characters.
    InvalidChannel,
    /// The connection's message rate limit was exceeded.
    RateLimited,
    /// `max_subscriptions` per connection reached.
    TooManySubscriptions,
    /// Not subscribed to that channel.
    NotSubscribed,
    /// A `request` with an action the server does not know.
    UnknownAction,
    /// An ingested record failed validation (the message names the fields).
    InvalidData,
    /// The storage writer's queue is full: retry later.
    Overloaded,
    /// The server runs without durable storage (`storage.backend = "none"`).
    StorageDisabled,
    /// The store failed to commit; nothing was acknowledged.
    StorageError,
    /// The token (or every token of the user) was revoked.
    TokenRevoked,
    /// The server is shutting down and could not do it.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::MissingType => "missing_type",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::InvalidData => "invalid_data",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::StorageDisabled => "storage_disabled",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// Append `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// A server message being written: `{"type":"...", ... ,"timestamp":"..."}`.
pub struct Out<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Out<'a> {
    /// Start a message of `kind` in `buf` (appending).
    pub fn new(buf: &'a mut Vec<u8>, kind: &str) -> Self {
        buf.extend_from_slice(b"{\"type\":");
        write_str(buf, kind);
        Out { buf }
    }

    fn key(&mut self, k: &str) {
        self.buf.push(b',');
        write_str(self.buf, k);
        self.buf.push(b':');
    }

    pub fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        write_str(self.buf, v);
        self
    }

    pub fn opt_str(self, k: &str, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.str(k, v),
            None => self,
        }
    }

    pub fn num(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// A value that is already JSON text (e.g. a requestId as received).
    pub fn raw(mut self, k: &str, json: &[u8]) -> Self {
        self.key(k);
        self.buf.extend_from_slice(json);
        self
    }

    pub fn opt_raw(self, k: &str, json: Option<&[u8]>) -> Self {
        match json {
            Some(j) => self.raw(k, j),
            None => self,
        }
    }

    /// A value from a decoded client message, re-encoded.
    pub fn value(mut self, k: &str, v: &simd_json::BorrowedValue<'_>) -> Self {
        self.key(k);
        let _ = v.write(&mut *self.buf);
        self
    }

    pub fn strs(mut self, k: &str, items: &[&str]) -> Self {
        self.key(k);
        self.buf.push(b'[');
        for (i, s) in items.iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            write_str(self.buf, s);
        }
        self.buf.push(b']');
        self
    }

    /// Close the object with the server timestamp.
    pub fn finish(self) {
        let ts = rfc3339_now();
        self.finish_at(&ts);
    }

    pub fn finish_at(mut self, ts: &str) {
        self.key("timestamp");
        write_str(self.buf, ts);
        self.buf.push(b'}');
    }
}

/// `{"type":"error","code","message","requestId"?,"timestamp"}`.
pub fn error(buf: &mut Vec<u8>, code: ErrorCode, message: &str, request_id: Option<&[u8]>) {
    Out::new(buf, "error")
        .str("code", code.as_str())
        .str("message", message)
        .opt_raw("requestId", request_id)
        .finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        let mut b = Vec::new();
        write_str(&mut b, "a\"b\\c\n\u{1}é");
        let s = String::from_utf8(b).unwrap();
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\n\u{1}é");
    }

    #[test]
    fn messages_are_valid_json() {
        let mut b = Vec::new();
        Out::new(&mut b, "subscribed")
            .str("channel", "room:1")
            .opt_raw("requestId", Some(b"42"))
            .num("n", 7)
            .strs("features", &["a", "b"])
            .finish_at("2026-01-01T00:00:00.000Z");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["type"], "subscribed");
        assert_eq!(v["requestId"], 42);
        assert_eq!(v["features"][1], "b");
        let mut e = Vec::new();
        error(&mut e, ErrorCode::Forbidden, "no", None);
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["code"], "forbidden");
        assert!(v["timestamp"].is_string());
    }
}
