//! The daemon's one configuration: a TOML file where every key is optional,
//! overlaid by `TURNSTILE_<SECTION>_<KEY>` environment variables.
//!
//! The types are here; the defaults (named functions) in `defaults.rs`, the
//! environment overlay in `env.rs`, the rules in `validate.rs` and
//! `exposure.rs`. The example file in the repository
//! (`turnstile.example.toml`) and the code cannot drift: a unit test parses
//! the example and compares it with `Config::default()`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod defaults;
mod env;
mod secrets;
pub use env::TEST_FAULTS_ENV;
pub use secrets::SECRETS;
mod exposure;
mod validate;

pub use validate::STOP_RESERVE_MS;

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
    pub takeover: TakeoverConfig,
    pub handler: HandlerConfig,
    pub context: ContextConfig,
    pub meta: MetaConfig,
    pub waha: WahaConfig,
    pub evolution: EvolutionConfig,
    pub gateway: GatewayConfig,
    pub openai: OpenAiConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
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
    /// Time a client has to send a request's headers, counted from when the
    /// connection waits for them: also the longest an idle keep-alive
    /// connection stays open. Slower clients are disconnected.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's body once its headers are in;
    /// past it the answer is 408 and the connection closes.
    pub body_timeout_ms: u64,
    /// Open connections per listener; past it a new one is closed at once.
    pub max_connections: usize,
    /// The longest a stop may take, whatever clients or the handler do:
    /// running turns get `turns.shutdown_grace_ms` of it, the outbox, the
    /// connections and the store's last sync the rest. Keep it below the
    /// unit's TimeoutStopSec (30 s).
    pub stop_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// company_id given to messages whose payload has none.
    pub default_company_id: String,
    /// Largest accepted webhook body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest accepted message text (and staff message), in bytes.
    pub max_text_bytes: usize,
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
    /// Gateway deliveries that passed their secret check but no parser took
    /// are kept (answered 200) up to this many; past it they are answered 503.
    pub quarantine_max: usize,
    /// Held deliveries older than this are dropped.
    pub quarantine_days: u64,
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
    /// `fixed`: cut `debounce_ms` after the last message. `adaptive`: cut on
    /// what presence, the learned windows and the last message's shape
    /// say (the `adaptive_*`, `paused_grace_ms` and `typing_ttl_ms` keys).
    pub policy: CutPolicy,
    /// Adaptive: a learned window never goes below this…
    pub adaptive_min_quiet_ms: u64,
    /// …nor above this; pauses longer than this are not learned.
    pub adaptive_max_quiet_ms: u64,
    /// Adaptive, without presence: the gap between two messages of one
    /// request assumed before any is seen.
    pub adaptive_prior_gap_ms: u64,
    /// Adaptive, with presence: the silence before typing resumes within
    /// one request assumed before any is seen.
    pub adaptive_prior_resume_ms: u64,
    /// Adaptive: the quantile (%) of the learned pauses a window covers.
    pub adaptive_quantile_pct: u32,
    /// Adaptive: a window is this many hundredths of that quantile.
    pub adaptive_gap_factor_pct: u32,
    /// Adaptive: a complete-looking last message keeps this share (%) of the window.
    pub adaptive_complete_pct: u32,
    /// Adaptive: the fewest characters a message needs to look complete.
    pub adaptive_complete_min_chars: usize,
    /// Adaptive: never cut sooner than this after the last message.
    pub adaptive_floor_ms: u64,
    /// Adaptive, with presence: never cut sooner than this after the
    /// client went silent (a message, or `paused`).
    pub paused_grace_ms: u64,
    /// Adaptive: a typing indicator not refreshed for this long counts as gone.
    pub typing_ttl_ms: u64,
    /// Set on load when the file or environment gives `debounce_ms` but no
    /// `policy`: an install tuned for the fixed window keeps it (said at start).
    #[serde(skip)]
    pub kept_fixed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutPolicy {
    Fixed,
    Adaptive,
}

