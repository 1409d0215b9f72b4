//! Key material: PEM (read with rustls' `PemObject`), a minimal bounds-checked
//! DER reader for the few structures ring does not parse for us (SPKI,
//! `RSAPublicKey`, SEC1 `ECPrivateKey`, the key inside an X.509 certificate),
//! and JWKS JSON. Every key leaves here tagged with its [`KeyKind`], which
//! decides the algorithms it may verify or sign: that tag is what refuses
//! algorithm confusion (an RSA public key is never an HMAC secret).

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use rustls::pki_types::pem::{PemObject, SectionKind};
use serde_json::Value;

/// The type of a key, which fixes the algorithms it can be used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A shared secret: HS256/384/512 only.
    Hmac,
    /// An RSA key (2048-8192 bits): RS256/384/512 and PS256/384/512.
    Rsa,
    /// An EC key on P-256: ES256 only.
    EcP256,
    /// An EC key on P-384: ES384 only.
    EcP384,
    /// An Ed25519 key: EdDSA only.
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind may be used with `alg`.
    pub fn allows(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Hmac => alg.family() == AlgorithmFamily::Hmac,
            KeyKind::Rsa => alg.family() == AlgorithmFamily::Rsa,
            KeyKind::EcP256 => alg == Algorithm::ES256,
            KeyKind::EcP384 => alg == Algorithm::ES384,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Hmac => "HMAC secret",
            KeyKind::Rsa => "RSA key",
            KeyKind::EcP256 => "EC P-256 key",
            KeyKind::EcP384 => "EC P-384 key",
            KeyKind::Ed25519 => "Ed25519 key",
        })
    }
}

/// A key that verifies tokens.
#[derive(Clone, Debug)]
pub(crate) struct VerifyKey {
    /// The JWK `kid`, if the key came from a JWKS that named it.
    pub kid: Option<String>,
    /// The JWK `alg`, if the JWKS pinned the key to one algorithm.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub key: DecodingKey,
}

impl VerifyKey {
    /// Whether this key may verify a token whose header says `alg`.
    pub fn usable_for(&self, alg: Algorithm) -> bool {
        self.kind.allows(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

/// A key that signs tokens.
pub(crate) struct SignKey {
    pub kind: KeyKind,
    pub key: EncodingKey,
}

// ---- DER -----------------------------------------------------------------

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const CONTEXT_0: u8 = 0xA0;
const CONTEXT_1: u8 = 0xA1;

pub(super) const OID_RSA_ENCRYPTION: &[u8] =
    &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01];
pub(super) const OID_RSASSA_PSS: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0A];
pub(super) const OID_EC_PUBLIC_KEY: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
pub(super) const OID_P256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
pub(super) const OID_P384: &[u8] = &[0x2B, 0x81, 0x04, 0x00, 0x22];
pub(super) const OID_ED25519: &[u8] = &[0x2B, 0x65, 0x70];

/// Reads DER TLVs from a slice. Definite lengths up to 4 bytes; never panics.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn read(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return None;
            }
            let (bytes, rest) = rest.split_at_checked(count)?;
            let len = bytes.iter().try_fold(0usize, |acc, &b| {
                acc.checked_mul(256)?.checked_add(usize::from(b))
            })?;
            (len, rest)
        };
        let (value, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some((tag, value))
    }

    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.read()? {
            (t, value) if t == tag => Some(value),
            _ => None,
        }
    }

    /// Reads the next element only if it has `tag`.
    fn optional(&mut self, tag: u8) -> Option<&'a [u8]> {
        if self.0.first() == Some(&tag) {
            self.expect(tag)
        } else {
            None
        }
    }
}

/// Reads one whole `SEQUENCE` that must fill `der`, and returns its content.
fn outer_sequence(der: &[u8]) -> Option<&[u8]> {
    let mut outer = Der(der);
    let content = outer.expect(SEQUENCE)?;
    outer.0.is_empty().then_some(content)
}

/// Big-endian integer bytes without leading zeros (DER adds one for the sign).
pub(crate) fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

