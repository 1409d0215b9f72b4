//! HTTP/1.1 on the shard loop: the upgrade request parser (sans-IO) and the
//! plain responses sent when a request is not a WebSocket upgrade.

pub mod handshake;

pub use handshake::{HttpError, Request, Response, parse_request};
