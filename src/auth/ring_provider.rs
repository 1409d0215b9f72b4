//! A `jsonwebtoken` [`CryptoProvider`] backed only by ring.
//!
//! jsonwebtoken 10+ no longer bundles a crypto library: without a provider
//! it compiles, then panics on the first sign or verify. This module is the
//! provider Switchboard installs with [`install`]: HMAC (HS256/384/512),
//! RSA PKCS#1 v1.5 (RS256/384/512) and PSS (PS256/384/512), ECDSA P-256 and
//! P-384 (ES256/ES384) and Ed25519 (EdDSA), all from ring. It mirrors the
//! layout of jsonwebtoken's own `rust_crypto` provider: one signer and one
//! verifier type per family, two factories and the JWK [`KeyUtils`].
//!
//! Key bytes are what jsonwebtoken's key constructors hold:
//! - HMAC: the raw secret.
//! - RSA: a DER `RSAPublicKey` (PKCS#1; an SPKI wrapper is unwrapped too) or
//!   (n, e) components; private keys as PKCS#1 or PKCS#8 DER.
//! - EC: the uncompressed SEC1 point (`04 || x || y`); private keys as PKCS#8
//!   (or SEC1 `ECPrivateKey` with its public key).
//! - Ed25519: the 32-byte public key; private keys as PKCS#8 v1 or v2.
//!
//! Nothing here panics on any input: every failure is a jsonwebtoken error.

use std::sync::OnceLock;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind, Result};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{
    self as sig, EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair, RsaEncoding,
    RsaKeyPair, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm,
};
use ring::{digest, hmac};

use super::keys;

/// The ring-backed provider. Install it with [`install`] rather than directly,
/// so that repeated calls are harmless.
pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: rsa_components_from_public_key,
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_components_from_private_key,
        compute_digest,
    },
};

/// Installs [`RING_PROVIDER`] as jsonwebtoken's process-wide provider. Safe to
/// call any number of times from any thread; the work happens once.
///
/// Returns whether ring is the process default afterwards. It is `false` only
/// if something else claimed the slot first: another provider, or
/// jsonwebtoken's panicking placeholder, which it locks in when a token is
/// signed or verified before any provider was installed. The auth module
/// calls this before every use of jsonwebtoken and refuses to work on `false`.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| match RING_PROVIDER.install_default() {
        Ok(()) => true,
        Err(existing) => std::ptr::eq(existing, &RING_PROVIDER),
    })
}

fn family_mismatch() -> Error {
    ErrorKind::InvalidKeyFormat.into()
}

fn sign_failed() -> signature::Error {
    signature::Error::new()
}

// ---- HMAC ----------------------------------------------------------------

fn hmac_algorithm(alg: Algorithm) -> Option<hmac::Algorithm> {
    match alg {
        Algorithm::HS256 => Some(hmac::HMAC_SHA256),
        Algorithm::HS384 => Some(hmac::HMAC_SHA384),
        Algorithm::HS512 => Some(hmac::HMAC_SHA512),
        _ => None,
    }
}

struct HmacSigner {
    alg: Algorithm,
    key: hmac::Key,
}

impl Signer<Vec<u8>> for HmacSigner {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.key, msg).as_ref().to_vec())
    }
}

impl JwtSigner for HmacSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

struct HmacVerifier {
    alg: Algorithm,
    key: hmac::Key,
}

impl Verifier<Vec<u8>> for HmacVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        // ring compares the tags in constant time.
        hmac::verify(&self.key, msg, signature).map_err(|_| sign_failed())
    }
}

impl JwtVerifier for HmacVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

// ---- RSA -----------------------------------------------------------------

fn rsa_signing(alg: Algorithm) -> Option<&'static dyn RsaEncoding> {
    match alg {
        Algorithm::RS256 => Some(&sig::RSA_PKCS1_SHA256),
        Algorithm::RS384 => Some(&sig::RSA_PKCS1_SHA384),
        Algorithm::RS512 => Some(&sig::RSA_PKCS1_SHA512),
        Algorithm::PS256 => Some(&sig::RSA_PSS_SHA256),
        Algorithm::PS384 => Some(&sig::RSA_PSS_SHA384),
        Algorithm::PS512 => Some(&sig::RSA_PSS_SHA512),
        _ => None,
    }
}

