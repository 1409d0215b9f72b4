//! The route table: every method and path the API answers, who may call
//! it, and the template matcher. docs/openapi.yaml describes exactly these
//! routes (a test checks both ways).

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Publish,
    Send,
    SendUsers,
    Broadcast,
    Notification,
    UsersConnected,
    UserStatus,
    MeStatus,
    Disconnect,
    Revoke,
    Subscribe,
    Unsubscribe,
    Presence,
    History,
    Status,
    Clients,
    Token,
    Metrics,
    Healthz,
    Readyz,
    Console,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, metrics, the console's static files).
    Public,
    /// Any valid client token (its own status).
    User,
    /// An API key, or a JWT with `role: admin`.
    Admin,
}

pub struct Route {
    pub method: &'static str,
    /// `{name}` matches one path segment (percent-decoded).
    pub path: &'static str,
    pub handler: Handler,
    pub access: Access,
}

const fn r(method: &'static str, path: &'static str, handler: Handler, access: Access) -> Route {
    Route {
        method,
        path,
        handler,
        access,
    }
}

/// Every route. docs/openapi.yaml describes exactly these (a test checks both ways).
pub const ROUTES: &[Route] = &[
    r("POST", "/api/publish", Handler::Publish, Access::Admin),
    r("POST", "/api/send", Handler::Send, Access::Admin),
    r("POST", "/api/broadcast", Handler::Broadcast, Access::Admin),
    r("POST", "/api/revoke", Handler::Revoke, Access::Admin),
    r("POST", "/api/subscribe", Handler::Subscribe, Access::Admin),
    r(
        "POST",
        "/api/unsubscribe",
        Handler::Unsubscribe,
        Access::Admin,
    ),
    r(
        "GET",
        "/api/channels/{channel}/presence",
        Handler::Presence,
        Access::Admin,
    ),
    r(
        "GET",
        "/api/channels/{channel}/history",
        Handler::History,
        Access::Admin,
    ),
    r("GET", "/api/status", Handler::Status, Access::Admin),
    r("GET", "/api/clients", Handler::Clients, Access::Admin),
    r("POST", "/api/token", Handler::Token, Access::Admin),
    // Seed 002, exactly as written there.
    r(
        "POST",
        "/websocket/message/user",
        Handler::Send,
        Access::Admin,
    ),
    r(
        "POST",
        "/websocket/message/users",
        Handler::SendUsers,
        Access::Admin,
    ),
    r(
        "POST",
        "/websocket/message/broadcast",
        Handler::Broadcast,
        Access::Admin,
    ),
    r(
        "POST",
        "/websocket/notification",
        Handler::Notification,
        Access::Admin,
    ),
    r(
        "GET",
        "/websocket/users/connected",
        Handler::UsersConnected,
        Access::Admin,
    ),
    r(
        "GET",
        "/websocket/users/{userId}/status",
        Handler::UserStatus,
        Access::Admin,
    ),
    r(
        "GET",
        "/websocket/me/status",
        Handler::MeStatus,
        Access::User,
    ),
    r(
        "DELETE",
        "/websocket/users/{userId}/disconnect",
        Handler::Disconnect,
        Access::Admin,
    ),
    r("GET", "/metrics", Handler::Metrics, Access::Public),
    r("GET", "/healthz", Handler::Healthz, Access::Public),
    r("GET", "/readyz", Handler::Readyz, Access::Public),
    r("GET", "/", Handler::Console, Access::Public),
    r("GET", "/index.html", Handler::Console, Access::Public),
    r("GET", "/console.js", Handler::Console, Access::Public),
    r("GET", "/console.css", Handler::Console, Access::Public),
];

/// Match `path` against a template; the `{...}` segments, decoded.
fn matches(template: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                params.push(crate::http::handshake::percent_decode_path(ps));
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// The route for a request: Ok((route, params)), or the methods the path has.
pub fn find(method: &str, path: &str) -> Result<(&'static Route, Vec<String>), Vec<&'static str>> {
    let mut allowed = Vec::new();
    for route in ROUTES {
        if let Some(params) = matches(route.path, path) {
            if route.method == method {
                return Ok((route, params));
            }
            allowed.push(route.method);
        }
    }
    Err(allowed)
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_segments() {
        assert_eq!(
            matches(
                "/websocket/users/{userId}/status",
                "/websocket/users/a%3Ab/status"
            ),
            Some(vec!["a:b".to_owned()])
        );
        assert_eq!(
            matches(
                "/websocket/users/{userId}/status",
                "/websocket/users//status"
            ),
            None
        );
        assert_eq!(matches("/api/status", "/api/status/"), None);
        assert!(find("GET", "/api/status").is_ok());
        assert_eq!(find("PUT", "/api/status").err(), Some(vec!["GET"]));
        assert_eq!(find("GET", "/nope").err(), Some(vec![]));
    }
}
