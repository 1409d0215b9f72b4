//! Sensor-data ingestion (M10, seed 000): validation of configured message
//! types and AES-256-GCM field encryption with ring.
//!
//! The pure part: [`prepare`] checks a record's `data` and builds the JSON
//! text the storage writer stores; [`reveal`] is its reverse for the
//! operator (`switchboard decrypt`). The stored format is described in
//! docs/STORAGE.md, "Ingested records and encryption".

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use simd_json::BorrowedValue;
use simd_json::prelude::*;

use crate::config::{FieldType, IngestConfig};

/// The algorithm name stored in `$enc`.
pub const ALG: &str = "A256GCM";

/// The member that marks a sealed value.
pub const ENC_MEMBER: &str = "$enc";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// The keys: the current one (id + key) for sealing, every known one for opening.
pub struct Sealer {
    current: String,
    keys: BTreeMap<String, LessSafeKey>,
    rng: SystemRandom,
}

impl fmt::Debug for Sealer {
    /// Key ids only, never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("current", &self.current)
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A key configuration [`Sealer::from_config`] refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestSetupError {
    /// `ingest.key` or `ingest.old_keys.<kid>` is not 32 bytes of base64.
    BadKey { kid: String },
    /// `ingest.key_id` is empty.
    EmptyKeyId,
    /// `ingest.old_keys` names the current `key_id` with a different key.
    KeyIdConflict { kid: String },
}

impl fmt::Display for IngestSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IngestSetupError::BadKey { kid } => write!(
                f,
                "ingest key {kid:?} must be 32 bytes in base64 (try: head -c32 /dev/urandom | base64)"
            ),
            IngestSetupError::EmptyKeyId => f.write_str("ingest.key_id must not be empty"),
            IngestSetupError::KeyIdConflict { kid } => write!(
                f,
                "ingest.old_keys.{kid} differs from ingest.key although both have id {kid:?}"
            ),
        }
    }
}

impl std::error::Error for IngestSetupError {}

/// Why [`Sealer::seal`] failed (neither happens in practice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    /// The system random source failed to give a nonce.
    Random,
    /// ring refused to encrypt (the value is too long for one GCM message).
    Encrypt { field: String },
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::Random => f.write_str("the system random source failed"),
            SealError::Encrypt { field } => {
                write!(f, "cannot encrypt field {}", quoted(field))
            }
        }
    }
}

impl std::error::Error for SealError {}

/// Why a sealed value (or a stored record) could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The stored text is not JSON.
    StoredNotJson { reason: String },
    /// The stored text is JSON but not an object.
    StoredNotObject,
    /// The value is not a well-formed sealed object (`problem` says what is wrong).
    Malformed {
        field: String,
        problem: &'static str,
    },
    /// `$enc` names an algorithm this build does not know.
    UnsupportedAlgorithm { field: String, alg: String },
    /// No configured key has this id.
    UnknownKey { field: String, kid: String },
    /// Authentication failed: the wrong key under that id, or the nonce,
    /// ciphertext, key id or field name was altered.
    Rejected { field: String, kid: String },
    /// Decryption succeeded but the plaintext is not JSON text.
    PlaintextNotJson { field: String },
    /// A sealed field was found but no key is configured.
    NoKey { field: String },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::StoredNotJson { reason } => {
                write!(f, "stored data is not JSON: {reason}")
            }
            OpenError::StoredNotObject => f.write_str("stored data is not a JSON object"),
            OpenError::Malformed { field, problem } => {
                write!(
                    f,
                    "field {}: malformed sealed value: {problem}",
                    quoted(field)
                )
            }
            OpenError::UnsupportedAlgorithm { field, alg } => write!(
                f,
                "field {}: unsupported algorithm {} (only {ALG})",
                quoted(field),
                quoted(alg)
            ),
            OpenError::UnknownKey { field, kid } => write!(
                f,
                "field {}: sealed under key id {}, which is neither ingest.key_id nor in ingest.old_keys",
                quoted(field),
                quoted(kid)
            ),
            OpenError::Rejected { field, kid } => write!(
                f,
                "field {}: cannot decrypt under key id {}: wrong key for that id, or the record was altered",
                quoted(field),
                quoted(kid)
            ),
            OpenError::PlaintextNotJson { field } => {
                write!(f, "field {}: decrypted value is not JSON", quoted(field))
            }
            OpenError::NoKey { field } => write!(
                f,
                "field {} is encrypted but no ingest.key is configured",
                quoted(field)
            ),
        }
    }
}

impl std::error::Error for OpenError {}

fn aead_key(raw: &[u8; 32], kid: &str) -> Result<LessSafeKey, IngestSetupError> {
    UnboundKey::new(&AES_256_GCM, raw)
        .map(LessSafeKey::new)
        .map_err(|_| IngestSetupError::BadKey {
            kid: kid.to_owned(),
        })
}