fn rsa_verification(alg: Algorithm) -> Option<&'static RsaParameters> {
    match alg {
        Algorithm::RS256 => Some(&sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => Some(&sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => Some(&sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => Some(&sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => Some(&sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => Some(&sig::RSA_PSS_2048_8192_SHA512),
        _ => None,
    }
}

/// Parses an RSA private key given as PKCS#1 `RSAPrivateKey` or PKCS#8 DER.
fn rsa_key_pair(der: &[u8]) -> Result<RsaKeyPair> {
    RsaKeyPair::from_der(der)
        .or_else(|_| RsaKeyPair::from_pkcs8(der))
        .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()).into())
}

struct RsaSigner {
    alg: Algorithm,
    padding: &'static dyn RsaEncoding,
    key: RsaKeyPair,
}

impl Signer<Vec<u8>> for RsaSigner {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        let mut out = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(self.padding, &SystemRandom::new(), msg, &mut out)
            .map_err(|_| sign_failed())?;
        Ok(out)
    }
}

impl JwtSigner for RsaSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

struct RsaVerifier {
    alg: Algorithm,
    params: &'static RsaParameters,
    /// Big-endian, no leading zeros (what ring's components API expects).
    n: Vec<u8>,
    e: Vec<u8>,
}

impl Verifier<Vec<u8>> for RsaVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        RsaPublicKeyComponents {
            n: self.n.as_slice(),
            e: self.e.as_slice(),
        }
        .verify(self.params, msg, signature)
        .map_err(|_| sign_failed())
    }
}

impl JwtVerifier for RsaVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

// ---- ECDSA and Ed25519 ---------------------------------------------------

fn ecdsa_signing(alg: Algorithm) -> Option<&'static EcdsaSigningAlgorithm> {
    match alg {
        Algorithm::ES256 => Some(&sig::ECDSA_P256_SHA256_FIXED_SIGNING),
        Algorithm::ES384 => Some(&sig::ECDSA_P384_SHA384_FIXED_SIGNING),
        _ => None,
    }
}

/// Parses an EC private key for `alg`: PKCS#8 first, then SEC1 `ECPrivateKey`
/// (which ring takes as a private scalar plus the public point it carries).
fn ecdsa_key_pair(alg: &'static EcdsaSigningAlgorithm, der: &[u8]) -> Result<EcdsaKeyPair> {
    let rng = SystemRandom::new();
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
        return Ok(pair);
    }
    let (private, public) = keys::sec1_private_and_public(der).ok_or(ErrorKind::InvalidEcdsaKey)?;
    EcdsaKeyPair::from_private_key_and_public_key(alg, private, public, &rng)
        .map_err(|_| ErrorKind::InvalidEcdsaKey.into())
}

struct EcdsaSigner {
    alg: Algorithm,
    key: EcdsaKeyPair,
}

impl Signer<Vec<u8>> for EcdsaSigner {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        self.key
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| sign_failed())
    }
}

impl JwtSigner for EcdsaSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

struct Ed25519Signer {
    key: Ed25519KeyPair,
}

impl Signer<Vec<u8>> for Ed25519Signer {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        Ok(self.key.sign(msg).as_ref().to_vec())
    }
}

impl JwtSigner for Ed25519Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

/// ECDSA (fixed-length `r || s` signatures, as JWS uses) and Ed25519: ring
/// verifies both from the raw public key bytes.
struct PublicKeyVerifier {
    alg: Algorithm,
    verification: &'static dyn VerificationAlgorithm,
    key: Vec<u8>,
}

impl Verifier<Vec<u8>> for PublicKeyVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        UnparsedPublicKey::new(self.verification, &self.key)
            .verify(msg, signature)
            .map_err(|_| sign_failed())
    }
}

impl JwtVerifier for PublicKeyVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

