//! Building the [`Authenticator`] from the `[auth]` configuration: reads key
//! files and names the option at fault when something is wrong.

use std::str::FromStr;

use jsonwebtoken::Algorithm;

use crate::auth::{Authenticator, JwtSettings, JwtVerifier, KeySource};
use crate::config::{AuthConfig, AuthMode, ConfigError};
use crate::error::StartError;

fn invalid(option: &'static str, message: impl Into<String>) -> StartError {
    StartError::Config(ConfigError::Invalid {
        option,
        message: message.into(),
    })
}

pub fn build(cfg: &AuthConfig) -> Result<Authenticator, StartError> {
    match cfg.mode {
        AuthMode::None => Ok(Authenticator::None),
        AuthMode::Token => Ok(Authenticator::StaticToken(
            cfg.token.clone().unwrap_or_default(),
        )),
        AuthMode::Jwt => {
            crate::auth::ring_provider::install();
            let j = &cfg.jwt;
            let mut algorithms = Vec::new();
            for a in &j.algorithms {
                let alg = Algorithm::from_str(a).map_err(|_| {
                    invalid("auth.jwt.algorithms", format!("unknown algorithm {a:?}"))
                })?;
                algorithms.push(alg);
            }
            if algorithms.is_empty() {
                return Err(invalid(
                    "auth.jwt.algorithms",
                    "list at least one algorithm",
                ));
            }
            let keys = match (
                &j.secret,
                &j.secret_base64,
                &j.public_key_file,
                &j.jwks_file,
            ) {
                (Some(s), None, None, None) => KeySource::Secret(s.as_bytes().to_vec()),
                (None, Some(b), None, None) => {
                    use base64::Engine;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .map_err(|e| invalid("auth.jwt.secret_base64", e.to_string()))?;
                    KeySource::Secret(raw)
                }
                (None, None, Some(path), None) => {
                    KeySource::Pem(std::fs::read(path).map_err(|e| {
                        invalid(
                            "auth.jwt.public_key_file",
                            format!("{}: {e}", path.display()),
                        )
                    })?)
                }
                (None, None, None, Some(path)) => {
                    KeySource::Jwks(std::fs::read_to_string(path).map_err(|e| {
                        invalid("auth.jwt.jwks_file", format!("{}: {e}", path.display()))
                    })?)
                }
                _ => {
                    return Err(invalid(
                        "auth.jwt",
                        "set exactly one of secret, secret_base64, public_key_file, jwks_file",
                    ));
                }
            };
            let mut settings = JwtSettings::new(algorithms, keys);
            settings.issuer = j.issuer.clone();
            settings.audience = j.audience.clone();
            settings.leeway_secs = j.leeway.as_secs();
            settings.require_exp = j.require_exp;
            let verifier =
                JwtVerifier::new(settings).map_err(|e| invalid("auth.jwt", e.to_string()))?;
            Ok(Authenticator::Jwt(verifier))
        }
    }
}

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
    use crate::auth::{Claims, SigningKeySource, SigningSettings, mint};
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
