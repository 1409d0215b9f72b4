//! Invariant: token verification (JWT with an HMAC secret, JWT with an RSA
//! public key, the static token) never panics on any input, and never
//! accepts a token this target did not sign: the only keys it knows are the
//! ones below, and arbitrary bytes cannot carry a valid signature.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard::auth::{Algorithm, Authenticator, JwtSettings, JwtVerifier, KeySource};

fn verifiers() -> &'static [Authenticator] {
    static V: OnceLock<Vec<Authenticator>> = OnceLock::new();
    V.get_or_init(|| {
        let hs = JwtSettings::new(
            vec![Algorithm::HS256, Algorithm::HS384],
            KeySource::Secret(b"fuzz-secret".to_vec()),
        );
        let rs = JwtSettings::new(
            vec![Algorithm::RS256, Algorithm::PS256],
            KeySource::Pem(include_bytes!("../../src/auth/testdata/rsa_a_public.pem").to_vec()),
        );
        vec![
            Authenticator::Jwt(JwtVerifier::new(hs).expect("hs settings")),
            Authenticator::Jwt(JwtVerifier::new(rs).expect("rs settings")),
            Authenticator::StaticToken("static-fuzz-token".into()),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    for v in verifiers() {
        if let Ok(id) = v.authenticate(token) {
            // Only the static token itself may pass.
            assert!(
                matches!(v, Authenticator::StaticToken(_)) && token == "static-fuzz-token",
                "accepted a forged token for {:?}",
                id.user_id
            );
        }
    }
});
