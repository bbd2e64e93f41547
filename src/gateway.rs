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
    /// WhatsApp refused the message with an error code (Meta's
    /// `error.code`): `refusal_of` says whether trying again can help.
    #[error("WhatsApp refused it (HTTP {status}, code {code}): {title}")]
    Refused { status: u16, code: i64, title: String },
}

/// What WhatsApp's refusal (an error code, from a send's answer or a
/// `failed` receipt) means for a reply piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Pacing, a rate limit, a temporary fault: back into the outbox, later.
    Retry,
    /// More than 24 h since the client last wrote: only a template reopens
    /// the chat (Meta 131047).
    OutsideWindow,
    /// The number cannot receive it (not on WhatsApp, blocked, restricted).
    Undeliverable,
}

/// Meta's error codes (Cloud API reference): 131047 the 24-hour window;
/// 131026 undeliverable, 131021 recipient is the sender, 131030 not an
/// allowed test number, 131031 account locked, 131050 marketing stopped,
/// 130497 country restricted; everything else (131049 and 131056 pacing,
/// 130429 rate limit, 131000 and 131016 temporary) is tried again.
pub fn refusal_of(code: Option<i64>) -> Refusal {
    match code {
        Some(131047) => Refusal::OutsideWindow,
        Some(131026 | 131021 | 131030 | 131031 | 131050 | 130497) => Refusal::Undeliverable,
        _ => Refusal::Retry,
    }
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
    /// What this daemon sent, to tell a gateway's echo of it from staff.
    sent: Arc<Sent>,
    typing_refresh: Duration,
    mark_read: bool,
    /// Meta: the re-engagement template (name, language), if any.
    template: Option<(String, String)>,
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
            sent: Arc::default(),
            typing_refresh: Duration::from_millis(c.gateway.typing_refresh_ms),
            mark_read: c.gateway.mark_read,
            template: (!c.meta.reengagement_template.is_empty())
                .then(|| (c.meta.reengagement_template.clone(), c.meta.reengagement_language.clone())),
        }
    }

    pub fn kind(&self) -> GatewayKind {
        self.kind
    }

    /// How often typing is shown again while a handler runs (zero: once).
    pub fn typing_refresh(&self) -> Duration {
        self.typing_refresh
    }

    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Meta: the re-engagement template, to a client whose window closed.
    pub async fn send_template(&self, conv: &Conv) -> Result<Option<String>, GatewayError> {
        let Some((name, language)) = &self.template else { return Ok(None) };
        let request = self.meta(&conv.company_id)?.json(&json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": conv.phone,
            "type": "template",
            "template": {"name": name, "language": {"code": language}},
        }));
        let answer = self.execute_reading(request).await?;
        Ok(sent_id(&answer))
    }

    /// Best effort, when a turn starts: the client's messages are read.
    /// (Meta's read call rides with the typing indicator, `typing`.)
    pub async fn mark_read(&self, conv: &Conv, last_message_id: &str) {
        if !self.mark_read || last_message_id.is_empty() {
            return;
        }
        let request = match self.kind {
            GatewayKind::Waha => self.waha("sendSeen", &conv.company_id).json(&json!({
                "session": self.session_for(&conv.company_id),
                "chatId": conv.jid("c.us"),
            })),
            GatewayKind::Evolution => {
                let instance = self.instances.get(&conv.company_id).unwrap_or(&self.default_session);
                self.client
                    .post(format!("{}/chat/markMessageAsRead/{instance}", self.url))
                    .header("apikey", &self.api_key)
                    .json(&json!({"readMessages": [{"remoteJid": conv.jid("s.whatsapp.net"), "fromMe": false, "id": short_id(last_message_id)}]}))
            }
            GatewayKind::Meta if !self.typing => match self.meta(&conv.company_id) {
                Ok(r) => r.json(&json!({"messaging_product": "whatsapp", "status": "read", "message_id": last_message_id})),
                Err(_) => return,
            },
            _ => return,
        };
        if let Err(e) = self.execute(request).await {
            tracing::debug!(conv = %conv.masked(), error = %e, "messages not marked read");
        }
    }

    /// The registry of this daemon's own sends (shared with ingest).
    pub fn sent(&self) -> Arc<Sent> {
        self.sent.clone()
    }

    /// Whether replies go anywhere (and so through the outbox).
    pub fn sends(&self) -> bool {
        self.kind != GatewayKind::Log
    }

    /// One send; the message id the gateway gave it, when it says one.
    /// While it runs, an echo of it waits (`Sent::is_ours`).
    pub async fn send(&self, d: &Delivery<'_>) -> Result<Option<String>, GatewayError> {
        let _in_flight = self.sent.begin(d.conv);
        let request = match self.kind {
            GatewayKind::Log => return Ok(None),
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
        let answer = self.execute_reading(request).await?;
        let id = sent_id(&answer);
        self.sent.sent(d.conv, id.as_deref());
        Ok(id)
    }

    /// Whether `typing` does anything: enabled, and a gateway that has it.
    pub fn shows_typing(&self) -> bool {
        self.typing && matches!(self.kind, GatewayKind::Waha | GatewayKind::Meta | GatewayKind::Evolution)
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
            // Evolution holds the call for `delay` ms of "composing", then
            // says "paused" itself (`sendPresence`): that "paused" must come
            // before the next refresh's "composing", not after it (a blink
            // of a second), and "off" is a "paused" with no delay.
            (GatewayKind::Evolution, _) => {
                let instance = self.instances.get(&conv.company_id).unwrap_or(&self.default_session);
                let refresh = self.typing_refresh.as_millis() as u64;
                let (presence, delay) = if on {
                    ("composing", refresh.saturating_sub(1000.min(refresh / 10)))
                } else {
                    ("paused", 0)
                };
                let r = self
                    .client
                    .post(format!("{}/chat/sendPresence/{instance}", self.url))
                    .header("apikey", &self.api_key)
                    .json(&json!({"number": conv.phone, "presence": presence, "delay": delay}));
                if let Err(e) = self.execute_within(r, self.timeout + Duration::from_millis(delay)).await {
                    tracing::debug!(conv = %conv.masked(), error = %e, "typing indicator not shown");
                }
                return;
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
        self.execute_reading(request).await.map(drop)
    }

    /// `execute`, keeping a 2xx answer's JSON (`Null` when it is none).
    async fn execute_reading(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<serde_json::Value, GatewayError> {
        self.execute_within(request, self.timeout).await
    }

    /// `execute_reading` with a deadline of its own.
    async fn execute_within(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<serde_json::Value, GatewayError> {
        let sent = request.timeout(timeout).send().await.map_err(|e| classify(e, timeout))?;
        let status = sent.status();
        if status.is_success() {
            let body = sent.bytes().await.unwrap_or_default();
            return Ok(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null));
        }
        let body = sent.text().await.unwrap_or_default();
        // Meta says why in `error.code`, `error.error_data.details`, `error.message`.
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(code) = parsed["error"]["code"].as_i64() {
            let e = &parsed["error"];
            let title =
                e["error_data"]["details"].as_str().or(e["message"].as_str()).unwrap_or("").to_owned();
            return Err(GatewayError::Refused { status: status.as_u16(), code, title });
        }
        Err(GatewayError::Status { status: status.as_u16(), body: body.chars().take(200).collect() })
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> GatewayError {
    if e.is_timeout() {
        GatewayError::Timeout(timeout)
    } else {
        GatewayError::Connect(e.to_string())
    }
}

/// The message id a gateway's send answer carries, in the short form the
/// webhooks' echoes can be matched on (`short_id`): WAHA NOWEB and
/// Evolution `key.id`, WAHA WEBJS `id._serialized` / `_data.id._serialized`,
/// GOWS `id`, Meta `messages[0].id`.
pub fn sent_id(answer: &serde_json::Value) -> Option<String> {
    let candidates = [
        &answer["key"]["id"],
        &answer["id"]["_serialized"],
        &answer["_data"]["id"]["_serialized"],
        &answer["id"],
        &answer["messages"][0]["id"],
    ];
    candidates.into_iter().find_map(|v| v.as_str()).filter(|s| !s.is_empty()).map(|s| short_id(s).to_owned())
}

/// A message id without what WAHA serialises around it:
/// `true_79001234567@c.us_3EB0…` (and a group's trailing participant) → `3EB0…`.
pub fn short_id(id: &str) -> &str {
    let mut parts = id.split('_');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("true" | "false"), Some(chat), Some(short)) if chat.contains('@') && !short.is_empty() => short,
        _ => id,
    }
}

/// This daemon's own sends: ids the gateway gave them (the last
/// `SENT_KEPT`, for `SENT_FOR`) and the sends still waiting for an answer,
/// per conversation. A `fromMe` event that carries no `source` is ours when
/// its id is here — and while a send to its conversation is in flight, the
/// question waits for that answer: never decided by timing alone.
#[derive(Default)]
pub struct Sent {
    state: Mutex<SentState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct SentState {
    in_flight: HashMap<Conv, usize>,
    ids: HashMap<String, Instant>,
    order: std::collections::VecDeque<String>,
}

const SENT_KEPT: usize = 10_000;
const SENT_FOR: Duration = Duration::from_secs(15 * 60);

/// A send in flight; its end is said on drop.
pub struct InFlight<'a> {
    sent: &'a Sent,
    conv: Conv,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.sent.state.lock().expect("sent lock");
        if let Some(n) = s.in_flight.get_mut(&self.conv) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.conv);
            }
        }
        drop(s);
        self.sent.changed.notify_waiters();
    }
}

