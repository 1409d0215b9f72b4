//! Building the [`Authenticator`] from the `[auth]` configuration: reads key
//! files and names the option at fault when something is wrong.

use std::str::FromStr;

use jsonwebtoken::Algorithm;

use super::{Authenticator, JwtSettings, JwtVerifier, KeySource};
use crate::config::{AuthConfig, AuthMode, ConfigError};
use crate::error::StartError;

pub(super) fn invalid(option: &'static str, message: impl Into<String>) -> StartError {
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
            super::ring_provider::install();
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
