//! Who is calling: an API key (compared in constant time), or a token
//! verified like a WebSocket login (revocations included), checked
//! against the route's access level.

use crate::auth::{Authenticator, Identity};
use crate::env::Handling;
use crate::http::Request;

use super::error::{ApiError, Caller};
use super::routes::Access;

/// The caller's identity, if the route needs one.
pub(super) fn authorize(
    req: &Request,
    access: Access,
    ctx: &Handling<'_>,
) -> Result<Option<Identity>, ApiError> {
    if access == Access::Public {
        return Ok(None);
    }
    let bearer = req
        .authorization
        .as_deref()
        .and_then(crate::auth::bearer_token);
    let presented = req.api_key.as_deref().or(bearer);
    if access == Access::Admin {
        if let Some(k) = presented
            && ctx
                .env
                .cfg
                .api
                .keys
                .iter()
                .any(|key| same(key.as_bytes(), k.as_bytes()))
        {
            return Ok(None);
        }
        if ctx.env.cfg.api.allow_anonymous {
            return Ok(None);
        }
    }
    let Some(token) = bearer else {
        let message = if access == Access::User {
            "send the user's token (Authorization: Bearer <token>)"
        } else {
            "send an API key (Authorization: Bearer <key> or X-API-Key) or an admin token"
        };
        return Err(ApiError::caller(Caller::Unauthorized, message));
    };
    let identity = match &*ctx.env.auth {
        Authenticator::None => None,
        auth => auth.authenticate(token).ok(),
    };
    // A revoked token is refused here as on a WebSocket connect.
    let identity = identity.filter(|id| !ctx.desk.revoked.covers(id, crate::clock::now_ms()));
    match (access, identity) {
        (_, None) => Err(ApiError::caller(
            Caller::Unauthorized,
            "the API key or token is not valid",
        )),
        (Access::Admin, Some(id)) if id.role.as_deref() != Some("admin") => Err(ApiError::caller(
            Caller::Forbidden,
            "this route needs an API key or a token with role \"admin\"",
        )),
        (_, Some(id)) => Ok(Some(id)),
    }
}

/// Constant-time comparison of a presented key with a configured one.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
