//! Why an API request failed, grouped by who is to blame: the caller
//! (4xx: fix the request, the credentials or the call) or this server (5xx:
//! retry later). Each variant has one stable `code` (docs/API.md).

use crate::http::Response;
use crate::proto;

/// The caller's part: the request, its credentials, or what it asks of
/// this server's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The body is not JSON (400 `bad_json`).
    BadJson,
    /// The body is JSON of the wrong shape (400 `invalid_body`).
    InvalidBody,
    /// A query parameter is malformed (400 `invalid_query`).
    InvalidQuery,
    /// A user id breaks the id rules (400 `invalid_user`).
    InvalidUser,
    /// A channel name breaks the channel rules (400 `invalid_channel`).
    InvalidChannel,
    /// An event type breaks the type rules (400 `invalid_type`).
    InvalidType,
    /// The route needs a user, and an API key has none (400 `no_subject`).
    NoSubject,
    /// No valid API key or token (401 `unauthorized`).
    Unauthorized,
    /// A valid token without the admin role (403 `forbidden`).
    Forbidden,
    /// No such route or file (404 `not_found`).
    NotFound,
    /// The body did not arrive within `handshake_timeout` (408 `body_timeout`).
    BodyTimeout,
    /// The body is larger than the route or the caller may send (413 `too_large`).
    TooLarge,
    /// A POST whose body is not declared `application/json`: what a web
    /// page can send cross-site without asking (415 `unsupported_media_type`).
    UnsupportedMediaType,
    /// Not possible with this server's configuration (409 `not_available`).
    NotAvailable,
    /// The user's inbox has no room the message may take (409 `inbox_full`).
    InboxFull,
    /// Needs storage, and this server stores nothing (409 `storage_disabled`).
    StorageDisabled,
}

/// This server's part: nothing is wrong with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// Graceful shutdown has begun (503 `shutting_down`).
    ShuttingDown,
    /// The storage writer's queue is full (503 `overloaded`).
    Overloaded,
    /// The store failed to commit; nothing was done (500 `storage_error`).
    StorageError,
    /// The database is unreachable and being reconnected (503 `storage_unavailable`, `/readyz`).
    StorageUnavailable,
}

/// A failed request: who is to blame, and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    Caller(Caller, String),
    Server(Server, String),
}

impl ApiError {
    pub fn caller(kind: Caller, message: impl Into<String>) -> Self {
        ApiError::Caller(kind, message.into())
    }

    pub fn server(kind: Server, message: impl Into<String>) -> Self {
        ApiError::Server(kind, message.into())
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::Caller(c, _) => match c {
                Caller::BadJson
                | Caller::InvalidBody
                | Caller::InvalidQuery
                | Caller::InvalidUser
                | Caller::InvalidChannel
                | Caller::InvalidType
                | Caller::NoSubject => 400,
                Caller::Unauthorized => 401,
                Caller::Forbidden => 403,
                Caller::NotFound => 404,
                Caller::BodyTimeout => 408,
                Caller::TooLarge => 413,
                Caller::UnsupportedMediaType => 415,
                Caller::NotAvailable | Caller::StorageDisabled | Caller::InboxFull => 409,
            },
            ApiError::Server(s, _) => match s {
                Server::ShuttingDown | Server::Overloaded | Server::StorageUnavailable => 503,
                Server::StorageError => 500,
            },
        }
    }

    /// The stable error code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Caller(c, _) => match c {
                Caller::BadJson => "bad_json",
                Caller::InvalidBody => "invalid_body",
                Caller::InvalidQuery => "invalid_query",
                Caller::InvalidUser => "invalid_user",
                Caller::InvalidChannel => "invalid_channel",
                Caller::InvalidType => "invalid_type",
                Caller::NoSubject => "no_subject",
                Caller::Unauthorized => "unauthorized",
                Caller::Forbidden => "forbidden",
                Caller::NotFound => "not_found",
                Caller::BodyTimeout => "body_timeout",
                Caller::TooLarge => "too_large",
                Caller::UnsupportedMediaType => "unsupported_media_type",
                Caller::NotAvailable => "not_available",
                Caller::InboxFull => "inbox_full",
                Caller::StorageDisabled => "storage_disabled",
            },
            ApiError::Server(s, _) => match s {
                Server::ShuttingDown => "shutting_down",
                Server::Overloaded => "overloaded",
                Server::StorageError => "storage_error",
                Server::StorageUnavailable => "storage_unavailable",
            },
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ApiError::Caller(_, m) | ApiError::Server(_, m) => m,
        }
    }

    /// `{"error":{"code","message"}}` with the status (and `WWW-Authenticate` on 401).
    pub fn response(&self, close: bool) -> Response {
        let mut b = Vec::new();
        b.extend_from_slice(b"{\"error\":{\"code\":");
        proto::write_str(&mut b, self.code());
        b.extend_from_slice(b",\"message\":");
        proto::write_str(&mut b, self.message());
        b.extend_from_slice(b"}}");
        if self.status() == 401 {
            return Response::with_body(
                401,
                "Unauthorized",
                "application/json",
                &b,
                &[("WWW-Authenticate", "Bearer")],
                close,
            );
        }
        Response::json(self.status(), &b, close)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status(), self.code(), self.message())
    }
}

impl std::error::Error for ApiError {}

/// A 400 for the caller.
pub fn bad(kind: Caller, message: impl Into<String>) -> ApiError {
    ApiError::caller(kind, message)
}