impl Sealer {
    /// From config: `None` when no key is configured.
    pub fn from_config(cfg: &IngestConfig) -> Result<Option<Sealer>, IngestSetupError> {
        let Some(current_b64) = &cfg.key else {
            return Ok(None);
        };
        if cfg.key_id.is_empty() {
            return Err(IngestSetupError::EmptyKeyId);
        }
        let bad = |kid: &str| IngestSetupError::BadKey {
            kid: kid.to_owned(),
        };
        let current = crate::config::decode_key(current_b64).ok_or_else(|| bad(&cfg.key_id))?;
        let mut keys = BTreeMap::new();
        for (kid, b64) in &cfg.old_keys {
            let raw = crate::config::decode_key(b64).ok_or_else(|| bad(kid))?;
            if *kid == cfg.key_id {
                if raw != current {
                    return Err(IngestSetupError::KeyIdConflict { kid: kid.clone() });
                }
                continue;
            }
            keys.insert(kid.clone(), aead_key(&raw, kid)?);
        }
        keys.insert(cfg.key_id.clone(), aead_key(&current, &cfg.key_id)?);
        Ok(Some(Sealer {
            current: cfg.key_id.clone(),
            keys,
            rng: SystemRandom::new(),
        }))
    }

    /// The id of the key new values are sealed under.
    pub fn key_id(&self) -> &str {
        &self.current
    }

    /// Encrypt one field's JSON text with AES-256-GCM under the current key,
    /// a fresh random 96-bit nonce, and the field name as AAD. Returns the
    /// JSON object text that replaces the value in storage:
    /// `{"$enc":"A256GCM","kid":"<key id>","nonce":"<base64>","ct":"<base64>"}`
    /// (`ct` is the ciphertext followed by the 16-byte tag).
    pub fn seal(&self, field: &str, plaintext_json: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::with_capacity(64 + self.current.len() + plaintext_json.len() * 4 / 3);
        self.seal_into(field, plaintext_json, &mut out)?;
        Ok(out)
    }

    /// [`Sealer::seal`], appending to `out`.
    fn seal_into(
        &self,
        field: &str,
        plaintext_json: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let key = self
            .keys
            .get(&self.current)
            .ok_or_else(|| SealError::Encrypt {
                field: field.to_owned(),
            })?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = Vec::with_capacity(plaintext_json.len() + AES_256_GCM.tag_len());
        buf.extend_from_slice(plaintext_json);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(field.as_bytes()),
            &mut buf,
        )
        .map_err(|_| SealError::Encrypt {
            field: field.to_owned(),
        })?;
        out.extend_from_slice(b"{\"$enc\":\"");
        out.extend_from_slice(ALG.as_bytes());
        out.extend_from_slice(b"\",\"kid\":");
        write_json_str(out, &self.current);
        out.extend_from_slice(b",\"nonce\":\"");
        out.extend_from_slice(B64.encode(nonce).as_bytes());
        out.extend_from_slice(b"\",\"ct\":\"");
        out.extend_from_slice(B64.encode(&buf).as_bytes());
        out.extend_from_slice(b"\"}");
        Ok(())
    }

    /// Reverse of [`Sealer::seal`] for one sealed object; the key is found
    /// by `kid`. Returns the original JSON text.
    pub fn open(&self, field: &str, sealed: &serde_json::Value) -> Result<Vec<u8>, OpenError> {
        let malformed = |problem: &'static str| OpenError::Malformed {
            field: field.to_owned(),
            problem,
        };
        let obj = sealed
            .as_object()
            .ok_or_else(|| malformed("not a JSON object"))?;
        let alg = obj
            .get(ENC_MEMBER)
            .ok_or_else(|| malformed("no \"$enc\" member"))?
            .as_str()
            .ok_or_else(|| malformed("\"$enc\" is not a string"))?;
        if alg != ALG {
            return Err(OpenError::UnsupportedAlgorithm {
                field: field.to_owned(),
                alg: alg.to_owned(),
            });
        }
        let kid = obj
            .get("kid")
            .and_then(|v| v.as_str())
            .ok_or_else(|| malformed("\"kid\" is missing or not a string"))?;
        let nonce_b64 = obj
            .get("nonce")
            .and_then(|v| v.as_str())
            .ok_or_else(|| malformed("\"nonce\" is missing or not a string"))?;
        let ct_b64 = obj
            .get("ct")
            .and_then(|v| v.as_str())
            .ok_or_else(|| malformed("\"ct\" is missing or not a string"))?;
        let nonce: [u8; NONCE_LEN] = B64
            .decode(nonce_b64)
            .map_err(|_| malformed("\"nonce\" is not base64"))?
            .try_into()
            .map_err(|_| malformed("\"nonce\" is not 12 bytes"))?;
        let mut buf = B64
            .decode(ct_b64)
            .map_err(|_| malformed("\"ct\" is not base64"))?;
        if buf.len() < AES_256_GCM.tag_len() {
            return Err(malformed("\"ct\" is shorter than the 16-byte tag"));
        }
        let key = self.keys.get(kid).ok_or_else(|| OpenError::UnknownKey {
            field: field.to_owned(),
            kid: kid.to_owned(),
        })?;
        let plain_len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(field.as_bytes()),
                &mut buf,
            )
            .map_err(|_| OpenError::Rejected {
                field: field.to_owned(),
                kid: kid.to_owned(),
            })?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

