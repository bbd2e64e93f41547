//! The rules a config must keep that its types cannot express; each refusal
//! names the key to change.

use super::{exposure, Config, ConfigError, GatewayKind, HandlerKind};

/// What a stop keeps after the turns' grace: the outbox's sends in flight,
/// the connections' last answers, the store's last sync.
pub const STOP_RESERVE_MS: u64 = 2_000;

impl Config {
    /// Checks the rules the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Invalid { key: key.to_owned(), message: message.to_owned() })
        };
        exposure::check_listeners(&self.server)?;
        let server = &self.server;
        for (key, value) in [
            ("server.header_timeout_ms", server.header_timeout_ms),
            ("server.body_timeout_ms", server.body_timeout_ms),
            ("server.max_connections", server.max_connections as u64),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if server.stop_timeout_ms < self.turns.shutdown_grace_ms + STOP_RESERVE_MS {
            return bad(
                "server.stop_timeout_ms",
                &format!(
                    "must leave {STOP_RESERVE_MS} ms after turns.shutdown_grace_ms ({}) for the outbox, \
                     the connections and the store's last sync",
                    self.turns.shutdown_grace_ms
                ),
            );
        }
        if let Some(problem) = crate::message::company_id_problem(&self.ingest.default_company_id) {
            return bad("ingest.default_company_id", &problem);
        }
        for (section, map) in [
            ("meta.companies", &self.meta.companies),
            ("waha.sessions", &self.waha.sessions),
            ("evolution.instances", &self.evolution.instances),
        ] {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for key in keys {
                if let Some(problem) = crate::message::company_id_problem(&map[key]) {
                    return bad(&format!("{section}.{key}"), &format!("(a company id) {problem}"));
                }
            }
        }
        if self.ingest.max_text_bytes == 0 {
            return bad("ingest.max_text_bytes", "must be at least 1");
        }
        if self.ingest.max_body_bytes < 256 {
            return bad("ingest.max_body_bytes", "must be at least 256");
        }
        if self.ingest.dedup_days == 0 {
            return bad("ingest.dedup_days", "must be at least 1");
        }
        if self.batching.debounce_ms == 0 {
            return bad("batching.debounce_ms", "must be at least 1");
        }
        if self.batching.max_messages == 0 {
            return bad("batching.max_messages", "must be at least 1");
        }
        let b = &self.batching;
        if b.adaptive_min_quiet_ms == 0 || b.adaptive_min_quiet_ms > b.adaptive_max_quiet_ms {
            return bad(
                "batching.adaptive_min_quiet_ms",
                "must be at least 1 and at most adaptive_max_quiet_ms",
            );
        }
        if b.adaptive_floor_ms > b.adaptive_min_quiet_ms {
            return bad("batching.adaptive_floor_ms", "must be at most adaptive_min_quiet_ms");
        }
        if b.adaptive_gap_factor_pct < 100 {
            return bad(
                "batching.adaptive_gap_factor_pct",
                "must be at least 100 (a window shorter than the gap splits every burst)",
            );
        }
        if b.adaptive_quantile_pct == 0 || b.adaptive_quantile_pct > 100 {
            return bad("batching.adaptive_quantile_pct", "must be from 1 to 100");
        }
        if b.adaptive_complete_pct == 0 || b.adaptive_complete_pct > 100 {
            return bad("batching.adaptive_complete_pct", "must be from 1 to 100");
        }
        if b.typing_ttl_ms == 0 {
            return bad("batching.typing_ttl_ms", "must be at least 1");
        }
        if self.batching.max_wait_ms == 0 {
            return bad("batching.max_wait_ms", "must be at least 1");
        }
        if self.turns.max_concurrent == 0 {
            return bad("turns.max_concurrent", "must be at least 1");
        }
        if self.turns.history_max_bytes < 4096 {
            return bad("turns.history_max_bytes", "must be at least 4096");
        }
        for (key, days) in [
            ("turns.history_days", self.turns.history_days),
            ("turns.dead_retention_days", self.turns.dead_retention_days),
            ("gateway.failed_retention_days", self.gateway.failed_retention_days),
        ] {
            if days == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.handler.max_attempts == 0 {
            return bad("handler.max_attempts", "must be at least 1");
        }
        if self.handler.max_answer_bytes < 1024 {
            return bad("handler.max_answer_bytes", "must be at least 1024");
        }
        if self.handler.timeout_ms == 0 {
            return bad("handler.timeout_ms", "must be at least 1");
        }
        if self.handler.kind == HandlerKind::Http {
            check_url("handler.url", &self.handler.url, "handler.kind = \"http\"")?;
        }
        if self.handler.kind == HandlerKind::OpenAi {
            check_url("openai.base_url", &self.openai.base_url, "handler.kind = \"openai\"")?;
            if self.openai.model.trim().is_empty() {
                return bad("openai.model", "must not be empty");
            }
            if !self.openai.system_prompt_file.is_empty() {
                if let Err(e) = std::fs::read_to_string(&self.openai.system_prompt_file) {
                    return bad("openai.system_prompt_file", &format!("cannot read it: {e}"));
                }
            }
        }
        let g = &self.gateway;
        if g.kind != GatewayKind::Log {
            check_url("gateway.url", &g.url, "gateway.kind is not \"log\"")?;
        }
        if g.kind == GatewayKind::Meta && g.access_token.is_empty() {
            return bad("gateway.access_token", "is required for gateway.kind = \"meta\"");
        }
        if g.kind == GatewayKind::Evolution && g.api_key.is_empty() {
            return bad(
                "gateway.api_key",
                "is required for gateway.kind = \"evolution\": Evolution refuses sends without it (its AUTHENTICATION_API_KEY or the instance's token; or TURNSTILE_GATEWAY_API_KEY)",
            );
        }
        let secret = &self.evolution.url_secret;
        if !secret.is_empty()
            && (secret.len() < 24
                || !secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return bad("evolution.url_secret", "must be at least 24 characters of A-Z a-z 0-9 - _");
        }
        if !self.meta.reengagement_template.is_empty() && self.meta.reengagement_language.trim().is_empty() {
            return bad(
                "meta.reengagement_language",
                "is required with meta.reengagement_template (e.g. \"ru\")",
            );
        }
        if self.takeover.resume_after_min == 0 {
            return bad("takeover.resume_after_min", "must be at least 1");
        }
        if self.ingest.quarantine_max == 0 {
            return bad("ingest.quarantine_max", "must be at least 1");
        }
        if self.ingest.quarantine_days == 0 {
            return bad("ingest.quarantine_days", "must be at least 1");
        }
        if g.max_chars < 16 {
            return bad("gateway.max_chars", "must be at least 16");
        }
        if g.max_attempts == 0 {
            return bad("gateway.max_attempts", "must be at least 1");
        }
        if g.timeout_ms == 0 {
            return bad("gateway.timeout_ms", "must be at least 1");
        }
        if g.max_replies_per_conversation_per_hour == 0 {
            return bad("gateway.max_replies_per_conversation_per_hour", "must be at least 1");
        }
        if self.context.ttl_hours == 0 {
            return bad("context.ttl_hours", "must be at least 1");
        }
        if self.context.max_bytes < 1024 {
            return bad("context.max_bytes", "must be at least 1024");
        }
        if self.context.sweep_interval_ms == 0 {
            return bad("context.sweep_interval_ms", "must be at least 1");
        }
        if !(8..=65536).contains(&self.store.cache_mb) {
            return bad("store.cache_mb", "must be between 8 and 65536 (MiB)");
        }
        if !(1..=3600).contains(&self.store.archive_every_s) {
            return bad("store.archive_every_s", "must be between 1 and 3600 (seconds)");
        }
        if self.store.rewrite_after_mb > 1_048_576 {
            return bad("store.rewrite_after_mb", "must be 0 (never) to 1048576 (MiB)");
        }
        if let Err(e) = self.log.filter.parse::<tracing_subscriber::EnvFilter>() {
            return bad("log.filter", &e.to_string());
        }
        // Last: a config otherwise sound, but open to anyone once something leaves.
        exposure::check_webhooks(self)
    }
}

fn check_url(key: &str, value: &str, because: &str) -> Result<(), ConfigError> {
    let bad = |message: String| Err(ConfigError::Invalid { key: key.to_owned(), message });
    match reqwest::Url::parse(value) {
        Ok(url) if url.scheme() == "http" || url.scheme() == "https" => Ok(()),
        Ok(url) => bad(format!("must be http:// or https://, not {}://", url.scheme())),
        Err(_) if value.is_empty() => bad(format!("is required when {because}")),
        Err(e) => bad(format!("not a URL: {e}")),
    }
}
