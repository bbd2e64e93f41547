//! What a message and a conversation are, as every other module sees them.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Whether logs show phones masked (`log.mask_phones`). Process-wide: it is
/// about the log output, which is process-wide too.
static MASK_PHONES: AtomicBool = AtomicBool::new(true);

pub fn set_mask_phones(on: bool) {
    MASK_PHONES.store(on, Ordering::Relaxed);
}

/// Whether debug lines may carry message and reply texts (`log.message_text`).
static LOG_TEXT: AtomicBool = AtomicBool::new(false);

pub fn set_log_text(on: bool) {
    LOG_TEXT.store(on, Ordering::Relaxed);
}

/// `text` itself if `log.message_text` is on, else only its length.
pub fn loggable(text: &str) -> String {
    if LOG_TEXT.load(Ordering::Relaxed) {
        text.to_owned()
    } else {
        format!("<{} chars>", text.chars().count())
    }
}

/// A phone as logs show it: "7900*****67" unless masking is off. API answers
/// always carry the full number.
pub fn mask(phone: &str) -> String {
    if !MASK_PHONES.load(Ordering::Relaxed) {
        return phone.to_owned();
    }
    mask_always(phone)
}

/// A phone masked whatever `log.mask_phones` says (the console's lists).
/// A hidden number's LID keeps its `@lid`.
pub fn mask_always(phone: &str) -> String {
    if let Some(lid) = phone.strip_suffix(LID) {
        return format!("{}{LID}", mask_always(lid));
    }
    let n = phone.chars().count();
    if n <= 6 {
        return "*".repeat(n);
    }
    phone.chars().enumerate().map(|(i, c)| if i < 4 || i >= n - 2 { c } else { '*' }).collect()
}

/// A conversation: one client's phone writing to one company. Batching, the
/// one-turn-at-a-time rule and the saved context are all per conversation;
/// with a single company (the usual appliance) that is simply per phone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conv {
    /// Digits only, e.g. "79001234567" — or, for a client whose number
    /// WhatsApp hides, its LID with the suffix, "123456789012345@lid", never
    /// the same string as any phone.
    pub phone: String,
    pub company_id: String,
}

impl Conv {
    /// "company/phone" with the phone masked, for logs.
    pub fn masked(&self) -> String {
        format!("{}/{}", self.company_id, mask(&self.phone))
    }

    /// Addressed by a LID (the number is hidden): replies go to that jid.
    pub fn is_lid(&self) -> bool {
        self.phone.ends_with(LID)
    }

    /// The chat's jid for a gateway whose phone jids end in `@{domain}`.
    pub fn jid(&self, domain: &str) -> String {
        if self.is_lid() {
            self.phone.clone()
        } else {
            format!("{}@{domain}", self.phone)
        }
    }
}

/// How a LID-addressed conversation's `phone` ends.
pub const LID: &str = "@lid";

/// Longest company id, in bytes.
pub const MAX_COMPANY_ID_BYTES: usize = 64;

/// What is wrong with a company id, if anything: 1 to 64 bytes of ASCII
/// letters, digits, `-`, `_`, `.` and `:` (a conversation's records repeat
/// it, so it stays short and plain).
pub fn company_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("must not be empty".into());
    }
    if id.len() > MAX_COMPANY_ID_BYTES {
        return Some(format!("is {} bytes, longer than {MAX_COMPANY_ID_BYTES}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))) {
        return Some(format!("has {c:?}: only ASCII letters, digits, '-', '_', '.' and ':' are taken"));
    }
    None
}

impl std::fmt::Display for Conv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.company_id, self.phone)
    }
}

/// A message as accepted by ingest, before the store numbers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub id: String,
    pub conv: Conv,
    /// "text", or what else the gateway said it was ("image", "location", …).
    pub kind: String,
    /// The text, or for other kinds a bracketed placeholder such as "[image] caption".
    pub text: String,
    /// The sender's timestamp in Unix seconds, when the webhook carried one.
    pub timestamp: Option<i64>,
    /// When turnstile received it, Unix milliseconds.
    pub received_at_ms: u64,
}

/// How a delivered message's batch is cut: when the batching policy says
/// (`POST /webhook/whatsapp/batched` and the gateways' webhooks), or at once
/// (`POST /webhook/whatsapp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Debounced,
    Immediate,
}

/// A stored message. `seq` orders the messages of a conversation by arrival.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub seq: u64,
    pub id: String,
    pub conv: Conv,
    pub kind: String,
    pub text: String,
    pub timestamp: Option<i64>,
    pub received_at_ms: u64,
}

impl Message {
    pub fn from_new(seq: u64, m: NewMessage) -> Message {
        Message {
            seq,
            id: m.id,
            conv: m.conv,
            kind: m.kind,
            text: m.text,
            timestamp: m.timestamp,
            received_at_ms: m.received_at_ms,
        }
    }
}

/// Wall-clock Unix milliseconds, for what is written to disk and shown to people.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a gateway says a client is doing in a chat. Never a message: it
/// is not stored, and it only moves a pending batch's cut (adaptive policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Typing or recording a voice note.
    Typing,
    /// Stopped: paused, or online / offline / available after typing.
    Paused,
}

/// What the cut policy reads of a message's text: its length and its last
/// character, closing quotes and brackets aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    pub chars: usize,
    pub last: Option<char>,
}

impl Shape {
    pub fn of(text: &str) -> Shape {
        let trimmed =
            text.trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ')' | '»' | '”'));
        Shape { chars: trimmed.chars().count(), last: trimmed.chars().last() }
    }

    /// Reads as a finished request: long enough, and ending in sentence
    /// punctuation (Latin, Cyrillic, Greek, Arabic, CJK, Devanagari alike).
    pub fn complete(&self, min_chars: usize) -> bool {
        self.chars >= min_chars
            && matches!(self.last, Some('.' | '?' | '!' | '…' | '؟' | '。' | '？' | '！' | '।' | ';'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_reach_the_logs_only_when_asked() {
        assert_eq!(loggable("Привет, можно?"), "<14 chars>");
        set_log_text(true);
        assert_eq!(loggable("Привет"), "Привет");
        set_log_text(false);
    }

    #[test]
    fn phones_are_masked_in_the_middle() {
        assert_eq!(super::mask("79001234567"), "7900*****67");
        assert_eq!(super::mask("123456"), "******");
    }

    #[test]
    fn a_complete_looking_message_in_any_script() {
        for text in [
            "Можно записаться на завтра?",
            "Can I book a haircut tomorrow.",
            "¿Hay hueco mañana para mí?",
            "明天下午可以预约剪发吗？",
            "هل يمكنني الحجز غدا؟ ",
            "Запишите меня, пожалуйста!)",
        ] {
            assert!(Shape::of(text).complete(12), "{text}");
        }
        for text in ["Привет!", "можно", "записаться на стрижку", "", "ok?"] {
            assert!(!Shape::of(text).complete(12), "{text}");
        }
    }
}
