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

pub mod caps;
pub mod evolution;
pub mod meta;
pub mod signature;
pub mod waha;

use serde_json::Value;

use crate::message::Urgency;
use crate::message::{unix_ms, Conv, NewMessage};
use crate::store::{Inserted, Store, StoreError};

/// What one gateway event carries. A chat addressed by a LID carries it
/// (`lid`): ingest resolves it to the conversation it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Message(crate::message::NewMessage, Option<Lid>),
    /// A client's presence in a chat: handed to the driver, never stored.
    Presence {
        conv: crate::message::Conv,
        presence: crate::message::Presence,
        lid: Option<Lid>,
    },
    /// A WAHA session (re)started: what was subscribed for it is gone.
    SessionStarted(String),
    /// What WhatsApp said of one of our messages (matched by its id).
    Receipt(Receipt),
    /// A message written in a client's chat from the salon's own WhatsApp:
    /// staff answering (a human takeover), or — where the sender reports
    /// our own sends too — an echo of ours (`source`: WAHA's "api" or
    /// "app"; `None` when the sender does not say).
    Staff(Staff),
    /// Nothing for us (acks, our own messages, groups, other events).
    Ignored,
}

/// A delivery or read receipt, or a failure, for message `id` (short form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: String,
    pub state: crate::store::Delivery,
    /// When, by the sender's clock (Unix ms); the receipt time when it says none.
    pub at_ms: u64,
    pub failure: Option<crate::store::Failure>,
}

/// A message from the salon's side of a client's chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staff {
    pub conv: Conv,
    pub lid: Option<Lid>,
    pub id: String,
    pub text: String,
    pub source: Option<String>,
    /// The signal: "waha", "evolution", "meta".
    pub by: &'static str,
}

/// A WhatsApp address as the senders write them (`:device` suffixes cut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A phone's digits (`…@s.whatsapp.net`, `…@c.us`).
    Phone(String),
    /// A LID's digits (`…@lid`): a client whose number WhatsApp may hide.
    Lid(String),
    /// A group, a broadcast, a channel: not a client's own chat.
    Other,
}

/// What an event says of a LID-addressed client: its LID, and its phone
/// when the payload reveals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lid {
    pub lid: String,
    pub phone: Option<String>,
}

/// Reads a jid: `79001234567@s.whatsapp.net`, `79001234567:12@s.whatsapp.net`,
/// `79001234567@c.us`, `123456789012345@lid`.
pub fn address(jid: &str) -> Address {
    let Some((user, domain)) = jid.trim().rsplit_once('@') else { return Address::Other };
    let user = user.split_once(':').map_or(user, |(u, _)| u);
    match domain {
        "lid" if (6..=20).contains(&user.len()) && user.bytes().all(|b| b.is_ascii_digit()) => {
            Address::Lid(user.to_owned())
        }
        "s.whatsapp.net" | "c.us" => normalize_phone(user).map_or(Address::Other, Address::Phone),
        _ => Address::Other,
    }
}

/// The conversation of a client's chat from its jid and the alternative one
/// the sender may add (`remoteJidAlt`, `SenderAlt`): the phone when either
/// is one, else the LID (`…@lid`); with the LID ↔ phone link either shows.
/// `None`: not a client's own chat.
pub fn chat(jid: &str, alt: Option<&str>) -> Option<(String, Option<Lid>)> {
    let alt = alt.map(address).unwrap_or(Address::Other);
    match (address(jid), alt) {
        (Address::Phone(p), Address::Lid(lid)) => Some((p.clone(), Some(Lid { lid, phone: Some(p) }))),
        (Address::Phone(p), _) => Some((p, None)),
        (Address::Lid(lid), Address::Phone(p)) => Some((p.clone(), Some(Lid { lid, phone: Some(p) }))),
        (Address::Lid(lid), _) => {
            Some((format!("{lid}{}", crate::message::LID), Some(Lid { lid, phone: None })))
        }
        (Address::Other, _) => None,
    }
}

/// Why a written phone number, WhatsApp id or conversation is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("{0:?} is a LID (a hidden number), not a phone number")]
    Lid(String),
    #[error("{0:?} is not a LID (6 to 20 digits, then @lid)")]
    NotALid(String),
    #[error("{0:?} is not a phone number or WhatsApp id")]
    NotAPhone(String),
    #[error("{0:?} must have 6 to 15 digits")]
    Digits(String),
}

