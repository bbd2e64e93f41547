//! Every key's default, in named functions, and the sections' `Default`s
//! built from them. `turnstile.example.toml` lists the same values; a unit
//! test compares the two.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::*;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
/// Beside the public port, on loopback: the admin API is never exposed by default.
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
/// hyper's own default: generous for a gateway on a slow link, and above the
/// keep-alive idle time of common proxies' upstream pools (keep those below).
fn default_header_timeout_ms() -> u64 {
    30_000
}
fn default_body_timeout_ms() -> u64 {
    15_000
}
/// Far above what gateways open, well below the unit's LimitNOFILE.
fn default_max_connections() -> usize {
    1024
}
/// Below the unit's TimeoutStopSec=30 with room for the process to exit.
fn default_stop_timeout_ms() -> u64 {
    25_000
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
/// 32 KiB: 20 turns of ordinary chat fit (a turn of chat is under 1 KiB as
/// stored); a conversation of long texts keeps its last turns, clipped. It
/// also keeps a page of sled's (16 records) under what sled counts against
/// its cache (see `store::SEGMENT_BYTES`).
fn default_history_max_bytes() -> usize {
    32 * 1024
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
/// Both context parts at their limit (4 MiB each) and a reply.
fn default_max_answer_bytes() -> usize {
    9 * 1024 * 1024
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
/// A month: long enough to look into a problem, short enough not to pile up.
fn default_retention_days() -> u64 {
    30
}
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
            failed_retention_days: default_retention_days(),
            window_hours: 24,
            typing_refresh_ms: 20_000,
            mark_read: true,
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
            api_key: String::new(),
            api_key_env: "OPENAI_API_KEY".to_owned(),
            history_turns: 20,
            cache_prompt: "The salon's current data (company, services, staff, schedule), as JSON:"
                .to_owned(),
            cache_max_chars: 24_000,
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
            header_timeout_ms: default_header_timeout_ms(),
            body_timeout_ms: default_body_timeout_ms(),
            max_connections: default_max_connections(),
            stop_timeout_ms: default_stop_timeout_ms(),
        }
    }
}
impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            default_company_id: default_company_id(),
            max_body_bytes: default_max_body_bytes(),
            max_text_bytes: 16_384,
            dedup_days: default_dedup_days(),
            webhook_token: String::new(),
            generic_webhooks: true,
            allow_unauthenticated: false,
            quarantine_max: 1_000,
            quarantine_days: 7,
        }
    }
}
impl Default for WahaConfig {
    fn default() -> Self {
        WahaConfig {
            hmac_key: String::new(),
            sessions: HashMap::new(),
            allow_unauthenticated: false,
            subscribe_presence: true,
        }
    }
}
impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            debounce_ms: default_debounce_ms(),
            max_messages: default_max_messages(),
            max_wait_ms: default_max_wait_ms(),
            policy: CutPolicy::Adaptive,
            adaptive_min_quiet_ms: 2_000,
            adaptive_max_quiet_ms: 20_000,
            adaptive_prior_gap_ms: 8_000,
            adaptive_prior_resume_ms: 7_000,
            adaptive_quantile_pct: 93,
            adaptive_gap_factor_pct: 100,
            adaptive_complete_pct: 50,
            adaptive_complete_min_chars: 15,
            adaptive_floor_ms: 1_000,
            paused_grace_ms: 2_500,
            typing_ttl_ms: 12_000,
            kept_fixed: false,
        }
    }
}
impl Default for TakeoverConfig {
    fn default() -> Self {
        TakeoverConfig { enabled: true, resume_after_min: 30, keyword: "#bot".into() }
    }
}
impl Default for TurnsConfig {
    fn default() -> Self {
        TurnsConfig {
            max_concurrent: default_max_concurrent(),
            history_limit: default_history_limit(),
            history_max_bytes: default_history_max_bytes(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            history_days: default_retention_days(),
            dead_retention_days: default_retention_days(),
            on_new_message: OnNewMessage::Restart,
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
            max_answer_bytes: default_max_answer_bytes(),
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
impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_mb: crate::store::DEFAULT_CACHE_MB,
            rewrite_after_mb: crate::store::DEFAULT_REWRITE_AFTER_MB,
            archive_every_s: 60,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: default_log_filter(), mask_phones: true, message_text: false }
    }
}
