//! Authentication, sans-IO: a token string in, an [`Identity`] or an
//! [`AuthError`] out. The connection code decides where the token comes from
//! (`Authorization: Bearer`, `?token=`, a first `authenticate` message) and
//! what to do with the answer; nothing here touches a socket or a clock
//! other than the system time jsonwebtoken reads for `exp`/`nbf`.
//!
//! Three modes ([`Authenticator`]):
//! - `None` (development): every connection is [`ANONYMOUS_USER_ID`].
//! - `StaticToken`: one shared token (seed 000), compared in constant time;
//!   every holder is [`STATIC_TOKEN_USER_ID`].
//! - `Jwt`: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA,
//!   verified by jsonwebtoken on a ring crypto provider ([`ring_provider`]),
//!   keys from a secret, a public key PEM or a JWKS ([`KeySource`]).
//!
//! Every key is tagged with its type and only verifies the algorithms of that
//! type (HS* with a secret, RS*/PS* with RSA, ES256 with P-256, ES384 with
//! P-384, EdDSA with Ed25519), so a token cannot pick how its key is read:
//! an `HS256` token "signed" with an RSA public key's PEM is refused.
//!
//! [`mint`] signs tokens for the `switchboard token` dev command and tests.

pub mod dev;
mod jwt;
mod keys;
pub mod ring_provider;
pub mod setup;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::OnceLock;

use ring::hmac;

pub use jsonwebtoken::Algorithm;
pub use jwt::{Claims, JwtVerifier, MAX_LEEWAY_SECS, MAX_TOKEN_LEN, mint};
pub use keys::KeyKind;

/// The user id of every connection when authentication is off.
pub const ANONYMOUS_USER_ID: &str = "anonymous";

/// The user id of every connection that presented the shared static token:
/// the token says nothing about who holds it.
pub const STATIC_TOKEN_USER_ID: &str = "static-token";

/// Where the JWT verification keys come from.
#[derive(Clone)]
pub enum KeySource {
    /// A shared HMAC secret (raw bytes): HS256/384/512 only. Must not be empty.
    Secret(Vec<u8>),
    /// A public key PEM: `PUBLIC KEY` (RSA, EC P-256/P-384 or Ed25519),
    /// `RSA PUBLIC KEY`, or a `CERTIFICATE` whose key is used.
    Pem(Vec<u8>),
    /// JWKS JSON text; keys are chosen by the token's `kid`, and by their
    /// `kty`/`crv`/`alg`. Keys marked `"use": "enc"` or of unsupported types
    /// are left out (see [`JwtVerifier::warnings`]).
    Jwks(String),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret([redacted])"),
            KeySource::Pem(pem) => write!(f, "Pem({} bytes)", pem.len()),
            KeySource::Jwks(json) => write!(f, "Jwks({} bytes)", json.len()),
        }
    }
}

/// How JWTs are verified. The server's auth configuration maps onto this.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// Accepted `alg` values. Every one must fit the key for `Secret` and
    /// `Pem` sources (an HS* algorithm with a PEM is a configuration error).
    pub algorithms: Vec<Algorithm>,
    pub keys: KeySource,
    /// When set, `iss` must be present and equal.
    pub issuer: Option<String>,
    /// When set, `aud` must be present and contain it; when unset, `aud` is
    /// not checked at all.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (capped at
    /// [`MAX_LEEWAY_SECS`]).
    pub leeway_secs: u64,
    /// Refuse tokens without `exp`. `exp` and `nbf` are always checked when
    /// present; turning this off accepts tokens that never expire (the
    /// seeds' sample tokens carry only `iat`).
    pub require_exp: bool,
}

impl JwtSettings {
    /// Settings with the defaults: no issuer or audience check, 60 s of
    /// leeway (jsonwebtoken's default), `exp` required.
    pub fn new(algorithms: Vec<Algorithm>, keys: KeySource) -> Self {
        JwtSettings {
            algorithms,
            keys,
            issuer: None,
            audience: None,
            leeway_secs: 60,
            require_exp: true,
        }
    }
}

/// Who a connection is, from its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `sub`: required and non-empty. An integer `sub` is taken in decimal.
    pub user_id: String,
    /// `channels`: the channel patterns the token allows (a string is one
    /// pattern). Empty when the claim is absent: the channel policy decides.
    pub channels: Vec<String>,
    /// `role` (for example `admin`).
    pub role: Option<String>,
    /// `tenant`: the tenant (company) the user belongs to.
    pub tenant: Option<String>,
    /// `jti`: the token id, used for revocation.
    pub token_id: Option<String>,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// `iat`, in seconds since the Unix epoch (a user revocation refuses
    /// tokens issued before it).
    pub issued_at: Option<u64>,
}

