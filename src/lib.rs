//! turnstile: durable per-phone batching and one-turn-at-a-time dispatch
//! between WhatsApp webhooks and an AI booking assistant.
//!
//! The modules below are declared in the order a message flows through them;
//! `ARCHITECTURE.md` maps that flow and says what each module may not touch.

pub mod config; // the one TOML file, environment overrides, validation
pub mod check; // `turnstile check`: what a config would start as, and what looks wrong
pub mod clock; // wall-clock time, injectable for expiry tests
pub mod http; // axum routes: webhooks on the public listener; APIs and metrics on the admin one
pub mod message; // what a message and a conversation (company, phone) are
pub mod ingest; // webhook payloads (generic, Meta, WAHA, Evolution) -> messages on disk -> batcher
pub mod store; // the message log and the only module that names sled: dedup, turns, history, contexts, outbox, takeovers, receipts
pub mod batcher; // sans-IO debounce: when a phone's pending messages become a turn
pub mod delivery; // receipts, failures after sending, the 24-hour window
pub mod takeover; // who answers a conversation: the assistant, or staff who took it over
pub mod turns; // the turn gate, the schedule (batcher + gate + restarts), the driver task, one turn
pub mod handler; // who answers a turn: echo, an HTTP service or an OpenAI-compatible API
pub mod context; // the per-conversation memory (dialogue + cache), compressed
pub mod sweep; // background sweeps: dedup marks archived and expired, contexts, retention
pub mod outbox; // durable delivery of replies: in order per phone, retried, sent once
pub mod gateway; // one send to WhatsApp: log, http, WAHA, Meta or Evolution; typing; splitting
pub mod feed; // what the operator console shows live: running and recent turns, rate samples
pub mod metrics; // Prometheus text: counters, histograms, gauges read at scrape
pub mod heap; // live heap bytes: the global allocator with a counter
pub mod ops; // systemd: READY, STOPPING, watchdog pings
pub mod backup; // backup files: write, verify, offline backup and restore
pub mod replay; // `turnstile replay`: traces through the daemon's schedule on simulated time; synthetic traces
pub mod server; // wiring: open the store, serve, recover, shut down in order

pub use config::Config;
pub use http::serve::Listeners;
pub use server::{run, Deps};