// ---------------------------------------------------------------------------
// Validation and preparation
// ---------------------------------------------------------------------------

/// Why a record is refused (each becomes a client-facing error message naming the fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// `data` is not a JSON object.
    NotAnObject,
    /// Required fields absent from `data` (config order).
    Missing(Vec<String>),
    /// Fields present with another JSON type than configured.
    WrongType(Vec<(String, FieldType)>),
    /// Top-level fields whose value is an object with a `$enc` member: that
    /// shape marks encrypted values in storage, so a client may not send it
    /// in a field that is stored in the clear.
    Reserved(Vec<String>),
    /// Keys that appear more than once in `data`.
    Duplicate(Vec<String>),
}

fn quoted(name: &str) -> String {
    let mut out = Vec::with_capacity(name.len() + 2);
    write_json_str(&mut out, name);
    String::from_utf8_lossy(&out).into_owned()
}

fn type_name(t: FieldType) -> &'static str {
    match t {
        FieldType::String => "a string",
        FieldType::Number => "a number",
        FieldType::Boolean => "a boolean",
        FieldType::Object => "an object",
        FieldType::Array => "an array",
    }
}

fn write_names(f: &mut fmt::Formatter<'_>, names: &[String]) -> fmt::Result {
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(&quoted(n))?;
    }
    Ok(())
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        match self {
            Invalid::NotAnObject => f.write_str("\"data\" must be a JSON object"),
            Invalid::Missing(names) => {
                write!(f, "missing required field{}: ", plural(names.len()))?;
                write_names(f, names)
            }
            Invalid::WrongType(list) => {
                f.write_str("wrong type: ")?;
                for (i, (n, t)) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{} must be {}", quoted(n), type_name(*t))?;
                }
                Ok(())
            }
            Invalid::Reserved(names) => {
                write!(f, "reserved value in field{} ", plural(names.len()))?;
                write_names(f, names)?;
                f.write_str(": objects with a \"$enc\" member mark encrypted values")
            }
            Invalid::Duplicate(names) => {
                write!(f, "duplicate field{}: ", plural(names.len()))?;
                write_names(f, names)
            }
        }
    }
}

impl std::error::Error for Invalid {}