impl Identity {
    /// An identity with only a user id.
    pub fn user(user_id: impl Into<String>) -> Self {
        Identity {
            user_id: user_id.into(),
            channels: Vec::new(),
            role: None,
            tenant: None,
            token_id: None,
            expires_at: None,
            issued_at: None,
        }
    }
}

/// Why a token was refused. [`AuthError::code`] is stable and meant for
/// clients; the `Display` text is a human explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was given (or it was empty).
    MissingToken,
    /// Not three base64url parts, a header or payload that is not a JSON
    /// object, or a token longer than [`MAX_TOKEN_LEN`].
    MalformedToken(String),
    /// The header's `alg` is unknown, `none`, not in the configured list, or
    /// does not fit the key the token names.
    UnsupportedAlgorithm(String),
    /// No JWKS key for the token: its `kid` is unknown, or it has no `kid`
    /// and the JWKS does not hold exactly one key for its `alg`.
    UnknownKeyId(Option<String>),
    /// The signature does not verify with the configured key.
    InvalidSignature,
    /// `exp` is in the past, beyond the leeway.
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    WrongIssuer,
    /// `aud` is missing or does not contain the configured audience.
    WrongAudience,
    /// `sub` is missing, null or empty.
    MissingSubject,
    /// `sub` breaks the user id rule ([`crate::id::valid_id`]): the API
    /// could not name that user (revoke, disconnect, send), and with a `:`
    /// it would share channels with another user.
    InvalidSubject,
    /// `tenant` breaks the id rule ([`crate::id::valid_id`]).
    InvalidTenant,
    /// `exp` is missing and [`JwtSettings::require_exp`] is set.
    MissingExpiry,
    /// A claim has the wrong type (`exp` not a number, `channels` not a
    /// string or list of strings, ...). Carries the claim name.
    InvalidClaim(String),
    /// The static token does not match.
    InvalidStaticToken,
    /// The server's auth configuration is unusable (bad key, empty secret,
    /// algorithm that does not fit the key, crypto provider not installed).
    /// The message is for operators; tell clients only the code.
    Misconfigured(String),
    /// Signing a token failed (mint only).
    SigningFailed(String),
}

impl AuthError {
    /// A stable snake_case code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::MalformedToken(_) => "malformed_token",
            AuthError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            AuthError::UnknownKeyId(_) => "unknown_key_id",
            AuthError::InvalidSignature => "invalid_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongIssuer => "invalid_issuer",
            AuthError::WrongAudience => "invalid_audience",
            AuthError::MissingSubject => "missing_subject",
            AuthError::InvalidSubject => "invalid_subject",
            AuthError::InvalidTenant => "invalid_tenant",
            AuthError::MissingExpiry => "missing_expiry",
            AuthError::InvalidClaim(_) => "invalid_claim",
            AuthError::InvalidStaticToken => "invalid_token",
            AuthError::Misconfigured(_) => "auth_misconfigured",
            AuthError::SigningFailed(_) => "signing_failed",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::MissingToken => f.write_str("no authentication token was given"),
            AuthError::MalformedToken(why) => write!(f, "malformed token: {why}"),
            AuthError::UnsupportedAlgorithm(why) => write!(f, "algorithm not accepted: {why}"),
            AuthError::UnknownKeyId(Some(kid)) => {
                write!(f, "no verification key with kid {kid:?}")
            }
            AuthError::UnknownKeyId(None) => f.write_str(
                "the token has no kid and the key set does not hold exactly one key for its algorithm",
            ),
            AuthError::InvalidSignature => f.write_str("the token signature is invalid"),
            AuthError::Expired => f.write_str("the token has expired"),
            AuthError::NotYetValid => f.write_str("the token is not valid yet (nbf)"),
            AuthError::WrongIssuer => f.write_str("the token issuer (iss) is not accepted"),
            AuthError::WrongAudience => f.write_str("the token audience (aud) is not accepted"),
            AuthError::MissingSubject => f.write_str("the token has no subject (sub)"),
            AuthError::InvalidSubject => f.write_str(
                "the subject (sub) is not a valid user id: 1-128 bytes without whitespace, control characters or ':'",
            ),
            AuthError::InvalidTenant => f.write_str(
                "the tenant claim is not a valid id: 1-128 bytes without whitespace, control characters or ':'",
            ),
            AuthError::MissingExpiry => f.write_str("the token has no expiry (exp)"),
            AuthError::InvalidClaim(claim) => write!(f, "the {claim} claim has the wrong type"),
            AuthError::InvalidStaticToken => f.write_str("the token is not valid"),
            AuthError::Misconfigured(why) => write!(f, "authentication is misconfigured: {why}"),
            AuthError::SigningFailed(why) => write!(f, "signing failed: {why}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// The authentication mode, ready to check tokens. Cheap to share behind an
/// `Arc`: checking takes `&self` and no lock.
pub enum Authenticator {
    /// No authentication: every token (or none) gives [`ANONYMOUS_USER_ID`].
    None,
    /// One shared token. An empty configured token refuses everything.
    StaticToken(String),
    Jwt(JwtVerifier),
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authenticator::None => f.write_str("None"),
            Authenticator::StaticToken(_) => f.write_str("StaticToken([redacted])"),
            Authenticator::Jwt(v) => f.debug_tuple("Jwt").field(v).finish(),
        }
    }
}

