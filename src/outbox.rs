//! Delivery of replies: one task that takes the outbox (written in each
//! turn's commit), sends every conversation's oldest piece through the
//! gateway, and removes it once the gateway took it.
//!
//! Order: a conversation's next piece is sent only after the previous one
//! went through, so one phone's replies arrive in order. A conversation whose
//! send failed waits out a backoff; others go on. A piece is removed (and the
//! removal flushed) only after the gateway answered 2xx, so a restart never
//! loses a reply; a crash in the instant between the two may send it twice,
//! which is why the http gateway carries an idempotency key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::backoff;
use crate::config::Config;
use crate::gateway::{Delivery, Gateway};
use crate::message::{mask, Conv};
use crate::metrics::{inc, Metrics};
use crate::store::{OutboxItem, Store};

/// Sends in flight at once (across conversations).
const MAX_PARALLEL: usize = 16;

pub struct Outbox {
    store: Store,
    gateway: Arc<Gateway>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    backoff: Duration,
    backoff_max: Duration,
    max_attempts: u32,
}

impl Outbox {
    pub fn new(
        config: &Config,
        store: Store,
        gateway: Arc<Gateway>,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox {
            store,
            metrics,
            gateway,
            wake,
            backoff: Duration::from_millis(config.gateway.backoff_ms),
            backoff_max: Duration::from_millis(config.gateway.backoff_max_ms),
            max_attempts: config.gateway.max_attempts,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut not_before: HashMap<Conv, Instant> = HashMap::new();
        // Sends in flight finish (within the gateway timeout); no new round starts.
        while !shutdown.is_cancelled() {
            let items = match self.store.outbox() {
                Ok(items) => items,
                Err(e) => {
                    error!(error = %e, "cannot read the outbox");
                    Vec::new()
                }
            };
            let now = Instant::now();
            not_before.retain(|_, t| *t > now);
            // Each conversation's oldest live piece, unless it is backing off.
            let mut heads = HashSet::new();
            let ready: Vec<OutboxItem> = items
                .into_iter()
                .filter(|i| !i.failed)
                .filter(|i| heads.insert(i.conv.clone()))
                .filter(|i| !not_before.contains_key(&i.conv))
                .take(MAX_PARALLEL)
                .collect();
            if ready.is_empty() {
                let next = not_before.values().min().copied();
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = sleep_until(next) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            let mut sends = JoinSet::new();
            for item in ready {
                let gateway = self.gateway.clone();
                sends.spawn(async move {
                    let d = Delivery {
                        turn_id: &item.turn_id,
                        conv: &item.conv,
                        text: &item.text,
                        part: item.part,
                        parts: item.parts,
                    };
                    let result = gateway.send(&d).await;
                    (item, result)
                });
            }
            while let Some(joined) = sends.join_next().await {
                let Ok((mut item, result)) = joined else { continue };
                let span =
                    tracing::info_span!("send", turn_id = %item.turn_id, phone = %mask(&item.conv.phone));
                let _enter = span.enter();
                let written = match result {
                    Ok(()) => {
                        inc(&self.metrics.replies_sent);
                        info!(part = item.part, parts = item.parts, "reply sent");
                        self.store.outbox_sent(item.seq).await
                    }
                    Err(e) => {
                        inc(&self.metrics.send_failures);
                        item.attempts += 1;
                        item.last_error = Some(e.to_string());
                        if item.attempts >= self.max_attempts {
                            item.failed = true;
                            error!(attempts = item.attempts, error = %e, "reply given up; listed in GET /api/outbox");
                        } else {
                            let wait = backoff(self.backoff, self.backoff_max, item.attempts);
                            warn!(attempt = item.attempts, error = %e, retry_in_ms = wait.as_millis() as u64, "send failed");
                            not_before.insert(item.conv.clone(), Instant::now() + wait);
                        }
                        self.store.outbox_update(&item).await
                    }
                };
                if let Err(e) = written {
                    error!(error = %e, "cannot record the send in the outbox");
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
