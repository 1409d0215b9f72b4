//! The protocol message that answers a connection once the shards have
//! done its work (`sent`, `published`, `subscribed` with a recovery,
//! presence and history responses), in the connection's dialect.

use crate::proto::encode::{history_page, presence, publications, response_head, response_tail};
use crate::proto::{Dialect, ErrorCode, Out};
use crate::work::{Gathered, WsReply};

/// The text of a finished cross-shard reply.
pub fn reply_text(
    what: &WsReply,
    request_id: Option<&[u8]>,
    dialect: Dialect,
    g: &Gathered<'_>,
) -> Vec<u8> {
    let mut b = Vec::new();
    match what {
        WsReply::Sent { to } => {
            Out::new(&mut b, "sent")
                .str("to", to)
                .num("connections", g.connections)
                .opt_raw("requestId", request_id)
                .finish();
        }
        WsReply::SentStored { to, id } => {
            Out::new(&mut b, "sent")
                .str("to", to)
                .num("connections", g.connections)
                .raw("stored", b"true")
                .raw("id", id.to_string().as_bytes())
                .opt_raw("requestId", request_id)
                .finish();
        }
        WsReply::Presence { channel } => {
            response_head(&mut b, dialect, request_id.unwrap_or(b"null"), "presence");
            presence(&mut b, channel, g.connections, g.presence);
            response_tail(&mut b);
        }
        WsReply::Published { .. } if g.published.is_none() => {
            crate::proto::error(
                &mut b,
                ErrorCode::Unavailable,
                "the channel's shard is shutting down; nothing was published",
                request_id,
            );
        }
        WsReply::Published { channel } => {
            let (offset, epoch) = g.published.unwrap_or((0, ""));
            Out::new(&mut b, "published")
                .str("channel", channel)
                .num("offset", offset)
                .str("epoch", epoch)
                .opt_raw("requestId", request_id)
                .finish();
        }
        WsReply::Subscribed { channel } => {
            let mut o = Out::new(&mut b, "subscribed").str("channel", channel);
            if let Some(page) = g.page {
                let mut pubs = Vec::new();
                publications(&mut pubs, &page.publications);
                o = o
                    .raw("recovered", if page.complete { b"true" } else { b"false" })
                    .num("offset", page.top)
                    .str("epoch", &page.epoch)
                    .raw("publications", &pubs);
            }
            o.opt_raw("requestId", request_id).finish();
        }
        WsReply::History { channel } => {
            response_head(&mut b, dialect, request_id.unwrap_or(b"null"), "history");
            history_page(&mut b, channel, g.page);
            response_tail(&mut b);
        }
    }
    b
}

/// A storage request failed: the error the connection gets (nothing was
/// acknowledged).
pub fn storage_failure(code: ErrorCode, message: &str, request_id: Option<&[u8]>) -> Vec<u8> {
    let mut b = Vec::new();
    crate::proto::error(&mut b, code, message, request_id);
    b
}
