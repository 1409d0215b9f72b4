//! One request: find its route, check the API is on and who is calling,
//! and hand it to its handler, which answers now or leaves work for the
//! shard whose gathered result becomes the answer ([`super::render`]).

use crate::env::Handling;
use crate::http::{Request, Response};

use super::authorize::authorize;
use super::call::{Call, Handled};
use super::error::{ApiError, Caller};
use super::routes::{Access, Handler, find};
use super::{admin, messages, ops};

/// Before a body of more than `pre_auth_max_bytes` is read: may this
/// caller send it? An answer here (401, 403, 404, 413) is sent at once and
/// the body is never buffered, so a caller without credentials holds at most
/// a head and a small body.
pub fn refuse_body(req: &Request, ctx: &Handling<'_>) -> Option<Response> {
    // The connection closes after a refusal: the unread body follows.
    let close = true;
    let route = match find(&req.method, &req.path) {
        Ok((route, _)) => route,
        Err(_) => {
            let e = ApiError::caller(Caller::NotFound, format!("no route {}", req.path));
            return Some(e.response(close));
        }
    };
    if route.access == Access::Public {
        // Public routes take small bodies only.
        return Some(too_large(ctx.env.cfg.pre_auth_max_bytes, close));
    }
    authorize(req, route.access, ctx)
        .err()
        .map(|e| e.response(close))
}

/// 413 with the limit that applies.
pub fn too_large(limit: usize, close: bool) -> Response {
    let e = ApiError::caller(
        Caller::TooLarge,
        format!("bodies are at most {limit} bytes here"),
    );
    e.response(close)
}

/// Serve one request with its body.
pub fn handle(req: &Request, body: &[u8], ctx: &mut Handling<'_>) -> Handled {
    let close = req.close;
    match serve(req, body, ctx) {
        Ok(h) => h,
        Err(e) => Handled::Now(e.response(close)),
    }
}

fn serve(req: &Request, body: &[u8], ctx: &mut Handling<'_>) -> Result<Handled, ApiError> {
    let close = req.close;
    let (route, params) = match find(&req.method, &req.path) {
        Ok(found) => found,
        Err(allowed) if allowed.is_empty() => {
            return Err(ApiError::caller(
                Caller::NotFound,
                format!("no route {}", req.path),
            ));
        }
        Err(allowed) => {
            let allow = allowed.join(", ");
            return Ok(Handled::Now(Response::with_body(
                405,
                "Method Not Allowed",
                "application/json",
                br#"{"error":{"code":"method_not_allowed","message":"method not allowed on this path"}}"#,
                &[("Allow", &allow)],
                close,
            )));
        }
    };
    let console_off = route.handler == Handler::Console && !ctx.env.cfg.api.console;
    let api_off = route.access != Access::Public && !ctx.env.cfg.api.enabled;
    if console_off || api_off {
        return Err(ApiError::caller(
            Caller::NotFound,
            format!("no route {}", req.path),
        ));
    }
    // A web page can make a browser send a "simple" POST to any site
    // (text/plain, a form, or no type at all) without asking: with
    // `api.allow_anonymous` that would publish. JSON needs a CORS
    // preflight, which this server never grants, so a POST must say JSON.
    if req.method == "POST" && route.access != Access::Public && !req.json_body() {
        return Err(ApiError::caller(
            Caller::UnsupportedMediaType,
            "send the body with Content-Type: application/json",
        ));
    }
    let who = authorize(req, route.access, ctx)?;
    let call = Call {
        handler: route.handler,
        close,
        who,
        params: &params,
    };
    let h = match route.handler {
        Handler::Healthz => ops::healthz,
        Handler::Readyz => ops::readyz,
        Handler::Metrics => ops::metrics,
        Handler::Console => ops::console,
        Handler::Status => ops::status,
        Handler::UsersConnected => admin::users_connected,
        Handler::Publish => messages::publish,
        Handler::Send => messages::send,
        Handler::Notification => messages::notification,
        Handler::SendUsers => messages::send_users,
        Handler::Broadcast => messages::broadcast,
        Handler::UserStatus | Handler::MeStatus => admin::user_status,
        Handler::Clients => admin::clients,
        Handler::Disconnect => admin::disconnect,
        Handler::Subscribe | Handler::Unsubscribe => admin::membership,
        Handler::Presence => admin::presence,
        Handler::History => admin::history,
        Handler::Revoke => admin::revoke,
        Handler::Token => admin::token,
    };
    h(req, body, ctx, &call)
}
