//! Where replies leave turnstile: one send attempt to WhatsApp through the
//! configured gateway. Retries, order and "sent" bookkeeping belong to
//! `outbox`; this module only knows each gateway's request shape.
//!
//! - `log`: sends nothing (replies stay in the conversation history)
//! - `http`: POST `{phone, text, turn_id, part, parts}` to a URL
//! - `waha`: POST `{url}/api/sendText` with `{session, chatId, text}`
//! - `meta`: POST `{url}/{phone_number_id}/messages`, Bearer token, type text
//! - `evolution`: POST `{url}/message/sendText/{instance}` with `{number, text}`, `apikey` header
//!
//! A conversation addressed by a LID (the client's number hidden) is sent
//! to its full `…@lid` jid: Evolution and WAHA take it as is, while bare
//! digits would be read as a phone number — someone else's, or nobody's.
//! `PresenceSubscriptions` asks WAHA for a chat's presence on its first
//! message (WAHA reports presence only for chats subscribed to).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{Config, GatewayKind};
use crate::message::Conv;

/// One piece of a reply, as the outbox hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub turn_id: &'a str,
    pub conv: &'a Conv,
    pub text: &'a str,
    /// 1-based; `parts` > 1 when a long reply was split.
    pub part: u32,
    pub parts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway timed out after {0:?}")]
    Timeout(Duration),
    #[error("gateway answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("gateway unreachable: {0}")]
    Connect(String),
    #[error("no route for company {0}: set [meta] companies or gateway.phone_number_id")]
    NoRoute(String),
}

pub struct Gateway {
    kind: GatewayKind,
    client: reqwest::Client,
    url: String,
    api_key: String,
    access_token: String,
    timeout: Duration,
    typing: bool,
    /// company_id -> WAHA session / Meta phone_number_id / Evolution instance (the inbound maps, reversed).
    sessions: HashMap<String, String>,
    instances: HashMap<String, String>,
    numbers: HashMap<String, String>,
    default_session: String,
    default_number: String,
}

impl Gateway {
    pub fn from_config(c: &Config) -> Gateway {
        let reverse = |m: &HashMap<String, String>| m.iter().map(|(k, v)| (v.clone(), k.clone())).collect();
        Gateway {
            kind: c.gateway.kind,
            client: reqwest::Client::builder().build().expect("an HTTP client builds"),
            url: c.gateway.url.trim_end_matches('/').to_owned(),
            api_key: c.gateway.api_key.clone(),
            access_token: c.gateway.access_token.clone(),
            timeout: Duration::from_millis(c.gateway.timeout_ms),
            typing: c.gateway.typing,
            sessions: reverse(&c.waha.sessions),
            instances: reverse(&c.evolution.instances),
            numbers: reverse(&c.meta.companies),
            default_session: c.gateway.session.clone(),
            default_number: c.gateway.phone_number_id.clone(),
        }
    }

    /// Whether replies go anywhere (and so through the outbox).
    pub fn sends(&self) -> bool {
        self.kind != GatewayKind::Log
    }

