//! The records the store keeps, their keys and their encoding (bincode 2).
//!
//! Keys are built so that a prefix scan answers each question the daemon asks:
//! a conversation's key is `phone \0 company \0`, so one phone's history is a
//! prefix scan whatever the company, and a conversation's pending messages sort by
//! arrival because `seq` follows it big-endian.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::message::{Conv, Message};

use super::StoreError;

/// A turn from the moment it is cut until it commits (then it is removed) or
/// is parked as dead. It carries copies of its messages so that a dead turn
/// keeps them after they stop being pending, and a re-run sees the same input.
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

/// What a clipped text of the history ends with.
pub const CLIPPED: &str = "…";

impl TurnSummary {
    /// Its size as stored.
    pub fn stored_bytes(&self) -> usize {
        encode(self).len()
    }

    /// Clips the texts (the messages' and the reply) so that the record
    /// takes at most `max_bytes` as stored, each text keeping an equal share
    /// of what the rest leaves (a short one keeps all of its own); a clipped
    /// text ends with [`CLIPPED`]. Ids and times are never clipped, so a turn
    /// whose ids alone exceed `max_bytes` keeps only those.
    pub fn clip_to(&mut self, max_bytes: usize) {
        let mut over = self.stored_bytes().saturating_sub(max_bytes);
        // Each round clips by at least what was over; the varint length
        // prefixes may take a few bytes less, hence the (short) loop.
        while over > 0 {
            let lens: Vec<usize> = self.texts().map(|t| t.len()).collect();
            let total: usize = lens.iter().sum();
            if total == 0 {
                return;
            }
            let mut budget = total.saturating_sub(over + CLIPPED.len() * lens.len());
            let mut order: Vec<usize> = (0..lens.len()).collect();
            order.sort_by_key(|&i| lens[i]);
            let mut keep = vec![0; lens.len()];
            for (n, &i) in order.iter().enumerate() {
                let share = budget / (lens.len() - n);
                keep[i] = lens[i].min(share);
                budget -= keep[i];
            }
            for (text, keep) in self.texts_mut().zip(keep) {
                if text.len() > keep {
                    let mut at = keep;
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text.truncate(at);
                    text.push_str(CLIPPED);
                }
            }
            let now = self.stored_bytes();
            if now <= max_bytes || self.texts().all(|t| t.len() <= CLIPPED.len()) {
                return;
            }
            over = now - max_bytes;
        }
    }

    fn texts(&self) -> impl Iterator<Item = &String> {
        self.messages.iter().map(|m| &m.text).chain(self.reply.iter())
    }

    fn texts_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.messages.iter_mut().map(|m| &mut m.text).chain(self.reply.iter_mut())
    }
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

/// Most bytes one record's decoding may claim: above anything the store
/// writes (a log record is at most 16 MiB), far below what would abort.
const DECODE_LIMIT: usize = 64 << 20;

/// How every record of the store is decoded: bincode's standard encoding,
/// with a limit, so that a length that damage made huge (behind a checksum
/// that holds) is an error rather than an allocation that aborts the process.
pub(crate) fn decoding() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

pub(crate) fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, decoding()).map(|(value, _)| value).map_err(|e| {
        StoreError::Corrupt { tree, key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(texts: &[&str], reply: Option<&str>) -> TurnSummary {
        let conv = Conv { phone: "79001234567".into(), company_id: "default".into() };
        let messages = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Message {
                seq: i as u64,
                id: format!("wamid.{i}"),
                conv: conv.clone(),
                kind: "text".into(),
                text: (*t).into(),
                timestamp: Some(1_700_000_000),
                received_at_ms: 1,
            })
            .collect();
        TurnSummary {
            turn_id: "t-1".into(),
            conv,
            messages,
            reply: reply.map(Into::into),
            cut_reason: "quiet".into(),
            cut_at_ms: 2,
            started_at_ms: 3,
            committed_at_ms: 4,
            attempts: 1,
        }
    }

    #[test]
    fn a_summary_that_fits_is_left_alone() {
        let mut s = summary(&["Привет", "можно на стрижку"], Some("Конечно!"));
        let before = s.clone();
        s.clip_to(4096);
        assert_eq!(s, before);
    }

    #[test]
    fn a_large_summary_is_clipped_to_the_bound_short_texts_whole_long_ones_marked() {
        let long = "я".repeat(15_000);
        let mut s = summary(&["Привет", &long, &long], Some(&"ответ ".repeat(3000)));
        s.clip_to(8192);
        assert!(s.stored_bytes() <= 8192, "{} bytes", s.stored_bytes());
        assert_eq!(s.messages[0].text, "Привет", "a short text keeps all of itself");
        for t in [&s.messages[1].text, &s.messages[2].text, s.reply.as_ref().unwrap()] {
            assert!(
                t.ends_with(CLIPPED) && t.len() > 1000,
                "a long text keeps a fair share: {} bytes",
                t.len()
            );
        }
        assert!(s.messages[1].text.starts_with("яяя"), "clipped on a character boundary, from the end");
        assert_eq!(
            (s.messages[2].id.as_str(), s.turn_id.as_str()),
            ("wamid.2", "t-1"),
            "ids are never clipped"
        );
    }

    #[test]
    fn ids_alone_over_the_bound_keep_the_ids_and_no_text() {
        let texts: Vec<String> = (0..40).map(|i| format!("text {i} {}", "x".repeat(100))).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut s = summary(&refs, None);
        s.clip_to(1024);
        assert_eq!(s.messages.len(), 40);
        assert!(s.messages.iter().all(|m| m.text.len() <= CLIPPED.len()));
    }
}
