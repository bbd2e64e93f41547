//! Metrics in the Prometheus text format, for `GET /metrics`.
//!
//! A small hand-rolled registry: counters and fixed-bucket histograms that
//! the pipeline updates as it goes, plus gauges read at scrape time (pending
//! batches, outbox depth, store size...). One `Metrics` per daemon instance,
//! not a global, so tests can run several daemons in one process.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram over seconds with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const LATENCY: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];
const LAG: &[f64] =
    &[0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const IDLE: &[f64] = &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0];
const SIZE: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 50.0];

/// What the pipeline counts as it goes.
/// Distinct `code` labels of `turnstile_delivery_failures_total`; the rest
/// count as "other".
const MAX_FAILURE_CODES: usize = 40;

pub struct Metrics {
    /// (endpoint, status, reason) → requests.
    webhooks: Mutex<BTreeMap<(String, u16, &'static str), u64>>,
    /// Gateway → deliveries put in the quarantine.
    quarantined: Mutex<BTreeMap<&'static str, u64>>,
    /// Cut batches by the signal that decided the cut (`CutReason::ALL` order).
    pub cuts: [AtomicU64; 9],
    /// Turns abandoned for a re-run with later messages (`turns.on_new_message`).
    pub turn_restarts: AtomicU64,
    pub batch_size: Histogram,
    pub idle_at_cut: Histogram,
    pub debounce_lag: Histogram,
    pub turn_duration: Histogram,
    pub handler_latency: Histogram,
    /// A batch's deadline to its handler's first call (cut, gate, turn record and fsync).
    pub deadline_to_handler: Histogram,
    /// Handler answer to commit on disk (context encode, transaction, fsync).
    pub commit_latency: Histogram,
    pub handler_retries: AtomicU64,
    pub handler_errors: AtomicU64,
    pub turns_committed: AtomicU64,
    pub turns_dead: AtomicU64,
    pub replies_sent: AtomicU64,
    pub send_failures: AtomicU64,
    /// Turn work the store could not record, read or commit (retried).
    pub turn_store_failures: AtomicU64,
    /// Replies parked by `gateway.max_replies_per_conversation_per_hour`.
    pub replies_rate_limited: AtomicU64,
    /// Replies held back because staff took their conversation over.
    pub replies_suppressed: AtomicU64,
    /// Takeovers started, per signal (waha, evolution, meta, api).
    takeovers: Mutex<BTreeMap<String, u64>>,
    /// Receipts taken, by state (and `unknown`: not one of ours).
    receipts: Mutex<BTreeMap<&'static str, u64>>,
    /// Replies WhatsApp refused, by error code (`none` when it gave none).
    delivery_failures: Mutex<BTreeMap<String, u64>>,
    /// From a reply's send to its delivery receipt, seconds.
    pub reply_delivery: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            webhooks: Mutex::default(),
            quarantined: Mutex::default(),
            cuts: Default::default(),
            turn_restarts: AtomicU64::new(0),
            batch_size: Histogram::new(SIZE),
            idle_at_cut: Histogram::new(IDLE),
            debounce_lag: Histogram::new(LAG),
            turn_duration: Histogram::new(LATENCY),
            handler_latency: Histogram::new(LATENCY),
            deadline_to_handler: Histogram::new(LAG),
            commit_latency: Histogram::new(LAG),
            handler_retries: AtomicU64::new(0),
            handler_errors: AtomicU64::new(0),
            turns_committed: AtomicU64::new(0),
            turns_dead: AtomicU64::new(0),
            replies_sent: AtomicU64::new(0),
            send_failures: AtomicU64::new(0),
            turn_store_failures: AtomicU64::new(0),
            replies_rate_limited: AtomicU64::new(0),
            replies_suppressed: AtomicU64::new(0),
            takeovers: Mutex::default(),
            receipts: Mutex::default(),
            // The codes an operator watches for exist from the start, at 0
            // (Prometheus sees their first increase).
            delivery_failures: Mutex::new(
                ["131047", "131026", "131049", "131056", "none"]
                    .into_iter()
                    .map(|c| (c.to_owned(), 0))
                    .collect(),
            ),
            reply_delivery: Histogram::new(LATENCY),
        }
    }
}

