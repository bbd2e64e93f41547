//! The per-conversation memory a turn saves and the next turn reads.
//!
//! A handler's context is JSON; it is stored as a versioned bincode record
//! holding the JSON text, deflated with flate2 (a ~300 KB booking context of
//! repetitive JSON shrinks many times over). Decoding failures are errors for
//! that one conversation, never a crash.

use std::io::{Read, Write};

use flate2::{read::DeflateDecoder, write::DeflateEncoder, Compression};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const FORMAT_VERSION: u8 = 1;

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

/// A context as read back from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub dialogue: Value,
    pub updated_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u8,
    updated_at_ms: u64,
    /// JSON text: bincode cannot carry `serde_json::Value` itself (it is self-describing).
    dialogue: String,
}

pub fn encode(dialogue: &Value, updated_at_ms: u64) -> Vec<u8> {
    let record = Record {
        version: FORMAT_VERSION,
        updated_at_ms,
        dialogue: dialogue.to_string(),
    };
    let raw = bincode::serde::encode_to_vec(&record, bincode::config::standard())
        .expect("bincode encodes a string record");
    let mut z = DeflateEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::default());
    z.write_all(&raw).expect("writing to a Vec cannot fail");
    z.finish().expect("writing to a Vec cannot fail")
}

pub fn decode(bytes: &[u8]) -> Result<Context, ContextError> {
    let mut raw = Vec::with_capacity(bytes.len() * 4);
    DeflateDecoder::new(bytes)
        .read_to_end(&mut raw)
        .map_err(ContextError::Inflate)?;
    let (record, _): (Record, usize) =
        bincode::serde::decode_from_slice(&raw, bincode::config::standard())
            .map_err(|e| ContextError::Record(e.to_string()))?;
    if record.version != FORMAT_VERSION {
        return Err(ContextError::Version(record.version));
    }
    let dialogue = serde_json::from_str(&record.dialogue).map_err(ContextError::Json)?;
    Ok(Context {
        dialogue,
        updated_at_ms: record.updated_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_compression() {
        let services: Vec<Value> = (0..200)
            .map(|i| serde_json::json!({"id": i, "name": "Стрижка мужская", "price": 1500, "duration_min": 45}))
            .collect();
        let dialogue = serde_json::json!({"turns": 3, "services": services});
        let bytes = encode(&dialogue, 42);
        let back = decode(&bytes).unwrap();
        assert_eq!(
            back,
            Context {
                dialogue: dialogue.clone(),
                updated_at_ms: 42
            }
        );
        assert!(
            bytes.len() * 5 < dialogue.to_string().len(),
            "repetitive JSON compresses well"
        );
    }

    #[test]
    fn corruption_is_an_error_not_a_panic() {
        let mut bytes = encode(&serde_json::json!({"a": 1}), 1);
        assert!(decode(&bytes[..bytes.len() / 2]).is_err());
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        assert!(decode(&bytes).is_err());
        assert!(decode(b"not deflate at all").is_err());
    }
}
