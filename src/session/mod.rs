//! The client protocol on `ws_path` (docs/PROTOCOL.md): the state of one
//! connection ([`Session`]) and a handler per message. Sans-IO: handlers
//! write replies into a [`Replies`] sink and ask their shard for work
//! ([`crate::work::Work`]) through the [`Handling`](crate::env::Handling)
//! context; [`render`] turns the gathered result of that work into the
//! answer.
//!
//! | file | owns |
//! |---|---|
//! | `state.rs` | `Session`, connect parameters, verdicts, close codes, the rate limit, the token's expiry |
//! | `dispatch.rs` | one text message: decode, rate limit, route to its handler |
//! | `auth.rs` | authentication, login, token refresh |
//! | `channels.rs` | subscribe (recovery), unsubscribe, publish |
//! | `direct.rs` | direct messages, the offline inbox, broadcast, acks |
//! | `request.rs` | request/response actions |
//! | `ingest.rs` | sensor-data records |
//! | `reply.rs` | the reply sink and the shared argument checks |
//! | `socketio.rs` | the Socket.IO front end: Engine.IO/Socket.IO packets to native messages, native answers to events and acks |
//! | `sio_state.rs` | a connection's Socket.IO wire state (sid, namespaces, ack ids, binary reassembly) and how a server message is rendered for it |
//! | `render.rs` | answers built from gathered cross-shard results |

mod auth;
mod channels;
mod direct;
mod dispatch;
mod ingest;
mod reply;
mod request;
mod sio_state;
mod socketio;
mod state;

pub mod render;

pub use reply::Replies;
pub use sio_state::SioState;
pub use socketio::close as sio_close;
pub use state::{ConnectParams, FEATURES, FEATURES_NO_STORAGE, Session, TokenStep, Verdict, close};
