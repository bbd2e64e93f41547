//! Who answers a turn. `echo` needs nothing and keeps a turn counter in the
//! context; `http` POSTs the turn to a service (the AI assistant) with the
//! turn id as idempotency key; `openai` asks an OpenAI-compatible chat API. One call is one attempt: retries, backoff and
//! dead-lettering belong to `turns::run`, which knows the turn's history.

mod openai;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::{Config, HandlerKind};
use crate::message::{Conv, Message};

/// What a handler is given.
#[derive(Debug, Clone, Serialize)]
pub struct TurnRequest {
    pub turn_id: String,
    pub company_id: String,
    pub phone: String,
    pub messages: Vec<RequestMessage>,
    /// The messages' texts joined by "\n", in arrival order.
    pub text: String,
    /// The dialogue the previous turn saved, or null.
    pub context: Option<Box<RawValue>>,
    /// The cached snapshot (company, services, staff, schedule), or null
    /// when there is none or it was invalidated: rebuild it and return it.
    pub cache: Option<Box<RawValue>>,
    /// When salon staff wrote in the conversation since its last turn (a
    /// takeover): the client's messages and staff's, in time order, marked
    /// by who wrote them. Absent otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transcript: Vec<TranscriptEntry>,
}

/// One line of what happened in a conversation while staff had it.
#[derive(Debug, Clone, Serialize)]
pub struct TranscriptEntry {
    /// "client" or "staff".
    pub from: &'static str,
    pub text: String,
    /// Unix milliseconds (receipt time).
    pub at: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestMessage {
    pub id: String,
    /// "text", "image", "location", …: what the gateway said it was.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    /// Receipt time, Unix milliseconds.
    pub at: u64,
    /// The sender's timestamp, Unix seconds, if the webhook carried one.
    pub timestamp: Option<i64>,
}

impl TurnRequest {
    pub fn new(
        turn_id: &str,
        conv: &Conv,
        messages: &[Message],
        context: Option<Box<RawValue>>,
        cache: Option<Box<RawValue>>,
        staff: &[crate::store::StaffMessage],
    ) -> Self {
        let mut transcript: Vec<TranscriptEntry> = Vec::new();
        if !staff.is_empty() {
            let client = messages.iter().map(|m| TranscriptEntry {
                from: "client",
                text: m.text.clone(),
                at: m.received_at_ms,
            });
            let staff =
                staff.iter().map(|m| TranscriptEntry { from: "staff", text: m.text.clone(), at: m.at_ms });
            transcript = client.chain(staff).collect();
            transcript.sort_by_key(|e| e.at);
        }
        TurnRequest {
            transcript,
            turn_id: turn_id.to_owned(),
            company_id: conv.company_id.clone(),
            phone: conv.phone.clone(),
            text: messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>().join("\n"),
            messages: messages
                .iter()
                .map(|m| RequestMessage {
                    id: m.id.clone(),
                    kind: m.kind.clone(),
                    text: m.text.clone(),
                    at: m.received_at_ms,
                    timestamp: m.timestamp,
                })
                .collect(),
            context,
            cache,
        }
    }
}

/// What a handler answers. A `None` context or cache keeps the stored one.
/// Both stay JSON text: a 300 KB cache is compressed as it came, never parsed
/// into a tree.
#[derive(Debug, Clone, Deserialize)]
pub struct TurnAnswer {
    #[serde(default)]
    pub reply: Option<String>,
    #[serde(default)]
    pub context: Option<Box<RawValue>>,
    #[serde(default)]
    pub cache: Option<Box<RawValue>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("handler timed out after {0:?}")]
    Timeout(Duration),
    #[error("handler answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("handler unreachable: {0}")]
    Connect(String),
    #[error("handler answer is not {{\"reply\", \"context\"}} JSON: {0}")]
    BadAnswer(String),
    #[error("handler answer is over {0} bytes (handler.max_answer_bytes)")]
    TooLarge(usize),
}

/// Who answers turns, and the sizes an answer may have.
pub struct Handler {
    kind: Kind,
    /// `handler.max_answer_bytes`: the whole answer, as read.
    max_answer: usize,
    /// `context.max_bytes`: each context part, whatever road it takes.
    max_part: usize,
}

enum Kind {
    Echo,
    Http { client: reqwest::Client, url: String, timeout: Duration },
    OpenAi(Box<openai::OpenAi>),
}

