//! Answers to the connection itself, and the argument checks every handler
//! shares: each failed check sends its error and returns `None`.

use std::borrow::Cow;

use simd_json::prelude::*;

use crate::auth::Identity;
use crate::config::Config;
use crate::policy::{self, Action};
use crate::proto::encode::error_in;
use crate::proto::{self, Dialect, ErrorCode, field, field_str};

/// Replies to the connection itself: each call is one text frame.
pub trait Replies {
    fn text(&mut self, json: &[u8]);
    /// A binary frame (Socket.IO attachments); the native protocol has none.
    fn binary(&mut self, _data: &[u8]) {}
    /// Bytes already waiting to be sent to this connection (replies of this
    /// read and its outbound queue): a handler checks it before costly work
    /// whose answer would only be dropped at the slow-consumer limit.
    fn queued(&self) -> usize {
        0
    }
}

/// An error reply in the client's dialect (docs/PROTOCOL.md, errors).
pub fn reply_error(
    out: &mut dyn Replies,
    code: ErrorCode,
    message: &str,
    rid: Option<&[u8]>,
    dialect: Dialect,
) {
    let mut b = Vec::new();
    error_in(&mut b, dialect, code, message, rid);
    out.text(&b);
}

pub fn unknown_type(out: &mut dyn Replies, kind: &str, rid: Option<&[u8]>) {
    let shown: String = kind.chars().take(64).collect();
    reply_error(
        out,
        ErrorCode::UnknownType,
        &format!("unknown message type {shown:?}"),
        rid,
        Dialect::Native,
    );
}

/// A required field (any JSON type), or a `missing_field` error.
pub fn required<'v, 'a>(
    v: &'v simd_json::BorrowedValue<'a>,
    name: &str,
    rid: Option<&[u8]>,
    out: &mut dyn Replies,
) -> Option<&'v simd_json::BorrowedValue<'a>> {
    let found = field(v, name);
    if found.is_none() {
        reply_error(
            out,
            ErrorCode::MissingField,
            &format!("{name:?} is required"),
            rid,
            Dialect::Native,
        );
    }
    found
}

pub fn channel_arg<'v>(
    v: &'v simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    cfg: &Config,
    out: &mut dyn Replies,
) -> Option<&'v str> {
    let Some(channel) = field_str(v, "channel") else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "\"channel\" (string) is required",
            rid,
            Dialect::Native,
        );
        return None;
    };
    if !policy::valid_channel(channel, cfg) {
        reply_error(
            out,
            ErrorCode::InvalidChannel,
            &format!(
                "channel names are 1-{} printable characters without spaces",
                cfg.channels.max_channel_length
            ),
            rid,
            Dialect::Native,
        );
        return None;
    }
    Some(channel)
}

/// The message's valid `channel` if `id` may do `action` on it; otherwise
/// the error reply is sent and `None` returned.
pub fn permitted_channel<'v>(
    v: &'v simd_json::BorrowedValue<'_>,
    rid: Option<&[u8]>,
    id: &Identity,
    action: Action,
    cfg: &Config,
    out: &mut dyn Replies,
) -> Option<&'v str> {
    let channel = channel_arg(v, rid, cfg, out)?;
    if !policy::allowed(cfg, action, channel, id) {
        let verb = match action {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish to",
        };
        reply_error(
            out,
            ErrorCode::Forbidden,
            &format!("not allowed to {verb} {channel:?}"),
            rid,
            Dialect::Native,
        );
        return None;
    }
    Some(channel)
}

/// The channel a `request` action reads (`data.channel`, or `channel`),
/// if valid and the identity may see it; otherwise the error is sent.
pub fn visible_channel<'v>(
    data: Option<&'v simd_json::BorrowedValue<'_>>,
    v: &'v simd_json::BorrowedValue<'_>,
    rid: &[u8],
    dialect: Dialect,
    id: &Identity,
    cfg: &Config,
    out: &mut dyn Replies,
) -> Option<&'v str> {
    let Some(channel) = data
        .and_then(|d| d.get_str("channel"))
        .or_else(|| field_str(v, "channel"))
    else {
        reply_error(
            out,
            ErrorCode::MissingField,
            "this action needs data.channel",
            Some(rid),
            dialect,
        );
        return None;
    };
    let problem = if !policy::valid_channel(channel, cfg) {
        Some((ErrorCode::InvalidChannel, "invalid channel name".to_owned()))
    } else if !policy::allowed(cfg, Action::Subscribe, channel, id) {
        Some((
            ErrorCode::Forbidden,
            format!("not allowed to see {channel:?}"),
        ))
    } else {
        None
    };
    if let Some((code, message)) = problem {
        reply_error(out, code, &message, Some(rid), dialect);
        return None;
    }
    Some(channel)
}

/// The JSON text to forward for field `name`: the client's own bytes, or
/// (duplicate keys) the parsed value re-encoded.
pub fn forwarded<'r>(
    v: &simd_json::BorrowedValue<'_>,
    raw: &'r [u8],
    name: &str,
) -> Option<Cow<'r, [u8]>> {
    if let Some(bytes) = proto::raw_field(raw, name) {
        return Some(Cow::Borrowed(bytes));
    }
    field(v, name).map(|value| Cow::Owned(value.encode().into_bytes()))
}
