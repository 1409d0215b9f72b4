//! Work items: plain data a handler (a client's session or an HTTP API
//! request) asks its shard to do once the connection's turn ends, and the
//! answers that come back. Nothing here touches a socket, a shard or a
//! routing table: the session and the API produce these, the shard carries
//! them out (locally, through other shards' inboxes, or through the storage
//! writer) and gives the gathered result to the renderer of the asker's
//! wire format (`session::render` or `api::render`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::InboxConfig;
use crate::history::Page;
use crate::id::ConnId;
use crate::proto::Dialect;
use crate::store::{InboxQuota, Op, Revocation, RevocationKind};

/// Who a delivery is for.
#[derive(Debug, Clone)]
pub enum Audience {
    User(Arc<str>),
    /// Several users (the HTTP API's `/websocket/message/users`).
    Users(Arc<[Arc<str>]>),
    Channel(Arc<str>),
    /// Every authenticated connection.
    All,
}

/// The connection that asked: its slab key on the asking shard and its id
/// (a reused slot has another id, so a late answer is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asker {
    pub key: usize,
    pub conn: ConnId,
}

/// Where the outcome of a cross-shard operation goes, and in which form.
#[derive(Debug, Clone)]
pub struct Reply {
    pub to: Asker,
    pub kind: ReplyKind,
}

/// The two wire formats an answer can take.
#[derive(Debug, Clone)]
pub enum ReplyKind {
    /// A protocol message to a WebSocket client, in its dialect.
    Ws {
        request_id: Option<Vec<u8>>,
        dialect: Dialect,
        what: WsReply,
    },
    /// An HTTP response to an API request.
    Api(Box<ApiPending>),
}

/// The protocol message a WebSocket client gets once the work is done.
#[derive(Debug, Clone)]
pub enum WsReply {
    /// `{"type":"sent","to",...,"connections":n}` after a direct message or broadcast.
    Sent { to: Arc<str> },
    /// `sent` for a message stored in the offline inbox first (`stored`, `id`).
    SentStored { to: Arc<str>, id: i64 },
    /// `{"type":"response","action":"presence",...}`.
    Presence { channel: Arc<str> },
    /// `{"type":"published","channel","offset","epoch"}` once the home shard numbered it.
    Published { channel: Arc<str> },
    /// `subscribed` with the recovery outcome.
    Subscribed { channel: Arc<str> },
    /// `{"type":"response","action":"history",...}`.
    History { channel: Arc<str> },
}

/// An HTTP response started later: which one, and for timing.
#[derive(Debug, Clone)]
pub struct ApiPending {
    pub what: ApiReply,
    /// The request asked for `Connection: close`.
    pub close: bool,
    pub started: Instant,
}

/// HTTP responses built from a cross-shard result.
#[derive(Debug, Clone)]
pub enum ApiReply {
    Published {
        channel: Arc<str>,
    },
    Sent {
        user: Arc<str>,
        stored: Option<i64>,
    },
    SentMany {
        users: usize,
    },
    Broadcast,
    UserStatus {
        user: Arc<str>,
    },
    Disconnected {
        user: Arc<str>,
    },
    Presence {
        channel: Arc<str>,
    },
    History {
        channel: Arc<str>,
    },
    Clients {
        offset: usize,
        limit: usize,
    },
    Membership {
        user: Arc<str>,
        channel: Arc<str>,
        subscribe: bool,
    },
    Revoked {
        kind: RevocationKind,
        value: String,
    },
}

impl Reply {
    /// A protocol reply to WebSocket connection `to`.
    pub fn ws(to: Asker, request_id: Option<&[u8]>, dialect: Dialect, what: WsReply) -> Self {
        Reply {
            to,
            kind: ReplyKind::Ws {
                request_id: request_id.map(<[u8]>::to_vec),
                dialect,
                what,
            },
        }
    }

    /// An HTTP response to the API request on connection `to`.
    pub fn api(to: Asker, what: ApiReply, close: bool, started: Instant) -> Self {
        Reply {
            to,
            kind: ReplyKind::Api(Box::new(ApiPending {
                what,
                close,
                started,
            })),
        }
    }

    /// A direct message was stored in the inbox with `id`: both answers say so.
    pub fn set_stored_id(&mut self, id: i64) {
        match &mut self.kind {
            ReplyKind::Ws {
                what: WsReply::SentStored { id: slot, .. },
                ..
            } => *slot = id,
            ReplyKind::Api(p) => {
                if let ApiReply::Sent { stored, .. } = &mut p.what {
                    *stored = Some(id);
                }
            }
            ReplyKind::Ws { .. } => {}
        }
    }
}

/// A channel publication on its way to the channel's home shard.
#[derive(Debug, Clone)]
pub struct PubEvent {
    /// The publishing user (absent for the HTTP API).
    pub from: Option<Arc<str>>,
    /// The `data` JSON text, verbatim.
    pub data: Box<[u8]>,
}

