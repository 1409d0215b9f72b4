//! JWT verification and minting on jsonwebtoken + the ring provider.
//!
//! Verification reads the header itself first (before jsonwebtoken does) so
//! that each refusal gets its own [`AuthError`]: `alg: none` and unknown
//! algorithms are reported as such rather than as a JSON error, and the key
//! is chosen here, by `kid` and key type, never by the token alone.

use std::collections::HashSet;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::keys::{self, KeyKind, VerifyKey};
use super::ring_provider;
use super::{AuthError, Identity, JwtSettings, KeySource, SigningKeySource, SigningSettings};

/// Longest token accepted, in bytes. A JWT with a few dozen channel
/// patterns and an RSA-4096 signature is about 2 KiB; 16 KiB leaves room
/// and bounds the work a hostile client can ask for.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Longest leeway honoured, in seconds (one day). Larger values would
/// overflow jsonwebtoken's time arithmetic and mean nothing anyway.
pub const MAX_LEEWAY_SECS: u64 = 24 * 60 * 60;

/// How much of a hostile string (an `alg`, a `kid`) an error message repeats.
const ECHO_LIMIT: usize = 64;

/// Claims for [`mint`]. Verification does not use this type: it reads the
/// claims leniently (see [`super::Identity`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Verifies JWTs against fixed settings. Build once at start; `verify` takes
/// `&self` and is safe to call from every shard.
#[derive(Debug)]
pub struct JwtVerifier {
    keys: Vec<VerifyKey>,
    /// True for JWKS: keys are chosen by `kid`. False: one configured key.
    by_kid: bool,
    /// One `Validation` per accepted algorithm. jsonwebtoken insists that
    /// every algorithm in a `Validation` share the verifying key's family, so
    /// a mixed list (RS256 + ES256 from one JWKS) needs one per algorithm.
    validations: Vec<(Algorithm, Validation)>,
    /// Checked here rather than through jsonwebtoken's required claims, so
    /// that a malformed `exp` is `invalid_claim`, not `missing_expiry`.
    require_exp: bool,
    warnings: Vec<String>,
}

