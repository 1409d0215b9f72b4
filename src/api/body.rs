//! Request bodies and parameters: the JSON shapes each route takes
//! (borrowed from the body where possible) and the checks on names.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::http::Request;
use crate::policy;

use super::error::{ApiError, Caller, bad};

pub(super) fn body_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(bad(Caller::BadJson, "a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            bad(Caller::InvalidBody, e.to_string())
        } else {
            bad(Caller::BadJson, e.to_string())
        }
    })
}

pub(super) fn query_num(req: &Request, name: &str) -> Result<Option<u64>, ApiError> {
    match req.query_param(name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            bad(
                Caller::InvalidQuery,
                format!("{name} must be a whole number"),
            )
        }),
    }
}

pub(super) fn user_id(s: &str) -> Result<Arc<str>, ApiError> {
    if !policy::valid_user(s) {
        return Err(bad(
            Caller::InvalidUser,
            "user ids are 1-128 bytes of printable characters without spaces",
        ));
    }
    Ok(Arc::from(s))
}

pub(super) fn channel_name(s: &str, cfg: &Config) -> Result<Arc<str>, ApiError> {
    if !policy::valid_channel(s, cfg) {
        return Err(bad(
            Caller::InvalidChannel,
            format!(
                "channel names are 1-{} printable characters without spaces",
                cfg.channels.max_channel_length
            ),
        ));
    }
    Ok(Arc::from(s))
}

/// A message `type` a backend may give its events.
pub(super) fn event_type(t: Option<&str>, default: &'static str) -> Result<String, ApiError> {
    let t = t.unwrap_or(default);
    if t.is_empty()
        || t.len() > 64
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
    {
        return Err(bad(
            Caller::InvalidType,
            "type is 1-64 characters of letters, digits, _ - . :",
        ));
    }
    Ok(t.to_owned())
}

#[derive(Deserialize)]
pub(super) struct PublishBody<'a> {
    #[serde(borrow)]
    pub(super) channel: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SendBody<'a> {
    #[serde(borrow)]
    pub(super) user_id: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    pub(super) kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(super) data: Option<&'a RawValue>,
    #[serde(default)]
    pub(super) ack: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SendManyBody<'a> {
    #[serde(borrow)]
    pub(super) user_ids: Vec<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    pub(super) kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(super) data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(super) struct BroadcastBody<'a> {
    #[serde(borrow, rename = "type")]
    pub(super) kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(super) data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NotificationBody<'a> {
    #[serde(borrow)]
    pub(super) user_id: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) title: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) body: Cow<'a, str>,
    pub(super) data: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub(super) ack: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RevokeBody<'a> {
    #[serde(borrow)]
    pub(super) user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(super) jti: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(super) reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MembershipBody<'a> {
    #[serde(borrow)]
    pub(super) user_id: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) channel: Cow<'a, str>,
    /// An event sent to each connection too (seed 001 `area_added`).
    #[serde(borrow)]
    pub(super) event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(super) data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TokenBody {
    pub(super) user_id: String,
    pub(super) role: Option<String>,
    pub(super) tenant: Option<String>,
    #[serde(default)]
    pub(super) channels: Vec<String>,
    pub(super) ttl: Option<String>,
}
