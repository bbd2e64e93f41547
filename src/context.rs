//! The per-conversation memory, in two parts: `dialogue` (what the handler
//! remembers of the conversation; never silently lost) and `cache` (derived
//! data the handler can rebuild — company, services, staff, schedule —
//! dropped by invalidation). Both are JSON.
//!
//! Each part is stored on its own as a versioned bincode record holding the
//! JSON text, deflated with flate2: a ~300 KB booking snapshot of repetitive
//! JSON shrinks many times over, and dropping the cache never recompresses
//! the dialogue. Decoding failures are errors for that one conversation,
//! never a crash.
//!
//! A small part (below `DEFLATE_FROM` bytes) is stored as the plain record
//! behind a 0xFF byte: deflate would save a few bytes and cost more CPU to
//! set up than the rest of the turn's encoding. 0xFF cannot begin a deflate
//! stream (its block type bits would be the reserved 11), so the two forms
//! never mix up, and parts stored before this form existed read as before.

use std::io::{Read, Write};

use flate2::{read::DeflateDecoder, write::DeflateEncoder, Compression};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

const FORMAT_VERSION: u8 = 1;
/// Parts smaller than this are stored plain.
const DEFLATE_FROM: usize = 512;
/// Marks a plain record.
const PLAIN: u8 = 0xFF;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("stored context does not inflate: {0}")]
    Inflate(std::io::Error),
    #[error("stored context record is unreadable: {0}")]
    Record(String),
    #[error("stored context has format version {0}, this build reads {FORMAT_VERSION}")]
    Version(u8),
    #[error("stored context is not JSON: {0}")]
    Json(serde_json::Error),
}

/// One part, ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Deflated bincode record.
    pub bytes: Vec<u8>,
    /// Size of the JSON text before compression.
    pub raw_len: u64,
}

/// Decoded borrowing its text from the stored bytes: a damaged length
/// prefix then runs past the end of the bytes and is an error, where an
/// owned `String` would first be allocated at the length it claims (a
/// terabyte aborts the process).
#[derive(Serialize, Deserialize)]
struct Record<'a> {
    version: u8,
    /// JSON text: bincode cannot carry `serde_json::Value` itself (it is self-describing).
    json: &'a str,
}

pub fn encode(value: &Value) -> Encoded {
    encode_json(value.to_string())
}

/// Encodes JSON text as it came (a handler's answer), without building a tree.
pub fn encode_json(json: String) -> Encoded {
    let raw_len = json.len() as u64;
    let record = Record { version: FORMAT_VERSION, json: &json };
    let mut raw = vec![PLAIN];
    bincode::serde::encode_into_std_write(&record, &mut raw, bincode::config::standard())
        .expect("bincode encodes a string record");
    if raw.len() < DEFLATE_FROM {
        return Encoded { bytes: raw, raw_len };
    }
    let raw = &raw[1..];
    let mut z = DeflateEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::default());
    z.write_all(raw).expect("writing to a Vec cannot fail");
    Encoded { bytes: z.finish().expect("writing to a Vec cannot fail"), raw_len }
}

/// The stored JSON as a tree, for code that looks inside it.
pub fn decode(bytes: &[u8]) -> Result<Value, ContextError> {
    serde_json::from_str(&decode_text(bytes)?).map_err(ContextError::Json)
}

/// The stored JSON, checked but not built into a tree: what a turn forwards
/// to its handler and the API returns. Several times cheaper than `decode`
/// for a 300 KB booking snapshot.
pub fn decode_raw(bytes: &[u8]) -> Result<Box<RawValue>, ContextError> {
    RawValue::from_string(decode_text(bytes)?).map_err(ContextError::Json)
}

fn decode_text(bytes: &[u8]) -> Result<String, ContextError> {
    let inflated;
    let raw = match bytes.split_first() {
        Some((&PLAIN, plain)) => plain,
        _ => {
            let mut out = Vec::with_capacity(bytes.len() * 4);
            DeflateDecoder::new(bytes).read_to_end(&mut out).map_err(ContextError::Inflate)?;
            inflated = out;
            &inflated
        }
    };
    let (record, _): (Record, usize) =
        bincode::serde::borrow_decode_from_slice(raw, bincode::config::standard())
            .map_err(|e| ContextError::Record(e.to_string()))?;
    if record.version != FORMAT_VERSION {
        return Err(ContextError::Version(record.version));
    }
    Ok(record.json.to_owned())
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_compression() {
        let services: Vec<Value> = (0..200)
            .map(|i| serde_json::json!({"id": i, "name": "Стрижка мужская", "price": 1500, "duration_min": 45}))
            .collect();
        let value = serde_json::json!({"turns": 3, "services": services});
        let encoded = encode(&value);
        assert_eq!(decode(&encoded.bytes).unwrap(), value);
        assert_eq!(decode_raw(&encoded.bytes).unwrap().get(), value.to_string());
        assert_eq!(encoded.raw_len, value.to_string().len() as u64);
        assert!(encoded.bytes.len() * 5 < value.to_string().len(), "repetitive JSON compresses well");
    }

    #[test]
    fn small_parts_are_stored_plain_and_both_forms_read_back() {
        let small = serde_json::json!({"count": 3});
        let encoded = encode(&small);
        assert_eq!(encoded.bytes[0], PLAIN);
        assert_eq!(decode(&encoded.bytes).unwrap(), small);
        // What earlier builds stored for the same part: a deflate stream.
        let record = Record { version: FORMAT_VERSION, json: &small.to_string() };
        let raw = bincode::serde::encode_to_vec(&record, bincode::config::standard()).unwrap();
        let mut z = DeflateEncoder::new(Vec::new(), Compression::default());
        z.write_all(&raw).unwrap();
        assert_eq!(decode(&z.finish().unwrap()).unwrap(), small);
    }

    #[test]
    fn corruption_is_an_error_not_a_panic() {
        let mut bytes = encode(&serde_json::json!({"a": [1, 2, 3], "b": "text"})).bytes;
        assert!(decode(&bytes[..bytes.len() / 2]).is_err());
        for i in 0..bytes.len() {
            bytes[i] ^= 0xa5;
            let _ = decode_raw(&bytes); // any result but a panic
            bytes[i] ^= 0xa5;
        }
        assert!(decode(b"not deflate at all").is_err());
        // A plain record whose text claims a terabyte: refused, never allocated.
        let mut claims = vec![PLAIN, FORMAT_VERSION, 253];
        claims.extend_from_slice(&(1u64 << 40).to_le_bytes());
        claims.extend_from_slice(b"{}");
        assert!(matches!(decode_raw(&claims), Err(ContextError::Record(_))));
    }
}