impl JwtVerifier {
    /// Checks the settings and loads the keys. Errors are
    /// [`AuthError::Misconfigured`] with an operator-facing message.
    pub fn new(settings: JwtSettings) -> Result<Self, AuthError> {
        let bad = AuthError::Misconfigured;
        if !ring_provider::install() {
            return Err(bad(
                "another jsonwebtoken crypto provider was installed before ring".into(),
            ));
        }
        let mut algorithms = Vec::new();
        for alg in settings.algorithms {
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        if algorithms.is_empty() {
            return Err(bad("no JWT algorithm is configured".into()));
        }
        let (keys, by_kid, warnings) = match settings.keys {
            KeySource::Secret(secret) => {
                if secret.is_empty() {
                    return Err(bad("the JWT secret is empty".into()));
                }
                let key = VerifyKey {
                    kid: None,
                    alg: None,
                    kind: KeyKind::Hmac,
                    key: jsonwebtoken::DecodingKey::from_secret(&secret),
                };
                (vec![key], false, Vec::new())
            }
            KeySource::Pem(pem) => {
                let key = keys::verify_key_from_pem(&pem).map_err(bad)?;
                (vec![key], false, Vec::new())
            }
            KeySource::Jwks(json) => {
                let (keys, skipped) = keys::verify_keys_from_jwks(&json).map_err(bad)?;
                (keys, true, skipped)
            }
        };
        if !by_kid {
            let kind = keys.first().map(|k| k.kind).unwrap_or(KeyKind::Hmac);
            if let Some(alg) = algorithms.iter().find(|a| !kind.allows(**a)) {
                return Err(bad(format!(
                    "algorithm {alg:?} cannot be used with the configured {kind}"
                )));
            }
        }

        let mut required = HashSet::new();
        if settings.issuer.is_some() {
            required.insert("iss".to_owned());
        }
        if settings.audience.is_some() {
            required.insert("aud".to_owned());
        }
        let validations = algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.required_spec_claims = required.clone();
                v.leeway = settings.leeway_secs.min(MAX_LEEWAY_SECS);
                v.validate_exp = true;
                v.validate_nbf = true;
                if let Some(iss) = &settings.issuer {
                    v.set_issuer(&[iss]);
                }
                match &settings.audience {
                    Some(aud) => v.set_audience(&[aud]),
                    None => v.validate_aud = false,
                }
                (alg, v)
            })
            .collect();
        Ok(JwtVerifier {
            keys,
            by_kid,
            validations,
            require_exp: settings.require_exp,
            warnings,
        })
    }

    /// The accepted algorithms, in configured order.
    pub fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        self.validations.iter().map(|(alg, _)| *alg)
    }

    /// Notes about JWKS keys that were left out (encryption keys,
    /// unsupported types): worth a log line at start.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Verifies `token` and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::MalformedToken(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let header = read_header(token)?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::MalformedToken("the header has no \"alg\" string".into()))?;
        let alg = Algorithm::from_str(alg_name)
            .map_err(|_| AuthError::UnsupportedAlgorithm(format!("{:?}", echo(alg_name))))?;
        let (_, validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .ok_or_else(|| {
                AuthError::UnsupportedAlgorithm(format!("{alg:?} is not an accepted algorithm"))
            })?;
        if header.contains_key("crit") {
            // RFC 7515 4.1.11: unknown critical extensions must be refused,
            // and none are understood here.
            return Err(AuthError::MalformedToken(
                "critical header extensions are not supported".into(),
            ));
        }
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(AuthError::MalformedToken("\"kid\" is not a string".into())),
        };
        let key = self.select_key(alg, kid)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(map_jwt_error)?;
        let identity = identity_from_claims(data.claims)?;
        if self.require_exp && identity.expires_at.is_none() {
            return Err(AuthError::MissingExpiry);
        }
        Ok(identity)
    }

    /// The key for a token: the single configured key, or the JWKS key with
    /// the token's `kid` whose type (and pinned `alg`, if any) fits `alg`.
    fn select_key(&self, alg: Algorithm, kid: Option<&str>) -> Result<&VerifyKey, AuthError> {
        let unfit = |what: String| {
            AuthError::UnsupportedAlgorithm(format!("{alg:?} cannot be verified with {what}"))
        };
        if !self.by_kid {
            return match self.keys.first() {
                Some(key) if key.usable_for(alg) => Ok(key),
                Some(key) => Err(unfit(format!("the configured {}", key.kind))),
                None => Err(AuthError::Misconfigured("no verification key".into())),
            };
        }
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                let Some(first) = named.peek().map(|k| k.kind) else {
                    return Err(AuthError::UnknownKeyId(Some(echo(kid).to_owned())));
                };
                named
                    .find(|k| k.usable_for(alg))
                    .ok_or_else(|| unfit(format!("key {:?} ({first})", echo(kid))))
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.usable_for(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Ok(key),
                    _ => Err(AuthError::UnknownKeyId(None)),
                }
            }
        }
    }
}

/// Splits off and decodes the header: exactly three parts, the header and
/// payload non-empty base64url, the header a JSON object.
fn read_header(token: &str) -> Result<Map<String, Value>, AuthError> {
    let malformed = |why: &str| AuthError::MalformedToken(why.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("a JWT has three parts separated by dots"));
    };
    if header.is_empty() || payload.is_empty() {
        return Err(malformed("empty header or payload"));
    }
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("the header is not base64url"))?;
    match serde_json::from_slice::<Value>(&json) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(malformed("the header is not a JSON object")),
    }
}

/// At most [`ECHO_LIMIT`] characters of `s`, for error messages.
fn echo(s: &str) -> &str {
    match s.char_indices().nth(ECHO_LIMIT) {
        Some((at, _)) => s.get(..at).unwrap_or_default(),
        None => s,
    }
}

