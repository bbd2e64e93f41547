//! From a webhook body to a message on disk that the batcher knows about.
//! The generic payload is parsed here; `meta` and `waha` parse the gateways'
//! own formats into the same messages, and `signature` checks their HMACs.
//!
//! Validation happens before anything is written, so bad input changes
//! nothing. The answer to the sender is given only after the store's writer
//! has synced the message log: an "accepted" (or "duplicate") message
//! survives `kill -9` and a power cut. The writer itself tells the driver
//! about each new message before answering, so no message is ever stored
//! without becoming a turn — even if this request's task is dropped.

pub mod evolution;
pub mod meta;
pub mod signature;
pub mod waha;

use serde_json::Value;

use crate::message::{unix_ms, Conv, NewMessage};
use crate::store::{Inserted, Store, StoreError};

/// What one gateway event carries.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    Message(crate::message::NewMessage),
    /// A client's presence in a chat: handed to the driver, never stored.
    Presence {
        conv: crate::message::Conv,
        presence: crate::message::Presence,
    },
    /// Nothing for us (acks, our own messages, groups, other events).
    Ignored,
}

/// Longest accepted message id; WhatsApp's are well under 100 bytes.
const MAX_ID_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is not JSON at all (400).
    #[error("body is not valid JSON: {0}")]
    Malformed(String),
    /// JSON, but a field is missing, empty or of the wrong type (422).
    #[error("{0}")]
    Invalid(String),
    /// The store could not write or flush (503): the sender should retry.
    #[error("message not stored: {0}")]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    New,
    Duplicate,
}

/// What a delivery of several messages did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: usize,
    pub duplicates: usize,
}

/// Parses and validates the generic webhook payload
/// `{"id", "from", "message", "timestamp"?, "company_id"?}`.
pub fn parse(body: &[u8], default_company_id: &str) -> Result<NewMessage, IngestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| IngestError::Malformed(e.to_string()))?;
    let obj = value.as_object().ok_or_else(|| IngestError::Invalid("body must be a JSON object".into()))?;
    let invalid = |m: String| IngestError::Invalid(m);
    let required_str = |field: &str| -> Result<&str, IngestError> {
        match obj.get(field) {
            None | Some(Value::Null) => Err(invalid(format!("field `{field}` is required"))),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(invalid(format!("field `{field}` must not be empty")))
            }
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(invalid(format!("field `{field}` must be a string"))),
        }
    };
    let id = required_str("id")?;
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(format!("field `id` is longer than {MAX_ID_BYTES} bytes")));
    }
    let phone = normalize_phone(required_str("from")?).map_err(|e| invalid(format!("field `from`: {e}")))?;
    let text = required_str("message")?;
    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) if t >= 0 => Some(t),
            _ => {
                return Err(invalid("field `timestamp` must be a non-negative integer (Unix seconds)".into()))
            }
        },
        Some(_) => return Err(invalid("field `timestamp` must be an integer (Unix seconds)".into())),
    };
    let company_id = match obj.get("company_id") {
        None | Some(Value::Null) => default_company_id.to_owned(),
        Some(Value::String(s)) if !s.trim().is_empty() && !s.contains('\0') => s.trim().to_owned(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(_) => return Err(invalid("field `company_id` must be a non-empty string".into())),
    };
    Ok(NewMessage {
        id: id.to_owned(),
        conv: Conv { phone, company_id },
        kind: "text".to_owned(),
        text: text.to_owned(),
        timestamp,
        received_at_ms: unix_ms(),
    })
}

