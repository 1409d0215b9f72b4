//! The HTTP API for backends and operators (docs/API.md, docs/openapi.yaml),
//! served by the shard loops on the WebSocket port, HTTP/1.1 keep-alive with
//! pipelining (the connection state machine answers requests in order).
//!
//! Sans-IO like the protocol handlers: [`handle`] turns one request into a
//! response now, or into work for the shard ([`crate::work::Work`]) whose
//! gathered result becomes the response later ([`render::later_response`]).
//!
//! | file | owns |
//! |---|---|
//! | `routes.rs` | the route table and the path matcher |
//! | `authorize.rs` | API keys and admin tokens |
//! | `serve.rs` | one request: route, checks, handler |
//! | `call.rs` | what a handler gets (`Call`) and returns (`Handled`) |
//! | `messages.rs` | publish, send, notifications, broadcast |
//! | `admin.rs` | users, clients, disconnect, membership, presence, history, revoke, tokens |
//! | `ops.rs` | health, readiness, metrics, console, status |
//! | `body.rs` | request bodies and parameter checks |
//! | `render.rs` | responses built from gathered results |
//! | `error.rs` | `ApiError`, grouped by who is to blame |

mod admin;
mod authorize;
mod body;
mod call;
mod error;
mod messages;
mod ops;
mod routes;
mod serve;

pub mod render;

pub use call::Handled;
pub use error::{ApiError, Caller, Server};
pub use routes::{Access, Handler, ROUTES, Route, find};
pub use serve::{handle, refuse_body, too_large};
