//! The `openai` handler: a turn becomes one chat completion on any
//! OpenAI-compatible server (OpenAI, DeepSeek, vLLM, llama.cpp, Ollama).
//!
//! The dialogue context keeps the conversation as `{"history": [{"role",
//! "content"}, ...]}` (other fields the dialogue holds are kept as they are).
//! Each request sends the system prompt, the context's cache part (the
//! salon's data) as a second system message when there is one — cut at
//! `cache_max_chars` — the last `history_turns` turns and the turn's combined
//! text; the answer's text is the reply, and the history grows by the user's
//! text and the answer.

use std::time::Duration;

use serde_json::{json, Value};

use super::{classify, HandlerError, TurnAnswer, TurnRequest};
use crate::config::OpenAiConfig;

pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    model: String,
    system_prompt: String,
    api_key: Option<String>,
    history_messages: usize,
    cache_prompt: String,
    cache_max_chars: usize,
    timeout: Duration,
}

impl OpenAi {
    /// Reads the prompt file and the API key's variable once, at start.
    pub fn from_config(c: &OpenAiConfig, timeout: Duration) -> OpenAi {
        let system_prompt = if c.system_prompt_file.is_empty() {
            c.system_prompt.clone()
        } else {
            // Config validation checked the file is readable.
            std::fs::read_to_string(&c.system_prompt_file).unwrap_or_else(|_| c.system_prompt.clone())
        };
        let api_key = match c.api_key.is_empty() {
            false => Some(c.api_key.clone()),
            true => {
                let from_env = std::env::var(&c.api_key_env).ok().filter(|k| !k.is_empty());
                match &from_env {
                    Some(_) => {
                        tracing::warn!(variable = %c.api_key_env, "the API key comes from openai.api_key_env, which is deprecated: set openai.api_key (or api_key_file, or TURNSTILE_OPENAI_API_KEY[_FILE])")
                    }
                    None => tracing::warn!("no openai.api_key; requests go without Authorization"),
                }
                from_env
            }
        };
        OpenAi {
            client: reqwest::Client::new(),
            url: format!("{}/chat/completions", c.base_url.trim_end_matches('/')),
            model: c.model.clone(),
            system_prompt: system_prompt.trim().to_owned(),
            api_key,
            history_messages: c.history_turns * 2,
            cache_prompt: c.cache_prompt.trim().to_owned(),
            cache_max_chars: c.cache_max_chars,
            timeout,
        }
    }

    /// The cache's system message: the prompt, then its JSON, cut at the budget.
    fn cache_message(&self, json: &str) -> String {
        let total = json.chars().count();
        if total <= self.cache_max_chars {
            return format!("{}\n{json}", self.cache_prompt);
        }
        let cut: String = json.chars().take(self.cache_max_chars).collect();
        format!("{}\n{cut}\n[cut at {} of {total} characters]", self.cache_prompt, self.cache_max_chars)
    }

    pub async fn call(&self, req: &TurnRequest, max_answer: usize) -> Result<TurnAnswer, HandlerError> {
        let mut dialogue = match req.context.as_ref().map(|raw| serde_json::from_str::<Value>(raw.get())) {
            Some(Ok(Value::Object(map))) => map,
            _ => serde_json::Map::new(),
        };
        let mut history: Vec<Value> = dialogue
            .get("history")
            .and_then(Value::as_array)
            .map(|h| {
                h.iter().filter(|m| m["role"].is_string() && m["content"].is_string()).cloned().collect()
            })
            .unwrap_or_default();
        let keep_from = history.len().saturating_sub(self.history_messages);
        history.drain(..keep_from);

        let mut messages = Vec::with_capacity(history.len() + 2);
        if !self.system_prompt.is_empty() {
            messages.push(json!({"role": "system", "content": self.system_prompt}));
        }
        if let Some(cache) = req.cache.as_ref().filter(|_| self.cache_max_chars > 0) {
            messages.push(json!({"role": "system", "content": self.cache_message(cache.get())}));
        }
        messages.extend(history.iter().cloned());
        let asked = asked(req);
        messages.extend(asked.iter().cloned());
        let mut request = self.client.post(&self.url).timeout(self.timeout).json(&json!({
            "model": self.model,
            "messages": messages,
        }));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| classify(e, self.timeout))?;
        let status = response.status();
        let body = super::read_limited(response, max_answer, self.timeout).await?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(HandlerError::Status { status: status.as_u16(), body });
        }
        let answer: Value =
            serde_json::from_slice(&body).map_err(|e| HandlerError::BadAnswer(e.to_string()))?;
        let reply = answer["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| HandlerError::BadAnswer("no choices[0].message.content".into()))?
            .to_owned();

        history.extend(asked);
        history.push(json!({"role": "assistant", "content": reply}));
        let keep_from = history.len().saturating_sub(self.history_messages);
        history.drain(..keep_from);
        dialogue.insert("history".into(), Value::Array(history));
        Ok(TurnAnswer {
            reply: Some(reply),
            context: serde_json::value::to_raw_value(&Value::Object(dialogue)).ok(),
            cache: None,
        })
    }
}

/// The turn's part of the chat: the client's text — or, when salon staff
/// wrote meanwhile, both sides in order, staff's as assistant messages
/// marked as theirs, after a note that says what happened.
fn asked(req: &TurnRequest) -> Vec<Value> {
    if req.transcript.is_empty() {
        return vec![json!({"role": "user", "content": req.text})];
    }
    let mut out = vec![json!({"role": "system", "content": STAFF_NOTE})];
    for e in &req.transcript {
        out.push(match e.from {
            "staff" => json!({"role": "assistant", "content": format!("[salon staff] {}", e.text)}),
            _ => json!({"role": "user", "content": e.text}),
        });
    }
    out
}

/// Said to the model before a transcript with staff in it.
const STAFF_NOTE: &str = "Salon staff answered this client themselves for a while, from the salon's phone; \
their messages are marked [salon staff]. Continue from where they left off, consistent with what they said.";
