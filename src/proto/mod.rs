//! The Switchboard client protocol on `ws_path` (docs/PROTOCOL.md is the
//! contract): JSON text frames, each an object with a string `type`.
//!
//! * [`decode`]: simd-json parses a text frame in place (per-shard buffers)
//!   into a borrowed value; fields are read from the top level or, for the
//!   seeds' clients, from a nested `payload` object.
//! * [`encode`]: server messages are written straight into a byte buffer
//!   (no intermediate value); a fan-out message is written once and framed
//!   once ([`encode::shared_frame`]).
//!
//! A client speaks one [`Dialect`], decided at decode from the spelling of
//! its messages, so handlers answer in kind without re-reading the input.

pub mod decode;
pub mod encode;
pub mod socketio;

pub use decode::{ClientMsg, DecodeError, Kind, decode, field, field_str, raw_field};
pub use encode::{Out, error, write_str};

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
    /// A `refresh` token names another user or tenant than the connection's.
    TokenMismatch,
    /// The server is shutting down and could not do it.
    Unavailable,
    /// The message was not stored: the recipient's inbox or the sender's
    /// quota is full (`inbox.*`); the message says which.
    InboxFull,
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
            ErrorCode::TokenMismatch => "token_mismatch",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InboxFull => "inbox_full",
        }
    }
}

/// How a client spells its messages; replies use the same spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// Lowercase types (`request`, `response`, `error`): docs/PROTOCOL.md.
    #[default]
    Native,
    /// Seed 004's uppercase `REQUEST`, answered by `RESPONSE` and `ERROR`
    /// (with a nested `error {code, message}` object).
    Upper,
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