/// Reduces a WhatsApp address or a written phone number to its digits:
/// "79001234567@c.us", "+7 900 123-45-67" and "79001234567" are one phone.
pub fn normalize_phone(raw: &str) -> Result<String, String> {
    let number = match raw.trim().split_once('@') {
        Some((number, domain))
            if !domain.is_empty() && domain.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') =>
        {
            number
        }
        Some(_) => return Err(format!("{raw:?} is not a phone number or WhatsApp id")),
        None => raw.trim(),
    };
    let mut digits = String::with_capacity(number.len());
    for (i, c) in number.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '(' | ')' | '.' => {}
            _ => return Err(format!("{raw:?} is not a phone number or WhatsApp id")),
        }
    }
    if !(6..=15).contains(&digits.len()) {
        return Err(format!("{raw:?} must have 6 to 15 digits"));
    }
    Ok(digits)
}

#[derive(Clone)]
pub struct Ingest {
    store: Store,
}

impl Ingest {
    pub fn new(store: Store) -> Ingest {
        Ingest { store }
    }

    /// Stores the message and answers once it is on disk and the batcher
    /// knows it. `immediate` skips the debounce (the message's batch is cut now).
    pub async fn accept(&self, message: NewMessage, immediate: bool) -> Result<Accepted, IngestError> {
        let counts = self.accept_many(vec![message], immediate).await?;
        Ok(if counts.accepted == 1 { Accepted::New } else { Accepted::Duplicate })
    }

    /// The messages of one delivery, in order, under one sync. If the write
    /// fails, none of them is stored (and none marked seen): the gateway's
    /// redelivery stores them then.
    pub async fn accept_many(
        &self,
        messages: Vec<NewMessage>,
        immediate: bool,
    ) -> Result<Counts, IngestError> {
        let mut counts = Counts::default();
        for inserted in self.store.accept(messages, immediate).await? {
            match inserted {
                Inserted::New(m) => {
                    tracing::debug!(conv = %m.conv.masked(), id = %m.id, seq = m.seq, kind = %m.kind, text = %crate::message::loggable(&m.text), "message stored");
                    counts.accepted += 1;
                }
                Inserted::Duplicate => counts.duplicates += 1,
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalize_to_digits() {
        for raw in ["79001234567@c.us", "+7 900 123-45-67", "79001234567", " +7 (900) 123.45.67 "] {
            assert_eq!(normalize_phone(raw).unwrap(), "79001234567", "{raw}");
        }
        for bad in
            ["", "abc", "7900@", "12345", "+7 900 abc", "1234567890123456", "79+001234567", "7900123@c us"]
        {
            assert!(normalize_phone(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn payload_fields_are_checked_by_name() {
        let ok = parse(br#"{"id":"a","from":"79001234567@c.us","message":"hi","timestamp":1763800000}"#, "d")
            .unwrap();
        assert_eq!(
            (ok.conv.phone.as_str(), ok.conv.company_id.as_str(), ok.timestamp),
            ("79001234567", "d", Some(1763800000))
        );
        let numeric_company =
            parse(br#"{"id":"a","from":"79001234567","message":"hi","company_id":962302}"#, "d").unwrap();
        assert_eq!(numeric_company.conv.company_id, "962302");

        let err = |body: &str| match parse(body.as_bytes(), "d") {
            Err(IngestError::Invalid(m)) => m,
            other => panic!("{body}: expected Invalid, got {other:?}"),
        };
        assert!(err(r#"{"from":"79001234567","message":"hi"}"#).contains("`id`"));
        assert!(err(r#"{"id":"","from":"79001234567","message":"hi"}"#).contains("`id`"));
        assert!(err(r#"{"id":"a","from":79001234567,"message":"hi"}"#).contains("`from`"));
        assert!(err(r#"{"id":"a","from":"79001234567","message":"  "}"#).contains("`message`"));
        assert!(err(r#"{"id":"a","from":"79001234567","message":"hi","timestamp":"now"}"#)
            .contains("`timestamp`"));
        assert!(
            err(r#"{"id":"a","from":"79001234567","message":"hi","company_id":[]}"#).contains("`company_id`")
        );
        assert!(err(r#"[1,2]"#).contains("object"));
        assert!(matches!(parse(b"{\"id\":", "d"), Err(IngestError::Malformed(_))));
    }
}