/// (n, e) of a DER `RSAPublicKey`, or of an SPKI holding one; big-endian,
/// without leading zeros.
pub(crate) fn rsa_public_components(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let pkcs1 = match parse_spki(der) {
        Some((SpkiKey::Rsa, key)) => key,
        Some(_) => return None,
        None => der,
    };
    let mut seq = Der(outer_sequence(pkcs1)?);
    let n = strip_leading_zeros(seq.expect(INTEGER)?);
    let e = strip_leading_zeros(seq.expect(INTEGER)?);
    (seq.0.is_empty() && !n.is_empty() && !e.is_empty()).then_some((n, e))
}

/// The private scalar and public point of a SEC1 `ECPrivateKey` (RFC 5915).
pub(crate) fn sec1_private_and_public(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut seq = Der(outer_sequence(der)?);
    if seq.expect(INTEGER)? != [1] {
        return None;
    }
    let private = seq.expect(OCTET_STRING)?;
    let _params = seq.optional(CONTEXT_0);
    let public_bits = Der(seq.optional(CONTEXT_1)?).expect(BIT_STRING)?;
    match public_bits.split_first()? {
        (0, point) => Some((private, point)),
        _ => None,
    }
}

/// The curve named in a SEC1 `ECPrivateKey`'s parameters, if any.
fn sec1_curve(der: &[u8]) -> Option<KeyKind> {
    let mut seq = Der(outer_sequence(der)?);
    seq.expect(INTEGER)?;
    seq.expect(OCTET_STRING)?;
    curve_kind(Der(seq.optional(CONTEXT_0)?).expect(OID)?)
}

fn curve_kind(oid: &[u8]) -> Option<KeyKind> {
    match oid {
        OID_P256 => Some(KeyKind::EcP256),
        OID_P384 => Some(KeyKind::EcP384),
        _ => None,
    }
}

enum SpkiKey {
    Rsa,
    Ec(Option<KeyKind>),
    Ed25519,
    Other,
}

/// Splits a DER `SubjectPublicKeyInfo` into its key type and key bytes.
fn parse_spki(der: &[u8]) -> Option<(SpkiKey, &[u8])> {
    spki_content(outer_sequence(der)?)
}

fn spki_content(content: &[u8]) -> Option<(SpkiKey, &[u8])> {
    let mut seq = Der(content);
    let mut alg_id = Der(seq.expect(SEQUENCE)?);
    let bits = seq.expect(BIT_STRING)?;
    if !seq.0.is_empty() {
        return None;
    }
    let key = match bits.split_first()? {
        (0, key) => key,
        _ => return None,
    };
    let kind = match alg_id.expect(OID)? {
        OID_RSA_ENCRYPTION | OID_RSASSA_PSS => SpkiKey::Rsa,
        OID_EC_PUBLIC_KEY => SpkiKey::Ec(alg_id.expect(OID).and_then(curve_kind)),
        OID_ED25519 => SpkiKey::Ed25519,
        _ => SpkiKey::Other,
    };
    Some((kind, key))
}

/// The SPKI content inside an X.509 certificate.
fn certificate_spki(der: &[u8]) -> Option<&[u8]> {
    let mut cert = Der(outer_sequence(der)?);
    let mut tbs = Der(cert.expect(SEQUENCE)?);
    let _version = tbs.optional(CONTEXT_0);
    tbs.expect(INTEGER)?; // serial
    tbs.expect(SEQUENCE)?; // signature algorithm
    tbs.expect(SEQUENCE)?; // issuer
    tbs.expect(SEQUENCE)?; // validity
    tbs.expect(SEQUENCE)?; // subject
    tbs.expect(SEQUENCE)
}

// ---- checks shared by PEM and JWKS ---------------------------------------

