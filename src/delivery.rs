//! What the client actually received, and whether a reply may still go:
//! WhatsApp's receipts for our sends (matched by the id the gateway gave
//! each one: `store::receipts`), what a failure means for the piece
//! (`gateway::refusal_of`: back into the outbox, or parked for good), and
//! Meta's 24-hour customer service window, known in advance from when each
//! client last wrote (`Store::last_inbound`, by the message's own timestamp).
//! Shared by the outbox task and the webhooks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::{Config, GatewayKind};
use crate::gateway::{refusal_of, Refusal};
use crate::ingest::Receipt as Said;
use crate::message::{mask, unix_ms, Conv};
use crate::metrics::Metrics;
use crate::store::{Delivery, OutboxItem, Store, StoreError};

/// How parked pieces start their `last_error`, and the state each makes
/// (`outbox::OutboxState::of`).
pub const OUTSIDE_WINDOW: &str = "outside_window:";
pub const AWAITING_CLIENT: &str = "awaiting_client:";
pub const UNDELIVERABLE: &str = "undeliverable:";

/// At most one re-engagement template per conversation this often.
const TEMPLATE_EVERY_MS: u64 = 24 * 3_600_000;

pub struct Deliveries {
    store: Store,
    metrics: Arc<Metrics>,
    /// Wakes the outbox (a piece came back).
    wake: Arc<Notify>,
    /// Meta: replies go only within this long of the client's last message.
    window_ms: Option<u64>,
    max_attempts: u32,
    /// Conversations WhatsApp said were outside the window (code 131047),
    /// with the client's last message as we knew it then: closed until a
    /// newer one arrives. Memory only: a restart asks WhatsApp again (one
    /// refused send).
    closed: Mutex<HashMap<Conv, Option<u64>>>,
    /// When the re-engagement template last went to each conversation: at
    /// most one a day, however often WhatsApp refuses. Memory only, like
    /// `closed`.
    templated: Mutex<HashMap<Conv, u64>>,
}

impl Deliveries {
    pub fn new(config: &Config, store: Store, metrics: Arc<Metrics>) -> Arc<Deliveries> {
        let window = config.gateway.kind == GatewayKind::Meta && config.gateway.window_hours > 0;
        Arc::new(Deliveries {
            wake: store.outbox_ready(),
            store,
            metrics,
            window_ms: window.then(|| config.gateway.window_hours * 3_600_000),
            max_attempts: config.gateway.max_attempts,
            closed: Mutex::default(),
            templated: Mutex::default(),
        })
    }

    /// Whether a reply to `conv` may go now: the client wrote within the
    /// window (and after WhatsApp last said it was closed).
    pub fn window_open(&self, conv: &Conv, now_ms: u64) -> bool {
        let last = self.store.last_inbound(conv);
        {
            let mut closed = self.closed.lock().expect("deliveries lock");
            if let Some(then) = closed.get(conv).copied() {
                if last <= then {
                    return false;
                }
                closed.remove(conv);
            }
        }
        match self.window_ms {
            None => true,
            Some(w) => last.is_some_and(|l| now_ms.saturating_sub(l) < w),
        }
    }

    /// WhatsApp says the window of `conv` is closed: it stays closed until
    /// the client writes again.
    pub fn close_window(&self, conv: &Conv) {
        let last = self.store.last_inbound(conv);
        self.closed.lock().expect("deliveries lock").insert(conv.clone(), last);
    }

    /// What WhatsApp said of one of our messages.
    pub async fn receipt(&self, said: Said) -> Result<(), StoreError> {
        let Some((r, news)) =
            self.store.receipt_update(&said.id, said.state, said.at_ms, said.failure).await?
        else {
            self.metrics.receipt("unknown");
            return Ok(());
        };
        if !news {
            return Ok(());
        }
        self.metrics.receipt(said.state.as_str());
        if matches!(said.state, Delivery::Delivered | Delivery::Read | Delivery::Played) {
            if let Some(at) = r.delivered_at_ms.filter(|at| *at == said.at_ms) {
                self.metrics.reply_delivery.observe(at.saturating_sub(r.sent_at_ms) as f64 / 1000.0);
            }
        }
        if said.state != Delivery::Failed {
            return Ok(());
        }
        let failure = r.failed.clone().unwrap_or_else(|| crate::store::Failure {
            code: None,
            title: "failed".into(),
            at_ms: said.at_ms,
        });
        self.metrics.delivery_failure(failure.code);
        let code = failure.code.map_or("none".to_owned(), |c| c.to_string());
        let phone = mask(&r.conv.phone);
        warn!(turn_id = %r.turn_id, %phone, code, title = %failure.title, "WhatsApp refused a reply the gateway had taken");
        let piece = OutboxItem {
            seq: r.seq,
            turn_id: r.turn_id.clone(),
            conv: r.conv.clone(),
            text: r.text.clone(),
            part: r.part,
            parts: r.parts,
            created_at_ms: r.sent_at_ms,
            attempts: r.attempts + 1,
            last_error: Some(format!("WhatsApp refused it after sending (code {code}): {}", failure.title)),
            failed: false,
        };
        let piece = match refusal_of(failure.code) {
            Refusal::Retry if piece.attempts < self.max_attempts => piece,
            Refusal::Retry => OutboxItem { failed: true, ..piece },
            Refusal::OutsideWindow => {
                // Back in line: the outbox sees the window closed and parks
                // it (or sends the template).
                self.close_window(&r.conv);
                piece
            }
            Refusal::Undeliverable => OutboxItem {
                failed: true,
                last_error: Some(format!(
                    "{UNDELIVERABLE} WhatsApp cannot deliver to this number (code {code}): {}",
                    failure.title
                )),
                ..piece
            },
        };
        info!(turn_id = %r.turn_id, %phone, requeued = !piece.failed, "a refused reply goes back to the outbox");
        self.store.outbox_update(&piece).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Whether the template may go to `conv` now (none went in the last
    /// day); if so, it counts as sent.
    pub fn take_template(&self, conv: &Conv, now_ms: u64) -> bool {
        let mut templated = self.templated.lock().expect("deliveries lock");
        templated.retain(|_, at| now_ms.saturating_sub(*at) < TEMPLATE_EVERY_MS);
        if templated.contains_key(conv) {
            return false;
        }
        templated.insert(conv.clone(), now_ms);
        true
    }

    /// The template did not go after all.
    pub fn untake_template(&self, conv: &Conv) {
        self.templated.lock().expect("deliveries lock").remove(conv);
    }

    /// When the clock says now (for the outbox's window checks).
    pub fn now_ms(&self) -> u64 {
        unix_ms()
    }
}
