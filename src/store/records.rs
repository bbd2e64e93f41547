//! The records the store keeps, their keys and their encoding (bincode 2).
//!
//! Keys are built so that a prefix scan answers each question the daemon asks:
//! a conversation's key is `phone \0 company \0`, so one phone's history is a
//! prefix scan whatever the company, and a conversation's inbox is sorted by
//! arrival because `seq` follows it big-endian.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::message::{Conv, Message};

use super::StoreError;

/// A turn from the moment it is cut until it commits (then it is removed) or
/// is parked as dead. It carries copies of its messages so that a dead turn
/// keeps them after they leave the inbox, and a re-run sees the same input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub turn_id: String,
    pub conv: Conv,
    pub messages: Vec<Message>,
    /// Why the batch was cut: "quiet", "full", "max_wait", "immediate", "recovered".
    pub cut_reason: String,
    pub cut_at_ms: u64,
    /// Handler attempts made so far, across restarts and retries.
    pub attempts: u32,
    pub dead: Option<DeadInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadInfo {
    pub error: String,
    pub died_at_ms: u64,
}

/// What `GET /api/conversations/{phone}` shows of a committed turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnSummary {
    pub turn_id: String,
    pub conv: Conv,
    pub messages: Vec<Message>,
    pub reply: Option<String>,
    pub cut_reason: String,
    pub cut_at_ms: u64,
    pub started_at_ms: u64,
    pub committed_at_ms: u64,
    pub attempts: u32,
}

/// A piece of a reply waiting to be sent (or given up). Written in the
/// turn's commit transaction; removed once the gateway took it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// Global order of writing; within a conversation, the order to send in.
    pub seq: u64,
    pub turn_id: String,
    pub conv: Conv,
    pub text: String,
    pub part: u32,
    pub parts: u32,
    pub created_at_ms: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Given up after the last attempt; kept for the operator, no longer blocks.
    pub failed: bool,
}

pub(crate) fn conv_prefix(conv: &Conv) -> Vec<u8> {
    let mut key = Vec::with_capacity(conv.phone.len() + conv.company_id.len() + 2);
    key.extend_from_slice(conv.phone.as_bytes());
    key.push(0);
    key.extend_from_slice(conv.company_id.as_bytes());
    key.push(0);
    key
}

pub(crate) fn phone_prefix(phone: &str) -> Vec<u8> {
    let mut key = phone.as_bytes().to_vec();
    key.push(0);
    key
}

pub(crate) fn seq_key(conv: &Conv, seq: u64) -> Vec<u8> {
    let mut key = conv_prefix(conv);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("bincode encodes our records")
}

/// Every record of a tree, in key order.
pub(crate) fn decode_all<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            decode(name, &k, &v)
        })
        .collect()
}

pub(crate) fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(value, _)| value).map_err(
        |e| StoreError::Corrupt {
            tree,
            key: String::from_utf8_lossy(key).into_owned(),
            reason: e.to_string(),
        },
    )
}