/// Maps jsonwebtoken's errors onto ours.
fn map_jwt_error(err: jsonwebtoken::errors::Error) -> AuthError {
    match err.into_kind() {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSubject => AuthError::InvalidClaim("sub".into()),
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => AuthError::MissingExpiry,
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            "sub" => AuthError::MissingSubject,
            _ => AuthError::InvalidClaim(claim),
        },
        ErrorKind::InvalidClaimFormat(claim) => AuthError::InvalidClaim(claim),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => {
            AuthError::UnsupportedAlgorithm("refused by the verifier".into())
        }
        ErrorKind::InvalidToken => AuthError::MalformedToken("not a JWT".into()),
        ErrorKind::Base64(_) => AuthError::MalformedToken("a part is not base64url".into()),
        ErrorKind::Json(e) => AuthError::MalformedToken(format!("bad JSON: {e}")),
        ErrorKind::Utf8(_) => AuthError::MalformedToken("not UTF-8".into()),
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => {
            AuthError::Misconfigured("the verification key was rejected".into())
        }
        ErrorKind::Provider(why) => AuthError::Misconfigured(why),
        ErrorKind::RsaFailedSigning | ErrorKind::Signing(_) => AuthError::InvalidSignature,
        other => AuthError::MalformedToken(format!("{other:?}")),
    }
}

/// Builds the identity from verified claims (see [`Identity`] for the rules).
fn identity_from_claims(mut claims: Map<String, Value>) -> Result<Identity, AuthError> {
    let invalid = |claim: &str| AuthError::InvalidClaim(claim.to_owned());
    let user_id = match claims.remove("sub") {
        None | Some(Value::Null) => return Err(AuthError::MissingSubject),
        Some(Value::String(s)) if s.is_empty() => return Err(AuthError::MissingSubject),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(_) => return Err(invalid("sub")),
    };
    // The same rule as every other place a user id enters (API paths and
    // bodies, `to`, `?userId=`): a user who can log in can be named.
    if !crate::id::valid_id(&user_id) {
        return Err(AuthError::InvalidSubject);
    }
    let mut optional_string = |claim: &str| match claims.remove(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(claim)),
    };
    let role = optional_string("role")?;
    let tenant = optional_string("tenant")?;
    if tenant.as_deref().is_some_and(|t| !crate::id::valid_id(t)) {
        return Err(AuthError::InvalidTenant);
    }
    let token_id = optional_string("jti")?;
    let channels = match claims.remove("channels") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(invalid("channels")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("channels")),
    };
    // jsonwebtoken has already checked that `exp`, when present, is a number.
    let seconds = |v: &Value| match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.round() as u64)),
        _ => None,
    };
    let expires_at = claims.get("exp").and_then(seconds);
    let issued_at = claims.get("iat").and_then(seconds);
    Ok(Identity {
        user_id,
        channels,
        role,
        tenant,
        token_id,
        expires_at,
        issued_at,
    })
}

/// Signs `claims` (any serializable object, usually [`Claims`]) into a JWT:
/// HS* with a secret, RS*/PS*/ES*/EdDSA with a private key PEM. The key type
/// must fit the algorithm (an ES384 token needs a P-384 key).
pub fn mint<C: Serialize>(settings: &SigningSettings, claims: &C) -> Result<String, AuthError> {
    let bad = AuthError::Misconfigured;
    if !ring_provider::install() {
        return Err(bad(
            "another jsonwebtoken crypto provider was installed before ring".into(),
        ));
    }
    let alg = settings.algorithm;
    let (kind, key) = match &settings.key {
        SigningKeySource::Secret(secret) => {
            if secret.is_empty() {
                return Err(bad("the signing secret is empty".into()));
            }
            (KeyKind::Hmac, EncodingKey::from_secret(secret))
        }
        SigningKeySource::Pem(pem) => {
            let signing = keys::signing_key_from_pem(pem).map_err(bad)?;
            (signing.kind, signing.key)
        }
    };
    if !kind.allows(alg) {
        return Err(bad(format!("algorithm {alg:?} cannot sign with a {kind}")));
    }
    let mut header = Header::new(alg);
    header.kid = settings.kid.clone();
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| match e.into_kind() {
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => bad(format!("the {kind} was rejected by ring")),
        other => AuthError::SigningFailed(format!("{other:?}")),
    })
}
