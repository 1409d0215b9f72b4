//! Sensor-data ingestion (M10, seed 000): validation of configured message
//! types and AES-256-GCM field encryption with ring.

use base64::Engine;

/// A 32-byte AES-256 key from base64 (standard or URL-safe alphabet).
pub fn decode_key(b64: &str) -> Option<[u8; 32]> {
    let b64 = b64.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
        .ok()?;
    bytes.try_into().ok()
}