impl Handler {
    pub fn from_config(config: &Config) -> Handler {
        let c = &config.handler;
        let kind = match c.kind {
            HandlerKind::OpenAi => Kind::OpenAi(Box::new(openai::OpenAi::from_config(
                &config.openai,
                Duration::from_millis(c.timeout_ms),
            ))),
            HandlerKind::Echo => Kind::Echo,
            HandlerKind::Http => Kind::Http {
                client: reqwest::Client::builder()
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build()
                    .expect("a plain HTTP client builds"),
                url: c.url.clone(),
                timeout: Duration::from_millis(c.timeout_ms),
            },
        };
        Handler { kind, max_answer: c.max_answer_bytes, max_part: config.context.max_bytes }
    }

    /// The echo handler with the default limits (tests and benches).
    pub fn echo() -> Handler {
        let config = Config::default();
        Handler {
            kind: Kind::Echo,
            max_answer: config.handler.max_answer_bytes,
            max_part: config.context.max_bytes,
        }
    }

    /// `handler.kind` as configured: "echo", "http" or "openai".
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Echo => "echo",
            Kind::Http { .. } => "http",
            Kind::OpenAi(_) => "openai",
        }
    }

    /// One attempt at answering the turn. An answer over the size limits is
    /// a failed attempt like any other: nothing of it reaches the store.
    pub async fn call(&self, req: &TurnRequest) -> Result<TurnAnswer, HandlerError> {
        let answer = self.call_kind(req).await?;
        for (part, raw) in [("context", &answer.context), ("cache", &answer.cache)] {
            if let Some(raw) = raw.as_ref().filter(|r| r.get().len() > self.max_part) {
                return Err(HandlerError::BadAnswer(format!(
                    "its {part} is {} bytes, over context.max_bytes ({})",
                    raw.get().len(),
                    self.max_part
                )));
            }
        }
        Ok(answer)
    }

    async fn call_kind(&self, req: &TurnRequest) -> Result<TurnAnswer, HandlerError> {
        match &self.kind {
            Kind::Echo => Ok(echo(req)),
            Kind::OpenAi(ai) => ai.call(req, self.max_answer).await,
            Kind::Http { client, url, timeout } => {
                let sent = client
                    .post(url)
                    .header("Idempotency-Key", &req.turn_id)
                    .timeout(*timeout)
                    .json(req)
                    .send()
                    .await;
                let resp = sent.map_err(|e| classify(e, *timeout))?;
                let status = resp.status();
                let body = read_limited(resp, self.max_answer, *timeout).await?;
                if !status.is_success() {
                    let body = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                    return Err(HandlerError::Status { status: status.as_u16(), body });
                }
                serde_json::from_slice(&body).map_err(|e| HandlerError::BadAnswer(e.to_string()))
            }
        }
    }
}

/// Reads an answer's body, refusing one over `limit` bytes (declared or as
/// it arrives) without holding more of it.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, HandlerError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(HandlerError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(e, timeout))? {
        if body.len() + chunk.len() > limit {
            return Err(HandlerError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(crate) fn classify(e: reqwest::Error, timeout: Duration) -> HandlerError {
    if e.is_timeout() {
        HandlerError::Timeout(timeout)
    } else {
        HandlerError::Connect(e.to_string())
    }
}

/// Replies with the combined text and counts turns in the context, keeping
/// whatever else the context holds.
fn echo(req: &TurnRequest) -> TurnAnswer {
    let previous = req.context.as_ref().and_then(|raw| serde_json::from_str(raw.get()).ok());
    let mut context = match previous {
        Some(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let turns = context.get("turns").and_then(Value::as_u64).unwrap_or(0) + 1;
    context.insert("turns".into(), turns.into());
    TurnAnswer {
        reply: Some(format!("received: {}", req.text)),
        context: serde_json::value::to_raw_value(&Value::Object(context)).ok(),
        cache: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_replies_with_the_joined_text_and_counts_turns() {
        let conv = Conv { phone: "79001234567".into(), company_id: "1".into() };
        let msgs: Vec<Message> = ["Привет", "можно"]
            .iter()
            .enumerate()
            .map(|(i, t)| Message {
                seq: i as u64,
                id: format!("m{i}"),
                conv: conv.clone(),
                kind: "text".into(),
                text: t.to_string(),
                timestamp: None,
                received_at_ms: 0,
            })
            .collect();
        let first =
            Handler::echo().call(&TurnRequest::new("t1", &conv, &msgs, None, None, &[])).await.unwrap();
        assert_eq!(first.reply.as_deref(), Some("received: Привет\nможно"));
        let second = Handler::echo()
            .call(&TurnRequest::new("t2", &conv, &msgs, first.context, None, &[]))
            .await
            .unwrap();
        assert_eq!(second.context.unwrap().get(), r#"{"turns":2}"#);
    }
}
