//! The HTTP response to a request whose answer was gathered across shards
//! (or that waited on the storage writer).

use std::io::Write;

use crate::http::Response;
use crate::proto;
use crate::proto::encode::{history_page, presence};
use crate::work::{ApiPending, ApiReply, ClientInfo, Gathered};

use super::error::{ApiError, Caller, Server};

fn client_json(b: &mut Vec<u8>, c: &ClientInfo) {
    b.extend_from_slice(b"{\"id\":");
    proto::write_str(b, &c.id.to_string());
    b.extend_from_slice(b",\"ip\":");
    proto::write_str(b, &c.ip.to_string());
    b.extend_from_slice(b",\"connectedAt\":");
    if c.connected_at_ms > 0 {
        proto::write_str(b, &crate::clock::rfc3339_ms(c.connected_at_ms));
    } else {
        b.extend_from_slice(b"null"); // the echo endpoint keeps no session
    }
    let _ = write!(
        b,
        ",\"shard\":{},\"isAuthenticated\":{},\"userId\":",
        c.id.shard(),
        c.authenticated
    );
    match &c.user {
        Some(u) => proto::write_str(b, u),
        None => b.extend_from_slice(b"null"),
    }
    let _ = write!(
        b,
        ",\"dataReceived\":{},\"subscriptions\":{}}}",
        c.data_received, c.subscriptions
    );
}

/// The HTTP response for a request whose answer was gathered across shards.
pub fn later_response(p: &ApiPending, g: &Gathered<'_>) -> Response {
    let mut b = Vec::new();
    match &p.what {
        ApiReply::Published { channel } => {
            let Some((offset, epoch)) = g.published else {
                return ApiError::server(Server::ShuttingDown, "the channel's shard is gone")
                    .response(p.close);
            };
            b.extend_from_slice(b"{\"success\":true,\"channel\":");
            proto::write_str(&mut b, channel);
            let _ = write!(b, ",\"offset\":{offset},\"epoch\":");
            proto::write_str(&mut b, epoch);
            let _ = write!(b, ",\"connections\":{}}}", g.connections);
        }
        ApiReply::Sent { user, stored } => {
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            let _ = write!(
                b,
                ",\"connections\":{},\"delivered\":{}",
                g.connections,
                g.connections > 0
            );
            match stored {
                Some(id) => {
                    let _ = write!(b, ",\"stored\":true,\"id\":{id}}}");
                }
                None => b.extend_from_slice(b",\"stored\":false}"),
            }
        }
        ApiReply::SentMany { users } => {
            let _ = write!(
                b,
                "{{\"success\":true,\"users\":{users},\"connections\":{}}}",
                g.connections
            );
        }
        ApiReply::Broadcast => {
            let _ = write!(b, "{{\"success\":true,\"connections\":{}}}", g.connections);
        }
        ApiReply::UserStatus { user } => {
            let mut shards: Vec<usize> = g.clients.iter().map(|c| c.id.shard()).collect();
            shards.sort_unstable();
            shards.dedup();
            let since = g.clients.iter().map(|c| c.connected_at_ms).min();
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            let _ = write!(
                b,
                ",\"online\":{},\"connections\":{},\"shards\":{:?},\"since\":",
                !g.clients.is_empty(),
                g.clients.len(),
                shards
            );
            match since {
                Some(ms) => proto::write_str(&mut b, &crate::clock::rfc3339_ms(ms)),
                None => b.extend_from_slice(b"null"),
            }
            b.extend_from_slice(b",\"clients\":[");
            for (i, c) in g.clients.iter().enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                client_json(&mut b, c);
            }
            b.extend_from_slice(b"]}");
        }
        ApiReply::Disconnected { user } => {
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            let _ = write!(b, ",\"connections\":{}}}", g.connections);
        }
        ApiReply::Membership {
            user,
            channel,
            subscribe,
        } => {
            b.extend_from_slice(b"{\"success\":true,\"userId\":");
            proto::write_str(&mut b, user);
            b.extend_from_slice(b",\"channel\":");
            proto::write_str(&mut b, channel);
            let _ = write!(
                b,
                ",\"subscribed\":{subscribe},\"connections\":{}}}",
                g.connections
            );
        }
        ApiReply::Presence { channel } => {
            presence(&mut b, channel, g.connections, g.presence);
        }
        ApiReply::History { channel } => history_page(&mut b, channel, g.page),
        ApiReply::Clients { offset, limit } => {
            let _ = write!(
                b,
                "{{\"total\":{},\"offset\":{offset},\"limit\":{limit},\"clients\":[",
                g.clients.len()
            );
            for (i, c) in g.clients.iter().skip(*offset).take(*limit).enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                client_json(&mut b, c);
            }
            b.extend_from_slice(b"]}");
        }
        ApiReply::Revoked { kind, value } => {
            b.extend_from_slice(b"{\"success\":true,\"revoked\":");
            proto::write_str(&mut b, kind.as_str());
            b.extend_from_slice(b",\"value\":");
            proto::write_str(&mut b, value);
            let _ = write!(b, ",\"connections\":{}}}", g.connections);
        }
    }
    Response::json(200, &b, p.close)
}

/// A storage failure for a request that was waiting on the writer.
/// A message the inbox quotas refused (`too_large`: larger than a whole
/// inbox, 413; otherwise 409 `inbox_full`).
pub fn inbox_refused(p: &ApiPending, too_large: bool, message: &str) -> Response {
    let kind = if too_large {
        Caller::TooLarge
    } else {
        Caller::InboxFull
    };
    ApiError::caller(kind, message).response(p.close)
}

pub fn storage_failure(p: &ApiPending, overloaded: bool, message: &str) -> Response {
    if overloaded {
        ApiError::server(Server::Overloaded, message).response(p.close)
    } else {
        ApiError::server(Server::StorageError, message).response(p.close)
    }
}