/// Why [`prepare`] produced no record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareError {
    /// The client's data is refused (the message is for the client).
    Invalid(Invalid),
    /// Fields must be encrypted but no key was given (a server bug: config
    /// validation requires a key when `fields_to_encrypt` is set).
    NoKey,
    /// Encryption failed.
    Seal(SealError),
}

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrepareError::Invalid(i) => i.fmt(f),
            PrepareError::NoKey => {
                f.write_str("ingest.fields_to_encrypt is set but no ingest.key is loaded")
            }
            PrepareError::Seal(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PrepareError {}

impl From<Invalid> for PrepareError {
    fn from(i: Invalid) -> Self {
        PrepareError::Invalid(i)
    }
}

impl From<SealError> for PrepareError {
    fn from(e: SealError) -> Self {
        PrepareError::Seal(e)
    }
}

fn has_type(v: &BorrowedValue<'_>, t: FieldType) -> bool {
    match t {
        FieldType::String => v.is_str(),
        FieldType::Number => v.is_number(),
        FieldType::Boolean => v.is_bool(),
        FieldType::Object => v.is_object(),
        FieldType::Array => v.is_array(),
    }
}

/// Validate `data` against `cfg` (required fields and types only when
/// `cfg.validate`; the object shape, repeated keys and the reserved
/// `$enc` shape always), then build the JSON text to store: the object
/// with every field of `cfg.fields_to_encrypt` that is present replaced
/// by its sealed object. Field order is kept as `data` iterates (the
/// parser keeps it for objects of up to 32 keys).
///
/// `raw` is the client's own text of `data`, when the caller has it: the
/// parsed value cannot show every repeated key (over 32 members the
/// parser's map keeps only the last value), the text can.
pub fn prepare(
    cfg: &IngestConfig,
    sealer: Option<&Sealer>,
    data: &BorrowedValue<'_>,
    raw: Option<&[u8]>,
) -> Result<Vec<u8>, PrepareError> {
    let obj = data.as_object().ok_or(Invalid::NotAnObject)?;

    // A record with two values for one name means different things to
    // different readers: refuse it, at every size and depth.
    let dup = match raw.and_then(repeated_keys) {
        Some(dup) => dup,
        None => repeated_parsed_keys(obj),
    };
    if !dup.is_empty() {
        return Err(Invalid::Duplicate(dup).into());
    }

    if cfg.validate {
        let missing: Vec<String> = cfg
            .required_fields
            .iter()
            .filter(|f| !obj.contains_key(f.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Invalid::Missing(missing).into());
        }
        let wrong: Vec<(String, FieldType)> = cfg
            .field_types
            .iter()
            .filter(|(f, t)| obj.get(f.as_str()).is_some_and(|v| !has_type(v, **t)))
            .map(|(f, t)| (f.clone(), *t))
            .collect();
        if !wrong.is_empty() {
            return Err(Invalid::WrongType(wrong).into());
        }
    }

    let encrypt = |k: &str| cfg.fields_to_encrypt.iter().any(|f| f == k);
    let reserved: Vec<String> = obj
        .iter()
        .filter(|(k, v)| !encrypt(k) && v.as_object().is_some_and(|o| o.contains_key(ENC_MEMBER)))
        .map(|(k, _)| k.to_string())
        .collect();
    if !reserved.is_empty() {
        return Err(Invalid::Reserved(reserved).into());
    }

    if !obj.keys().any(|k| encrypt(k)) {
        return Ok(data.encode().into_bytes());
    }
    let sealer = sealer.ok_or(PrepareError::NoKey)?;
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (i, (k, v)) in obj.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(&mut out, k);
        out.push(b':');
        let text = v.encode();
        if encrypt(k) {
            sealer.seal_into(k, text.as_bytes(), &mut out)?;
        } else {
            out.extend_from_slice(text.as_bytes());
        }
    }
    out.push(b'}');
    Ok(out)
}

/// Repeated keys of the parsed top-level object. Only small objects can
/// show them (simd-json keeps repeated keys in objects of up to 32
/// members); the fallback when the text is not at hand.
fn repeated_parsed_keys(obj: &simd_json::borrowed::Object<'_>) -> Vec<String> {
    let mut dup: Vec<String> = Vec::new();
    let keys: Vec<&str> = obj.keys().map(|k| k.as_ref()).collect();
    for (i, k) in keys.iter().enumerate() {
        if keys.get(..i).is_some_and(|before| before.contains(k)) && !dup.iter().any(|d| d == k) {
            dup.push((*k).to_owned());
        }
    }
    dup
}

/// Every key that appears twice in one object of the JSON text `raw`, at
/// any depth (a nested one as `outer.inner`), in order of appearance;
/// keys are compared after unescaping (`"a"` and `"\u0061"` are one key).
/// `None` if serde_json cannot read the text (e.g. nested deeper than its
/// limit of 128): the caller falls back to the parsed value.
pub fn repeated_keys(raw: &[u8]) -> Option<Vec<String>> {
    use serde::de::DeserializeSeed;
    let mut dup = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(raw);
    KeyScan {
        path: "",
        dup: &mut dup,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    Some(dup)
}

/// A serde visitor that walks a JSON value and records repeated keys.
struct KeyScan<'p> {
    path: &'p str,
    dup: &'p mut Vec<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for KeyScan<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyScan<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(KeyScan {
                path: self.path,
                dup: &mut *self.dup,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let full = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            map.next_value_seed(KeyScan {
                path: &full,
                dup: &mut *self.dup,
            })?;
            if !seen.insert(key) && !self.dup.contains(&full) {
                self.dup.push(full);
            }
        }
        Ok(())
    }
}

/// Append `s` as a JSON string literal.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

// ---------------------------------------------------------------------------
// Reveal
// ---------------------------------------------------------------------------