// ---- factories -----------------------------------------------------------

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    let alg = *algorithm;
    if key.family() != alg.family() {
        return Err(family_mismatch());
    }
    let bytes = key.as_bytes();
    let signer: Box<dyn JwtSigner> = match alg.family() {
        AlgorithmFamily::Hmac => {
            let h = hmac_algorithm(alg).ok_or(ErrorKind::InvalidAlgorithm)?;
            Box::new(HmacSigner {
                alg,
                key: hmac::Key::new(h, bytes),
            })
        }
        AlgorithmFamily::Rsa => Box::new(RsaSigner {
            alg,
            padding: rsa_signing(alg).ok_or(ErrorKind::InvalidAlgorithm)?,
            key: rsa_key_pair(bytes)?,
        }),
        AlgorithmFamily::Ec => {
            let signing = ecdsa_signing(alg).ok_or(ErrorKind::InvalidAlgorithm)?;
            Box::new(EcdsaSigner {
                alg,
                key: ecdsa_key_pair(signing, bytes)?,
            })
        }
        AlgorithmFamily::Ed => Box::new(Ed25519Signer {
            key: Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes)
                .map_err(|_| ErrorKind::InvalidEddsaKey)?,
        }),
    };
    Ok(signer)
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let alg = *algorithm;
    if key.family() != alg.family() {
        return Err(family_mismatch());
    }
    let verifier: Box<dyn JwtVerifier> = match alg.family() {
        AlgorithmFamily::Hmac => {
            let h = hmac_algorithm(alg).ok_or(ErrorKind::InvalidAlgorithm)?;
            Box::new(HmacVerifier {
                alg,
                key: hmac::Key::new(h, key.try_get_as_bytes()?),
            })
        }
        AlgorithmFamily::Rsa => {
            let params = rsa_verification(alg).ok_or(ErrorKind::InvalidAlgorithm)?;
            let (n, e) = match key.kind() {
                DecodingKeyKind::SecretOrDer(der) => rsa_components_from_public_key(der)?,
                DecodingKeyKind::RsaModulusExponent { n, e } => (
                    keys::strip_leading_zeros(n).to_vec(),
                    keys::strip_leading_zeros(e).to_vec(),
                ),
            };
            Box::new(RsaVerifier { alg, params, n, e })
        }
        AlgorithmFamily::Ec => {
            let (verification, point_len): (&'static dyn VerificationAlgorithm, usize) = match alg {
                Algorithm::ES256 => (&sig::ECDSA_P256_SHA256_FIXED, 65),
                Algorithm::ES384 => (&sig::ECDSA_P384_SHA384_FIXED, 97),
                _ => return Err(ErrorKind::InvalidAlgorithm.into()),
            };
            let point = key.try_get_as_bytes()?;
            if point.len() != point_len || point.first() != Some(&0x04) {
                return Err(ErrorKind::InvalidEcdsaKey.into());
            }
            Box::new(PublicKeyVerifier {
                alg,
                verification,
                key: point.to_vec(),
            })
        }
        AlgorithmFamily::Ed => {
            let raw = key.try_get_as_bytes()?;
            if raw.len() != 32 {
                return Err(ErrorKind::InvalidEddsaKey.into());
            }
            Box::new(PublicKeyVerifier {
                alg,
                verification: &sig::ED25519,
                key: raw.to_vec(),
            })
        }
    };
    Ok(verifier)
}

// ---- key utilities (JWK export and thumbprints) --------------------------

fn rsa_components_from_private_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let pair = rsa_key_pair(der)?;
    let components: RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
    Ok((components.n, components.e))
}

/// ring has no parser for a bare RSA public key, so the DER `RSAPublicKey`
/// (or its SPKI wrapper) is split with the auth module's small DER reader.
fn rsa_components_from_public_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let (n, e) = keys::rsa_public_components(der)
        .ok_or_else(|| ErrorKind::InvalidRsaKey("not a DER RSAPublicKey".into()))?;
    Ok((n.to_vec(), e.to_vec()))
}