impl Sent {
    pub fn begin(&self, conv: &Conv) -> InFlight<'_> {
        *self.state.lock().expect("sent lock").in_flight.entry(conv.clone()).or_default() += 1;
        InFlight { sent: self, conv: conv.clone() }
    }

    /// A send went through with this id (short form).
    pub fn sent(&self, _conv: &Conv, id: Option<&str>) {
        let Some(id) = id else { return };
        let mut s = self.state.lock().expect("sent lock");
        let now = Instant::now();
        s.ids.insert(id.to_owned(), now);
        s.order.push_back(id.to_owned());
        while s.order.len() > SENT_KEPT {
            if let Some(old) = s.order.pop_front() {
                s.ids.remove(&old);
            }
        }
    }

    /// Whether `id` (any form) is one of our sends to `conv`: known, or — a
    /// send to `conv` still in flight — once its answer says. Waits at most `wait`.
    pub async fn is_ours(&self, conv: &Conv, id: &str, wait: Duration) -> bool {
        let id = short_id(id);
        let until = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.state.lock().expect("sent lock");
                let now = Instant::now();
                s.ids.retain(|_, at| now.duration_since(*at) < SENT_FOR);
                if s.ids.contains_key(id) {
                    return true;
                }
                if !s.in_flight.contains_key(conv) {
                    return false;
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return false;
            }
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

    #[tokio::test(start_paused = true)]
    async fn an_echo_that_comes_before_our_sends_answer_waits_for_it() {
        let sent = Arc::new(Sent::default());
        let conv = Conv { phone: "79001234567".into(), company_id: "962302".into() };
        assert!(
            !sent.is_ours(&conv, "true_79001234567@c.us_3EB0AAA", Duration::from_secs(10)).await,
            "nothing in flight: not ours"
        );
        let guard = sent.begin(&conv);
        let (s2, c2) = (sent.clone(), conv.clone());
        let asked = tokio::spawn(async move {
            s2.is_ours(&c2, "true_79001234567@c.us_3EB0AAA", Duration::from_secs(10)).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!asked.is_finished(), "it waits for the send in flight");
        sent.sent(&conv, Some("3EB0AAA"));
        drop(guard);
        assert!(asked.await.unwrap(), "the answer's id: ours");
        // A staff message while a send is in flight is staff's once the send answered.
        let guard = sent.begin(&conv);
        let (s2, c2) = (sent.clone(), conv.clone());
        let asked = tokio::spawn(async move {
            s2.is_ours(&c2, "false_79001234567@c.us_STAFF", Duration::from_secs(10)).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        sent.sent(&conv, Some("3EB0BBB"));
        drop(guard);
        assert!(!asked.await.unwrap());
        assert_eq!(
            sent_id(&json!({"id": {"_serialized": "true_79001234567@c.us_3EB0CCC"}})).as_deref(),
            Some("3EB0CCC")
        );
        assert_eq!(sent_id(&json!({"messages": [{"id": "wamid.HBg"}]})).as_deref(), Some("wamid.HBg"));
        assert_eq!(sent_id(&json!({"ok": true})), None);
    }

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