    pub async fn send(&self, d: &Delivery<'_>) -> Result<(), GatewayError> {
        let request = match self.kind {
            GatewayKind::Log => return Ok(()),
            GatewayKind::Http => {
                let key =
                    if d.parts > 1 { format!("{}-{}", d.turn_id, d.part) } else { d.turn_id.to_owned() };
                self.client.post(&self.url).header("Idempotency-Key", key).json(&json!({
                    "phone": d.conv.phone,
                    "company_id": d.conv.company_id,
                    "text": d.text,
                    "turn_id": d.turn_id,
                    "part": d.part,
                    "parts": d.parts,
                }))
            }
            GatewayKind::Waha => self.waha("sendText", &d.conv.company_id).json(&json!({
                "session": self.session_for(&d.conv.company_id),
                "chatId": d.conv.jid("c.us"),
                "text": d.text,
            })),
            GatewayKind::Evolution => {
                let instance = self.instances.get(&d.conv.company_id).unwrap_or(&self.default_session);
                self.client
                    .post(format!("{}/message/sendText/{instance}", self.url))
                    .header("apikey", &self.api_key)
                    .json(&json!({ "number": d.conv.phone, "text": d.text }))
            }
            GatewayKind::Meta => self.meta(&d.conv.company_id)?.json(&json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": d.conv.phone,
                "type": "text",
                "text": {"preview_url": false, "body": d.text},
            })),
        };
        self.execute(request).await
    }

    /// Whether `typing` does anything: enabled, and a gateway that has it.
    pub fn shows_typing(&self) -> bool {
        self.typing && matches!(self.kind, GatewayKind::Waha | GatewayKind::Meta)
    }

    /// Best effort: show (or stop showing) that the assistant is answering.
    /// `last_message_id` is the client's newest message (Meta marks it read).
    pub async fn typing(&self, conv: &Conv, last_message_id: &str, on: bool) {
        if !self.typing {
            return;
        }
        let request = match (self.kind, on) {
            (GatewayKind::Waha, _) => {
                let action = if on { "startTyping" } else { "stopTyping" };
                self.waha(action, &conv.company_id).json(&json!({
                    "session": self.session_for(&conv.company_id),
                    "chatId": conv.jid("c.us"),
                }))
            }
            // Meta shows typing until the reply is sent (or 25 s pass).
            (GatewayKind::Meta, true) => match self.meta(&conv.company_id) {
                Ok(r) => r.json(&json!({
                    "messaging_product": "whatsapp",
                    "status": "read",
                    "message_id": last_message_id,
                    "typing_indicator": {"type": "text"},
                })),
                Err(_) => return,
            },
            _ => return,
        };
        if let Err(e) = self.execute(request).await {
            tracing::debug!(conv = %conv.masked(), error = %e, "typing indicator not shown");
        }
    }

    /// WAHA: have the session report this chat's presence.
    pub async fn subscribe_presence(&self, conv: &Conv) -> Result<(), GatewayError> {
        let url = format!(
            "{}/api/{}/presence/{}/subscribe",
            self.url,
            self.session_for(&conv.company_id),
            conv.jid("c.us")
        );
        let r = self.client.post(url);
        let r = if self.api_key.is_empty() { r } else { r.header("X-Api-Key", &self.api_key) };
        self.execute(r).await
    }

    fn session_for(&self, company_id: &str) -> &str {
        self.sessions.get(company_id).unwrap_or(&self.default_session)
    }

    fn waha(&self, action: &str, _company_id: &str) -> reqwest::RequestBuilder {
        let r = self.client.post(format!("{}/api/{action}", self.url));
        if self.api_key.is_empty() {
            r
        } else {
            r.header("X-Api-Key", &self.api_key)
        }
    }

    fn meta(&self, company_id: &str) -> Result<reqwest::RequestBuilder, GatewayError> {
        let number = self.numbers.get(company_id).unwrap_or(&self.default_number);
        if number.is_empty() {
            return Err(GatewayError::NoRoute(company_id.to_owned()));
        }
        Ok(self.client.post(format!("{}/{number}/messages", self.url)).bearer_auth(&self.access_token))
    }

    async fn execute(&self, request: reqwest::RequestBuilder) -> Result<(), GatewayError> {
        let sent = request.timeout(self.timeout).send().await.map_err(|e| self.classify(e))?;
        let status = sent.status();
        if status.is_success() {
            return Ok(());
        }
        let body = sent.text().await.unwrap_or_default();
        Err(GatewayError::Status { status: status.as_u16(), body: body.chars().take(200).collect() })
    }

    fn classify(&self, e: reqwest::Error) -> GatewayError {
        if e.is_timeout() {
            GatewayError::Timeout(self.timeout)
        } else {
            GatewayError::Connect(e.to_string())
        }
    }
}

/// WAHA reports a chat's presence only once it was subscribed to, so the
/// adaptive policy would see none: the first message of each chat (per WAHA
/// session) subscribes it, best effort, at most `PER_SECOND` a second (the
/// rest wait for their chat's next message); a session that (re)started
/// forgets its chats, so they are subscribed again. Memory only: after a
/// restart of turnstile, chats are subscribed again as they write.
pub struct PresenceSubscriptions {
    gateway: Gateway,
    /// (session, chat) subscribed, or being subscribed.
    done: Mutex<HashSet<(String, String)>>,
    /// Tokens left and when they were last counted.
    bucket: Mutex<(f64, Instant)>,
}

const PER_SECOND: f64 = 5.0;
/// Chats remembered at most (then forgotten all at once: each subscribes again).
const SUBSCRIBED_MAX: usize = 100_000;

