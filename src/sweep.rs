//! Background sweeps: dedup marks move from sled into the archive files;
//! message ids past the dedup window, expired contexts, and what retention
//! lets go (dead turns, given-up replies, history, receipts, held
//! deliveries) leave the disk.
//! Each runs in bounded chunks through the store's writer, so a large
//! sweep never makes one long group.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::store::Store;

/// Every `period` (`store.archive_every_s`: sled holds about this long of
/// marks, see store/archive.rs): moves the dedup marks retired since into
/// the archive, then forgets message ids retired more than `dedup_days` ago.
pub async fn dedup(store: Store, clock: Clock, dedup_days: u64, period: Duration, token: CancellationToken) {
    let keep_ms = dedup_days * 24 * 3600 * 1000;
    every(period, token, || {
        let store = store.clone();
        let cutoff = clock.now_ms().saturating_sub(keep_ms);
        async move {
            loop {
                match store.archive_dedup().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "archiving dedup marks failed; they stay in the store until the next try");
                        break;
                    }
                }
            }
            let mut forgotten = 0;
            loop {
                match store.expire_dedup(cutoff).await {
                    Ok(0) => break,
                    Ok(n) => forgotten += n,
                    Err(e) => {
                        warn!(error = %e, "dedup sweep failed");
                        break;
                    }
                }
            }
            if forgotten > 0 {
                info!(records = forgotten, "expired message ids removed from the dedup index");
            }
        }
    })
    .await
}

/// Removes expired contexts from disk (reads already ignore them).
pub async fn contexts(store: Store, clock: Clock, interval_ms: u64, token: CancellationToken) {
    every(Duration::from_millis(interval_ms), token, || {
        let store = store.clone();
        let now = clock.now_ms();
        async move {
            let mut removed = 0;
            loop {
                match store.expire_contexts(now).await {
                    Ok(swept) => {
                        for e in &swept.errors {
                            error!(error = %e, "context sweep met a damaged record; it stays until repaired");
                        }
                        removed += swept.removed;
                        if swept.removed == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "context sweep failed");
                        break;
                    }
                }
            }
            if removed > 0 {
                info!(removed, "expired contexts removed");
            }
        }
    })
    .await
}

/// Runs `job` now and then every `period` until `token` is cancelled.
async fn every<F: Future<Output = ()>>(
    period: Duration,
    token: CancellationToken,
    mut job: impl FnMut() -> F,
) {
    loop {
        tokio::select! {
            _ = job() => {}
            _ = token.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = token.cancelled() => return,
        }
    }
}

/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Removes, once an hour, what retention lets go: dead turns, given-up
/// reply pieces, old history (in chunks).
pub async fn retention(store: Store, clock: Clock, rules: RetentionDays, token: CancellationToken) {
    let day = 24 * 3600 * 1000;
    every(RETENTION_EVERY, token, || {
        let store = store.clone();
        let now = clock.now_ms();
        let (rules_quarantine, rules_failed) = (rules.quarantine, rules.failed);
        let rules = crate::store::Retention {
            dead_before: now.saturating_sub(rules.dead * day),
            failed_before: now.saturating_sub(rules.failed * day),
            history_before: now.saturating_sub(rules.history * day),
        };
        async move {
            let (mut total, mut from) = (crate::store::Expired::default(), None);
            loop {
                match store.expire_old(rules, from.take()).await {
                    Ok(e) => {
                        total.dead += e.dead;
                        total.failed += e.failed;
                        total.history += e.history;
                        match e.next {
                            Some(next) => from = Some(next),
                            None => break,
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "retention sweep failed");
                        break;
                    }
                }
            }
            let receipts_before = now.saturating_sub(rules_failed * day);
            let q = store.clone();
            match tokio::task::spawn_blocking(move || q.expire_receipts(receipts_before)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => info!(
                    receipts = n,
                    "retention: delivery receipts past gateway.failed_retention_days removed"
                ),
                Ok(Err(e)) => warn!(error = %e, "receipt retention failed"),
                Err(e) => warn!(error = %e, "receipt retention failed"),
            }
            let quarantine_before = now.saturating_sub(rules_quarantine * day);
            let q = store.clone();
            match tokio::task::spawn_blocking(move || q.expire_quarantined(quarantine_before)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => info!(
                    deliveries = n,
                    "retention: quarantined deliveries past ingest.quarantine_days removed"
                ),
                Ok(Err(e)) => warn!(error = %e, "quarantine retention failed"),
                Err(e) => warn!(error = %e, "quarantine retention failed"),
            }
            if total.dead + total.failed + total.history > 0 {
                info!(
                    dead_turns = total.dead,
                    outbox_failed = total.failed,
                    history = total.history,
                    "retention: old records removed"
                );
            }
        }
    })
    .await
}

/// How many days each kind of record is kept.
#[derive(Debug, Clone, Copy)]
pub struct RetentionDays {
    pub dead: u64,
    pub failed: u64,
    pub history: u64,
    /// Quarantined gateway deliveries.
    pub quarantine: u64,
}