impl BatchingConfig {
    /// The rule in effect and its knobs, for the start log and `/api/batches`.
    pub fn effective(&self, on_new_message: OnNewMessage) -> serde_json::Value {
        let on_new = match on_new_message {
            OnNewMessage::Queue => "queue",
            OnNewMessage::Restart => "restart",
        };
        let mut v = match self.policy {
            CutPolicy::Fixed => serde_json::json!({
                "policy": "fixed",
                "debounce_ms": self.debounce_ms,
            }),
            CutPolicy::Adaptive => {
                let prior = crate::batcher::Batcher::<u8>::new(self.rules()).windows(&0);
                serde_json::json!({
                    "policy": "adaptive",
                    "quantile_pct": self.adaptive_quantile_pct,
                    "windows_ms": [self.adaptive_min_quiet_ms, self.adaptive_max_quiet_ms],
                    "prior_gap_window_ms": prior.gap.as_millis() as u64,
                    "prior_resume_window_ms": prior.resume.as_millis() as u64,
                    "paused_grace_ms": self.paused_grace_ms,
                    "typing_ttl_ms": self.typing_ttl_ms,
                })
            }
        };
        v["max_messages"] = self.max_messages.into();
        v["max_wait_ms"] = self.max_wait_ms.into();
        v["on_new_message"] = on_new.into();
        v["kept_fixed"] = self.kept_fixed.into();
        v
    }