impl Authenticator {
    /// Checks `token` (the bare token: strip `Bearer ` with [`bearer_token`]).
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        match self {
            Authenticator::None => Ok(Identity::user(ANONYMOUS_USER_ID)),
            Authenticator::StaticToken(expected) => {
                if token.is_empty() {
                    return Err(AuthError::MissingToken);
                }
                if !expected.is_empty() && static_token_matches(expected, token) {
                    Ok(Identity::user(STATIC_TOKEN_USER_ID))
                } else {
                    Err(AuthError::InvalidStaticToken)
                }
            }
            Authenticator::Jwt(verifier) => verifier.verify(token),
        }
    }

    /// Whether a token is needed at all.
    pub fn requires_token(&self) -> bool {
        !matches!(self, Authenticator::None)
    }
}

/// Compares the presented token with the configured one in constant time.
fn static_token_matches(expected: &str, presented: &str) -> bool {
    secrets_equal(expected.as_bytes(), presented.as_bytes())
}

/// Compares a presented secret (token, API key) with a configured one in
/// constant time.
///
/// Both are run through HMAC-SHA256 under a random per-process key and the
/// two tags are compared with ring's `hmac::verify`, which is constant-time
/// (`ring::constant_time` is deprecated). Comparing fixed-size tags means the
/// time does not depend on where the strings differ nor on whether their
/// lengths match; a fold-xor over the raw bytes would have to return early
/// on a length mismatch and so reveal the configured secret's length.
pub fn secrets_equal(expected: &[u8], presented: &[u8]) -> bool {
    static KEY: OnceLock<hmac::Key> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        // The key need not be secret for the comparison to be constant-time;
        // a fixed fallback only matters if the OS refuses random bytes.
        hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| hmac::Key::new(hmac::HMAC_SHA256, b"switchboard static token"))
    });
    let tag = hmac::sign(key, expected);
    hmac::verify(key, presented, tag.as_ref()).is_ok()
}

/// The token of an `Authorization` header value: `Bearer <token>` (scheme
/// case-insensitive, surrounding spaces ignored). `None` for other schemes or
/// an empty token.
pub fn bearer_token(header_value: &str) -> Option<&str> {
    let value = header_value.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The key that [`mint`] signs with.
#[derive(Clone)]
pub enum SigningKeySource {
    /// An HMAC secret: HS256/384/512.
    Secret(Vec<u8>),
    /// A private key PEM: `PRIVATE KEY` (PKCS#8: RSA, EC P-256/P-384,
    /// Ed25519), `RSA PRIVATE KEY` (PKCS#1) or `EC PRIVATE KEY` (SEC1).
    Pem(Vec<u8>),
}

impl fmt::Debug for SigningKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKeySource::Secret(_) => f.write_str("Secret([redacted])"),
            SigningKeySource::Pem(_) => f.write_str("Pem([redacted])"),
        }
    }
}

/// How [`mint`] signs.
#[derive(Clone, Debug)]
pub struct SigningSettings {
    pub algorithm: Algorithm,
    pub key: SigningKeySource,
    /// Written to the header as `kid` (for JWKS verifiers).
    pub kid: Option<String>,
}