fn ec_components_from_private_key(
    der: &[u8],
    alg: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>)> {
    let (curve, signing, coord_len) = match alg {
        Algorithm::ES256 => (
            EllipticCurve::P256,
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            32,
        ),
        Algorithm::ES384 => (
            EllipticCurve::P384,
            &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            48,
        ),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let pair = ecdsa_key_pair(signing, der)?;
    let point = pair.public_key().as_ref();
    match point.split_first() {
        Some((0x04, xy)) if xy.len() == 2 * coord_len => {
            let (x, y) = xy.split_at(coord_len);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn ed_components_from_private_key(der: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>> {
    match curve {
        EllipticCurve::Ed25519 => Ok(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|_| ErrorKind::InvalidEddsaKey)?
            .public_key()
            .as_ref()
            .to_vec()),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &digest::SHA256,
        ThumbprintHash::SHA384 => &digest::SHA384,
        ThumbprintHash::SHA512 => &digest::SHA512,
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(digest::digest(alg, data).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;

    const RSA_A_PRIVATE: &str = include_str!("testdata/rsa_a_private.pem");

    #[test]
    fn install_is_idempotent() {
        assert!(install());
        assert!(install());
        let handles: Vec<_> = (0..4).map(|_| std::thread::spawn(install)).collect();
        for h in handles {
            assert!(h.join().unwrap_or(false));
        }
    }

    #[test]
    fn key_utils_cover_every_family() {
        assert!(install());
        let rng = SystemRandom::new();

        let rsa = keys::signing_key_from_pem(RSA_A_PRIVATE.as_bytes()).unwrap();
        let jwk = Jwk::from_encoding_key(&rsa.key, Algorithm::RS256).unwrap();
        assert!(jwk.thumbprint(ThumbprintHash::SHA256).is_ok());
        let (n, e) = rsa_components_from_private_key(rsa.key.as_bytes()).unwrap();
        assert_eq!(n.len(), 256);
        assert_eq!(e, vec![1, 0, 1]);

        for (alg, signing, curve) in [
            (
                Algorithm::ES256,
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                EllipticCurve::P256,
            ),
            (
                Algorithm::ES384,
                &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                EllipticCurve::P384,
            ),
        ] {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
            let (c, x, y) = ec_components_from_private_key(pkcs8.as_ref(), alg).unwrap();
            assert_eq!(c, curve);
            assert_eq!(x.len(), y.len());
            // The wrong curve for the key is an error, not a panic.
            let other = if alg == Algorithm::ES256 {
                Algorithm::ES384
            } else {
                Algorithm::ES256
            };
            assert!(ec_components_from_private_key(pkcs8.as_ref(), other).is_err());
        }

        let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let x = ed_components_from_private_key(ed.as_ref(), &EllipticCurve::Ed25519).unwrap();
        assert_eq!(x.len(), 32);
        assert!(ed_components_from_private_key(ed.as_ref(), &EllipticCurve::P256).is_err());

        for h in [
            ThumbprintHash::SHA256,
            ThumbprintHash::SHA384,
            ThumbprintHash::SHA512,
        ] {
            assert!(!compute_digest(b"abc", h).unwrap().is_empty());
        }
    }

    #[test]
    fn garbage_keys_are_errors() {
        for junk in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"not a key at all",
        ] {
            assert!(rsa_components_from_private_key(junk).is_err());
            assert!(rsa_components_from_public_key(junk).is_err());
            assert!(ec_components_from_private_key(junk, Algorithm::ES256).is_err());
            assert!(ed_components_from_private_key(junk, &EllipticCurve::Ed25519).is_err());
            for alg in [
                Algorithm::RS256,
                Algorithm::PS512,
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::EdDSA,
            ] {
                let enc = match alg.family() {
                    AlgorithmFamily::Rsa => EncodingKey::from_rsa_der(junk),
                    AlgorithmFamily::Ec => EncodingKey::from_ec_der(junk),
                    _ => EncodingKey::from_ed_der(junk),
                };
                assert!(new_signer(&alg, &enc).is_err());
                let dec = match alg.family() {
                    AlgorithmFamily::Rsa => DecodingKey::from_rsa_der(junk),
                    AlgorithmFamily::Ec => DecodingKey::from_ec_der(junk),
                    _ => DecodingKey::from_ed_der(junk),
                };
                // Building may fail or succeed (ring parses lazily); verifying must fail.
                if let Ok(v) = new_verifier(&alg, &dec) {
                    assert!(v.verify(b"msg", &vec![0u8; 64]).is_err());
                }
            }
        }
        // A key of one family never builds a signer or verifier of another.
        let secret = DecodingKey::from_secret(b"secret");
        assert!(new_verifier(&Algorithm::RS256, &secret).is_err());
        let rsa_as_secret = EncodingKey::from_secret(RSA_A_PRIVATE.as_bytes());
        assert!(new_signer(&Algorithm::RS256, &rsa_as_secret).is_err());
    }
}
