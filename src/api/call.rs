//! What a route handler gets besides the request ([`Call`]), what it
//! returns ([`Handled`]), and where its answer goes when it waits on shards.

use crate::auth::Identity;
use crate::env::Handling;
use crate::http::Response;
use crate::work::{ApiReply, Reply};

use super::error::ApiError;
use super::routes::Handler;

/// The outcome of one request.
pub enum Handled {
    Now(Response),
    /// The shard will answer (`later_response`) once its work completes.
    Later,
}

/// What a handler knows of the call besides the request: its route, the
/// caller's identity (for a token), the path parameters.
pub(super) struct Call<'a> {
    pub handler: Handler,
    pub close: bool,
    pub who: Option<Identity>,
    pub params: &'a [String],
}

impl Call<'_> {
    /// Path parameter `i` (decoded), or empty.
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map(String::as_str).unwrap_or_default()
    }

    /// A 200 JSON answer now.
    pub fn ok(&self, body: &[u8]) -> Result<Handled, ApiError> {
        Ok(Handled::Now(Response::json(200, body, self.close)))
    }
}

/// Where the answer to this request goes once its work is done.
pub(super) fn reply(ctx: &Handling<'_>, what: ApiReply, close: bool) -> Reply {
    Reply::api(ctx.asker(), what, close, ctx.now)
}