/// What a shard asks a channel's home shard about its history.
#[derive(Debug, Clone)]
pub enum HistoryQuery {
    /// Everything after `offset` in `epoch` (a subscribe with `since`).
    Recover { offset: u64, epoch: Box<str> },
    /// A page: after `since` (ascending), or the latest `limit`.
    Page { since: Option<u64>, limit: usize },
}

/// What the writer's answer to a storage request is for.
#[derive(Debug)]
pub enum StoreWait {
    /// An ingested record: `ack` to the connection.
    Ingest {
        request_id: Option<Vec<u8>>,
        client_id: Option<String>,
    },
    /// A direct message stored in the recipient's inbox: deliver it with
    /// its id, then answer the sender (the reply gets the id once stored).
    InboxPut {
        to: Arc<str>,
        payload: Box<[u8]>,
        reply: Reply,
    },
    /// A revocation committed: apply it on every shard, then answer.
    Revoke {
        revocation: Arc<Revocation>,
        reply: Option<Reply>,
    },
    /// The user's pending inbox, to deliver to the connection that logged in.
    Inbox,
}

/// A query the API asks every (or some) shards about their connections.
#[derive(Debug, Clone)]
pub enum ShardQuery {
    /// The shard's connections (of one user, or all).
    Clients { user: Option<Arc<str>> },
    /// Close the user's connections with this code.
    Disconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
    },
    /// Server-side subscribe/unsubscribe of the user's connections, with an
    /// optional event (seed 001 `area_added`) sent to each.
    Membership {
        user: Arc<str>,
        channel: Arc<str>,
        subscribe: bool,
        event: Option<Arc<[u8]>>,
    },
    /// Apply a (committed) revocation and count the connections it closed.
    Revoke(Arc<Revocation>),
}

/// One connection, as `/api/clients` and user status show it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: ConnId,
    pub ip: IpAddr,
    pub connected_at_ms: i64,
    pub authenticated: bool,
    pub user: Option<Arc<str>>,
    pub data_received: u32,
    pub subscriptions: u32,
}

/// Work a handler asks the shard to do once the connection's turn ends.
#[derive(Debug)]
pub enum Work {
    /// A pre-encoded frame for an audience, on whatever shards it is.
    Deliver {
        audience: Audience,
        frame: Arc<[u8]>,
        reply: Option<Reply>,
        /// An inbox message id: track for redelivery until acknowledged.
        ack: Option<i64>,
    },
    /// Who is subscribed to a channel, gathered from every shard.
    Presence { channel: Arc<str>, reply: Reply },
    /// A channel publication: numbered by its home shard, then fanned out.
    Publish {
        channel: Arc<str>,
        event: PubEvent,
        reply: Option<Reply>,
    },
    /// Recovery or a history page, answered by the channel's home shard.
    History {
        channel: Arc<str>,
        query: HistoryQuery,
        reply: Reply,
    },
    /// A request for the storage writer; the answer comes back to `to`.
    Store { to: Asker, op: Op, wait: StoreWait },
    /// A client acknowledged inbox message `id`: stop its redeliveries everywhere.
    Acked { user: Arc<str>, id: i64 },
    /// An API query to some shards (`shards` is a bit set).
    Query {
        shards: u64,
        query: ShardQuery,
        reply: Reply,
    },
    /// Store a revocation (when storage is on), then apply it everywhere.
    Revoke {
        revocation: Revocation,
        reply: Option<Reply>,
    },
}

/// What the shards answered for a cross-shard operation.
#[derive(Debug, Default)]
pub struct Gathered<'a> {
    /// Connections reached (or present).
    pub connections: u64,
    pub presence: &'a [(Arc<str>, u32)],
    /// Connections listed by the shards (API client list, user status).
    pub clients: &'a [ClientInfo],
    /// The offset and epoch the home shard gave a publication.
    pub published: Option<(u64, &'a str)>,
    /// A recovery or history page.
    pub page: Option<&'a Page>,
}

impl Work {
    /// Keep a direct message (`event`, a server message for `user`) in the
    /// user's offline inbox; once stored the shard delivers it with its id
    /// (redelivered until acknowledged) and answers `reply` with that id.
    /// `sender` is the sending user (`None`: the backend), for the quotas
    /// and the eviction rule of [`InboxQuota`].
    pub fn store_direct(
        asker: Asker,
        sender: Option<Arc<str>>,
        user: Arc<str>,
        event: Vec<u8>,
        cfg: &InboxConfig,
        reply: Reply,
    ) -> Work {
        let now = crate::clock::now_ms();
        let ttl = i64::try_from(cfg.ttl.as_millis()).unwrap_or(i64::MAX);
        let payload: Box<[u8]> = event.into_boxed_slice();
        Work::Store {
            to: asker,
            op: Op::InboxPut {
                user: user.clone(),
                sender,
                payload: payload.to_vec(),
                created_at_ms: now,
                expires_at_ms: now.saturating_add(ttl),
                quota: InboxQuota {
                    max_per_user: cfg.max_per_user,
                    max_bytes_per_user: cfg.max_bytes_per_user,
                    max_bytes_per_sender: cfg.max_bytes_per_sender,
                },
            },
            wait: StoreWait::InboxPut {
                to: user,
                payload,
                reply,
            },
        }
    }
}