/// A JSON object as its members in stored order, values as raw text.
struct RawObject<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) =
                    map.next_entry::<String, &'de serde_json::value::RawValue>()?
                {
                    members.push((k, v));
                }
                Ok(RawObject(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reverse of [`prepare`] for an operator: decrypt every sealed field (a
/// top-level value that is an object with a `$enc` member) of a stored
/// JSON text, returning plain JSON text. Other values are copied byte for
/// byte and member order is kept.
pub fn reveal(sealer: &Sealer, stored: &str) -> Result<String, OpenError> {
    reveal_with(Some(sealer), stored)
}

/// [`reveal`] when a key may be absent: a record without sealed fields is
/// returned as it is; a sealed field gives [`OpenError::NoKey`].
pub fn reveal_with(sealer: Option<&Sealer>, stored: &str) -> Result<String, OpenError> {
    let trimmed = stored.trim_start();
    if !trimmed.starts_with('{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(stored) {
            Ok(_) => Err(OpenError::StoredNotObject),
            Err(e) => Err(OpenError::StoredNotJson {
                reason: e.to_string(),
            }),
        };
    }
    let RawObject(members) =
        serde_json::from_str(stored).map_err(|e| OpenError::StoredNotJson {
            reason: e.to_string(),
        })?;
    let mut out = Vec::with_capacity(stored.len());
    out.push(b'{');
    for (i, (k, raw)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(&mut out, k);
        out.push(b':');
        let text = raw.get();
        let sealed = if text.starts_with('{') {
            serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .filter(|v| v.get(ENC_MEMBER).is_some())
        } else {
            None
        };
        match sealed {
            None => out.extend_from_slice(text.as_bytes()),
            Some(v) => {
                let sealer = sealer.ok_or_else(|| OpenError::NoKey { field: k.clone() })?;
                let plain = sealer.open(k, &v)?;
                if serde_json::from_slice::<serde::de::IgnoredAny>(&plain).is_err() {
                    return Err(OpenError::PlaintextNotJson { field: k.clone() });
                }
                out.extend_from_slice(&plain);
            }
        }
    }
    out.push(b'}');
    String::from_utf8(out).map_err(|_| OpenError::StoredNotJson {
        reason: "decrypted text is not UTF-8".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64key(byte: u8) -> String {
        B64.encode([byte; 32])
    }

    fn cfg_with(key: u8, kid: &str) -> IngestConfig {
        IngestConfig {
            key: Some(b64key(key)),
            key_id: kid.into(),
            ..IngestConfig::default()
        }
    }

    fn sealer(key: u8, kid: &str) -> Sealer {
        Sealer::from_config(&cfg_with(key, kid)).unwrap().unwrap()
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// `prepare` on JSON text.
    fn prep(cfg: &IngestConfig, s: Option<&Sealer>, data: &str) -> Result<String, PrepareError> {
        let mut bytes = data.as_bytes().to_vec();
        let v = simd_json::to_borrowed_value(&mut bytes).unwrap();
        prepare(cfg, s, &v, Some(data.as_bytes())).map(|out| String::from_utf8(out).unwrap())
    }

    /// Change one member of a sealed object.
    fn with_member(sealed: &serde_json::Value, k: &str, v: &str) -> serde_json::Value {
        let mut s = sealed.clone();
        s[k] = serde_json::Value::String(v.into());
        s
    }

    #[test]
    fn round_trip_for_every_json_type() {
        let s = sealer(1, "k1");
        for v in [
            "25.5",
            "60",
            "-3",
            "1e300",
            "\"text \\\"q\\\" \u{e9} \\u0000\"",
            "\"\"",
            "true",
            "false",
            "null",
            "[1,2.5,\"x\",[],{}]",
            "{\"a\":{\"b\":[1,null]}}",
        ] {
            let sealed = s.seal("value", v.as_bytes()).unwrap();
            let obj = json(&sealed);
            assert_eq!(obj["$enc"], "A256GCM");
            assert_eq!(obj["kid"], "k1");
            assert_eq!(
                B64.decode(obj["nonce"].as_str().unwrap()).unwrap().len(),
                12
            );
            assert_eq!(
                B64.decode(obj["ct"].as_str().unwrap()).unwrap().len(),
                v.len() + 16
            );
            assert_eq!(obj.as_object().unwrap().len(), 4);
            assert_eq!(s.open("value", &obj).unwrap(), v.as_bytes(), "{v}");
        }
    }

    #[test]
    fn kid_is_escaped_in_the_sealed_object() {
        let s = sealer(1, "we\"ird\\id\n");
        let obj = json(&s.seal("f", b"1").unwrap());
        assert_eq!(obj["kid"], "we\"ird\\id\n");
        assert_eq!(s.open("f", &obj).unwrap(), b"1");
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let s = sealer(1, "k1");
        let a = json(&s.seal("f", b"42").unwrap());
        let b = json(&s.seal("f", b"42").unwrap());
        assert_ne!(a["nonce"], b["nonce"]);
        assert_ne!(a["ct"], b["ct"]);
        assert_eq!(s.open("f", &a).unwrap(), s.open("f", &b).unwrap());
    }

    #[test]
    fn wrong_key_tampering_and_swapped_fields_fail() {
        let s = sealer(1, "k1");
        let sealed = json(&s.seal("sensorId", b"\"abc-123\"").unwrap());
        let rejected = |field: &str, kid: &str| OpenError::Rejected {
            field: field.into(),
            kid: kid.into(),
        };

        // The same id with another key.
        let other = sealer(2, "k1");
        assert_eq!(
            other.open("sensorId", &sealed),
            Err(rejected("sensorId", "k1"))
        );

        // Swapped into another field.
        assert_eq!(s.open("value", &sealed), Err(rejected("value", "k1")));

        // One bit of the ciphertext, the tag, or the nonce.
        let ct = B64.decode(sealed["ct"].as_str().unwrap()).unwrap();
        for i in [0, ct.len() - 1] {
            let mut t = ct.clone();
            t[i] ^= 1;
            let bad = with_member(&sealed, "ct", &B64.encode(&t));
            assert_eq!(s.open("sensorId", &bad), Err(rejected("sensorId", "k1")));
        }
        let mut n = B64.decode(sealed["nonce"].as_str().unwrap()).unwrap();
        n[0] ^= 1;
        let bad = with_member(&sealed, "nonce", &B64.encode(&n));
        assert_eq!(s.open("sensorId", &bad), Err(rejected("sensorId", "k1")));

        // Another key id: unknown, or known with another key.
        let bad = with_member(&sealed, "kid", "k9");
        assert_eq!(
            s.open("sensorId", &bad),
            Err(OpenError::UnknownKey {
                field: "sensorId".into(),
                kid: "k9".into()
            })
        );
        let mut cfg = cfg_with(3, "k2");
        cfg.old_keys.insert("k1".into(), b64key(1));
        cfg.old_keys.insert("k0".into(), b64key(4));
        let rotated = Sealer::from_config(&cfg).unwrap().unwrap();
        let bad = with_member(&sealed, "kid", "k0");
        assert_eq!(
            rotated.open("sensorId", &bad),
            Err(rejected("sensorId", "k0"))
        );

        // Malformed members and algorithms.
        let malformed = |v: &serde_json::Value| {
            matches!(s.open("sensorId", v), Err(OpenError::Malformed { .. }))
        };
        assert!(malformed(&with_member(&sealed, "nonce", "!!")));
        assert!(malformed(&with_member(
            &sealed,
            "nonce",
            &B64.encode([0u8; 8])
        )));
        assert!(malformed(&with_member(&sealed, "ct", "%%%")));
        assert!(malformed(&with_member(
            &sealed,
            "ct",
            &B64.encode([0u8; 15])
        )));
        assert!(malformed(&serde_json::json!(42)));
        assert!(malformed(&serde_json::json!({"kid": "k1"})));
        assert!(malformed(&serde_json::json!({"$enc": "A256GCM", "kid": 1})));
        assert_eq!(
            s.open("sensorId", &with_member(&sealed, "$enc", "A128GCM")),
            Err(OpenError::UnsupportedAlgorithm {
                field: "sensorId".into(),
                alg: "A128GCM".into()
            })
        );
        // Still fine after all that.
        assert_eq!(s.open("sensorId", &sealed).unwrap(), b"\"abc-123\"");
    }

    #[test]
    fn rotation_opens_records_sealed_under_old_keys() {
        let old = sealer(1, "k1");
        let before = json(&old.seal("value", b"25.5").unwrap());
        let mut cfg = cfg_with(2, "k2");
        cfg.old_keys.insert("k1".into(), b64key(1));
        let new = Sealer::from_config(&cfg).unwrap().unwrap();
        assert_eq!(new.key_id(), "k2");
        assert_eq!(new.open("value", &before).unwrap(), b"25.5");
        let after = json(&new.seal("value", b"26").unwrap());
        assert_eq!(after["kid"], "k2");
        assert_eq!(new.open("value", &after).unwrap(), b"26");
        // The old sealer does not know k2.
        assert!(matches!(
            old.open("value", &after),
            Err(OpenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn from_config_checks_keys() {
        assert!(
            Sealer::from_config(&IngestConfig::default())
                .unwrap()
                .is_none()
        );
        let mut cfg = cfg_with(1, "k1");
        cfg.key = Some("c2hvcnQ=".into());
        assert_eq!(
            Sealer::from_config(&cfg).unwrap_err(),
            IngestSetupError::BadKey { kid: "k1".into() }
        );
        let mut cfg = cfg_with(1, "k1");
        cfg.old_keys.insert("k0".into(), "nope".into());
        assert_eq!(
            Sealer::from_config(&cfg).unwrap_err(),
            IngestSetupError::BadKey { kid: "k0".into() }
        );
        let mut cfg = cfg_with(1, "");
        cfg.old_keys.clear();
        assert_eq!(
            Sealer::from_config(&cfg).unwrap_err(),
            IngestSetupError::EmptyKeyId
        );
        let mut cfg = cfg_with(1, "k1");
        cfg.old_keys.insert("k1".into(), b64key(2));
        assert_eq!(
            Sealer::from_config(&cfg).unwrap_err(),
            IngestSetupError::KeyIdConflict { kid: "k1".into() }
        );
        // The same key under its own id is harmless.
        cfg.old_keys.insert("k1".into(), b64key(1));
        assert!(Sealer::from_config(&cfg).unwrap().is_some());
        // Debug shows ids, not keys.
        let dbg = format!("{:?}", sealer(1, "k1"));
        assert!(dbg.contains("k1") && !dbg.contains(&b64key(1)), "{dbg}");
    }

    fn validating() -> IngestConfig {
        let mut cfg = IngestConfig {
            required_fields: vec!["timestamp".into(), "sensorId".into(), "value".into()],
            ..IngestConfig::default()
        };
        cfg.field_types.insert("value".into(), FieldType::Number);
        cfg.field_types.insert("sensorId".into(), FieldType::String);
        cfg.field_types.insert("tags".into(), FieldType::Array);
        cfg
    }

    #[test]
    fn prepare_names_missing_fields() {
        let e = prep(&validating(), None, r#"{"sensorId":"s1"}"#).unwrap_err();
        assert_eq!(
            e,
            PrepareError::Invalid(Invalid::Missing(vec!["timestamp".into(), "value".into()]))
        );
        assert_eq!(
            e.to_string(),
            r#"missing required fields: "timestamp", "value""#
        );
        let e = prep(&validating(), None, r#"{"sensorId":"s1","value":1}"#).unwrap_err();
        assert_eq!(e.to_string(), r#"missing required field: "timestamp""#);
        // null counts as present (the seed's `field in data`).
        assert!(
            prep(
                &validating(),
                None,
                r#"{"timestamp":null,"sensorId":"s","value":1}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn prepare_names_wrong_types() {
        let e = prep(
            &validating(),
            None,
            r#"{"timestamp":1,"sensorId":7,"value":"25.5","tags":["a"]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PrepareError::Invalid(Invalid::WrongType(vec![
                ("sensorId".into(), FieldType::String),
                ("value".into(), FieldType::Number),
            ]))
        );
        assert_eq!(
            e.to_string(),
            r#"wrong type: "sensorId" must be a string, "value" must be a number"#
        );
        let e = prep(
            &validating(),
            None,
            r#"{"timestamp":1,"sensorId":"s","value":1,"tags":{}}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), r#"wrong type: "tags" must be an array"#);
    }

    #[test]
    fn prepare_refuses_non_objects_even_without_validation() {
        let mut cfg = validating();
        for v in ["[1,2]", "42", "\"x\"", "null", "true"] {
            for validate in [true, false] {
                cfg.validate = validate;
                assert_eq!(
                    prep(&cfg, None, v),
                    Err(PrepareError::Invalid(Invalid::NotAnObject)),
                    "{v}"
                );
            }
        }
        assert_eq!(
            Invalid::NotAnObject.to_string(),
            "\"data\" must be a JSON object"
        );
    }

    #[test]
    fn validate_false_skips_required_and_types() {
        let mut cfg = validating();
        cfg.validate = false;
        assert_eq!(
            prep(&cfg, None, r#"{"value":"x"}"#).unwrap(),
            r#"{"value":"x"}"#
        );
    }

    #[test]
    fn prepare_refuses_duplicates_and_reserved_shapes() {
        let cfg = IngestConfig {
            fields_to_encrypt: vec!["secret".into()],
            ..IngestConfig::default()
        };
        let s = sealer(1, "k1");
        assert_eq!(
            prep(&cfg, Some(&s), r#"{"value":1,"value":"x"}"#),
            Err(PrepareError::Invalid(Invalid::Duplicate(vec![
                "value".into()
            ])))
        );
        // Over 32 keys the parser's map keeps only the last value: the
        // client's text shows the repetition (issue 11, point 12).
        let big: Vec<String> = (0..40).map(|i| format!("\"f{i}\":{i}")).collect();
        let big = format!("{{{},\"f3\":0}}", big.join(","));
        assert_eq!(
            prep(&cfg, Some(&s), &big),
            Err(PrepareError::Invalid(Invalid::Duplicate(vec!["f3".into()])))
        );
        // Escaped spellings of one key, and repeated keys deeper down.
        assert_eq!(
            prep(&cfg, Some(&s), r#"{"a":1,"\u0061":2}"#),
            Err(PrepareError::Invalid(Invalid::Duplicate(vec!["a".into()])))
        );
        assert_eq!(
            prep(&cfg, Some(&s), r#"{"o":{"x":1,"x":2},"l":[{"y":1,"y":2}]}"#),
            Err(PrepareError::Invalid(Invalid::Duplicate(vec![
                "o.x".into(),
                "l.y".into()
            ])))
        );
        assert_eq!(repeated_keys(br#"{"a":{"b":1},"c":{"b":1}}"#), Some(vec![]));
        assert_eq!(repeated_keys(b"{not json"), None);
        let e = prep(&cfg, Some(&s), r#"{"a":{"$enc":"A256GCM"},"b":1}"#).unwrap_err();
        assert_eq!(
            e,
            PrepareError::Invalid(Invalid::Reserved(vec!["a".into()]))
        );
        assert!(e.to_string().contains("\"a\""), "{e}");
        // Fine in an encrypted field (it is sealed) and nested.
        let out = prep(
            &cfg,
            Some(&s),
            r#"{"secret":{"$enc":"A256GCM"},"b":{"c":{"$enc":1}}}"#,
        )
        .unwrap();
        assert_eq!(
            reveal(&s, &out).unwrap(),
            r#"{"secret":{"$enc":"A256GCM"},"b":{"c":{"$enc":1}}}"#
        );
    }

    #[test]
    fn encryption_replaces_exactly_the_configured_fields() {
        let mut cfg = validating();
        cfg.fields_to_encrypt = vec!["sensorId".into(), "value".into(), "absent".into()];
        cfg.key = Some(b64key(1));
        let s = Sealer::from_config(&cfg).unwrap().unwrap();
        let input = r#"{"timestamp":1712000000123,"sensorId":"s-1","value":25.5,"humidity":60,"loc":{"x":[1,2]},"note":"a\"b"}"#;
        let stored = prep(&cfg, Some(&s), input).unwrap();
        let v = json(stored.as_bytes());
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            ["humidity", "loc", "note", "sensorId", "timestamp", "value"]
        );
        for f in ["sensorId", "value"] {
            assert_eq!(v[f]["$enc"], "A256GCM", "{f}");
            assert_eq!(v[f]["kid"], "k1");
        }
        assert_eq!(v["timestamp"], 1_712_000_000_123u64);
        assert_eq!(v["humidity"], 60);
        assert_eq!(v["loc"], serde_json::json!({"x": [1, 2]}));
        assert!(
            !stored.contains("s-1") && !stored.contains("25.5"),
            "{stored}"
        );
        // Order kept, 25.5 stays 25.5, the whole object comes back.
        assert!(stored.starts_with(r#"{"timestamp":1712000000123,"sensorId":{"$enc""#));
        assert_eq!(reveal(&s, &stored).unwrap(), input);
        assert_eq!(
            json(&s.open("value", &v["value"]).unwrap()),
            serde_json::json!(25.5)
        );
        // Without a key the record is refused, not stored in the clear.
        assert_eq!(prep(&cfg, None, input), Err(PrepareError::NoKey));
        // A record without any of those fields needs no key.
        let mut loose = cfg.clone();
        loose.validate = false;
        assert_eq!(prep(&loose, None, r#"{"h":1.5}"#).unwrap(), r#"{"h":1.5}"#);
    }

    #[test]
    fn reveal_refuses_corrupt_rows_without_panicking() {
        let s = sealer(1, "k1");
        assert!(matches!(
            reveal(&s, "{not json"),
            Err(OpenError::StoredNotJson { .. })
        ));
        assert!(matches!(
            reveal(&s, ""),
            Err(OpenError::StoredNotJson { .. })
        ));
        assert_eq!(reveal(&s, "[1]"), Err(OpenError::StoredNotObject));
        assert_eq!(reveal(&s, " 7 "), Err(OpenError::StoredNotObject));
        assert!(matches!(
            reveal(
                &s,
                r#"{"a":{"$enc":"A256GCM","kid":"k1","nonce":"AAAA","ct":""}}"#
            ),
            Err(OpenError::Malformed { .. })
        ));
        // A sealed field that decrypts to something that is not JSON.
        let bad = s.seal("a", b"{oops").unwrap();
        let stored = format!(r#"{{"a":{}}}"#, String::from_utf8(bad).unwrap());
        assert_eq!(
            reveal(&s, &stored),
            Err(OpenError::PlaintextNotJson { field: "a".into() })
        );
        // No key at all.
        assert_eq!(
            reveal_with(None, &stored),
            Err(OpenError::NoKey { field: "a".into() })
        );
        assert_eq!(reveal_with(None, r#"{"a":1}"#).unwrap(), r#"{"a":1}"#);
        // Escaped keys survive.
        assert_eq!(reveal(&s, r#"{"a\"\n":1}"#).unwrap(), r#"{"a\"\n":1}"#);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        write_json_str(&mut out, "a\"b\\c\n\t\u{1}\u{7f}é");
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\t\\u0001\u{7f}é\"");
        assert_eq!(
            serde_json::from_str::<String>(&s).unwrap(),
            "a\"b\\c\n\t\u{1}\u{7f}é"
        );
    }
}