impl PresenceSubscriptions {
    /// `None` unless WAHA is the gateway (its URL and key) and the config wants it.
    pub fn from_config(c: &Config) -> Option<Arc<PresenceSubscriptions>> {
        let wanted = c.waha.enabled()
            && c.waha.subscribe_presence
            && c.gateway.kind == GatewayKind::Waha
            && c.batching.policy == crate::config::CutPolicy::Adaptive;
        wanted.then(|| {
            Arc::new(PresenceSubscriptions {
                gateway: Gateway::from_config(c),
                done: Mutex::new(HashSet::new()),
                bucket: Mutex::new((PER_SECOND, Instant::now())),
            })
        })
    }

    /// A message of `conv` was stored: subscribe its chat if that is new.
    pub fn message(self: &Arc<Self>, conv: &Conv) {
        let key = (self.gateway.session_for(&conv.company_id).to_owned(), conv.jid("c.us"));
        {
            let mut done = self.done.lock().expect("subscriptions lock");
            if done.contains(&key) || !self.take_token() {
                return;
            }
            if done.len() >= SUBSCRIBED_MAX {
                done.clear();
            }
            done.insert(key.clone());
        }
        let (me, conv) = (self.clone(), conv.clone());
        tokio::spawn(async move {
            if let Err(e) = me.gateway.subscribe_presence(&conv).await {
                tracing::debug!(conv = %conv.masked(), error = %e, "presence not subscribed; tried again at the chat's next message");
                me.done.lock().expect("subscriptions lock").remove(&key);
            }
        });
    }

    /// A WAHA session (re)started: its subscriptions are gone.
    pub fn session_started(&self, session: &str) {
        self.done.lock().expect("subscriptions lock").retain(|(s, _)| s != session);
    }

    fn take_token(&self) -> bool {
        let mut b = self.bucket.lock().expect("subscriptions lock");
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * PER_SECOND).min(PER_SECOND);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Splits `text` into pieces of at most `max_chars` characters, cutting at
/// the last line break in reach, else the last sentence end, else the last
/// space, else mid-word. Pieces are trimmed; none is empty.
pub fn split(text: &str, max_chars: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest: Vec<char> = text.trim().chars().collect();
    while rest.len() > max_chars {
        let window = &rest[..max_chars];
        let after = |i: usize| i + 1;
        let cut = window
            .iter()
            .rposition(|c| *c == '\n')
            .map(after)
            .or_else(|| {
                (1..max_chars)
                    .rev()
                    .find(|&i| matches!(window[i - 1], '.' | '!' | '?' | '…') && window[i].is_whitespace())
            })
            .or_else(|| window.iter().rposition(|c| c.is_whitespace()).map(after))
            .filter(|&i| i > 0)
            .unwrap_or(max_chars);
        let piece: String = rest[..cut].iter().collect();
        if !piece.trim().is_empty() {
            parts.push(piece.trim().to_owned());
        }
        rest = rest[cut..].iter().copied().skip_while(|c| c.is_whitespace()).collect();
    }
    let last: String = rest.into_iter().collect();
    if !last.trim().is_empty() || parts.is_empty() {
        parts.push(last.trim().to_owned());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_replies_are_one_piece() {
        assert_eq!(split("  Есть окна в 12:00.  ", 4096), ["Есть окна в 12:00."]);
    }

    #[test]
    fn long_replies_split_at_lines_then_sentences_then_spaces() {
        let text = "Первая строка.\nВторая строка подлиннее. И ещё предложение.";
        assert_eq!(split(text, 30), ["Первая строка.", "Вторая строка подлиннее.", "И ещё предложение."]);
        assert_eq!(split("один два три четыре", 9), ["один два", "три", "четыре"]);
        assert_eq!(split("абвгдежзий", 4), ["абвг", "дежз", "ий"]);
    }

    #[test]
    fn every_piece_fits_and_nothing_is_lost() {
        let sentence = "Запись подтверждена на завтра в 15:00, мастер Анна! ";
        let text = sentence.repeat(300);
        let parts = split(&text, 4096);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.chars().count() <= 4096 && p.ends_with('!')));
        let joined: String = parts.join(" ");
        assert_eq!(
            joined.split_whitespace().collect::<Vec<_>>(),
            text.split_whitespace().collect::<Vec<_>>()
        );
    }
}
