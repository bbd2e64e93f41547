//! The daemon's one configuration: a TOML file where every key is optional,
//! overlaid by `TURNSTILE_<SECTION>_<KEY>` environment variables.
//!
//! Defaults live in named functions so the example file in the repository
//! (`turnstile.example.toml`) and the code cannot drift: a unit test parses
//! the example and compares it with `Config::default()`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod exposure;

pub use exposure::Unauthenticated;

/// Why a configuration was refused. The binary prints it and exits with 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub ingest: IngestConfig,
    pub batching: BatchingConfig,
    pub turns: TurnsConfig,
    pub handler: HandlerConfig,
    pub context: ContextConfig,
    pub meta: MetaConfig,
    pub waha: WahaConfig,
    pub gateway: GatewayConfig,
    pub openai: OpenAiConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the public listener: the webhooks, /healthz and /readyz,
    /// nothing else. What a reverse proxy forwards to.
    pub listen: SocketAddr,
    /// Address of the admin listener: /api/*, /metrics (and /healthz,
    /// /readyz). Must differ from `listen`; meant to stay on loopback.
    pub admin_listen: SocketAddr,
    /// Directory of the embedded store; created if missing.
    pub data_dir: PathBuf,
    /// Bearer token for the admin listener. Required when `admin_listen` is
    /// not a loopback address; when set, required on loopback too.
    pub admin_token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// company_id given to messages whose payload has none.
    pub default_company_id: String,
    /// Largest accepted webhook body; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a message id is remembered to answer redeliveries as duplicates.
    pub dedup_days: u64,
    /// Shared secret of the generic webhooks, sent as `Authorization: Bearer
    /// <token>` or `X-Webhook-Token: <token>`; when set, a request without it
    /// gets 401. Required once replies can leave the machine.
    pub webhook_token: String,
    /// Serve `/webhook/whatsapp` and `/webhook/whatsapp/batched` (false: 404).
    pub generic_webhooks: bool,
    /// Take the generic webhooks without a token even with a real gateway or
    /// handler (warned about at every start).
    pub allow_unauthenticated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Quiet time after a phone's last message before its batch becomes a turn.
    pub debounce_ms: u64,
    /// A batch holding this many messages becomes a turn at once.
    pub max_messages: usize,
    /// A batch becomes a turn at the latest this long after its first message.
    pub max_wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnsConfig {
    /// Turns of different phones running at once.
    pub max_concurrent: usize,
    /// Committed turns kept per conversation for `GET /api/conversations`.
    pub history_limit: usize,
    /// On shutdown, how long running turns may take to finish before the
    /// daemon exits anyway (they re-run on the next start).
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    Echo,
    Http,
    OpenAi,
}

/// The WhatsApp Cloud API (Meta) webhook: served when any key here is set
/// (`enabled`); `/webhook/meta` answers 404 otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetaConfig {
    /// Token Meta echoes in `GET /webhook/meta` verification; empty refuses every verification.
    pub verify_token: String,
    /// App secret for `X-Hub-Signature-256`; when set, unsigned or badly signed deliveries get 401.
    pub app_secret: String,
    /// Business phone_number_id -> company_id (unlisted numbers: ingest.default_company_id).
    pub companies: HashMap<String, String>,
    /// Take unsigned deliveries even with a real gateway or handler (warned
    /// about at every start).
    pub allow_unauthenticated: bool,
}

impl MetaConfig {
    /// Whether `/webhook/meta` is served: the section is configured.
    pub fn enabled(&self) -> bool {
        *self != MetaConfig::default()
    }
}

/// The WAHA webhook: served when any key here is set (`enabled`);
/// `/webhook/waha` answers 404 otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WahaConfig {
    /// HMAC key set on the WAHA webhook; when set, `X-Webhook-Hmac` is required.
    pub hmac_key: String,
    /// WAHA session name -> company_id (unlisted sessions: ingest.default_company_id).
    pub sessions: HashMap<String, String>,
    /// Take unsigned events even with a real gateway or handler (warned
    /// about at every start).
    pub allow_unauthenticated: bool,
}