/// ring verifies RSA keys of 2048 to 8192 bits; say so when the key is built
/// instead of failing every signature later.
fn check_rsa_modulus(n: &[u8]) -> Result<(), String> {
    let bits = match n.first() {
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if (2048..=8192).contains(&bits) {
        Ok(())
    } else {
        Err(format!(
            "RSA key has a {bits}-bit modulus; 2048 to 8192 bits are accepted"
        ))
    }
}

fn check_ec_point(kind: KeyKind, point: &[u8]) -> Result<(), String> {
    let len = if kind == KeyKind::EcP384 { 97 } else { 65 };
    if point.len() == len && point.first() == Some(&0x04) {
        Ok(())
    } else {
        Err(format!(
            "{kind} must be an uncompressed point of {len} bytes"
        ))
    }
}

/// A verification key from DER SPKI content (the bytes inside the SEQUENCE).
fn verify_key_from_spki(content: &[u8]) -> Result<VerifyKey, String> {
    let (kind, key) = spki_content(content).ok_or("malformed SubjectPublicKeyInfo")?;
    let (kind, key) = match kind {
        SpkiKey::Rsa => {
            let (n, _) = rsa_public_components(key).ok_or("malformed RSA public key")?;
            check_rsa_modulus(n)?;
            (KeyKind::Rsa, DecodingKey::from_rsa_der(key))
        }
        SpkiKey::Ec(Some(kind)) => {
            check_ec_point(kind, key)?;
            (kind, DecodingKey::from_ec_der(key))
        }
        SpkiKey::Ec(None) => return Err("EC key on a curve other than P-256 or P-384".into()),
        SpkiKey::Ed25519 if key.len() == 32 => (KeyKind::Ed25519, DecodingKey::from_ed_der(key)),
        SpkiKey::Ed25519 => return Err("Ed25519 public key is not 32 bytes".into()),
        SpkiKey::Other => {
            return Err("unsupported public key type (RSA, EC P-256/P-384 or Ed25519)".into());
        }
    };
    Ok(VerifyKey {
        kid: None,
        alg: None,
        kind,
        key,
    })
}

// ---- PEM -----------------------------------------------------------------

/// The body of the first `-----BEGIN <label>-----` block, base64-decoded.
/// Only used for labels rustls' PEM reader skips (`RSA PUBLIC KEY`).
fn pem_block(pem: &[u8], label: &str) -> Option<Result<Vec<u8>, String>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let body = text.get(start..)?;
    let Some(stop) = body.find(&end) else {
        return Some(Err(format!("PEM block {label} has no END line")));
    };
    let b64: String = body
        .get(..stop)?
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("PEM block {label} is not base64: {e}")),
    )
}

/// A verification key from a public key PEM: `PUBLIC KEY` (SPKI: RSA, EC
/// P-256/P-384 or Ed25519), `RSA PUBLIC KEY` (PKCS#1) or `CERTIFICATE` (the
/// certificate's key; the certificate itself is not checked).
pub(crate) fn verify_key_from_pem(pem: &[u8]) -> Result<VerifyKey, String> {
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        let (kind, der) = section.map_err(|e| format!("invalid PEM: {e:?}"))?;
        match kind {
            SectionKind::PublicKey => {
                let content = outer_sequence(&der).ok_or("malformed SubjectPublicKeyInfo")?;
                return verify_key_from_spki(content);
            }
            SectionKind::Certificate => {
                let spki = certificate_spki(&der).ok_or("malformed X.509 certificate")?;
                return verify_key_from_spki(spki);
            }
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return Err(
                    "this PEM holds a private key; configure the matching public key".into(),
                );
            }
            _ => {}
        }
    }
    match pem_block(pem, "RSA PUBLIC KEY") {
        Some(der) => {
            let der = der?;
            let (n, _) = rsa_public_components(&der).ok_or("malformed RSA public key")?;
            check_rsa_modulus(n)?;
            Ok(VerifyKey {
                kid: None,
                alg: None,
                kind: KeyKind::Rsa,
                key: DecodingKey::from_rsa_der(&der),
            })
        }
        None => Err("no PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE block in the PEM".into()),
    }
}

/// A signing key from a private key PEM: `PRIVATE KEY` (PKCS#8: RSA, EC
/// P-256/P-384, Ed25519), `RSA PRIVATE KEY` (PKCS#1) or `EC PRIVATE KEY`
/// (SEC1, with its public key, as OpenSSL writes it).
pub(crate) fn signing_key_from_pem(pem: &[u8]) -> Result<SignKey, String> {
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        let (kind, der) = section.map_err(|e| format!("invalid PEM: {e:?}"))?;
        match kind {
            SectionKind::PrivateKey => return signing_key_from_pkcs8(&der),
            SectionKind::RsaPrivateKey => {
                return Ok(SignKey {
                    kind: KeyKind::Rsa,
                    key: EncodingKey::from_rsa_der(&der),
                });
            }
            SectionKind::EcPrivateKey => {
                let kind = sec1_curve(&der).ok_or("EC private key on an unsupported curve")?;
                return Ok(SignKey {
                    kind,
                    key: EncodingKey::from_ec_der(&der),
                });
            }
            SectionKind::PublicKey | SectionKind::Certificate => {
                return Err("this PEM holds a public key; signing needs the private key".into());
            }
            _ => {}
        }
    }
    Err("no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block in the PEM".into())
}

