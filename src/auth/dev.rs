//! Development tokens: what `switchboard token` and `POST /api/token` sign
//! with the configured keys (or, in mode `token`, the shared token).

use std::str::FromStr;

use jsonwebtoken::Algorithm;

use super::setup::invalid;
use super::{Claims, SigningKeySource, SigningSettings, mint};
use crate::config::{AuthConfig, AuthMode};
use crate::error::StartError;

/// What `switchboard token` puts in a development token.
#[derive(Debug, Clone, Default)]
pub struct DevToken {
    pub sub: String,
    pub channels: Vec<String>,
    pub role: Option<String>,
    pub tenant: Option<String>,
    pub jti: Option<String>,
    pub ttl: std::time::Duration,
    /// Private key PEM for RS*/PS*/ES*/EdDSA; HS* use the configured secret.
    pub private_key: Option<std::path::PathBuf>,
    /// Algorithm; default: the first configured one.
    pub algorithm: Option<String>,
}

/// Sign a token the configured server accepts (or, in mode `token`, print the
/// static token; in mode `none`, say that no token is needed).
pub fn mint_dev_token(cfg: &AuthConfig, t: &DevToken) -> Result<String, StartError> {
    match cfg.mode {
        AuthMode::None => Err(invalid(
            "auth.mode",
            "is \"none\": connect with ?userId=<name>, no token needed",
        )),
        AuthMode::Token => cfg
            .token
            .clone()
            .ok_or_else(|| invalid("auth.token", "is not set")),
        AuthMode::Jwt => {
            let j = &cfg.jwt;
            let alg_name = t
                .algorithm
                .clone()
                .or_else(|| j.algorithms.first().cloned())
                .unwrap_or_else(|| "HS256".into());
            let algorithm = Algorithm::from_str(&alg_name)
                .map_err(|_| invalid("--alg", format!("unknown algorithm {alg_name:?}")))?;
            let key = match (&t.private_key, &j.secret, &j.secret_base64) {
                (Some(path), _, _) => SigningKeySource::Pem(
                    std::fs::read(path)
                        .map_err(|e| invalid("--key", format!("{}: {e}", path.display())))?,
                ),
                (None, Some(s), _) => SigningKeySource::Secret(s.as_bytes().to_vec()),
                (None, None, Some(b)) => {
                    use base64::Engine;
                    SigningKeySource::Secret(
                        base64::engine::general_purpose::STANDARD
                            .decode(b.trim())
                            .map_err(|e| invalid("auth.jwt.secret_base64", e.to_string()))?,
                    )
                }
                (None, None, None) => {
                    return Err(invalid(
                        "--key",
                        "the server verifies with a public key: give the private key PEM with --key",
                    ));
                }
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let claims = Claims {
                sub: t.sub.clone(),
                exp: Some(now + t.ttl.as_secs()),
                nbf: None,
                iat: Some(now),
                iss: j.issuer.clone(),
                aud: j.audience.clone(),
                jti: t.jti.clone(),
                channels: t.channels.clone(),
                role: t.role.clone(),
                tenant: t.tenant.clone(),
            };
            let settings = SigningSettings {
                algorithm,
                key,
                kid: None,
            };
            mint(&settings, &claims).map_err(|e| invalid("auth.jwt", e.to_string()))
        }
    }
}