impl WahaConfig {
    /// Whether `/webhook/waha` is served: the section is configured.
    pub fn enabled(&self) -> bool {
        *self != WahaConfig::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayKind {
    Log,
    Http,
    Waha,
    Meta,
}

/// Where replies go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// `log` (keep replies in the history only), `http`, `waha` or `meta`.
    pub kind: GatewayKind,
    /// http: the endpoint; waha: the WAHA base URL; meta: the Graph API base with version.
    pub url: String,
    /// waha: sent as X-Api-Key when set.
    pub api_key: String,
    /// meta: the Bearer access token.
    pub access_token: String,
    /// waha: session for companies not listed in [waha] sessions.
    pub session: String,
    /// meta: phone_number_id for companies not listed in [meta] companies.
    pub phone_number_id: String,
    /// Longer replies are split at sentence or line boundaries (Meta's text limit is 4096).
    pub max_chars: usize,
    pub timeout_ms: u64,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// Attempts before a reply is given up (kept and listed by GET /api/outbox).
    pub max_attempts: u32,
    /// While a turn runs, show the client the assistant is answering (WAHA typing, Meta read + typing).
    pub typing: bool,
    /// Replies sent to one conversation in any hour, at most (a reply split
    /// into pieces counts once). A reply over it is parked, never sent:
    /// listed by GET /api/outbox as "rate_limited" and counted in
    /// turnstile_replies_rate_limited_total.
    pub max_replies_per_conversation_per_hour: u32,
}

/// The `openai` handler: any OpenAI-compatible chat completions API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Base URL; the handler POSTs to `{base_url}/chat/completions`.
    pub base_url: String,
    pub model: String,
    /// The system prompt, inline...
    pub system_prompt: String,
    /// ...or from a file (wins when set).
    pub system_prompt_file: String,
    /// Name of the environment variable holding the API key (unset: no Authorization header).
    pub api_key_env: String,
    /// Past turns (a user and an assistant message each) sent with every request.
    pub history_turns: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerConfig {
    /// `echo` (replies "received: <text>") or `http` (POSTs the turn to `url`).
    pub kind: HandlerKind,
    /// Endpoint of the `http` handler.
    pub url: String,
    /// One attempt's time limit.
    pub timeout_ms: u64,
    /// Attempts before a turn is parked as dead.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub backoff_ms: u64,
    /// Upper bound of that wait.
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// A context expires this many hours after its last turn or PUT.
    pub ttl_hours: u64,
    /// Largest accepted `PUT /api/contexts/...` body; larger ones get 413.
    pub max_bytes: usize,
    /// How often expired contexts are removed from disk. Reads never return
    /// an expired context, swept or not.
    pub sweep_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "turnstile=debug,info". RUST_LOG wins if set.
    pub filter: String,
    /// Show phones in logs as "7900*****67".
    pub mask_phones: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
/// Beside the public port, on loopback: the admin API is never exposed by default.
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_company_id() -> String {
    "default".to_owned()
}
/// 64 KiB: a WhatsApp text is at most 4096 characters, so this leaves room.
fn default_max_body_bytes() -> usize {
    64 * 1024
}
/// WhatsApp's Cloud API redelivers a webhook for up to 7 days.
fn default_dedup_days() -> u64 {
    7
}
fn default_debounce_ms() -> u64 {
    10_000
}
fn default_max_messages() -> usize {
    10
}
fn default_max_wait_ms() -> u64 {
    60_000
}
fn default_max_concurrent() -> usize {
    32
}
fn default_history_limit() -> usize {
    20
}
/// Below systemd's default TimeoutStopSec of 90 s, and below the unit's 30 s.
fn default_shutdown_grace_ms() -> u64 {
    20_000
}
fn default_timeout_ms() -> u64 {
    60_000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_backoff_ms() -> u64 {
    1_000
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
/// The system we replace kept contexts in Redis for 12 hours.
fn default_ttl_hours() -> u64 {
    12
}
/// Room for a ~300 KB booking snapshot many times over.
fn default_context_max_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_sweep_interval_ms() -> u64 {
    60_000
}
/// One a minute for a whole hour: far above a client's conversation, and a
/// brake on a loop between two bots or a flood aimed at one number.
fn default_max_replies_per_conversation_per_hour() -> u32 {
    60
}
impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            kind: GatewayKind::Log,
            url: String::new(),
            api_key: String::new(),
            access_token: String::new(),
            session: "default".to_owned(),
            phone_number_id: String::new(),
            max_chars: 4096,
            timeout_ms: 10_000,
            backoff_ms: 1_000,
            backoff_max_ms: 60_000,
            // With the 60 s cap, about an hour and a half of outage.
            max_attempts: 100,
            typing: true,
            max_replies_per_conversation_per_hour: default_max_replies_per_conversation_per_hour(),
        }
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".to_owned(),
            model: "gpt-4o-mini".to_owned(),
            system_prompt:
                "You are the booking assistant of a beauty salon. Answer briefly, in the client's language."
                    .to_owned(),
            system_prompt_file: String::new(),
            api_key_env: "OPENAI_API_KEY".to_owned(),
            history_turns: 20,
        }
    }
}