/// A conversation's `phone` as an API path names it: a phone in any
/// spelling (`normalize_phone`), or a LID with its `@lid`.
pub fn normalize_conversation(raw: &str) -> Result<String, PhoneError> {
    if raw.trim().ends_with(crate::message::LID) {
        return match address(raw) {
            Address::Lid(lid) => Ok(format!("{lid}{}", crate::message::LID)),
            _ => Err(PhoneError::NotALid(raw.to_owned())),
        };
    }
    normalize_phone(raw)
}

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
/// `{"id", "from", "message", "timestamp"?, "company_id"?}` (the caps:
/// `caps::Caps::message`).
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
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
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
pub fn normalize_phone(raw: &str) -> Result<String, PhoneError> {
    let number = match raw.trim().split_once('@') {
        Some((_, "lid")) => return Err(PhoneError::Lid(raw.to_owned())),
        Some((number, domain))
            if !domain.is_empty() && domain.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') =>
        {
            number
        }
        Some(_) => return Err(PhoneError::NotAPhone(raw.to_owned())),
        None => raw.trim(),
    };
    let mut digits = String::with_capacity(number.len());
    for (i, c) in number.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '(' | ')' | '.' => {}
            _ => return Err(PhoneError::NotAPhone(raw.to_owned())),
        }
    }
    if !(6..=15).contains(&digits.len()) {
        return Err(PhoneError::Digits(raw.to_owned()));
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
    /// knows it. `Urgency::Immediate` skips the debounce (the message's batch is cut now).
    pub async fn accept(&self, message: NewMessage, urgency: Urgency) -> Result<Accepted, IngestError> {
        let counts = self.accept_many(vec![message], urgency).await?;
        Ok(if counts.accepted == 1 { Accepted::New } else { Accepted::Duplicate })
    }

    /// Points a LID-addressed event at its conversation: the phone's, when
    /// the event or an earlier one revealed it (a revealed link is stored,
    /// synced, before the message is), else the LID's own.
    pub async fn resolve(&self, conv: &mut Conv, lid: Option<&Lid>) -> Result<(), IngestError> {
        let Some(lid) = lid else { return Ok(()) };
        match &lid.phone {
            Some(phone) => self.store.link_lid(&conv.company_id, &lid.lid, phone).await?,
            None => {
                if let Some(phone) = self.store.lid_phone(&conv.company_id, &lid.lid) {
                    conv.phone = phone;
                }
            }
        }
        Ok(())
    }

    /// The messages of one delivery, in order, under one sync. If the write
    /// fails, none of them is stored (and none marked seen): the gateway's
    /// redelivery stores them then.
    pub async fn accept_many(
        &self,
        messages: Vec<NewMessage>,
        urgency: Urgency,
    ) -> Result<Counts, IngestError> {
        let mut counts = Counts::default();
        for inserted in self.store.accept(messages, urgency).await? {
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
pub(crate) mod fuzz;

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
    fn a_lid_is_never_taken_for_a_phone_and_a_revealed_phone_wins() {
        assert_eq!(address("79001234567@s.whatsapp.net"), Address::Phone("79001234567".into()));
        assert_eq!(
            address("79001234567:12@s.whatsapp.net"),
            Address::Phone("79001234567".into()),
            "GOWS's device"
        );
        assert_eq!(address("123456789012345@lid"), Address::Lid("123456789012345".into()));
        assert_eq!(address("120363025246125486@g.us"), Address::Other);
        assert_eq!(address("status@broadcast"), Address::Other);
        assert_eq!(
            normalize_phone("123456789012345@lid"),
            Err(PhoneError::Lid("123456789012345@lid".into()))
        );
        assert!(normalize_phone("123456789012345@lid").unwrap_err().to_string().contains("LID"));
        assert_eq!(normalize_phone("12345"), Err(PhoneError::Digits("12345".into())));
        assert_eq!(normalize_conversation("123456789012345@lid").unwrap(), "123456789012345@lid");
        assert_eq!(normalize_conversation("+7 900 123-45-67").unwrap(), "79001234567");
        assert!(normalize_conversation("12@lid").is_err());
        // The alt decides by its suffix: a phone chat's alt is its LID.
        let link = Some(Lid { lid: "98765432109876".into(), phone: Some("79007654321".into()) });
        assert_eq!(
            chat("98765432109876@lid", Some("79007654321@s.whatsapp.net")),
            Some(("79007654321".into(), link.clone()))
        );
        assert_eq!(
            chat("79007654321@s.whatsapp.net", Some("98765432109876@lid")),
            Some(("79007654321".into(), link))
        );
        assert_eq!(
            chat("98765432109876@lid", None),
            Some(("98765432109876@lid".into(), Some(Lid { lid: "98765432109876".into(), phone: None })))
        );
        assert_eq!(chat("79001234567@c.us", None), Some(("79001234567".into(), None)));
        assert_eq!(chat("120363025246125486@g.us", Some("79001234567@s.whatsapp.net")), None);
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