/// Reads the algorithm of a PKCS#8 `PrivateKeyInfo` and wraps the DER.
pub(crate) fn signing_key_from_pkcs8(der: &[u8]) -> Result<SignKey, String> {
    let malformed = "malformed PKCS#8 private key";
    let mut seq = Der(outer_sequence(der).ok_or(malformed)?);
    seq.expect(INTEGER).ok_or(malformed)?;
    let mut alg_id = Der(seq.expect(SEQUENCE).ok_or(malformed)?);
    let (kind, key) = match alg_id.expect(OID).ok_or(malformed)? {
        OID_RSA_ENCRYPTION => (KeyKind::Rsa, EncodingKey::from_rsa_der(der)),
        OID_EC_PUBLIC_KEY => {
            let kind = alg_id
                .expect(OID)
                .and_then(curve_kind)
                .ok_or("EC private key on a curve other than P-256 or P-384")?;
            (kind, EncodingKey::from_ec_der(der))
        }
        OID_ED25519 => (KeyKind::Ed25519, EncodingKey::from_ed_der(der)),
        _ => return Err("unsupported private key type (RSA, EC P-256/P-384 or Ed25519)".into()),
    };
    Ok(SignKey { kind, key })
}

// ---- JWKS ----------------------------------------------------------------

/// JWK members are base64url; accept them with or without padding.
const JWK_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn jwk_bytes(jwk: &serde_json::Map<String, Value>, member: &str) -> Result<Vec<u8>, String> {
    let text = jwk
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no \"{member}\" string"))?;
    JWK_BASE64
        .decode(text)
        .map_err(|e| format!("\"{member}\" is not base64url: {e}"))
}

/// The keys of a JWKS document that can verify signatures, and a note for
/// each key left out (encryption keys, unsupported types or curves, broken
/// members). A JWKS without a single usable key is an error.
pub(crate) fn verify_keys_from_jwks(json: &str) -> Result<(Vec<VerifyKey>, Vec<String>), String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" array")?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match jwk_to_key(entry) {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("JWKS key {i}: {why}")),
        }
    }
    if keys.is_empty() {
        let mut message = String::from("JWKS holds no usable signature key");
        for note in &skipped {
            message.push_str("; ");
            message.push_str(note);
        }
        return Err(message);
    }
    Ok((keys, skipped))
}