/// Gauges read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub ready: bool,
    pub pending_batches: usize,
    pub pending_messages: usize,
    pub turns_in_flight: usize,
    pub dead_turns: usize,
    pub outbox_depth: usize,
    pub outbox_failed: usize,
    pub outbox_rate_limited: usize,
    pub context_hits: u64,
    pub context_misses: u64,
    pub context_invalidations: u64,
    pub contexts: i64,
    pub context_raw_bytes: i64,
    pub context_stored_bytes: i64,
    pub store_bytes: u64,
    pub fsyncs: u64,
    /// The store takes writes (false once it failed).
    pub store_ok: bool,
    pub log_syncs: u64,
    pub tree_syncs: u64,
    pub messages_stored: u64,
    pub log_segments: usize,
    /// Per listener (public, admin): connections open, and refused at the cap.
    pub connections: [(u64, u64); 2],
    /// Removed by retention: dead turns, given-up outbox pieces, history.
    pub expired: [u64; 3],
    /// Bytes of the trees' files (the embedded store) and of the message log.
    pub file_bytes: crate::store::FileSizes,
    /// Live records and their key + value bytes, per tree of the embedded store.
    pub trees: Vec<crate::store::TreeSize>,
    /// Online rewrites of the trees' files that completed.
    pub store_rewrites: u64,
    /// Repairs the store's open made (a torn tail cut, a damaged cache dropped).
    pub store_repairs: usize,
    /// Age of the oldest batch still collecting messages, seconds.
    pub oldest_pending_batch_s: f64,
    /// `batching.max_wait_ms`, in seconds.
    pub batch_max_wait_s: f64,
    /// Age of the oldest reply piece not yet delivered (nor given up), seconds.
    pub oldest_outbox_s: f64,
    /// Since the store's last successful sync, seconds.
    pub last_sync_age_s: f64,
    /// Gateway deliveries held in the quarantine.
    pub quarantine_held: usize,
    /// Reply pieces parked because the 24-hour window closed (waiting for
    /// the client, or for good).
    pub outbox_outside_window: usize,
    /// Conversations staff have taken over, and how long the oldest client
    /// message waits in one of them (0: none waits).
    pub paused_conversations: usize,
    pub paused_oldest_waiting_s: f64,
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Webhook requests answered so far, whatever their status.
    pub fn webhooks_total(&self) -> u64 {
        self.webhooks.lock().expect("metrics lock").values().sum()
    }

    /// One webhook answered; `refused` names why it was refused when it
    /// matters (`secret`: its secret was missing or wrong), else the reason
    /// is the status's class: `ok`, `input` (4xx), `unavailable` (503), `other`.
    pub fn webhook(&self, endpoint: &str, status: u16, refused: Option<&'static str>) {
        let reason = refused.unwrap_or(match status {
            200..=299 => "ok",
            503 => "unavailable",
            400..=499 => "input",
            _ => "other",
        });
        let mut w = self.webhooks.lock().expect("metrics lock");
        *w.entry((endpoint.to_owned(), status, reason)).or_default() += 1;
    }

    /// Webhooks refused for `reason` since the start, all endpoints.
    pub fn webhooks_refused(&self, reason: &str) -> u64 {
        let w = self.webhooks.lock().expect("metrics lock");
        w.iter().filter(|((_, _, r), _)| *r == reason).map(|(_, n)| n).sum()
    }

    pub fn receipt(&self, state: &'static str) {
        *self.receipts.lock().expect("metrics lock").entry(state).or_default() += 1;
    }

    pub fn delivery_failure(&self, code: Option<i64>) {
        let mut codes = self.delivery_failures.lock().expect("metrics lock");
        let mut code = code.map_or("none".to_owned(), |c| c.to_string());
        // The label stays bounded whatever a gateway reports.
        if !codes.contains_key(&code) && codes.len() >= MAX_FAILURE_CODES {
            code = "other".to_owned();
        }
        *codes.entry(code).or_default() += 1;
    }

    /// Staff took a conversation over, by `signal`.
    pub fn takeover(&self, signal: &str) {
        *self.takeovers.lock().expect("metrics lock").entry(signal.to_owned()).or_default() += 1;
    }

    /// A gateway delivery put in the quarantine.
    pub fn quarantined(&self, gateway: &'static str) {
        *self.quarantined.lock().expect("metrics lock").entry(gateway).or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP turnstile_webhooks_total Webhook requests by endpoint, answer status and reason (ok, secret: refused for a missing or wrong secret, input, unavailable, other).\n# TYPE turnstile_webhooks_total counter"
        );
        for ((endpoint, status, reason), n) in self.webhooks.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "turnstile_webhooks_total{{endpoint=\"{endpoint}\",status=\"{status}\",reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP turnstile_quarantined_total Authenticated gateway deliveries no parser took, kept in the quarantine.\n# TYPE turnstile_quarantined_total counter"
        );
        for gateway in ["meta", "waha", "evolution"] {
            let n = self.quarantined.lock().expect("metrics lock").get(gateway).copied().unwrap_or(0);
            let _ = writeln!(out, "turnstile_quarantined_total{{gateway=\"{gateway}\"}} {n}");
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "turnstile_ready",
            "1 once recovery is done and the daemon takes webhooks.",
            g.ready as u8 as f64,
        );
        gauge(
            &mut out,
            "turnstile_pending_batches",
            "Conversations with a batch collecting or waiting for its turn.",
            g.pending_batches as f64,
        );
        gauge(
            &mut out,
            "turnstile_pending_messages",
            "Messages in those batches.",
            g.pending_messages as f64,
        );
        gauge(&mut out, "turnstile_turns_in_flight", "Turns running now.", g.turns_in_flight as f64);
        gauge(&mut out, "turnstile_dead_turns", "Turns parked as dead (GET /api/dead).", g.dead_turns as f64);
        gauge(
            &mut out,
            "turnstile_outbox_depth",
            "Reply pieces waiting for the gateway.",
            g.outbox_depth as f64,
        );
        gauge(
            &mut out,
            "turnstile_outbox_failed",
            "Reply pieces given up after gateway.max_attempts (GET /api/outbox).",
            g.outbox_failed as f64,
        );
        gauge(
            &mut out,
            "turnstile_outbox_rate_limited",
            "Reply pieces parked by the reply cap, never sent (GET /api/outbox).",
            g.outbox_rate_limited as f64,
        );
        let _ = writeln!(
            out,
            "# HELP turnstile_cuts_total Batches cut, by the signal that decided the cut.\n# TYPE turnstile_cuts_total counter"
        );
        for (reason, n) in crate::batcher::CutReason::ALL.iter().zip(&self.cuts) {
            let _ = writeln!(out, "turnstile_cuts_total{{reason=\"{}\"}} {}", reason.as_str(), load(n));
        }
        self.batch_size.render(&mut out, "turnstile_batch_size", "Messages per cut batch.");
        self.idle_at_cut.render(
            &mut out,
            "turnstile_idle_at_cut_seconds",
            "Time since the batch's last message when it was cut.",
        );
        self.debounce_lag.render(
            &mut out,
            "turnstile_debounce_lag_seconds",
            "Actual cut time minus its deadline.",
        );
        self.turn_duration.render(&mut out, "turnstile_turn_duration_seconds", "Turn start to commit.");
        self.handler_latency.render(&mut out, "turnstile_handler_latency_seconds", "One handler attempt.");
        self.deadline_to_handler.render(
            &mut out,
            "turnstile_deadline_to_handler_seconds",
            "A debounced batch's deadline to its handler's first call.",
        );
        self.commit_latency.render(&mut out, "turnstile_commit_seconds", "Handler answer to commit on disk.");
        counter(
            &mut out,
            "turnstile_handler_retries_total",
            "Handler attempts that failed and were retried.",
            load(&self.handler_retries),
        );
        counter(
            &mut out,
            "turnstile_handler_errors_total",
            "Handler attempts that failed (an error or a timeout), retried or not.",
            load(&self.handler_errors),
        );
        counter(&mut out, "turnstile_turns_committed_total", "Turns committed.", load(&self.turns_committed));
        counter(&mut out, "turnstile_turns_dead_total", "Turns parked as dead.", load(&self.turns_dead));
        counter(
            &mut out,
            "turnstile_replies_sent_total",
            "Reply pieces the gateway accepted.",
            load(&self.replies_sent),
        );
        counter(
            &mut out,
            "turnstile_send_failures_total",
            "Failed sends to the gateway.",
            load(&self.send_failures),
        );
        counter(
            &mut out,
            "turnstile_replies_rate_limited_total",
            "Replies not sent: their conversation had gateway.max_replies_per_conversation_per_hour already.",
            load(&self.replies_rate_limited),
        );
        counter(
            &mut out,
            "turnstile_context_cache_hits_total",
            "Context reads that found a cache.",
            g.context_hits,
        );
        counter(
            &mut out,
            "turnstile_context_cache_misses_total",
            "Context reads without a cache.",
            g.context_misses,
        );
        counter(
            &mut out,
            "turnstile_context_invalidations_total",
            "Caches dropped by invalidation.",
            g.context_invalidations,
        );
        gauge(
            &mut out,
            "turnstile_oldest_pending_batch_seconds",
            "Age of the oldest batch still collecting messages (0: none).",
            g.oldest_pending_batch_s,
        );
        gauge(
            &mut out,
            "turnstile_batch_max_wait_seconds",
            "batching.max_wait_ms: no batch should collect longer.",
            g.batch_max_wait_s,
        );
        gauge(
            &mut out,
            "turnstile_oldest_outbox_seconds",
            "Age of the oldest reply piece not yet delivered nor given up (0: none).",
            g.oldest_outbox_s,
        );
        gauge(
            &mut out,
            "turnstile_store_last_sync_age_seconds",
            "Since the store's last successful sync (of the message log or the trees); grows while idle.",
            g.last_sync_age_s,
        );
        gauge(&mut out, "turnstile_contexts", "Contexts stored.", g.contexts as f64);
        gauge(
            &mut out,
            "turnstile_context_raw_bytes",
            "JSON bytes of the stored contexts.",
            g.context_raw_bytes as f64,
        );
        gauge(
            &mut out,
            "turnstile_context_stored_bytes",
            "Deflated bytes of the stored contexts.",
            g.context_stored_bytes as f64,
        );
        gauge(
            &mut out,
            "turnstile_store_size_bytes",
            "The data directory's size on disk, as the store counts it.",
            g.store_bytes as f64,
        );
        let _ = writeln!(
            out,
            "# HELP turnstile_store_file_bytes Bytes on disk: the trees' files (the embedded store), the message log's segments, the dedup archive's files, the context part files.\n# TYPE turnstile_store_file_bytes gauge"
        );
        let f = &g.file_bytes;
        let _ = writeln!(out, "turnstile_store_file_bytes{{part=\"trees\"}} {}", f.trees);
        let _ = writeln!(out, "turnstile_store_file_bytes{{part=\"log\"}} {}", f.log);
        let _ = writeln!(out, "turnstile_store_file_bytes{{part=\"dedup_archive\"}} {}", f.dedup_archive);
        let _ = writeln!(out, "turnstile_store_file_bytes{{part=\"contexts\"}} {}", f.contexts);
        let _ = writeln!(
            out,
            "# HELP turnstile_tree_records Live records per tree (counted at most once a minute).\n# TYPE turnstile_tree_records gauge"
        );
        for t in &g.trees {
            let _ = writeln!(out, "turnstile_tree_records{{tree=\"{}\"}} {}", t.tree, t.records);
        }
        let _ = writeln!(
            out,
            "# HELP turnstile_tree_bytes Key + value bytes of the live records per tree (counted at most once a minute).\n# TYPE turnstile_tree_bytes gauge"
        );
        for t in &g.trees {
            let _ = writeln!(out, "turnstile_tree_bytes{{tree=\"{}\"}} {}", t.tree, t.bytes);
        }
        counter(
            &mut out,
            "turnstile_fsyncs_total",
            "Every fsync/fdatasync the store made (message log, committed state, directories).",
            g.fsyncs,
        );
        counter(
            &mut out,
            "turnstile_log_syncs_total",
            "fdatasync calls on the message log: one per group of acknowledged writes.",
            g.log_syncs,
        );
        counter(
            &mut out,
            "turnstile_store_syncs_total",
            "Syncs of the committed-state files (flush, then fdatasync).",
            g.tree_syncs,
        );
        counter(
            &mut out,
            "turnstile_messages_stored_total",
            "Messages stored and acknowledged as accepted.",
            g.messages_stored,
        );
        let _ = writeln!(
            out,
            "# HELP turnstile_connections Open connections per listener.\n# TYPE turnstile_connections gauge"
        );
        for (listener, (open, _)) in ["public", "admin"].iter().zip(g.connections) {
            let _ = writeln!(out, "turnstile_connections{{listener=\"{listener}\"}} {open}");
        }
        let _ = writeln!(
            out,
            "# HELP turnstile_connections_refused_total Connections closed at once at server.max_connections.\n# TYPE turnstile_connections_refused_total counter"
        );
        for (listener, (_, refused)) in ["public", "admin"].iter().zip(g.connections) {
            let _ = writeln!(out, "turnstile_connections_refused_total{{listener=\"{listener}\"}} {refused}");
        }
        let _ = writeln!(
            out,
            "# HELP turnstile_expired_total Records removed by retention, by kind.\n# TYPE turnstile_expired_total counter"
        );
        for (kind, n) in ["dead_turns", "outbox_failed", "history"].iter().zip(g.expired) {
            let _ = writeln!(out, "turnstile_expired_total{{kind=\"{kind}\"}} {n}");
        }
        gauge(
            &mut out,
            "turnstile_heap_bytes",
            "Bytes the daemon's allocations hold now; the rest of its RSS is kept by the allocator or mapped files.",
            crate::heap::live_bytes() as f64,
        );
        gauge(&mut out, "turnstile_log_segments", "Message-log segment files.", g.log_segments as f64);
        counter(
            &mut out,
            "turnstile_store_rewrites_total",
            "Online rewrites of the trees' files into a fresh directory (store.rewrite_after_mb).",
            g.store_rewrites,
        );
        gauge(
            &mut out,
            "turnstile_store_repairs_at_start",
            "Repairs the store made when it opened (a torn tail cut, a damaged cache dropped); /readyz lists them, each naming its file.",
            g.store_repairs as f64,
        );
        gauge(
            &mut out,
            "turnstile_store_ok",
            "1 while the store takes writes; 0 while message-log writes fail, or once it failed (the daemon then exits for a restart).",
            g.store_ok as u8 as f64,
        );
        let _ = writeln!(
            out,
            "# HELP turnstile_takeovers_total Conversations staff took over, by the signal that said so.\n# TYPE turnstile_takeovers_total counter"
        );
        for signal in ["waha", "evolution", "meta", "api"] {
            let n = self.takeovers.lock().expect("metrics lock").get(signal).copied().unwrap_or(0);
            let _ = writeln!(out, "turnstile_takeovers_total{{signal=\"{signal}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP turnstile_receipts_total Delivery receipts taken, by state (unknown: for no message of ours).\n# TYPE turnstile_receipts_total counter"
        );
        for state in ["sent", "server", "delivered", "read", "played", "failed", "unknown"] {
            let n = self.receipts.lock().expect("metrics lock").get(state).copied().unwrap_or(0);
            let _ = writeln!(out, "turnstile_receipts_total{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP turnstile_delivery_failures_total Replies WhatsApp refused after the gateway took them, or at once, by error code.\n# TYPE turnstile_delivery_failures_total counter"
        );
        for (code, n) in self.delivery_failures.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "turnstile_delivery_failures_total{{code=\"{code}\"}} {n}");
        }
        self.reply_delivery.render(
            &mut out,
            "turnstile_reply_delivery_seconds",
            "From a reply's send to WhatsApp's delivery receipt.",
        );
        gauge(
            &mut out,
            "turnstile_outbox_outside_window",
            "Reply pieces parked because more than the window passed since the client last wrote.",
            g.outbox_outside_window as f64,
        );
        counter(
            &mut out,
            "turnstile_replies_suppressed_total",
            "Replies not sent because staff took their conversation over meanwhile.",
            load(&self.replies_suppressed),
        );
        gauge(
            &mut out,
            "turnstile_paused_conversations",
            "Conversations staff have taken over (the assistant waits).",
            g.paused_conversations as f64,
        );
        gauge(
            &mut out,
            "turnstile_paused_oldest_waiting_seconds",
            "How long the oldest client message waits in a paused conversation (0: none waits).",
            g.paused_oldest_waiting_s,
        );
        gauge(
            &mut out,
            "turnstile_quarantine_held",
            "Gateway deliveries held in the quarantine, waiting for a replay (or their expiry).",
            g.quarantine_held as f64,
        );
        counter(
            &mut out,
            "turnstile_turn_restarts_total",
            "Turns abandoned before their handler answered, re-run with the messages that came meanwhile.",
            load(&self.turn_restarts),
        );
        counter(
            &mut out,
            "turnstile_turn_store_failures_total",
            "Turn work the store could not record, read or commit; retried in order after a backoff.",
            load(&self.turn_store_failures),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_webhooks_labelled() {
        let m = Metrics::default();
        for v in [1.0, 2.0, 10.0, 100.0] {
            m.batch_size.observe(v);
        }
        m.webhook("/webhook/whatsapp/batched", 200, None);
        m.webhook("/webhook/whatsapp/batched", 200, None);
        m.webhook("/webhook/whatsapp/batched", 422, None);
        let text = m.render(&Gauges::default());
        assert!(text.contains("turnstile_batch_size_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("turnstile_batch_size_bucket{le=\"10\"} 3\n"));
        assert!(text.contains("turnstile_batch_size_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("turnstile_batch_size_sum 113\n"));
        assert!(text
            .contains("turnstile_webhooks_total{endpoint=\"/webhook/whatsapp/batched\",status=\"200\",reason=\"ok\"} 2\n"));
        assert!(text
            .contains("turnstile_webhooks_total{endpoint=\"/webhook/whatsapp/batched\",status=\"422\",reason=\"input\"} 1\n"));
    }
}