    /// The batcher's rules from these keys.
    pub fn rules(&self) -> crate::batcher::Rules {
        use crate::batcher::{Adaptive, Policy};
        let ms = std::time::Duration::from_millis;
        crate::batcher::Rules {
            debounce: ms(self.debounce_ms),
            max_messages: self.max_messages,
            max_wait: ms(self.max_wait_ms),
            policy: match self.policy {
                CutPolicy::Fixed => Policy::Fixed,
                CutPolicy::Adaptive => Policy::Adaptive(Adaptive {
                    min_quiet: ms(self.adaptive_min_quiet_ms),
                    max_quiet: ms(self.adaptive_max_quiet_ms),
                    prior_gap: ms(self.adaptive_prior_gap_ms),
                    prior_resume: ms(self.adaptive_prior_resume_ms),
                    quantile_pct: self.adaptive_quantile_pct,
                    gap_factor_pct: self.adaptive_gap_factor_pct,
                    complete_pct: self.adaptive_complete_pct,
                    complete_min_chars: self.adaptive_complete_min_chars,
                    floor: ms(self.adaptive_floor_ms),
                    paused_grace: ms(self.paused_grace_ms),
                    typing_ttl: ms(self.typing_ttl_ms),
                }),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnsConfig {
    /// Turns of different phones running at once.
    pub max_concurrent: usize,
    /// Committed turns kept per conversation for `GET /api/conversations`.
    pub history_limit: usize,
    /// Bytes of history kept per conversation: older turns go first, and a
    /// turn larger than this alone is kept with its texts clipped.
    pub history_max_bytes: usize,
    /// On shutdown, how long running turns may take to finish before the
    /// daemon exits anyway (they re-run on the next start).
    pub shutdown_grace_ms: u64,
    /// Committed turns older than this are removed from the history.
    pub history_days: u64,
    /// Dead turns (and their messages) older than this are removed.
    pub dead_retention_days: u64,
    /// A message that comes while its conversation's turn runs: `queue` it
    /// for the next turn, or `restart` the turn (its handler call abandoned
    /// and its answer discarded) with every message, if the handler has not
    /// answered yet.
    pub on_new_message: OnNewMessage,
}

/// Human takeover: staff answering from the salon's phone pause the
/// assistant in that conversation (docs/gateways.md, "Human takeover").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TakeoverConfig {
    /// Staff messages (WAHA `message.any` from the phone, Evolution
    /// `fromMe`, Meta `smb_message_echoes`) pause the conversation.
    pub enabled: bool,
    /// The assistant comes back on its own after this many minutes without
    /// a staff message (and a pause from the API lasts this long unless
    /// it says otherwise).
    pub resume_after_min: u64,
    /// A staff message that is exactly this (any case, trimmed) resumes at
    /// once and is never shown to the assistant; empty: no keyword.
    pub keyword: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNewMessage {
    Queue,
    Restart,
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
    /// An approved template sent, once, when a reply cannot go because the
    /// 24-hour window closed (code 131047); the reply then waits for the
    /// client's answer. Empty: none (the reply is parked `outside_window`).
    pub reengagement_template: String,
    /// The template's language code (e.g. "ru").
    pub reengagement_language: String,
}

impl MetaConfig {
    /// Whether `/webhook/meta` is served: the section is configured.
    pub fn enabled(&self) -> bool {
        *self != MetaConfig::default()
    }
}

/// The WAHA webhook: served when any key here is set (`enabled`);
/// `/webhook/waha` answers 404 otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WahaConfig {
    /// HMAC key set on the WAHA webhook; when set, `X-Webhook-Hmac` is required.
    pub hmac_key: String,
    /// WAHA session name -> company_id (unlisted sessions: ingest.default_company_id).
    pub sessions: HashMap<String, String>,
    /// Take unsigned events even with a real gateway or handler (warned
    /// about at every start).
    pub allow_unauthenticated: bool,
    /// Subscribe to a chat's presence through WAHA's API
    /// (`POST /api/{session}/presence/{chat}/subscribe`) on its first message
    /// — WAHA reports presence only for subscribed chats. Takes effect with
    /// `gateway.kind = "waha"` (its URL and key) and the adaptive policy.
    pub subscribe_presence: bool,
}

impl WahaConfig {
    /// Whether `/webhook/waha` is served: the section is configured.
    pub fn enabled(&self) -> bool {
        *self != WahaConfig::default()
    }
}

/// The Evolution API webhook: served when any key here is set (`enabled`);
/// `/webhook/evolution` answers 404 otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EvolutionConfig {
    /// The instance's API key (its token): an event carrying it in the
    /// body's `apikey` (Evolution puts it there only with
    /// `AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES=true`) or an `apikey` header
    /// (a per-instance webhook's `headers`) is authenticated.
    pub api_key: String,
    /// A secret for the webhook's URL, for Evolution's global webhook (which
    /// sends no headers): events to `/webhook/evolution/key/<url_secret>`
    /// (and its per-event paths) are authenticated. At least 24 characters
    /// of `A-Z a-z 0-9 - _`; compared in constant time, never logged.
    pub url_secret: String,
    /// Evolution instance name -> company_id (unlisted instances: ingest.default_company_id).
    pub instances: HashMap<String, String>,
    /// Take events without a key even with a real gateway or handler
    /// (warned about at every start).
    pub allow_unauthenticated: bool,
}

impl EvolutionConfig {
    /// Whether `/webhook/evolution` is served: the section is configured.
    pub fn enabled(&self) -> bool {
        *self != EvolutionConfig::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayKind {
    Log,
    Http,
    Waha,
    Meta,
    Evolution,
}

/// Where replies go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// `log` (keep replies in the history only), `http`, `waha`, `meta` or `evolution`.
    pub kind: GatewayKind,
    /// http: the endpoint; waha, evolution: the base URL; meta: the Graph API base with version.
    pub url: String,
    /// waha: sent as X-Api-Key when set; evolution: sent as `apikey`.
    pub api_key: String,
    /// meta: the Bearer access token.
    pub access_token: String,
    /// waha: session for companies not listed in [waha] sessions; evolution:
    /// the instance for companies not listed in [evolution] instances.
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
    /// Reply pieces given up (or parked by the cap) are kept this long for
    /// `GET /api/outbox`, then removed; receipts too.
    pub failed_retention_days: u64,
    /// meta: a reply is sent only within this many hours of the client's
    /// last message (by its own timestamp); past it the piece is parked
    /// `outside_window` without an attempt. 0: no window. Other gateways
    /// have no such rule.
    pub window_hours: u64,
    /// While a turn's handler runs, show typing again this often (Meta shows
    /// it at most 25 s; WAHA's fades). 0: once.
    pub typing_refresh_ms: u64,
    /// Mark the client's messages read when their turn starts (Meta's read
    /// call, WAHA sendSeen, Evolution markMessageAsRead).
    pub mark_read: bool,
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
    /// The API key (or `api_key_file`; empty: no Authorization header).
    pub api_key: String,
    /// Deprecated: the name of an environment variable holding the API key,
    /// read when `api_key` is empty (with a warning).
    pub api_key_env: String,
    /// Past turns (a user and an assistant message each) sent with every request.
    pub history_turns: usize,
    /// The context's cache part (company, services, staff, schedule), when
    /// there is one, goes in a second system message: this text, then the
    /// cache's JSON...
    pub cache_prompt: String,
    /// ...cut at this many characters (0: the cache is never sent).
    pub cache_max_chars: usize,
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
    /// Largest answer read from the handler (reply and context parts); a
    /// larger one is a failed attempt.
    pub max_answer_bytes: usize,
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
    /// Put what clients wrote and what the assistant replied in `debug`
    /// lines. Off: logs carry sizes, ids, timings and masked phones only.
    pub message_text: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The most memory, in MiB, the embedded store's page cache may hold.
    pub cache_mb: u64,
    /// The store's files are rewritten online once they have grown this
    /// many MiB (and by half their size) since the last rewrite; 0: never.
    pub rewrite_after_mb: u64,
    /// How often, in seconds, the dedup marks of committed turns move from
    /// the embedded store into the dedup archive's files.
    pub archive_every_s: u64,
}

impl StoreConfig {
    pub fn options(&self) -> crate::store::Options {
        crate::store::Options {
            cache_bytes: self.cache_mb << 20,
            rewrite_after_bytes: self.rewrite_after_mb << 20,
        }
    }
}

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
        env::apply(&mut table, env)?;
        secrets::read_files(&mut table)?;
        // An install that tuned the fixed window before the adaptive policy
        // was the default keeps it — and the queue it ran with.
        let batching = table.get("batching").and_then(|b| b.as_table());
        let kept_fixed = batching.is_some_and(|b| b.contains_key("debounce_ms") && !b.contains_key("policy"));
        if kept_fixed {
            let section = |name: &str, t: &toml::Table| -> Option<toml::Table> {
                t.get(name).and_then(|v| v.as_table()).cloned()
            };
            let mut b = section("batching", &table).unwrap_or_default();
            b.insert("policy".into(), "fixed".into());
            table.insert("batching".into(), b.into());
            let mut turns = section("turns", &table).unwrap_or_default();
            turns.entry("on_new_message").or_insert_with(|| "queue".into());
            table.insert("turns".into(), turns.into());
        }
        let mut config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Invalid { key: e.path().to_string(), message: e.into_inner().to_string() }
            })?;
        config.batching.kept_fixed = kept_fixed;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_debounce_set_without_a_policy_keeps_the_fixed_window_it_was_tuned_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "[batching]\ndebounce_ms = 15000\n").unwrap();
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!((c.batching.policy, c.turns.on_new_message), (CutPolicy::Fixed, OnNewMessage::Queue));
        assert!(c.batching.kept_fixed);
        assert_eq!(c.batching.effective(c.turns.on_new_message)["policy"], "fixed");
        let c = Config::load(None, env(&[("TURNSTILE_BATCHING_DEBOUNCE_MS", "15000")])).unwrap();
        assert_eq!(c.batching.policy, CutPolicy::Fixed, "from the environment too");
        std::fs::write(&path, "[batching]\ndebounce_ms = 15000\n[turns]\non_new_message = \"restart\"\n")
            .unwrap();
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!((c.batching.policy, c.turns.on_new_message), (CutPolicy::Fixed, OnNewMessage::Restart));
        std::fs::write(&path, "[batching]\ndebounce_ms = 15000\npolicy = \"adaptive\"\n").unwrap();
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!((c.batching.policy, c.batching.kept_fixed), (CutPolicy::Adaptive, false));
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!((c.batching.policy, c.turns.on_new_message), (CutPolicy::Adaptive, OnNewMessage::Restart));
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