fn default_log_filter() -> String {
    "info".to_owned()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            data_dir: default_data_dir(),
            admin_token: String::new(),
        }
    }
}
impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            default_company_id: default_company_id(),
            max_body_bytes: default_max_body_bytes(),
            dedup_days: default_dedup_days(),
            webhook_token: String::new(),
            generic_webhooks: true,
            allow_unauthenticated: false,
        }
    }
}
impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            debounce_ms: default_debounce_ms(),
            max_messages: default_max_messages(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}
impl Default for TurnsConfig {
    fn default() -> Self {
        TurnsConfig {
            max_concurrent: default_max_concurrent(),
            history_limit: default_history_limit(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
        }
    }
}
impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            kind: HandlerKind::Echo,
            url: String::new(),
            timeout_ms: default_timeout_ms(),
            max_attempts: default_max_attempts(),
            backoff_ms: default_backoff_ms(),
            backoff_max_ms: default_backoff_max_ms(),
        }
    }
}
impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            ttl_hours: default_ttl_hours(),
            max_bytes: default_context_max_bytes(),
            sweep_interval_ms: default_sweep_interval_ms(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: default_log_filter(), mask_phones: true }
    }
}

const ENV_PREFIX: &str = "TURNSTILE_";
/// Environment variables with the prefix that are not config keys.
const ENV_RESERVED: &[&str] = &["TURNSTILE_CONFIG", crate::server::TEST_FAULTS_ENV];