fn jwk_to_key(entry: &Value) -> Result<VerifyKey, String> {
    let jwk = entry.as_object().ok_or("not a JSON object")?;
    let string = |member: &str| -> Result<Option<&str>, String> {
        match jwk.get(member) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("\"{member}\" is not a string")),
        }
    };
    let kid = string("kid")?;
    let label = kid.map(|k| format!("kid {k:?}: ")).unwrap_or_default();
    let fail = |why: String| format!("{label}{why}");
    if let Some(usage) = string("use").map_err(&fail)?
        && usage != "sig"
    {
        return Err(fail(format!("\"use\" is {usage:?}, not \"sig\"")));
    }
    let alg = match string("alg").map_err(&fail)? {
        None => None,
        Some(name) => Some(
            Algorithm::from_str(name).map_err(|_| fail(format!("unsupported \"alg\" {name:?}")))?,
        ),
    };
    let kty = string("kty").map_err(&fail)?.unwrap_or_default();
    let (kind, key) = match kty {
        "RSA" => {
            let n = jwk_bytes(jwk, "n").map_err(&fail)?;
            let e = jwk_bytes(jwk, "e").map_err(&fail)?;
            let (n, e) = (strip_leading_zeros(&n), strip_leading_zeros(&e));
            check_rsa_modulus(n).map_err(&fail)?;
            if e.is_empty() {
                return Err(fail("RSA exponent is zero".into()));
            }
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(n, e))
        }
        "EC" => {
            let kind = match string("crv").map_err(&fail)? {
                Some("P-256") => KeyKind::EcP256,
                Some("P-384") => KeyKind::EcP384,
                other => return Err(fail(format!("unsupported EC curve {other:?}"))),
            };
            let mut point = vec![0x04];
            point.extend(jwk_bytes(jwk, "x").map_err(&fail)?);
            point.extend(jwk_bytes(jwk, "y").map_err(&fail)?);
            check_ec_point(kind, &point).map_err(&fail)?;
            (kind, DecodingKey::from_ec_der(&point))
        }
        "OKP" => match string("crv").map_err(&fail)? {
            Some("Ed25519") => {
                let x = jwk_bytes(jwk, "x").map_err(&fail)?;
                if x.len() != 32 {
                    return Err(fail("Ed25519 \"x\" is not 32 bytes".into()));
                }
                (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
            }
            other => return Err(fail(format!("unsupported OKP curve {other:?}"))),
        },
        "oct" => {
            let k = jwk_bytes(jwk, "k").map_err(&fail)?;
            if k.is_empty() {
                return Err(fail("empty \"k\"".into()));
            }
            (KeyKind::Hmac, DecodingKey::from_secret(&k))
        }
        other => return Err(fail(format!("unsupported \"kty\" {other:?}"))),
    };
    if let Some(alg) = alg
        && !kind.allows(alg)
    {
        return Err(fail(format!("\"alg\" {alg:?} does not fit a {kind}")));
    }
    Ok(VerifyKey {
        kid: kid.map(str::to_owned),
        alg,
        kind,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_reader_refuses_truncation_and_huge_lengths() {
        for junk in [
            &b""[..],
            b"\x30",
            b"\x30\x05\x02\x01",
            b"\x30\x80\x00\x00",
            b"\x30\x85\x01\x00\x00\x00\x00",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x02\x02\x00",
        ] {
            assert!(rsa_public_components(junk).is_none());
            assert!(sec1_private_and_public(junk).is_none());
            assert!(parse_spki(junk).is_none());
            assert!(certificate_spki(junk).is_none());
            assert!(signing_key_from_pkcs8(junk).is_err());
        }
    }

    #[test]
    fn strip_leading_zeros_keeps_the_value() {
        assert_eq!(strip_leading_zeros(&[0, 0, 1, 0]), &[1, 0]);
        assert_eq!(strip_leading_zeros(&[0, 0]), &[] as &[u8]);
        assert_eq!(strip_leading_zeros(&[]), &[] as &[u8]);
    }

    #[test]
    fn rsa_modulus_bounds() {
        assert!(check_rsa_modulus(&[0x80; 256]).is_ok());
        assert!(check_rsa_modulus(&[0x7f; 256]).is_err()); // 2047 bits
        assert!(check_rsa_modulus(&[0xff; 128]).is_err());
        assert!(check_rsa_modulus(&[]).is_err());
        assert!(check_rsa_modulus(&[0xff; 1025]).is_err());
    }

    #[test]
    fn pem_errors_are_messages() {
        assert!(verify_key_from_pem(b"").is_err());
        assert!(verify_key_from_pem(b"-----BEGIN PUBLIC KEY-----\n!!!\n").is_err());
        assert!(verify_key_from_pem(b"-----BEGIN RSA PUBLIC KEY-----\nAAAA\n").is_err());
        assert!(
            verify_key_from_pem(
                b"-----BEGIN RSA PUBLIC KEY-----\n@@\n-----END RSA PUBLIC KEY-----"
            )
            .is_err()
        );
        assert!(
            verify_key_from_pem(b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
        assert!(signing_key_from_pem(b"").is_err());
        assert!(
            signing_key_from_pem(
                b"-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n"
            )
            .is_err()
        );
    }

    #[test]
    fn jwks_errors_are_messages() {
        for doc in [
            "",
            "[]",
            "{}",
            r#"{"keys":{}}"#,
            r#"{"keys":[]}"#,
            r#"{"keys":[1, "x", null]}"#,
            r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AA"}]}"#,
            r#"{"keys":[{"kty":"oct","k":""}]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","use":"enc"}]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"RS256"}]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"none"}]}"#,
            r#"{"keys":[{"kty":"oct","k":"%%%"}]}"#,
            r#"{"keys":[{"kty":5}]}"#,
        ] {
            assert!(verify_keys_from_jwks(doc).is_err(), "{doc}");
        }
        let (keys, skipped) = verify_keys_from_jwks(
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"},{"kty":"RSA-OAEP"}]}"#,
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(skipped.len(), 1);
    }
}
