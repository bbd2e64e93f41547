//! The context codec, fuzzed: any JSON comes back as the same text (plain
//! below `DEFLATE_FROM`, deflated above), and whatever bytes the store hands
//! back — arbitrary, or a real part damaged — decode to a typed error or to
//! checked JSON, never a panic or an abort.

use proptest::prelude::*;
use serde_json::Value;

use super::{decode, decode_raw, encode, encode_json, ContextError, DEFLATE_FROM, FORMAT_VERSION, PLAIN};
use crate::ingest::fuzz::{config, json_value};

const KEYS: &[&str] = &["turns", "services", "id", "name", "price", "staff", "schedule", "messages", "role"];

/// Any JSON, and some that is long and repetitive like a booking snapshot.
fn context() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => json_value(KEYS),
        1 => (json_value(KEYS), 0..300usize).prop_map(|(item, n)| Value::Array(vec![item; n])),
    ]
}

/// Bytes as a damaged store might hold them: anything, a plain record's
/// marker before anything, or a plain record whose text claims a length
/// it does not have (up to a terabyte and past `usize`).
fn stored_bytes() -> impl Strategy<Value = Vec<u8>> {
    let any_bytes = proptest::collection::vec(any::<u8>(), 0..1024);
    prop_oneof![
        any_bytes.clone(),
        any_bytes.clone().prop_map(|b| [&[PLAIN][..], &b].concat()),
        (any::<u64>(), any_bytes)
            .prop_map(|(len, b)| { [&[PLAIN, FORMAT_VERSION, 253][..], &len.to_le_bytes(), &b].concat() }),
    ]
}

/// A real part with `flips` (index, xor) done to its bytes.
fn damaged(value: &Value, flips: &[(usize, u8)]) -> Vec<u8> {
    let mut bytes = encode(value).bytes;
    for &(at, xor) in flips {
        let len = bytes.len();
        bytes[at % len] ^= xor.max(1);
    }
    bytes
}

/// What a decode may answer: checked JSON, or an error of the codec's own.
fn assert_typed(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode_raw(bytes) {
        // JSON by its grammar, which is what `decode_raw` checks: a number
        // such as `1e00000000000000000` is that, and out of `Value`'s range.
        Ok(raw) => prop_assert!(serde_json::from_str::<serde::de::IgnoredAny>(raw.get()).is_ok()),
        Err(ContextError::Inflate(_)) => {
            prop_assert!(bytes.first() != Some(&PLAIN), "a plain record is not inflated")
        }
        Err(ContextError::Record(_) | ContextError::Version(_) | ContextError::Json(_)) => {}
    }
    let _ = decode(bytes);
    Ok(())
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn context_round_trips_any_json_as_its_text(value in context()) {
        let text = value.to_string();
        let encoded = encode(&value);
        prop_assert_eq!(encoded.raw_len, text.len() as u64);
        // Plain (behind its marker) while the record — marker, version,
        // the text's varint length, the text — is small; deflated from then on.
        let varint = match text.len() { 0..=250 => 1, 251..=65_535 => 3, _ => 5 };
        prop_assert_eq!(encoded.bytes[0] == PLAIN, 2 + varint + text.len() < DEFLATE_FROM);
        let raw = decode_raw(&encoded.bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(raw.get(), text.as_str());
        let tree: Value = serde_json::from_str(&text).expect("serde_json reads its own text");
        prop_assert_eq!(decode(&encoded.bytes).map_err(|e| TestCaseError::fail(e.to_string()))?, tree);
    }

    #[test]
    fn context_keeps_a_handlers_json_text_byte_for_byte(value in context()) {
        let text = serde_json::to_string_pretty(&value).expect("JSON");
        let encoded = encode_json(text.clone());
        let raw = decode_raw(&encoded.bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(raw.get(), text.as_str());
    }

    #[test]
    fn context_decoder_answers_arbitrary_bytes_with_a_typed_error(bytes in stored_bytes()) {
        assert_typed(&bytes)?;
    }

    #[test]
    fn context_decoder_answers_a_damaged_part_with_a_typed_error(
        value in context(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        assert_typed(&damaged(&value, &flips))?;
    }

    #[test]
    fn context_decoder_never_reads_a_cut_part_as_other_json(value in context(), cut in any::<usize>()) {
        let bytes = encode(&value).bytes;
        let cut = &bytes[..cut % bytes.len()];
        // Refused; or, where only a deflate stream's last bits are gone, all of it.
        if let Ok(raw) = decode_raw(cut) {
            prop_assert_eq!(raw.get(), value.to_string(), "{} of {} bytes", cut.len(), bytes.len());
        }
    }
}
