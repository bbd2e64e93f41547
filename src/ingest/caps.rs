//! What every sender is held to, whatever it sends and however it is
//! signed: ids, company ids, kinds and texts capped, timestamps in range.
//! Checked on what the parsers made (one place for the generic webhook and
//! the three gateways), before anything is written: a refusal stores
//! nothing. The generic webhook answers it 422; a gateway's delivery goes
//! to the quarantine with the reason (`http::webhooks`), where raising the
//! cap and replaying it takes it.

use crate::message::{company_id_problem, NewMessage};

use super::{Inbound, IngestError};

/// Longest accepted message id (ours or a receipt's); WhatsApp's are well
/// under 100 bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest message kind ("text", "image", "interactive", …).
pub const MAX_KIND_BYTES: usize = 32;
/// Longest failure title a receipt may carry (Meta's are a few words).
pub const MAX_FAILURE_BYTES: usize = 1024;
/// How far ahead of our clock a sender's timestamp may be (its clock is
/// off, not in milliseconds).
pub const MAX_AHEAD_S: i64 = 86_400;

#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// `ingest.max_text_bytes`: a message's text, and a staff message's.
    pub max_text_bytes: usize,
}

impl Caps {
    /// A client's message: its id, company, kind, text and timestamp.
    pub fn message(&self, m: &NewMessage) -> Result<(), IngestError> {
        id("id", &m.id)?;
        if let Some(problem) = company_id_problem(&m.conv.company_id) {
            return Err(invalid(format!("`company_id` {problem}")));
        }
        if m.kind.len() > MAX_KIND_BYTES {
            return Err(invalid(format!("the message's type is longer than {MAX_KIND_BYTES} bytes")));
        }
        self.text("message", &m.text)?;
        if m.text.trim().is_empty() {
            return Err(invalid("`message` (the text) must not be empty".into()));
        }
        if let Some(t) = m.timestamp {
            let now_s = (m.received_at_ms / 1000) as i64;
            if t < 0 {
                return Err(invalid(format!("`timestamp` {t} is negative: Unix seconds expected")));
            }
            if t > now_s + MAX_AHEAD_S {
                return Err(invalid(format!(
                    "`timestamp` {t} is more than a day ahead of this machine's clock ({now_s}): Unix seconds expected, not milliseconds"
                )));
            }
        }
        Ok(())
    }

    /// Every event of a gateway's delivery (messages, staff messages, receipts).
    pub fn inbound(&self, events: &[Inbound]) -> Result<(), IngestError> {
        for event in events {
            match event {
                Inbound::Message(m, _) => self.message(m)?,
                Inbound::Staff(staff) => {
                    id("id", &staff.id)?;
                    self.text("text", &staff.text)?;
                    if staff.source.as_ref().is_some_and(|s| s.len() > MAX_KIND_BYTES) {
                        return Err(invalid(format!(
                            "the staff message's source is longer than {MAX_KIND_BYTES} bytes"
                        )));
                    }
                }
                Inbound::Receipt(r) => {
                    id("id", &r.id)?;
                    if r.failure.as_ref().is_some_and(|f| f.title.len() > MAX_FAILURE_BYTES) {
                        return Err(invalid(format!(
                            "the receipt's failure title is longer than {MAX_FAILURE_BYTES} bytes"
                        )));
                    }
                }
                Inbound::SessionStarted(session) => id("session", session)?,
                Inbound::Presence { .. } | Inbound::Ignored => {}
            }
        }
        Ok(())
    }

    fn text(&self, field: &str, text: &str) -> Result<(), IngestError> {
        if text.len() > self.max_text_bytes {
            return Err(invalid(format!(
                "`{field}` is {} bytes, longer than ingest.max_text_bytes ({})",
                text.len(),
                self.max_text_bytes
            )));
        }
        Ok(())
    }
}

fn id(field: &str, id: &str) -> Result<(), IngestError> {
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(format!("`{field}` is longer than {MAX_ID_BYTES} bytes")));
    }
    Ok(())
}

fn invalid(message: String) -> IngestError {
    IngestError::Invalid(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Conv;

    fn message(f: impl FnOnce(&mut NewMessage)) -> Result<(), IngestError> {
        let mut m = NewMessage {
            id: "wamid.1".into(),
            conv: Conv { phone: "79001234567".into(), company_id: "962302".into() },
            kind: "text".into(),
            text: "Можно на завтра?".into(),
            timestamp: Some(1_763_800_000),
            received_at_ms: 1_763_800_005_000,
        };
        f(&mut m);
        Caps { max_text_bytes: 100 }.message(&m)
    }

    fn refused(f: impl FnOnce(&mut NewMessage)) -> String {
        message(f).unwrap_err().to_string()
    }

    #[test]
    fn each_cap_refuses_naming_the_field_and_the_limit() {
        assert!(message(|_| {}).is_ok());
        assert!(message(|m| m.id = "x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(refused(|m| m.id = "x".repeat(MAX_ID_BYTES + 1)).contains("`id` is longer than 256 bytes"));
        assert!(refused(|m| m.conv.company_id = "c".repeat(65)).contains("`company_id`"));
        assert!(refused(|m| m.conv.company_id = "salon one".into()).contains("`company_id`"));
        assert!(refused(|m| m.kind = "k".repeat(33)).contains("type"));
        assert!(refused(|m| m.text = "я".repeat(51)).contains("ingest.max_text_bytes (100)"));
        assert!(message(|m| m.text = "я".repeat(50)).is_ok(), "bytes, not characters: 50 × 2");
        assert!(refused(|m| m.text = "  ".into()).contains("must not be empty"));
        assert!(refused(|m| m.timestamp = Some(-1)).contains("negative"));
        assert!(refused(|m| m.timestamp = Some(1_763_800_005_000)).contains("not milliseconds"));
        assert!(message(|m| m.timestamp = Some(1_763_800_005 + MAX_AHEAD_S)).is_ok());
        assert!(message(|m| m.timestamp = None).is_ok());
    }

    #[test]
    fn staff_messages_receipts_and_sessions_are_capped_too() {
        let caps = Caps { max_text_bytes: 100 };
        let conv = Conv { phone: "79001234567".into(), company_id: "962302".into() };
        let staff = |source: &str| {
            Inbound::Staff(crate::ingest::Staff {
                conv: conv.clone(),
                lid: None,
                id: "s1".into(),
                text: "Записала вас".into(),
                source: Some(source.into()),
                by: "waha",
            })
        };
        let receipt = |title: &str| {
            Inbound::Receipt(crate::ingest::Receipt {
                id: "r1".into(),
                state: crate::store::Delivery::Failed,
                at_ms: 1,
                failure: Some(crate::store::Failure { code: Some(131047), title: title.into(), at_ms: 1 }),
            })
        };
        assert!(caps.inbound(&[staff("app"), receipt("Re-engagement message")]).is_ok());
        let refused = |e: Inbound| caps.inbound(&[e]).unwrap_err().to_string();
        assert!(refused(staff(&"a".repeat(33))).contains("source"));
        assert!(refused(receipt(&"t".repeat(MAX_FAILURE_BYTES + 1))).contains("failure title"));
        assert!(refused(Inbound::SessionStarted("s".repeat(MAX_ID_BYTES + 1))).contains("`session`"));
        assert!(caps.inbound(&[Inbound::SessionStarted("default".into())]).is_ok());
    }
}