impl Config {
    /// Reads `path` (if given), then applies `TURNSTILE_*` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::Invalid { key: e.path().to_string(), message: e.into_inner().to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Invalid { key: key.to_owned(), message: message.to_owned() })
        };
        exposure::check_listeners(&self.server)?;
        if self.ingest.default_company_id.trim().is_empty() {
            return bad("ingest.default_company_id", "must not be empty");
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
        if self.batching.max_wait_ms == 0 {
            return bad("batching.max_wait_ms", "must be at least 1");
        }
        if self.turns.max_concurrent == 0 {
            return bad("turns.max_concurrent", "must be at least 1");
        }
        if self.handler.max_attempts == 0 {
            return bad("handler.max_attempts", "must be at least 1");
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

/// Overlays `TURNSTILE_<SECTION>_<KEY>` variables. The type of each value is
/// taken from the key's default, so `TURNSTILE_INGEST_DEFAULT_COMPANY_ID=962302`
/// stays a string and `TURNSTILE_BATCHING_DEBOUNCE_MS=abc` is refused by name.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("default config serializes");
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_RESERVED.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let err = |message: String| ConfigError::Env { var: var.clone(), message };
        let (section, key) =
            rest.split_once('_').ok_or_else(|| err("expected TURNSTILE_<SECTION>_<KEY>".to_owned()))?;
        let default = defaults
            .get(section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(key))
            .ok_or_else(|| err(format!("no config key {section}.{key}")))?;
        let value = match default {
            toml::Value::Integer(_) => raw
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| err(format!("{section}.{key} must be an integer, got {raw:?}")))?,
            toml::Value::Table(_) => {
                return Err(err(format!("{section}.{key} is a table: set it in the config file")));
            }
            toml::Value::Boolean(_) => raw
                .trim()
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .map_err(|_| err(format!("{section}.{key} must be true or false, got {raw:?}")))?,
            _ => toml::Value::String(raw),
        };
        let section_table =
            table.entry(section.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table.as_table_mut() {
            Some(t) => {
                t.insert(key.to_owned(), value);
            }
            None => return Err(err(format!("[{section}] in the config file is not a table"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("turnstile.example.toml");
        let parsed = Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!(parsed, Config::default());
        // Every key of the default config appears (uncommented) in the example.
        let text = std::fs::read_to_string(&path).unwrap();
        let example: toml::Table = text.parse().unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, keys) in &defaults {
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    example.get(section).and_then(|s| s.get(key)).is_some(),
                    "{section}.{key} missing from the example config"
                );
            }
        }
    }

    #[test]
    fn no_file_means_defaults() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.server.data_dir, PathBuf::from("./data"));
        assert_eq!(c.handler.kind, HandlerKind::Echo);
    }

    #[test]
    fn env_overrides_with_the_type_of_the_default() {
        let c = Config::load(
            None,
            env(&[
                ("TURNSTILE_SERVER_LISTEN", "127.0.0.1:9000"),
                ("TURNSTILE_HANDLER_KIND", "http"),
                ("TURNSTILE_HANDLER_URL", "http://127.0.0.1:7000/turn"),
                ("TURNSTILE_INGEST_WEBHOOK_TOKEN", "a-webhook-token-of-16+"),
                ("TURNSTILE_INGEST_DEFAULT_COMPANY_ID", "962302"),
                ("TURNSTILE_BATCHING_DEBOUNCE_MS", "250"),
                ("TURNSTILE_CONFIG", "ignored.toml"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.handler.url, "http://127.0.0.1:7000/turn");
        assert_eq!(c.ingest.default_company_id, "962302");
        assert_eq!(c.batching.debounce_ms, 250);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |pairs: &[(&str, &str)]| Config::load(None, env(pairs)).unwrap_err().to_string();
        assert!(err(&[("TURNSTILE_BATCHING_DEBOUNCE_MS", "soon")]).contains("batching.debounce_ms"));
        assert!(err(&[("TURNSTILE_BATCHING_MAX_MESSAGES", "0")]).contains("batching.max_messages"));
        assert!(err(&[("TURNSTILE_SERVER_LISTEN", "nowhere")]).contains("server.listen"));
        assert!(err(&[("TURNSTILE_HANDLER_KIND", "http")]).contains("handler.url"));
        assert!(err(&[("TURNSTILE_BATCHING_NOPE", "1")]).contains("batching.nope"));
        assert!(err(&[("TURNSTILE_SERVER_ADMIN_LISTEN", "0.0.0.0:8081")]).contains("server.admin_token"));
        assert!(err(&[("TURNSTILE_SERVER_ADMIN_LISTEN", "127.0.0.1:8080")]).contains("server.admin_listen"));
        assert!(err(&[("TURNSTILE_SERVER_LISTEN", "0.0.0.0:8081")]).contains("server.admin_listen"));
        assert!(err(&[("TURNSTILE_META_COMPANIES", "x")]).contains("meta.companies"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "[batching]\ndebounce_ms = \"ten\"\n").unwrap();
        let e = Config::load(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(e.contains("batching.debounce_ms"), "{e}");
        std::fs::write(&path, "[batching]\ndebounce = 5\n").unwrap();
        let e = Config::load(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(e.contains("debounce"), "{e}");
    }
}
